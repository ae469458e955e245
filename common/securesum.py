"""Secure summation of small integer vectors (score histograms) across sites: the coordinator learns only the sum.

Pairwise additive masking with double masking (Bonawitz et al. 2017, "Practical Secure Aggregation", without its
secret-sharing dropout recovery). Each site holds an X25519 key pair for one protocol run; for one summation attempt
(run, summation id, attempt nonce) every pair of participants derives a shared key with HKDF-SHA256 over their X25519
secret, with that context as `info`, so no mask repeats across attempts or quantities. A participant sends

    y_i = x_i + PRG(seed_i) + Σ_{j: pk_j > pk_i} PRG(k_ij) − Σ_{j: pk_j < pk_i} PRG(k_ij)   (mod 2^32)

where PRG is the ChaCha20 keystream (never a numpy generator) and seed_i a fresh random self-mask seed. The pairwise
terms cancel in Σ y_i over all participants; the self masks are removed only with the seeds, which a site reveals in a
second step, and only when the coordinator announces that it received a vector from every participant (client side:
client/securesum.py). Without the seeds a partial or late set of vectors reveals nothing, so a dropout can never
yield two completed sums over site sets that differ by one site.

This module is the arithmetic only (no Flower, no files): keys, masks, unmasking and the checks on a result.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common import metrics as M
from common.errors import SpineFedError

MIN_PARTICIPANTS = 3  # a sum over two sites would tell each of them the other's vector
DTYPE = np.dtype("<u4")  # masked vectors travel as little-endian uint32; all arithmetic is mod 2^32
KEY_BYTES = 32


class SumRefused(SpineFedError):
    """A summation that cannot be used (bad spec, too few participants, a result out of range); says why."""


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def new_seed() -> bytes:
    return os.urandom(KEY_BYTES)


def context(run: str, sum_id: str, nonce: str) -> bytes:
    """HKDF `info` of one attempt of one summation: run ‖ summation (unit and quantity) ‖ attempt nonce."""
    return b"spinefed/securesum/v1\x00" + b"\x00".join(s.encode() for s in (run, sum_id, nonce))


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def keystream(key: bytes, size: int) -> np.ndarray:
    """`size` uint32 words of the ChaCha20 keystream under `key` (each key is used for one stream only)."""
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * size)), dtype=DTYPE).copy()


def pair_key(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, b"pair\x00" + info)


def self_mask(seed: bytes, info: bytes, size: int) -> np.ndarray:
    return keystream(_hkdf(seed, b"self\x00" + info), size)


def check_peers(peers: Sequence[bytes], own: bytes) -> None:
    """The participants a site is asked to mask with: distinct 32-byte keys, its own among them, at least three."""
    if any(len(p) != KEY_BYTES for p in peers):
        raise SumRefused("a participant's public key is not 32 bytes")
    if len(set(peers)) != len(peers):
        raise SumRefused("the participant list repeats a public key")
    if own not in peers:
        raise SumRefused("the participant list does not hold this site's key for the run")
    if len(peers) < MIN_PARTICIPANTS:
        raise SumRefused(f"{len(peers)} participant(s); a secure sum needs at least {MIN_PARTICIPANTS}")


def mask(vector, private: bytes, peers: Sequence[bytes], info: bytes, seed: bytes) -> np.ndarray:
    """This site's masked vector for one attempt (uint32). `vector`: non-negative integers below 2^32."""
    x = np.asarray(vector)
    if x.ndim != 1 or (x.size and (x.min() < 0 or x.max() >= 2**32)) or not np.all(x == np.round(x)):
        raise SumRefused("the vector to sum must be one row of non-negative integers below 2^32")
    own = public_key(private)
    check_peers(peers, own)
    y = x.astype(DTYPE) + self_mask(seed, info, x.size)
    for peer in peers:
        if peer == own:
            continue
        m = keystream(pair_key(private, peer, info), x.size)
        y = y + m if peer > own else y - m  # numpy uint32 arithmetic wraps: mod 2^32
    return y


def unmask(masked: Sequence[np.ndarray], seeds: Sequence[bytes], info: bytes) -> np.ndarray:
    """Σ x_i from every participant's masked vector and every participant's revealed self-mask seed (uint32)."""
    if not masked or len(masked) != len(seeds):
        raise SumRefused("a masked vector and a seed are needed from every participant")
    size = masked[0].size
    if any(m.dtype != DTYPE or m.shape != (size,) for m in masked):
        raise SumRefused("the masked vectors differ in type or length")
    total = np.zeros(size, dtype=DTYPE)
    for y in masked:
        total = total + y
    for seed in seeds:
        total = total - self_mask(seed, info, size)
    return total


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(str(text).encode("ascii"), validate=True)
    except ValueError:
        raise SumRefused("a key or vector in the summation is not base64") from None


def decode(data: bytes, size: int) -> np.ndarray:
    """A masked vector from the wire; refuses a wrong length."""
    if not isinstance(data, bytes) or len(data) != 4 * size:
        raise SumRefused(f"a masked vector must be {4 * size} bytes")
    return np.frombuffer(data, dtype=DTYPE).copy()


def histogram_sum(total: np.ndarray, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """The pooled (malignant, benign) histograms from a summed [pos ‖ neg] vector, after the sanity checks: every
    cell within [0, n] and each class's total equal to the participants' own counts (sent in the clear), else
    `SumRefused` with the reason (a wrong vector anywhere, or a participant whose input disagrees with its counts)."""
    counts = total.astype(np.int64)  # wrapped negatives read as values above 2^31: out of range below
    if counts.size % 2:
        raise SumRefused("a histogram sum must hold the malignant and the benign histogram")
    hp, hn = counts[: counts.size // 2], counts[counts.size // 2 :]
    n = n_pos + n_neg
    if counts.max(initial=0) > n:
        raise SumRefused(f"a pooled cell holds {int(counts.max())}, above the {n} patients summed")
    if int(hp.sum()) != n_pos or int(hn.sum()) != n_neg:
        raise SumRefused(
            f"the pooled histograms hold {int(hp.sum())} malignant and {int(hn.sum())} benign patients; the "
            f"participants counted {n_pos} and {n_neg}"
        )
    return hp, hn


def publish(hist, floor: int) -> np.ndarray:
    """The pooled histogram as published: adjacent cells merged until every published cell holds at least `floor`
    patients or none (the highest minimum cell count of the participants; common/metrics.suppress_small_cells)."""
    return M.suppress_small_cells(np.asarray(hist, dtype=np.float64), floor)


def fingerprint(vector) -> str:
    """A site-local digest of an input, to tell whether a repeated request sums the same input."""
    return hashlib.sha256(np.asarray(vector, dtype=np.int64).tobytes()).hexdigest()
