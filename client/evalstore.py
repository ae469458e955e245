"""Site-side store of out-of-fold scores, on disk, so that folds run in separate messages or runs add up.

One JSON file per tag (an experiment/protocol name chosen by the coordinator) in the store folder, mapping each
patient key to its label, score and fold. Writes are atomic (temporary file + rename) so a ClientApp process killed
mid-write leaves the previous version. The store holds pseudonymous keys only and never leaves the site: what leaves
is the aggregate the ClientApp computes from it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

_TAG = re.compile(r"[^A-Za-z0-9_.-]")


def default_folder(cache: Path) -> Path:
    """Next to the cache, like the privacy ledger: `<cache>-evalstore`."""
    cache = Path(cache)
    return cache.parent / f"{cache.name}-evalstore"


class EvalStore:
    """Scores per tag; a later score for the same key and tag replaces the earlier one (a re-run fold)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, tag: str) -> Path:
        safe = _TAG.sub("_", tag)[:120] or "default"
        return self.folder / f"{safe}.json"

    def load(self, tag: str) -> dict[str, dict]:
        path = self._path(tag)
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def record(self, tag: str, keys, labels, scores, folds) -> int:
        """Add scores; returns how many the tag now holds."""
        entries = self.load(tag)
        for k, y, s, f in zip(keys, labels, scores, folds, strict=True):
            entries[str(k)] = {"label": int(y), "score": float(s), "fold": int(f)}
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # keys of patients: site-local, owner only
        path = self._path(tag)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entries, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(entries)

    def arrays(self, tag: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(keys, labels, scores, folds) of a tag, keys sorted."""
        entries = self.load(tag)
        keys = sorted(entries)
        labels = np.array([entries[k]["label"] for k in keys], dtype=np.int64)
        scores = np.array([entries[k]["score"] for k in keys], dtype=np.float64)
        folds = np.array([entries[k]["fold"] for k in keys], dtype=np.int64)
        return keys, labels, scores, folds
