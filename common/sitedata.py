"""Read-only view of one site's prepared cache: the single data interface that local training, the ClientApp,
the centralized baseline and `predict` all use (in the spirit of FLamby's per-center dataset)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.acquisition import ATTRIBUTES, UNKNOWN, column
from common.errors import SpineFedError

INDEX_COLUMNS = ("patient_id", "key", "label", "status", "reason", "file")  # then common.acquisition.COLUMNS
LABELS = {"benign": 0, "malignant": 1}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
UNLABELLED = -1


def parse_label(text: str) -> int | None:
    """'benign'/'malignant' (any case, surrounding space ignored) → 0/1; '' → UNLABELLED; anything else → None."""
    value = (text or "").strip().lower()
    if not value:
        return UNLABELLED
    return LABELS.get(value)


@dataclass(frozen=True)
class SiteData:
    """The usable (status ok) patients of one prepared cache. Holds pseudonymous keys only, never patient_id."""

    cache: Path
    keys: tuple[str, ...]
    labels: np.ndarray  # int64: 0 benign, 1 malignant, -1 unlabelled
    files: tuple[Path, ...]
    site: str = ""
    # acquisition attribute → level per patient (aligned with keys); caches prepared before the columns existed
    # read as UNKNOWN throughout
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, cache: str | Path, site: str = "") -> SiteData:
        cache = Path(cache)
        index = cache / "index.csv"
        if not index.is_file():
            raise SpineFedError(f"{cache}: no prepared cache (index.csv missing); run `client prepare` first")
        keys, labels, files = [], [], []
        attributes: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
        with index.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("key", "label", "status", "file") if c not in (reader.fieldnames or [])]
            if missing:
                raise SpineFedError(f"{index}: column(s) {', '.join(missing)} missing; re-run `client prepare`")
            for row in reader:
                if row["status"] != "ok":
                    continue
                label = parse_label(row["label"])
                keys.append(row["key"])
                labels.append(UNLABELLED if label is None else label)
                files.append(cache / row["file"])
                for name, values in attributes.items():
                    values.append((row.get(column(name)) or "").strip() or UNKNOWN)
        attrs = {name: tuple(values) for name, values in attributes.items()}
        return cls(cache, tuple(keys), np.asarray(labels, dtype=np.int64), tuple(files), site, attrs)

    def __len__(self) -> int:
        return len(self.keys)

    def stack(self, i: int) -> np.ndarray:
        """The (6, S, S) float32 stack of patient i."""
        return np.load(self.files[i])

    def read_stack(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Patient i's stack, read into `out` when the file holds exactly out's shape and dtype (C order): one copy
        from the file into memory that is already there, instead of a fresh array and a second copy. Otherwise (no
        `out`, another size or dtype) a new array as `stack` returns it. Raises OSError/ValueError as np.load does."""
        if out is None:
            return self.stack(i)
        with open(self.files[i], "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return self.stack(i)
            if fortran or dtype != out.dtype or shape != out.shape or not out.flags.c_contiguous:
                return self.stack(i)
            view = memoryview(out).cast("B")
            if fh.readinto(view) != view.nbytes:
                raise ValueError("stack file is truncated")
        return out

    def labelled(self) -> np.ndarray:
        """Indices of patients with a benign/malignant label."""
        return np.flatnonzero(self.labels >= 0)

    @classmethod
    def concat(cls, parts: list[SiteData], site: str = "pooled") -> SiteData:
        """One view over several caches (centralized baselines, pretraining); stack paths are kept as they are."""
        if not parts:
            raise SpineFedError("no caches to pool")
        return cls(
            cache=parts[0].cache,
            keys=tuple(k for p in parts for k in p.keys),
            labels=np.concatenate([p.labels for p in parts]),
            files=tuple(f for p in parts for f in p.files),
            site=site,
            attributes={
                name: tuple(v for p in parts for v in p.attributes.get(name, (UNKNOWN,) * len(p)))
                for name in ATTRIBUTES
            },
        )

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == v).sum()) for name, v in LABELS.items()}
