"""Site-side store of out-of-fold scores, on disk, so that folds run in separate messages or runs add up.

One JSON file per tag (an experiment/protocol name chosen by the coordinator) in the store folder, mapping each
patient key to its label, score, fold and the model that scored it (a protocol unit such as `fold-03`), so that each
patient is later called at its own model's threshold (chosen on inner-validation data and sent at report time). Writes are atomic (temporary file + rename) so a ClientApp process killed
mid-write leaves the previous version. The store holds pseudonymous keys only and never leaves the site: what leaves
is the aggregate the ClientApp computes from it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from common.fileio import atomic_write_text

_TAG = re.compile(r"[^A-Za-z0-9_.-]")


def default_folder(cache: Path) -> Path:
    """Next to the cache: `<cache>-evalstore` (the privacy ledger lives wherever site.yaml `privacy.ledger` says)."""
    cache = Path(cache)
    return cache.parent / f"{cache.name}-evalstore"


def threshold_of(entry: dict, by_model: dict[str, float] | None = None, default: float = 0.5) -> float:
    """The threshold one stored patient is called at: its own (set when it was scored), else its model's (sent at
    report time), else `default`. The one rule for every per-patient call (report, comparisons, readers)."""
    t = float(entry.get("threshold", -1.0))
    return t if t >= 0 else float((by_model or {}).get(entry.get("model", ""), default))


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

    def record(self, tag: str, keys, labels, scores, folds, model: str = "", threshold: float = -1.0) -> int:
        """Add scores; returns how many the tag now holds. `threshold` −1: to be set at report time by model."""
        entries = self.load(tag)
        for k, y, s, f in zip(keys, labels, scores, folds, strict=True):
            entries[str(k)] = {"label": int(y), "score": float(s), "fold": int(f), "model": str(model)}
            entries[str(k)]["threshold"] = float(threshold)
        self._write(self._path(tag), entries)
        return len(entries)

    def _write(self, path: Path, entries) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # keys of patients: site-local, owner only
        atomic_write_text(path, json.dumps(entries, sort_keys=True), mode=0o600)

    def log_usage(self, entry: dict) -> None:
        """Append one line to the site-local usage log: which keys a message trained, validated or tested on.

        The audit trail of "no patient in train and test of the same fold" (tests read it); never leaves the site.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        with (self.folder / "usage.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")

    def usage(self) -> list[dict]:
        path = self.folder / "usage.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def arrays(self, tag: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(keys, labels, scores, folds) of a tag, keys sorted."""
        entries = self.load(tag)
        keys = sorted(entries)
        labels = np.array([entries[k]["label"] for k in keys], dtype=np.int64)
        scores = np.array([entries[k]["score"] for k in keys], dtype=np.float64)
        folds = np.array([entries[k]["fold"] for k in keys], dtype=np.int64)
        return keys, labels, scores, folds

    def thresholds(self, tag: str, by_model: dict[str, float] | None = None, default: float = 0.5) -> np.ndarray:
        """Per-row thresholds (keys sorted, as `arrays`): the row's own, else its model's in `by_model`, else default."""
        entries = self.load(tag)
        return np.asarray([threshold_of(entries[k], by_model, default) for k in sorted(entries)], dtype=np.float64)
