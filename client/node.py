"""The hospital's SuperNode: key pair, readiness checks, and the `flower-supernode` process.

- Key pair: ECDSA P-384, made at the site (OpenSSH format, which `flower-supernode --auth-supernode-private-key`
  reads); the private key is owner-only and never travels, the `.pub` goes to the coordinator
  (`server register-site NAME KEY.pub`).
- The SuperNode only connects outwards (HTTPS to the coordinator's front, verified with the site's root
  certificate); its local ClientApp API listens on 127.0.0.1 only. The hospital's web proxy: site.yaml's
  network.proxy (basic auth from network.proxy_auth_file) or else HTTPS_PROXY, as Flower's httpx client reads it
  (`supernode_proxy_env`); loopback is always direct. Flower retries a lost connection with exponential backoff, without
  limit (no `--max-retries` / `--max-wait-time`), which is what a hospital service wants.
- The node config `site-config` tells the ClientApp which site.yaml this node serves (client/tasks.py).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from client.launcher import ENV_CONFIG
from common.config import SiteConfig
from common.errors import SpineFedError
from common.processes import flwr_env, stop, stop_group


def private_key_path(cfg: SiteConfig) -> Path:
    """federation.auth_private_key, default `supernode.key` beside site.yaml."""
    return cfg.federation.auth_private_key or cfg.file.parent / "supernode.key"


def log_path(cfg: SiteConfig) -> Path:
    return cfg.federation.log_file or cfg.cache.parent / f"{cfg.cache.name}-supernode.log"


def keygen(cfg: SiteConfig, force: bool = False) -> tuple[Path, str]:
    """Make the site's key pair; (private key path, public key line). Refuses to overwrite unless `force`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = private_key_path(cfg)
    pub = path.with_name(path.name + ".pub")
    if path.exists() and not force:
        if pub.is_file():
            return path, pub.read_text().strip()
        raise SpineFedError(f"{path} exists but {pub} does not; move the key away or use --force to make a new one")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} spinefed-{cfg.site}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    pub.write_text(line + "\n")
    return path, line


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(cfg: SiteConfig) -> list[str]:
    """The `flower-supernode` command line for this site (see the module docstring for each choice)."""
    fed = cfg.federation
    port = fed.local_port or _free_local_port()
    # Flower's flower-supernode, through the site's launcher (client/launcher.py `supernode_main`: prompter polling).
    cmd = [sys.executable, "-m", "client.launcher", "supernode", "--superlink", str(fed.superlink)]
    cmd += [
        "--root-certificates",
        str(fed.root_certificates),
        "--auth-supernode-private-key",
        str(private_key_path(cfg)),
    ]
    cmd += ["--node-config", f'site-config="{cfg.file}"', "--host", "127.0.0.1", "--port", str(port)]
    # Process isolation: the SuperNode runs no app code; the site's own launcher (client/launcher.py) starts the
    # ClientApps and checks each app bundle against federation.approved_apps before any of its code runs.
    return cmd + ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret(cfg))]


def superexec_secret(cfg: SiteConfig) -> Path:
    """The SuperNode ↔ launcher shared secret (owner-only, made once beside the cache)."""
    path = cfg.cache.parent / f"{cfg.cache.name}-superexec.secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32).hex().encode())
    return path


def launcher_command(cfg: SiteConfig, supernode: list[str], parent_pid: int) -> list[str]:
    """The site's launcher (client/launcher.py: Flower's SuperExec + approval gate) for a SuperNode command line."""
    port = supernode[supernode.index("--port") + 1]
    return [sys.executable, "-m", "client.launcher", "superexec", "--runtime-api-address", f"127.0.0.1:{port}",
            "--insecure", "--superexec-auth-secret-file", str(superexec_secret(cfg)),
            "--parent-pid", str(parent_pid)]  # fmt: skip


def require_ready(cfg: SiteConfig) -> None:
    """What must hold before the SuperNode starts; each failure says how to fix it."""
    fed = cfg.federation
    if not fed.superlink:
        raise SpineFedError(f"{cfg.file}: key 'federation.superlink' is missing: the coordinator's host:port")
    if not fed.root_certificates or not fed.root_certificates.is_file():
        raise SpineFedError(
            f"{cfg.file}: key 'federation.root_certificates': the coordinator's CA certificate file is missing"
            + (f" ({fed.root_certificates})" if fed.root_certificates else "")
        )
    cfg.network.proxy_credentials(cfg.file)  # an unusable proxy_auth_file stops here, not in the SuperNode's log
    key = private_key_path(cfg)
    if not key.is_file():
        raise SpineFedError(f"{key}: no private key; run `client keygen --config {cfg.file}` and send the .pub")
    if key.stat().st_mode & 0o077:
        raise SpineFedError(f"{key}: readable by others; run `chmod 600 {key}`")
    index = cfg.cache / "index.csv"
    if not index.is_file():
        raise SpineFedError(f"{cfg.cache}: not prepared; run `client prepare --config {cfg.file}` first")
    with index.open(encoding="utf-8") as fh:
        if not any(",ok," in line for line in fh):
            raise SpineFedError(f"{index}: no usable patient; see its reasons, fix, and run `client prepare` again")


# --- checks -----------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    what: str
    ok: bool
    detail: str
    warn: bool = False

    def line(self) -> str:
        tag = "WARN" if (self.ok and self.warn) else ("OK" if self.ok else "FAIL")
        return f"{tag:4s}  {self.what}: {self.detail}"


# --- the hospital's web proxy ---------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # always reached directly (common/processes.py `flwr_env` too)
ENV_PROXY_AUTH = "SPINEFED_PROXY_AUTH"  # set to 1 for the SuperNode: the launcher adds network.proxy_auth_file's


@dataclass(frozen=True)
class ProxyRoute:
    """How this site reaches a host: through `url` (http://host:port, never with credentials) or directly (None).

    source: where the proxy came from ("network.proxy in site.yaml", "HTTPS_PROXY in the environment") or, when
    direct, why. auth: (user, password) for Proxy-Authorization, from auth_source; never printed."""

    url: str | None
    source: str
    auth: tuple[str, str] | None = field(default=None, repr=False)
    auth_source: str = ""

    @property
    def hostport(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.url or "")
        return parts.hostname or "", parts.port or 80

    def describe(self) -> str:
        if self.url is None:
            return f"directly ({self.source})"
        return f"through proxy {self.url} ({self.source}" + (f", basic auth from {self.auth_source})" if self.auth
                                                              else ", no authentication)")  # fmt: skip


def _bypassed(host: str, entries) -> bool:
    """NO_PROXY as the SuperNode's httpx applies it: `*`; an IP address or localhost exactly; `.example.org` its
    subdomains only; `example.org` itself and its subdomains."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in entries):
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.strip("[]")
        if entry == "localhost" or entry.replace(".", "").isdigit() or ":" in entry:
            if host == entry:
                return True
        elif entry.startswith("."):
            if host.endswith(entry):
                return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_route(cfg: SiteConfig, host: str) -> ProxyRoute:
    """The route to `host`: network.proxy / network.no_proxy in site.yaml where set, else HTTPS_PROXY (or ALL_PROXY)
    and NO_PROXY from the environment, as the SuperNode will see them. Loopback is always direct. Raises ConfigError
    for an unusable proxy_auth_file, SpineFedError for an environment proxy this check cannot use."""
    net = cfg.network
    env = urllib.request.getproxies_environment()  # what httpx reads (lower case wins over upper, as there)
    no_proxy = [*(net.no_proxy if net.no_proxy is not None else env.get("no", "").split(",")), *LOOPBACK]
    if net.proxy:
        url, source = net.proxy, "network.proxy in site.yaml"
    else:
        url = env.get("https") or env.get("all")
        source = "HTTPS_PROXY in the environment" if env.get("https") else "ALL_PROXY in the environment"
    if not url:
        return ProxyRoute(None, "no proxy configured")
    if _bypassed(host, no_proxy):
        where = "network.no_proxy" if net.no_proxy is not None else "NO_PROXY"
        return ProxyRoute(None, f"{host} is in {where}" if host not in LOOPBACK else "loopback")
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise SpineFedError(f"{source}: expected http://HOST:PORT, got a {parts.scheme or 'malformed'} URL")
    bare = f"http://{parts.hostname if ':' not in parts.hostname else '[' + parts.hostname + ']'}:{parts.port or 80}"
    if net.proxy:
        auth = net.proxy_credentials(cfg.file)
        return ProxyRoute(bare, source, auth, str(net.proxy_auth_file) if auth else "")
    if parts.username is not None:  # the standard way outside site.yaml: user:password in HTTPS_PROXY itself
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        return ProxyRoute(bare, source, auth, source.split(" ")[0])
    return ProxyRoute(bare, source)


def supernode_proxy_env(cfg: SiteConfig, with_credentials: bool = False) -> dict[str, str]:
    """What the SuperNode's environment needs so that its Fleet client (httpx, which reads https_proxy/no_proxy;
    Flower 1.42's SuperNode speaks protobuf over HTTPS, not gRPC) takes site.yaml's route: both spellings, because
    a lower-case variable inherited from the shell would otherwise win. Credentials are added only with
    `with_credentials`, which the SuperNode's own process does at start (client/launcher.py): they are never on a
    command line, in a log, or in the environment of `client`, the launcher or a ClientApp."""
    net, env = cfg.network, {}
    if net.proxy:
        url = net.proxy
        auth = net.proxy_credentials(cfg.file) if with_credentials else None
        if auth:
            user, password = (urllib.parse.quote(v, safe="") for v in auth)
            url = url.replace("http://", f"http://{user}:{password}@", 1)
        env["HTTPS_PROXY"] = env["https_proxy"] = url
        if net.proxy_auth_file and not with_credentials:
            env[ENV_PROXY_AUTH] = "1"
    if net.no_proxy is not None:
        env["NO_PROXY"] = env["no_proxy"] = ",".join(dict.fromkeys([*net.no_proxy, *LOOPBACK]))
    return env


class ProxyFailure(OSError):
    """The proxy did not open the tunnel; the message names the proxy, what happened and what to fix."""


def _fix(route: ProxyRoute) -> str:
    return "network.proxy in site.yaml" if route.source.startswith("network.proxy") else route.source


def _open_tunnel(route: ProxyRoute, host: str, port: int, timeout: float) -> tuple[socket.socket, str]:
    """A socket to host:port through the proxy's CONNECT (with Proxy-Authorization where configured), and the
    proxy's status line."""
    phost, pport = route.hostport
    try:
        raw = socket.create_connection((phost, pport), timeout=timeout)
    except ConnectionRefusedError:
        raise ProxyFailure(f"proxy {route.url} refused the connection (nothing listens on {phost}:{pport}): check "
                           f"{_fix(route)} with the hospital's network team") from None  # fmt: skip
    except socket.gaierror:
        raise ProxyFailure(f"proxy {route.url}: the host name {phost} does not resolve: check {_fix(route)}") from None
    except TimeoutError:
        raise ProxyFailure(f"proxy {route.url} did not answer within {timeout:.0f} s (unreachable, or a firewall "
                           f"drops the connection): check {_fix(route)}") from None  # fmt: skip
    except OSError as exc:
        raise ProxyFailure(f"proxy {route.url} unreachable ({exc.strerror or exc}): check {_fix(route)}") from None
    target = f"{host if ':' not in host else '[' + host + ']'}:{port}"
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if route.auth:
        token = base64.b64encode(f"{route.auth[0]}:{route.auth[1]}".encode()).decode()
        request += f"Proxy-Authorization: Basic {token}\r\n"
    try:
        raw.sendall((request + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:  # nothing follows it until our TLS hello
            chunk = raw.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError as exc:
        raw.close()
        raise ProxyFailure(
            f"proxy {route.url} closed the connection during CONNECT ({exc.__class__.__name__})"
        ) from None
    line = head.split(b"\r\n", 1)[0].decode(errors="replace").strip()
    parts = line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status == 200:
        return raw, line
    raw.close()
    if status in (401, 407) and route.auth:  # tinyproxy answers wrong credentials with 401, others with 407
        why = (f"rejected the credentials from {route.auth_source} (HTTP {status}): check user:password there "
               "with the proxy's administrator")  # fmt: skip
    elif status in (401, 407):
        why = ("requires authentication (HTTP 407): write user:password into an owner-only file (chmod 600) and name "
               "it in network.proxy_auth_file")  # fmt: skip
    elif status == 403:
        why = f"refused CONNECT to {target} (HTTP 403): ask the hospital's network team to allow CONNECT to {target}"
    elif not line:
        why = "closed the connection without answering CONNECT: is it an HTTP proxy? check " + _fix(route)
    else:
        why = f"answered CONNECT to {target} with '{line}'"
    raise ProxyFailure(f"proxy {route.url} {why}")


def tls_handshake(address: str, ca: Path, route: ProxyRoute | None = None, timeout: float = 10.0) -> tuple[dict, str]:
    """Connect to host:port (through `route`'s proxy when it has one), verify the certificate against `ca` and the
    host name; returns the peer certificate (ssl's dict form) and the proxy's CONNECT status line ("" when direct).
    Raises ProxyFailure, OSError or ssl.SSLError on failure."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if route is not None and route.url:
        raw, connect = _open_tunnel(route, host, int(port), timeout)
    else:
        raw, connect = socket.create_connection((host, int(port)), timeout=timeout), ""
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert(), connect
    finally:
        raw.close()


def _fleet_answers(address: str, ca: Path, route: ProxyRoute) -> int:
    """HTTP status of an empty POST to a Fleet path through the front (4xx other than 404: the SuperLink answered),
    over the route the SuperNode takes."""
    import httpx

    proxy = None
    if route.url:
        proxy = httpx.Proxy(route.url, auth=route.auth) if route.auth else route.url
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10.0, proxy=proxy,
                      trust_env=False) as client:  # fmt: skip
        return client.post(f"https://{address}/v1/fleet/get-run", content=b"").status_code


def check(cfg: SiteConfig) -> list[Verdict]:
    """Every readiness check of `client check`, each with its verdict."""
    out = [Verdict("config", True, f"{cfg.file} is valid (site {cfg.site})")]
    index = cfg.cache / "index.csv"
    if index.is_file():
        with index.open(encoding="utf-8") as fh:
            rows = fh.read().splitlines()[1:]
        ok = sum(",ok," in r for r in rows)
        out.append(Verdict("data", ok > 0, f"{ok} usable patient(s), {len(rows) - ok} skipped, in {cfg.cache}"
                           if ok else f"no usable patient in {index}; fix and run `client prepare`"))  # fmt: skip
    else:
        out.append(Verdict("data", False, f"{cfg.cache} not prepared; run `client prepare --config {cfg.file}`"))
    key = private_key_path(cfg)
    if not key.is_file():
        out.append(Verdict("site key", False, f"{key} missing; run `client keygen --config {cfg.file}`"))
    elif key.stat().st_mode & 0o077:
        out.append(Verdict("site key", False, f"{key} is readable by others; chmod 600 it"))
    else:
        out.append(Verdict("site key", True, f"{key} (owner-only); public key {key}.pub"))
    fed = cfg.federation
    if not fed.superlink or not fed.root_certificates or not fed.root_certificates.is_file():
        out.append(Verdict("coordinator", False, "federation.superlink and federation.root_certificates must be set "
                           "(address and CA certificate from the coordinator)"))  # fmt: skip
    else:
        import httpx  # the Fleet probe's client (only `client check` needs it)

        host = fed.superlink.rpartition(":")[0].strip("[]")
        try:
            route = proxy_route(cfg, host)
        except SpineFedError as exc:
            route = None
            out.append(Verdict("reachability", False, f"{fed.superlink} not tried: {exc}"))
        if route is not None:
            out += _coordinator_verdicts(fed.superlink, fed.root_certificates, host, route, httpx)
    out.append(approved_apps_verdict(cfg))
    out += pacs_verdicts(cfg)
    return out


def pacs_verdicts(cfg: SiteConfig) -> list[Verdict]:
    """data.source dicomweb: the PACS's verdict (client/pacs.py: reachable, authenticated, one QIDO query)."""
    if cfg.dicomweb is None:
        return []
    from client.pacs import check_verdict

    return [check_verdict(cfg)]


def _coordinator_verdicts(address: str, ca: Path, host: str, route: ProxyRoute, httpx) -> list[Verdict]:
    """Certificate, reachability (directly or through which proxy) and Fleet API verdicts for the coordinator."""
    out = []
    try:
        cert, connect = tls_handshake(address, ca, route)
        expires = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), datetime.timezone.utc)
        days = (expires - datetime.datetime.now(datetime.timezone.utc)).days
        sans = [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
        out.append(Verdict("certificate", True, f"valid for {host}, expires {expires:%Y-%m-%d} ({days} days); "
                           f"SANs {', '.join(sans)}", warn=days < 30))  # fmt: skip
        if route.url:
            code = connect.split(" ", 2)[1] if connect.count(" ") else connect
            how = f"through proxy {route.url} (CONNECT {code}): TLS handshake with {address} succeeded; " + (
                f"proxy from {route.source}" + (f", basic auth from {route.auth_source}" if route.auth else "")
            )
        else:
            how = f"directly: TLS handshake with {address} succeeded ({route.source})"
        out.append(Verdict("reachability", True, "coordinator reached " + how))
        try:
            status = _fleet_answers(address, ca, route)
            out.append(Verdict("fleet API", status != 404 and status < 500, f"the coordinator answered HTTP {status}"
                               + (" (path not exposed?)" if status == 404 else "")))  # fmt: skip
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            out.append(Verdict("fleet API", False, f"no answer ({exc.__class__.__name__})"))
    except ssl.SSLCertVerificationError as exc:
        hint = (f"; through a proxy this also happens when the proxy intercepts TLS: ask the network team to exempt "
                f"{address} from TLS inspection" if route.url else "")  # fmt: skip
        out.append(Verdict("certificate", False, f"{address}: {exc.verify_message} (root certificate {ca}; the "
                           f"coordinator's certificate needs a SAN for {host}){hint}"))  # fmt: skip
    except ProxyFailure as exc:
        out.append(Verdict("reachability", False, f"coordinator {address} not reached: {exc}"))
    except (OSError, ssl.SSLError, ValueError) as exc:
        out.append(Verdict("reachability", False, f"{address} ({route.describe()}): {exc}"))
    return out


def approved_apps_verdict(cfg: SiteConfig) -> Verdict:
    """The allow-list itself: empty (nothing will run) or holding entries that are not hashes is a FAIL."""
    from client.approval import invalid_entries

    approved = cfg.federation.approved_apps
    bad = invalid_entries(approved)
    if bad:
        return Verdict("approved apps", False, f"federation.approved_apps in {cfg.file} has entries that are not "
                       f"sha256 hashes (64 hex digits): {', '.join(bad)}")  # fmt: skip
    if not approved:
        return Verdict("approved apps", False, f"federation.approved_apps in {cfg.file} is empty: every app bundle "
                       "will be refused and nothing will run here. Get app.fab from the coordinator (`server run "
                       f"--dry-run` writes it), review it with `client review --fab app.fab --config {cfg.file}`, then "
                       "add its sha256 under federation.approved_apps")  # fmt: skip
    return Verdict("approved apps", True, f"{len(approved)} app bundle hash(es) approved")


def bundle_verdicts(cfg: SiteConfig, fab_file: Path | None) -> list[Verdict]:
    """`client check --dry-run`: the installed release and (given a bundle) whether it would run here.

    Honest limits: the site cannot see which bundle the coordinator will send until a run reaches it, so without
    --fab only the allow-list is checked (by `check`); the coordinator's `server run --dry-run` asks every connected
    site and shows each one's answer."""
    from client.approval import NotApproved, check_bundle, installed_version

    version = installed_version()
    out = [Verdict("installed release", bool(version), f"spinefed {version or 'NOT installed as a package'}")]
    if fab_file is None:
        out.append(Verdict("app bundle", True, "none given (--fab FILE): which bundle runs is known only when a run "
                           "arrives; refused runs are listed by `client review`", warn=True))  # fmt: skip
        return out
    try:
        bundle = check_bundle(Path(fab_file).read_bytes(), cfg.federation.approved_apps, version)
        out.append(Verdict("app bundle", True, f"{bundle.sha256[:12]} ({bundle.name} {bundle.version}) approved"))
    except OSError as exc:
        out.append(Verdict("app bundle", False, f"{fab_file}: cannot read ({exc.strerror})"))
    except NotApproved as exc:
        out.append(Verdict("app bundle", False, str(exc)))
    return out


def run_supernode(cfg: SiteConfig, marker: str) -> int:
    """Run the SuperNode in the foreground until it exits or SIGTERM/SIGINT arrives; returns its exit code.

    Output goes to the site's SuperNode log. On a signal the SuperNode gets SIGTERM (it tells the SuperLink it is
    leaving); afterwards anything it started (ClientApp processes detach into their own sessions) is ended by the
    marker in its environment."""
    log_file = log_path(cfg)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = flwr_env(cfg.cache.parent / f"{cfg.cache.name}-flwr", marker)
    cmd = supernode_command(cfg)
    env[ENV_CONFIG] = str(cfg.file)  # the launcher reads approved_apps from here for every task
    env.update(supernode_proxy_env(cfg))  # site.yaml's proxy and no_proxy win over the environment's
    route = proxy_route(cfg, str(cfg.federation.superlink).rpartition(":")[0].strip("[]"))
    with log_file.open("ab") as out:
        out.write(f"spinefed: coordinator {cfg.federation.superlink} reached {route.describe()}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # Insecure only on loopback: the Runtime API listens on 127.0.0.1 and the secret authenticates the launcher.
        launcher = subprocess.Popen(launcher_command(cfg, cmd, proc.pid), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (code := proc.poll()) is None:
            if launcher.poll() is not None:  # without the launcher nothing would run: stop rather than idle
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                code = proc.wait() or 1
                break
            time.sleep(0.5)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        stop_group(launcher, grace_s=5)
        stop(proc, marker)
    return code
