"""Analysed slices back from disk: where a slice's file is now (processed/, or still in the spool), and the slice
rendered with its boxes — the overlay's key image and the PACS key image."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.domain import SliceFinding
from appliance.ingest.dicom_reader import read_slice


class SourceImages:
    def __init__(self, cfg: Any, store: Any, spool: Any) -> None:
        self.cfg, self.store, self.spool = cfg, store, spool

    def path(self, ident: str) -> Path | None:
        """Where the analysed file of a slice is now: processed/, or still in the spool after a crash before the
        move; None once pruned (watch.keep_processed_days)."""
        stored = self.store.file_path(ident)
        if not stored:
            return None
        for p in (Path(stored), self.spool.dir / Path(stored).name):
            if p.is_file():
                return p
        return None

    def key_image(self, findings: list[SliceFinding], index: int, result: str, state: str,
                  max_size: int, words: bool = True) -> tuple[bytes | None, tuple[int, int] | None]:
        """The slice with its boxes; words: the slice number and verdict burned in (PACS key image). The display's
        key image goes without (the display writes its caption itself, legible at tile size)."""
        from appliance.publish.overlays import png_bytes, render, slice_grey

        f = findings[index]
        path = self.path(f.key)
        if path is None:
            return None, None
        img = read_slice(path, max_tilt_deg=self.cfg.analysis.max_tilt_deg)
        text = f"slice {index + 1}/{len(findings)}  {result.upper()} ({state})"
        im = render(slice_grey(img.hu, None), f, title=text, max_size=max_size, text=words)
        return png_bytes(im), (im.width, im.height)
