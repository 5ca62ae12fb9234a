"""The allocator setting: slice-sized buffers are reused instead of faulted in afresh on every use."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "on":
    from appliance.allocator import reuse_freed_buffers
    assert reuse_freed_buffers() and reuse_freed_buffers()  # idempotent
def use():
    batch = [np.empty((512, 512), np.float32) for _ in range(8)]  # a batch of slices, 1 MiB each
    for a in batch:
        a.fill(1.0)
    return sum(float(a[0, 0]) for a in batch)
use()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    use()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_slice_buffers_are_reused_without_page_faults():
    from appliance.allocator import reuse_freed_buffers

    if not reuse_freed_buffers():
        pytest.skip("this C library has no mallopt (not glibc)")
    off, on = _faults("off"), _faults("on")
    assert off >= 50 * 8 * 200  # freed batches go back to the OS; each new 1 MiB buffer faults in its 256 pages
    assert on < 100  # the same heap memory, already mapped
