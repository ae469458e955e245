"""Site configuration (site.yaml), validated once on load.

Errors name the file, the key and what is expected. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import urllib.parse
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
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no decimal point) as text; it is the number meant
            with contextlib.suppress(ValueError):
                value = float(value.strip())
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
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


# Site privacy policy defaults (deploy/site.yaml documents them). One experiment may spend at most this share of the
# site's lifetime budget unless the site sets privacy.max_epsilon_per_experiment itself.
EXPERIMENT_SHARE = 0.5
# Beyond this noise multiplier the released update is mostly noise (bench/dp_overhead.py, README accuracy vs ε): a task
# that needs more is refused rather than trained at the site's cost.
MAX_NOISE_MULTIPLIER = 10.0


@dataclass(frozen=True)
class PrivacyConfig:
    """The site's privacy settings (site.yaml `privacy:`). Nothing a coordinator sends can change them.

    ledger: the DP ledger, a path the site chooses outside the cache (required with dp). ledger_record: the small
    tamper-evident record of the ledger's history kept beside the site's key material (default: beside the pseudonym
    secret); a ledger that disagrees with it is refused (common/privacy.py). max_epsilon_per_experiment: the most ε one
    experiment may spend on its own (None: EXPERIMENT_SHARE × epsilon_budget). max_noise_multiplier: a task that needs
    more noise than this is refused. min_cell: the floor of every histogram cell a reply carries (an experiment may
    raise it, never lower it). class_weight: the malignant-class loss weight under DP, a public constant the site
    declares (1: none); without DP the experiment's `imbalance` applies. secure_pooling: the site's score histograms
    go into secure sums (common/securesum.py) where a summation has at least three participants; off, or with fewer,
    it sends them with its minimum cell count applied, as before.
    """

    dp: bool = False
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    ledger: Path | None = None
    ledger_record: Path | None = None
    max_epsilon_per_experiment: float | None = None
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER
    min_cell: int = 5
    class_weight: float = 1.0
    secure_pooling: bool = True

    @property
    def experiment_epsilon(self) -> float:
        """The most ε one experiment may spend at this site (never more than the whole budget)."""
        cap = self.max_epsilon_per_experiment
        return min(self.epsilon_budget, EXPERIMENT_SHARE * self.epsilon_budget if cap is None else cap)


@dataclass(frozen=True)
class FederationConfig:
    superlink: str | None = None
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    approved_apps: list[str] = field(default_factory=list)
    log_file: Path | None = None  # the SuperNode's log (default: <cache>-supernode.log)
    local_port: int = 0  # the SuperNode's local ClientApp API port on 127.0.0.1 (0: a free one at start)


DATA_SOURCES = ("folder", "dicomweb")


@dataclass(frozen=True)
class DicomWebSource:
    """`data.source: dicomweb`: pull each manifest patient's sagittal series from the PACS (client/pacs.py).

    url: the DICOMweb service root (QIDO-RS and WADO-RS below it). auth_file: one line, `user:password` (HTTP basic)
    or `Bearer <token>`; owner-only, read only when the PACS is contacted, never logged. ca_bundle: the CA certificates
    that verify the PACS's TLS certificate (None: the system's). store: the local DICOM folder the fetch fills
    (owner-only); `client prepare` prepares from it as it would from data.root.
    """

    url: str
    auth_file: Path
    store: Path
    ca_bundle: Path | None = None


# A NO_PROXY entry: a host name, a domain (`.example.org` for its subdomains only), an IP address or `*`.
NO_PROXY_ENTRY = re.compile(r"^(\*|\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*|[0-9A-Fa-f:.]+|\[[0-9A-Fa-f:.]+\])$")


@dataclass(frozen=True)
class NetworkConfig:
    """How the SuperNode and `client check` reach the coordinator (site.yaml `network:`).

    proxy: the hospital's web proxy, `http://host:port`, without credentials; it replaces HTTPS_PROXY/https_proxy
    from the environment (site.yaml wins). proxy_auth_file: an owner-only file holding `user:password` for the proxy's
    basic authentication, read only when a connection is made and never logged; credentials in the URL itself are
    refused so that site.yaml (copied into tickets, backups, configuration management) never holds a secret.
    no_proxy: hosts reached directly, replacing NO_PROXY from the environment (None: the environment's); loopback is
    always direct.
    """

    proxy: str | None = None
    proxy_auth_file: Path | None = None
    no_proxy: tuple[str, ...] | None = None

    @property
    def proxy_hostport(self) -> tuple[str, int] | None:
        if not self.proxy:
            return None
        parts = urllib.parse.urlsplit(self.proxy)
        return parts.hostname or "", parts.port or 0

    def proxy_credentials(self, file: Path) -> tuple[str, str] | None:
        """(user, password) from proxy_auth_file, checked here because it is read at use, not at load: owner-only,
        one `user:password` line. `file` is site.yaml, named in errors; the file's content never is."""
        path = self.proxy_auth_file
        if path is None:
            return None
        key = "key 'network.proxy_auth_file'"
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{file}: {key}: {path} not found (a file holding user:password)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: {key}: cannot read {path} ({exc.__class__.__name__})") from None
        if mode & 0o077:
            raise ConfigError(f"{file}: {key}: {path} is readable by others; run `chmod 600 {path}`")
        lines = [line for line in text.splitlines() if line.strip()]
        user, sep, password = (lines[0].strip() if len(lines) == 1 else "").partition(":")
        if not (sep and user and password):
            raise ConfigError(f"{file}: {key}: {path} must hold one line `user:password` (user and password "
                              "not empty)")  # fmt: skip
        return user, password


def _network(net: Section) -> NetworkConfig:
    proxy = net.str("proxy", None)
    if proxy is not None:
        parts = urllib.parse.urlsplit(proxy.strip())
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"{net.file}: key 'network.proxy': credentials do not belong in site.yaml; write `user:password` into "
                "an owner-only file (chmod 600) and name it in network.proxy_auth_file"
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or not port or parts.path not in ("", "/") or parts.query:
            raise net.fail("proxy", "http://HOST:PORT (the hospital's web proxy, e.g. http://proxy.hospital:3128)",
                           proxy)  # fmt: skip
        proxy = f"http://{parts.netloc}"
    auth_file = net.path("proxy_auth_file", None)
    if auth_file is not None and proxy is None:
        raise net.fail("proxy_auth_file", "to be set together with network.proxy (the proxy these credentials are for)")
    no_proxy = net.data.get("no_proxy")
    if no_proxy is not None:
        entries = no_proxy.split(",") if isinstance(no_proxy, str) else no_proxy
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise net.fail("no_proxy", "a list of host names, domains or IP addresses", no_proxy)
        entries = [e.strip() for e in entries if e.strip()]
        bad = [e for e in entries if not NO_PROXY_ENTRY.match(e)]
        if bad:
            raise net.fail("no_proxy", "host names, domains (.example.org) or IP addresses", bad[0])
        no_proxy = tuple(entries)
    return NetworkConfig(proxy=proxy, proxy_auth_file=auth_file, no_proxy=no_proxy)


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
    network: NetworkConfig = NetworkConfig()
    share_predictions: bool = False
    audit_log: Path | None = None
    workers: int = 0  # 0: one per CPU core
    dicomweb: DicomWebSource | None = None  # data.source dicomweb; None: data.source folder (DICOM below data.root)
    manifest_file: Path | None = None  # set by `for_prepare` only: manifest.csv stays in data.root

    @property
    def manifest(self) -> Path:
        return self.manifest_file or self.data_root / "manifest.csv"

    def for_prepare(self) -> SiteConfig:
        """The config `common.prepare.prepare` works on: with a DICOMweb source the store is the DICOM tree it scans
        (manifest.csv still read from data.root); with a folder source, this config."""
        if self.dicomweb is None:
            return self
        return dataclasses.replace(self, data_root=self.dicomweb.store, manifest_file=self.manifest)


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
    secret = data.path("secret")
    privacy = _privacy(priv, cache, secret)
    return SiteConfig(
        file=path,
        site=top.str("site", pattern=SITE_NAME),
        data_root=data.path("root"),
        cache=cache,
        secret=secret,
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
        network=_network(top.section("network")),
        share_predictions=top.bool("share_predictions", False),
        audit_log=top.path("audit_log", None),
        workers=top.section("preprocess").int("workers", 0, lo=0, hi=256),
        dicomweb=_data_source(data, cache),
    )


def _data_source(data: Section, cache: Path) -> DicomWebSource | None:
    """data.source: `folder` (default: the DICOM tree below data.root) or `dicomweb` with its url, auth_file, store
    and optional ca_bundle. The auth file itself is read (and its permissions checked) only when the PACS is
    contacted (client/pacs.py), so that a config with a misplaced secret still loads for `client check` to report."""
    source = data.choice("source", DATA_SOURCES, "folder")
    extra = [k for k in ("url", "auth_file", "ca_bundle", "store") if data.data.get(k) is not None]
    if source == "folder":
        if extra:
            raise data.fail("source", f"dicomweb where {', '.join('data.' + k for k in extra)} is set", source)
        return None
    url = data.str("url")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise data.fail("url", "the DICOMweb service's http(s):// URL (e.g. https://pacs.hospital/dicom-web)", url)
    if parts.username or parts.password:
        raise data.fail("url", "a URL without user or password (put them in data.auth_file, owner-only)", url)
    if parts.query or parts.fragment:
        raise data.fail("url", "a URL without ?query or #fragment", url)
    store = data.path("store")
    if store == cache or cache in store.parents or store in cache.parents:
        raise data.fail(
            "store", f"a folder apart from data.cache ({cache}): re-preparing rewrites the cache", str(store)
        )
    return DicomWebSource(
        url=url.rstrip("/"), auth_file=data.path("auth_file"), store=store, ca_bundle=data.path("ca_bundle", None)
    )


def _privacy(priv: Section, cache: Path, secret: Path) -> PrivacyConfig:
    dp = priv.bool("dp", False)
    budget = priv.float("epsilon_budget", 8.0, lo=1e-6)
    ledger = priv.path("ledger", None)
    if dp and ledger is None:
        raise ConfigError(
            f"{priv.file}: key 'privacy.ledger' is missing: with privacy.dp on, name the file that records every DP "
            "step taken on this site's data, outside the cache folder (e.g. /var/lib/spinefed/privacy/ledger.json), "
            "and back it up with the pseudonym secret after every experiment"
        )
    if ledger is not None and (ledger == cache or cache in ledger.parents):
        raise ConfigError(
            f"{priv.file}: key 'privacy.ledger': {ledger} lies inside the cache folder {cache}; re-preparing or "
            "moving the cache would lose it. Put it outside (e.g. beside the pseudonym secret)"
        )
    # Default beside the pseudonym secret, named after it: sites that keep their secrets in one folder stay apart.
    record = priv.path("ledger_record", None) or secret.with_name(f"{secret.stem}-privacy-record.json")
    per_experiment = None
    if priv.data.get("max_epsilon_per_experiment") is not None:
        per_experiment = priv.float("max_epsilon_per_experiment", lo=1e-6)
    if per_experiment is not None and per_experiment > budget:
        raise priv.fail("max_epsilon_per_experiment", f"a number <= epsilon_budget ({budget:g})", per_experiment)
    return PrivacyConfig(
        dp=dp,
        epsilon_budget=budget,
        delta=priv.float("delta", 1e-5, lo=1e-12, hi=0.1),
        max_grad_norm=priv.float("max_grad_norm", 1.0, lo=1e-6),
        ledger=ledger,
        ledger_record=record,
        max_epsilon_per_experiment=per_experiment,
        max_noise_multiplier=priv.float("max_noise_multiplier", MAX_NOISE_MULTIPLIER, lo=0.1, hi=1000.0),
        min_cell=priv.int("min_cell", 5, lo=1, hi=1000),
        class_weight=priv.float("class_weight", 1.0, lo=0.01, hi=100.0),
        secure_pooling=priv.bool("secure_pooling", True),
    )
