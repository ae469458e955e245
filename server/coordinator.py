"""The coordinator's configuration (coordinator.yaml), its state folder, and the register of sites.

coordinator.yaml (relative paths resolve against its folder):

    name: spinefed                 # label only
    state_dir: state               # SuperLink database, FLWR_HOME, sites.json, SuperExec secret, nginx runtime files
    log_dir: logs                  # superlink.log, superexec.log, front-access.log, front-error.log, server.log
    runs_dir: runs                 # one output folder per experiment (checkpoint, rounds.csv, federation.json)
    superlink:
      port: 9091                   # loopback only (127.0.0.1): Fleet, Control and Runtime APIs, TLS (private CA)
      isolation: process           # process: SuperExec started by `server` with the auth secret; or subprocess
    front:
      host: 0.0.0.0                # what the sites reach: nginx, TLS, Fleet API paths only
      port: 9443
      certificate: certs/front.crt # chain the sites verify with their root certificate (SANs for every name used)
      key: certs/front.key
      nginx: nginx                 # the nginx binary (Debian package `nginx`)

The register (state_dir/sites.json) maps a site's name to the node id the SuperLink gave its public key and the key's
SHA-256, so that `server status` can speak in site names; the SuperLink itself knows only keys and node ids. A revoked
site keeps its entry with `revoked_at` (its key can never be registered again); re-registering the name with a new
key moves the old entry to the site's `revoked` history.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import SITE_NAME, Section, read_yaml
from common.errors import ConfigError, SpineFedError

HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")
CONNECTION = "coordinator"  # the FLWR_HOME connection name for the local Control API


@dataclass(frozen=True)
class CoordinatorConfig:
    file: Path
    name: str
    state_dir: Path
    log_dir: Path
    runs_dir: Path
    superlink_port: int
    isolation: str
    front_host: str
    front_port: int
    certificate: Path
    key: Path
    nginx: str

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr_home"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def secret_file(self) -> Path:
        return self.state_dir / "superexec.secret"

    @property
    def registry_file(self) -> Path:
        return self.state_dir / "sites.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "server.pid"

    @property
    def local_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Load and validate coordinator.yaml; errors name the file and the key."""
    path = Path(path).resolve()
    top = Section(read_yaml(path), path)
    link, front = top.section("superlink"), top.section("front")
    cfg = CoordinatorConfig(
        file=path,
        name=top.str("name", "spinefed", pattern=SITE_NAME),
        state_dir=top.path("state_dir", "state"),
        log_dir=top.path("log_dir", "logs"),
        runs_dir=top.path("runs_dir", "runs"),
        superlink_port=link.int("port", 9091, lo=1, hi=65535),
        isolation=link.choice("isolation", ("process", "subprocess"), "process"),
        front_host=front.str("host", "0.0.0.0", pattern=HOST),
        front_port=front.int("port", 9443, lo=1, hi=65535),
        certificate=front.path("certificate"),
        key=front.path("key"),
        nginx=front.str("nginx", "nginx"),
    )
    if cfg.front_port == cfg.superlink_port and cfg.front_host in ("127.0.0.1", "0.0.0.0", "localhost"):
        raise front.fail("port", f"a port other than superlink.port ({cfg.superlink_port})", cfg.front_port)
    for key, file in (("certificate", cfg.certificate), ("key", cfg.key)):
        if not file.is_file():
            raise ConfigError(f"{path}: key 'front.{key}': file not found: {file} (see deploy/make_certs.sh)")
    return cfg


def ensure_state(cfg: CoordinatorConfig) -> None:
    """Create the state and log folders (owner-only: the database and secret are the federation's keys)."""
    for folder in (cfg.state_dir, cfg.log_dir, cfg.runs_dir, cfg.flwr_home):
        folder.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)
    if not cfg.secret_file.is_file():
        fd = os.open(cfg.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32).hex().encode())


class SiteRegistry:
    """state_dir/sites.json: {name: {node_id, key_sha256, registered_at}}; written atomically."""

    def __init__(self, file: Path):
        self.file = Path(file)

    def load(self) -> dict[str, dict]:
        if not self.file.is_file():
            return {}
        try:
            return json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            raise SpineFedError(f"{self.file}: unreadable site register; restore it from a backup") from None

    def save(self, sites: dict[str, dict]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sites, indent=1, sort_keys=True))
        os.replace(tmp, self.file)

    def check_new(self, name: str, key_sha256: str) -> None:
        """Refuse a name or a key that is already registered (revoke it first)."""
        if not SITE_NAME.match(name):
            raise SpineFedError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        for other, info in self.load().items():
            if other == name and not info.get("revoked_at"):
                raise SpineFedError(f"site {name} is already registered (node {info['node_id']})")
            revoked = [r.get("key_sha256") for r in info.get("revoked", [])]
            revoked += [info.get("key_sha256")] if info.get("revoked_at") else []
            if key_sha256 in revoked:
                raise SpineFedError(f"this public key was revoked (site {other}); the site must make a new key "
                                    "with `client keygen --force`")  # fmt: skip
            if info.get("key_sha256") == key_sha256:
                raise SpineFedError(f"this public key is already registered for site {other}")

    def add(self, name: str, node_id: int, key_sha256: str) -> None:
        """Register (or re-register after a revocation, keeping the revoked entries as history)."""
        sites = self.load()
        history = []
        if name in sites and sites[name].get("revoked_at"):
            old = sites[name]
            history = old.pop("revoked", []) + [old]
        sites[name] = {"node_id": int(node_id), "key_sha256": key_sha256, "registered_at": time.time()}
        if history:
            sites[name]["revoked"] = history
        self.save(sites)

    def revoke(self, name: str) -> dict:
        """Mark a site revoked (its node id and key stay on record so the key cannot be registered again)."""
        sites = self.load()
        if name not in sites:
            raise SpineFedError(f"site {name} is not registered (see `server status`)")
        if sites[name].get("revoked_at"):
            raise SpineFedError(f"site {name} is already revoked")
        sites[name]["revoked_at"] = time.time()
        self.save(sites)
        return sites[name]

    def active(self) -> dict[str, dict]:
        """Registered sites that are not revoked."""
        return {name: info for name, info in self.load().items() if not info.get("revoked_at")}


def key_fingerprint(public_key_text: bytes) -> str:
    """SHA-256 of the OpenSSH public key's base64 body (comment and whitespace ignored)."""
    parts = public_key_text.split()
    body = parts[1] if len(parts) > 1 else public_key_text
    return hashlib.sha256(body).hexdigest()
