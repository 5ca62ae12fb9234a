"""The malloc arena cap that keeps the daemon's RSS flat: applied by every `ctriage` command, overridable."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are a glibc feature")

# eight threads that malloc/free concurrently (ctypes calls run without the GIL), then glibc's per-arena report
PROBE = """
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def work():
    for _ in range(20000):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()
"""


def arenas(setup: str, env: dict | None = None) -> int:
    run_env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {})
    r = subprocess.run([sys.executable, "-c", setup + PROBE], capture_output=True, text=True, env=run_env, timeout=120)
    assert r.returncode == 0, r.stderr
    return sum(line.startswith("Arena ") for line in r.stderr.splitlines())


def test_ctriage_caps_arenas_for_the_threads_it_starts():
    cli = "from appliance.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    assert 1 <= arenas(cli) <= 2


def test_an_explicit_environment_setting_wins():
    from appliance.malloc import limit_arenas

    code = "import os\nfrom appliance.malloc import limit_arenas\nassert limit_arenas() is False\n"
    assert arenas(code, {"MALLOC_ARENA_MAX": "3"}) <= 3  # glibc applies the operator's value, not ours
    if "MALLOC_ARENA_MAX" not in os.environ:
        assert arenas("from appliance.malloc import limit_arenas\nassert limit_arenas() is True\n") <= 2
    else:
        assert limit_arenas() is False
