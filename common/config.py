"""Site configuration (site.yaml), validated once on load.

Errors name the file, the key and what is expected. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; a missing, unreadable or non-mapping file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


class Section:
    """Typed access to a YAML mapping that reports `file: key: expected ...` on bad values."""

    _MISSING = object()

    def __init__(self, data: dict, file: Path, prefix: str = ""):
        self.data, self.file, self.prefix = data, Path(file), prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, expected: str, got: Any = _MISSING) -> ConfigError:
        shown = "" if got is self._MISSING else f", got {got!r}"
        return ConfigError(f"{self.file}: key '{self._name(key)}': expected {expected}{shown}")

    def section(self, key: str) -> Section:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping", value)
        return Section(value, self.file, f"{self._name(key)}.")

    def require(self, key: str, expected: str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{self.file}: key '{self._name(key)}' is missing: expected {expected}")
        return self.data[key]

    def str(self, key: str, default: Any = _MISSING, pattern: re.Pattern | None = None) -> str:
        value = self.require(key, "a string") if default is self._MISSING else self.data.get(key, default)
        if value is None:
            return value
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.fail(key, "a string" + (f" matching {pattern.pattern}" if pattern else ""), value)
        return value

    def path(self, key: str, default: Any = _MISSING) -> Path | None:
        value = self.str(key, default)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.file.parent / p).resolve()

    def int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> int:
        value = self.require(key, "an integer") if default is self._MISSING else self.data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (lo is not None and value < lo)
            or (hi is not None and value > hi)
        ):
            raise self.fail(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def float(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None) -> float:
        value = self.require(key, "a number") if default is self._MISSING else self.data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (lo is not None and value < lo)
            or (hi is not None and value > hi)
        ):
            raise self.fail(key, f"a number in [{lo}, {hi}]", value)
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.require(key, "true or false") if default is self._MISSING else self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.str(key, default)
        if value not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), value)
        return value

    def list_of_str(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self.require(key, "a list of strings") if default is self._MISSING else self.data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings", value)
        return list(value)


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 224
    margin: float = 0.5


@dataclass(frozen=True)
class PrivacyConfig:
    dp: bool = False
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    ledger: Path | None = None


@dataclass(frozen=True)
class FederationConfig:
    superlink: str | None = None
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    approved_apps: list[str] = field(default_factory=list)
    log_file: Path | None = None  # the SuperNode's log (default: <cache>-supernode.log)
    local_port: int = 0  # the SuperNode's local ClientApp API port on 127.0.0.1 (0: a free one at start)


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's settings. Owned by the site; the coordinator can ask, never override."""

    file: Path
    site: str
    data_root: Path
    cache: Path
    secret: Path
    preprocess: PreprocessConfig = PreprocessConfig()
    train_device: str = "auto"
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    share_predictions: bool = False
    audit_log: Path | None = None
    workers: int = 0  # 0: one per CPU core

    @property
    def manifest(self) -> Path:
        return self.data_root / "manifest.csv"


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate site.yaml."""
    path = Path(path).resolve()
    top = Section(read_yaml(path), path)
    data = top.section("data")
    pre = top.section("preprocess")
    priv = top.section("privacy")
    fed = top.section("federation")
    train = top.section("train")
    cache = data.path("cache")
    privacy = PrivacyConfig(
        dp=priv.bool("dp", False),
        epsilon_budget=priv.float("epsilon_budget", 8.0, lo=1e-6),
        delta=priv.float("delta", 1e-5, lo=0.0, hi=0.1),
        max_grad_norm=priv.float("max_grad_norm", 1.0, lo=1e-6),
        ledger=priv.path("ledger", None) or (cache.parent / f"{cache.name}-privacy-ledger.json"),
    )
    return SiteConfig(
        file=path,
        site=top.str("site", pattern=SITE_NAME),
        data_root=data.path("root"),
        cache=cache,
        secret=data.path("secret"),
        preprocess=PreprocessConfig(
            size=pre.int("size", 224, lo=16, hi=1024), margin=pre.float("margin", 0.5, lo=0.0, hi=3.0)
        ),
        train_device=train.choice("device", ("auto", "cpu", "cuda", "mps"), "auto"),
        privacy=privacy,
        federation=FederationConfig(
            superlink=fed.str("superlink", None),
            root_certificates=fed.path("root_certificates", None),
            auth_private_key=fed.path("auth_private_key", None),
            approved_apps=fed.list_of_str("approved_apps", []),
            log_file=fed.path("log_file", None),
            local_port=fed.int("local_port", 0, lo=0, hi=65535),
        ),
        share_predictions=top.bool("share_predictions", False),
        audit_log=top.path("audit_log", None),
        workers=top.section("preprocess").int("workers", 0, lo=0, hi=256),
    )
