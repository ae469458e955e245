"""The hospital's SuperNode: key pair, readiness checks, and the `flower-supernode` process.

- Key pair: ECDSA P-384, made at the site (OpenSSH format, which `flower-supernode --auth-supernode-private-key`
  reads); the private key is owner-only and never travels, the `.pub` goes to the coordinator
  (`server register-site NAME KEY.pub`).
- The SuperNode only connects outwards (HTTPS to the coordinator's front, verified with the site's root
  certificate); its local ClientApp API listens on 127.0.0.1 only. HTTPS_PROXY is honoured (Flower's httpx client
  reads it); NO_PROXY always covers loopback. Flower retries a lost connection with exponential backoff, without
  limit (no `--max-retries` / `--max-wait-time`), which is what a hospital service wants.
- The node config `site-config` tells the ClientApp which site.yaml this node serves (client/tasks.py).
"""

from __future__ import annotations

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
from dataclasses import dataclass
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


def _proxy_for(host: str) -> tuple[str, int] | None:
    """The HTTPS proxy that applies to host (HTTPS_PROXY/https_proxy minus NO_PROXY), as (host, port)."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if not url:
        return None
    skip = [p.strip().lstrip(".") for p in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")]
    if any(p and (host == p or host.endswith("." + p)) for p in skip) or "*" in skip:
        return None
    parsed = urllib.parse.urlsplit(url if "//" in url else "http://" + url)
    return parsed.hostname or "", parsed.port or 3128


def tls_handshake(address: str, ca: Path, timeout: float = 10.0) -> dict:
    """Connect to host:port (through HTTPS_PROXY if set), verify the certificate against `ca` and the host name;
    returns the peer certificate (ssl's dict form). Raises OSError/ssl.SSLError on failure."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    proxy = _proxy_for(host)
    raw = socket.create_connection(proxy or (host, int(port)), timeout=timeout)
    try:
        if proxy:
            raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = raw.recv(4096).split(b"\r\n", 1)[0]
            if b" 200" not in head:
                raise OSError(f"the proxy {proxy[0]}:{proxy[1]} refused CONNECT: {head.decode(errors='replace')}")
        ctx = ssl.create_default_context(cafile=str(ca))
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert()
    finally:
        raw.close()


def _fleet_answers(address: str, ca: Path) -> int:
    """HTTP status of an empty POST to a Fleet path through the front (4xx other than 404: the SuperLink answered)."""
    import httpx

    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10.0) as client:
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
            cert = tls_handshake(fed.superlink, fed.root_certificates)
            expires = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), datetime.timezone.utc)
            days = (expires - datetime.datetime.now(datetime.timezone.utc)).days
            sans = [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
            out.append(Verdict("certificate", True, f"valid for {host}, expires {expires:%Y-%m-%d} ({days} days); "
                               f"SANs {', '.join(sans)}", warn=days < 30))  # fmt: skip
            out.append(Verdict("reachability", True, f"TLS handshake with {fed.superlink} succeeded"
                               + (" (through HTTPS_PROXY)" if _proxy_for(host) else "")))  # fmt: skip
            try:
                status = _fleet_answers(fed.superlink, fed.root_certificates)
                out.append(Verdict("fleet API", status != 404 and status < 500, f"the coordinator answered HTTP {status}"
                                   + (" (path not exposed?)" if status == 404 else "")))  # fmt: skip
            except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
                out.append(Verdict("fleet API", False, f"no answer ({exc.__class__.__name__})"))
        except ssl.SSLCertVerificationError as exc:
            out.append(Verdict("certificate", False, f"{fed.superlink}: {exc.verify_message} (root certificate "
                               f"{fed.root_certificates}; the coordinator's certificate needs a SAN for {host})"))  # fmt: skip
        except (OSError, ssl.SSLError, ValueError) as exc:
            out.append(Verdict("reachability", False, f"{fed.superlink}: {exc}"))
    out.append(approved_apps_verdict(cfg))
    out += pacs_verdicts(cfg)
    return out


def pacs_verdicts(cfg: SiteConfig) -> list[Verdict]:
    """data.source dicomweb: the PACS's verdict (client/pacs.py: reachable, authenticated, one QIDO query)."""
    if cfg.dicomweb is None:
        return []
    from client.pacs import check_verdict

    return [check_verdict(cfg)]


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
    with log_file.open("ab") as out:
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
