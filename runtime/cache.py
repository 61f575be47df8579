"""The cache folder's size: once its entries hold more than the limit, the least recently used go first.

An entry is what edgesd itself writes there: an ONNX Runtime optimised graph (`<name>.onnx` with its
`<name>.onnx.data`), one OpenVINO compiled-model blob (`openvino-<key>/<hash>.blob`) or one static-shape copy
of an IR graph that OpenVINO compiles from (`openvino-<key>/static-<key>.xml` with its `.bin`). Without a limit the
folder only grows: every re-export, every moved or deleted model leaves its copies behind (an SD 1.5 U-Net's
are about 1 GB, SDXL's about 10 GB). Files the folder holds that edgesd did not write are never touched, so
pointing --cache-dir at a shared folder is safe. Last use: a graph read from the cache has its times set
(`mark_used`); OpenVINO reads its blobs itself, so theirs is the file's access time, which a relatime mount
(Linux's default) updates at least once a day.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_GB = 20.0
# A staging folder (.partial-*) this old belongs to a run that was killed while writing an entry.
STALE_STAGING_S = 24 * 3600
_ORT_GRAPH = re.compile(r"[\w.+-]+-[0-9a-f]{16}-[0-9a-f]{16}\.onnx")
_OV_FOLDER = re.compile(r"openvino-[0-9a-f]{12}")
_OV_BLOB = re.compile(r"[0-9]+\.blob")
_OV_STATIC_COPY = re.compile(r"static-[0-9a-f]{16}\.xml")
# File times may be coarser than the clock (FAT: 2 s): an entry this close before `used_since` is this run's.
_CLOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class Entry:
    files: tuple[Path, ...]
    size: int  # bytes
    used: float  # the latest of its files' access and change times (seconds since the epoch)


def _stat_entry(files: list[Path]) -> Entry | None:
    try:
        stats = [f.stat() for f in files]
    except OSError:  # removed meanwhile (another process pruning)
        return None
    return Entry(tuple(files), sum(s.st_size for s in stats), max(max(s.st_atime, s.st_mtime) for s in stats))


def entries(folder: Path) -> list[Entry]:
    """Every entry edgesd wrote in `folder`."""
    found = []
    for path in folder.iterdir():
        if path.is_file() and _ORT_GRAPH.fullmatch(path.name):
            data = path.with_name(path.name + ".data")
            found.append(_stat_entry([path, data] if data.exists() else [path]))
        elif path.is_dir() and _OV_FOLDER.fullmatch(path.name):
            for file in path.iterdir():
                if _OV_BLOB.fullmatch(file.name):
                    found.append(_stat_entry([file]))
                elif _OV_STATIC_COPY.fullmatch(file.name):
                    found.append(_stat_entry([file, file.with_suffix(".bin")]))
    return [e for e in found if e is not None]


def mark_used(*files: Path) -> None:
    """Record that these files were just read (file systems mounted noatime or relatime may not)."""
    for f in files:
        try:
            os.utime(f)
        except OSError:
            pass


def prune(folder: Path, max_bytes: int, used_since: float) -> list[Path]:
    """Remove the least recently used entries until the folder's entries fit in `max_bytes`; entries used
    at or after `used_since` (this run's) stay even if they alone are larger. Returns the files removed."""
    removed: list[Path] = []
    for staging in [*folder.glob(".partial-*"), *folder.glob("openvino-*/.partial-*")]:
        try:
            stale = time.time() - staging.stat().st_mtime > STALE_STAGING_S
        except OSError:
            continue
        if stale and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif stale:
            staging.unlink(missing_ok=True)
    found = sorted(entries(folder), key=lambda e: e.used)
    total = sum(e.size for e in found)
    for entry in found:
        if total <= max_bytes or entry.used >= used_since - _CLOCK_SLACK_S:
            break
        for f in entry.files:
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
        total -= entry.size
    return removed
