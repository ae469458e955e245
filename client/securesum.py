"""The site's side of secure summation (common/securesum.py): its key for the run, its inputs and what it released.

State lives beside the evaluation store (`<evalstore>/securesum/`, owner-only) so that it survives between messages:
- `<run>.key`: the site's X25519 private key for one protocol run (its public key rides on the membership reply);
- one record per summation (run, summation id): the exact input vector, each attempt's participants and self-mask
  seed, and how the input was released.

The rule that keeps a dropout from leaking: each input is released once, in one form. A self-mask seed is revealed
only when the coordinator announces that it received a masked vector from every participant of that attempt; after
that, only the same participants summing the same input again (a coordinator resuming after a crash) get a seed, and
the input is never sent in the clear. An input sent in the clear (the fallback: minimum cell count applied) never
enters a completed sum. A masked vector without its seed reveals nothing, so sending one to a failed attempt is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from common import metrics as M
from common import securesum as S
from common.fileio import atomic_write_bytes, atomic_write_json

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SiteSums:
    """One site's secure-summation state for one protocol run."""

    def __init__(self, evalstore: Path, run: str):
        if not run or len(run) > 200:
            raise S.SumRefused("the summation names no run")
        self.run = run
        self.folder = Path(evalstore) / "securesum"
        self._key_path = self.folder / f"{_SAFE.sub('_', run)[:80]}-{_digest(run)[:16]}.key"

    # ----- the run key -------------------------------------------------------------------------------------------
    def _private(self) -> bytes:
        if self._key_path.is_file():
            data = self._key_path.read_bytes()
            if len(data) == S.KEY_BYTES:
                return data
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        key = S.new_private_key()
        atomic_write_bytes(self._key_path, key, 0o600)
        return key

    def public_key(self) -> bytes:
        return S.public_key(self._private())

    # ----- records -----------------------------------------------------------------------------------------------
    def _path(self, sum_id: str) -> Path:
        return self.folder / f"{_digest(self.run + chr(0) + sum_id)[:40]}.json"

    def _load(self, sum_id: str) -> dict:
        path = self._path(sum_id)
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {"id": sum_id, "vector": None, "attempts": {}, "released": None}

    def _save(self, sum_id: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._path(sum_id), record, 0o600)

    def keep(self, sum_id: str, vector) -> None:
        """Store this site's input (e.g. a validation histogram) for a summation; a changed input after a release is
        kept apart: it may go out in the clear but never into a sum (that would difference two inputs)."""
        record = self._load(sum_id)
        values = [int(v) for v in np.asarray(vector).tolist()]
        if record["released"] and record["vector"] != values:
            record["changed"] = values
        else:
            record["vector"] = values
            record.pop("changed", None)
        self._save(sum_id, record)

    # ----- the three steps -----------------------------------------------------------------------------------------
    def contribute(self, spec: dict) -> bytes:
        """This site's masked input for one attempt (`spec`: id, nonce, peers as base64 public keys)."""
        sum_id, nonce = str(spec.get("id", "")), str(spec.get("nonce", ""))
        if not sum_id or len(nonce) < 16:
            raise S.SumRefused("the summation has no id or a nonce shorter than 16 characters")
        record = self._load(sum_id)
        if record["vector"] is None:
            raise S.SumRefused("this site holds no input for that summation")
        if record.get("changed") is not None:
            raise S.SumRefused("this site's input changed after it was released; it is not summed again")
        peers = [S.unb64(p) for p in spec.get("peers", [])]
        private = self._private()
        if nonce in record["attempts"]:
            raise S.SumRefused("that attempt nonce was used before; masks are never reused")
        seed = S.new_seed()
        masked = S.mask(record["vector"], private, peers, S.context(self.run, sum_id, nonce), seed)
        record["attempts"][nonce] = {"peers": sorted(S.b64(p) for p in peers), "seed": seed.hex()}
        self._save(sum_id, record)
        return masked.tobytes()

    def reveal(self, sum_id: str, nonce: str, received) -> bytes:
        """The self-mask seed of one attempt, when the coordinator received a vector from every participant."""
        record = self._load(sum_id)
        attempt = record["attempts"].get(nonce)
        if attempt is None:
            raise S.SumRefused("this site sent no vector to that attempt")
        if sorted(str(r) for r in received) != attempt["peers"]:
            raise S.SumRefused("the coordinator received vectors from other sites than the attempt's participants")
        released = record["released"]
        if released and (released["how"] != "sum" or released["peers"] != attempt["peers"]):
            raise S.SumRefused(f"this input was released before ({_released(released)})")
        record["released"] = {"how": "sum", "peers": attempt["peers"]}
        self._save(sum_id, record)
        return bytes.fromhex(attempt["seed"])

    def clear(self, sum_id: str, min_cell: int) -> list[float]:
        """The fallback: the input in the clear with the site's minimum cell count applied to each half."""
        record = self._load(sum_id)
        values = record.get("changed") or record["vector"]
        if values is None:
            raise S.SumRefused("this site holds no input for that summation")
        released = record["released"]
        if released and released["how"] == "sum" and record.get("changed") is None:
            raise S.SumRefused(f"this input was released before ({_released(released)})")
        record["released"] = released or {"how": "clear"}
        self._save(sum_id, record)
        return suppressed(values, min_cell)


def suppressed(values, min_cell: int) -> list[float]:
    """[malignant ‖ benign] histograms on the usual 100-bin grid with the minimum cell count applied to each (what
    leaves without a sum; a finer validation grid is summed into it first)."""
    v = np.asarray(values, dtype=np.float64)
    half = v.size // 2
    parts = (M.regrid(v[:half], M.N_HIST_BINS), M.regrid(v[half:], M.N_HIST_BINS))
    return [float(x) for part in parts for x in M.suppress_small_cells(part, min_cell)]


def _released(released: dict) -> str:
    return "in a completed sum" if released["how"] == "sum" else "in the clear"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
