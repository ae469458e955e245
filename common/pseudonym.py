"""Per-site pseudonyms: key = HMAC-SHA256(site secret, patient_id), truncated.

The secret is created once, kept outside the cache with owner-only permissions, and never leaves the site: without
it a key cannot be linked back to a patient, with it the site can re-identify its own patients.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from common.errors import ConfigError

KEY_HEX = 20  # 80 bits: collisions are negligible for any hospital's cohort


def load_or_create_secret(path: Path) -> bytes:
    """Read the site secret, creating it (owner-only, atomically) on first use."""
    path = Path(path)
    if path.exists():
        try:
            text = path.read_text().strip()
            secret = bytes.fromhex(text)
        except (OSError, ValueError):
            raise ConfigError(f"{path}: pseudonym secret is unreadable or not hex; restore it from backup") from None
        if len(secret) < 16:
            raise ConfigError(f"{path}: pseudonym secret is too short; restore it from backup")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return load_or_create_secret(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    return secret


def pseudonym(secret: bytes, patient_id: str) -> str:
    return hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_HEX]
