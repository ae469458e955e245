"""Crash-safe file writes: write a temporary file beside the target, fsync, then rename over it.

A reader therefore sees either the old complete file or the new complete file, never a half-written one.
`write_temp` + `commit` split the two halves, so that one process can write while another waits for the disk.
`mode` None (default): what a plain open() would give under the process umask (0600 under `server`/`client`, which set
umask 077, common/umask.py), not a fixed 0644 that would override it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from common.umask import default_file_mode


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, durable: bool = True) -> None:
    """`durable` False skips the fsync: still never half-written for readers and after a crashed process, but after
    a power loss the file may be empty; only for files that are rebuilt when unreadable (caches)."""
    tmp = write_temp(path, data, mode)
    commit([(tmp, Path(path))], durable)


def write_temp(path: Path, data: bytes, mode: int | None = None) -> str:
    """Write `data` to a new temporary file beside `path` (its name ends in .tmp) and return that file's path; the
    caller puts it in place with `commit`. Not yet durable: a worker process can write and go on while another
    process makes it durable (an fsync waits for the disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
    except BaseException:
        discard([(tmp, path)])
        raise
    return tmp


def commit(pairs: list[tuple[str, Path]], durable: bool = True) -> None:
    """Put temporary files in place, in order: each is fsynced (when durable) before it is renamed over its target,
    so that a reader, a crash or a power loss sees the old complete file or the new complete file. On an error, the
    temporary files not yet in place are removed."""
    for i, (tmp, path) in enumerate(pairs):
        try:
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            discard(pairs[i:])
            raise


def discard(pairs: list[tuple[str, Path]]) -> None:
    for tmp, _ in pairs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj, mode: int | None = None) -> None:
    atomic_write_text(path, json_text(obj), mode)


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"


def atomic_save_npy(path: Path, array: np.ndarray, mode: int = 0o600) -> None:
    atomic_write_bytes(path, npy_bytes(array), mode)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
