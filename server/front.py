"""The TLS front: an nginx that exposes only the SuperLink's Fleet API to the sites.

Why: in open-source Flower 1.42 the SuperLink serves the Fleet API (SuperNodes), the Control API (`flwr run`,
`flwr supernode register`: no authentication) and the Runtime API on one HTTP port. The SuperLink is therefore bound
to 127.0.0.1 and nginx, on the address the sites reach, terminates TLS with the coordinator's certificate and passes
on only the Fleet endpoints that a stock SuperNode calls (flwr/supernode/fleet_http_client.py). Everything else —
`/v1/control/...`, `/v1/runtime/...`, `/health`, any other method or path — is answered 404 by nginx itself and never
reaches the SuperLink. In 1.42 the Fleet API is protobuf over HTTP/1.1 POST (httpx at the SuperNode, uvicorn at the
SuperLink), not gRPC, so this is `proxy_pass`, not `grpc_pass`.

The rule matches the raw request line's URI (`$request_uri`, exactly as the client sent it, query included) against the
exact list `/v1/fleet/<endpoint>`, before any location is chosen. Nothing that needs normalising can pass: percent
encoding, dot segments, double slashes and query strings (a SuperNode sends none) are answered 404 by nginx and never
reach the SuperLink, so a path that the SuperLink's router would resolve differently from nginx cannot exist. A
plain-HTTP request to the TLS port gets nginx's 400.

Abuse is shed here, before it costs the SuperLink memory (issue #20): the SuperLink (uvicorn) reads a whole body before
it checks the node's signature, so the front accepts only bodies Flower's chunking can produce (FRONT_LIMITS
`max_body`), buffers each whole body itself (in memory) before contacting the SuperLink, so a slow or
oversized body costs the SuperLink nothing, cuts slow headers and bodies by timeout, and limits connections and request
rate per client address (sized for several sites behind one hospital proxy; refusals are 503, which a SuperNode
retries with backoff). TLS is 1.3, or 1.2 with ECDHE and an AEAD cipher (GCM, ChaCha20-Poly1305) only.

nginx runs in the foreground (`daemon off`) under `server`, with its own prefix inside state_dir (config, pid, temp
folders) and its logs in log_dir; the access log holds client addresses, paths, sizes and whether the SuperLink
served the request (`upstream=`), nothing of the payload.
A stock SuperNode cannot present a client certificate; per-site client certificates would need a TLS sidecar at each
site (e.g. stunnel or nginx `proxy_ssl_certificate` in front of the SuperNode) and `ssl_verify_client on` here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from common.errors import SpineFedError
from common.processes import children, identify, kill_same

# Every Fleet endpoint a Flower 1.42 SuperNode calls; tests/test_deploy.py checks it against the installed flwr.
FLEET_PATHS = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

# TLS 1.2 suites: ECDHE key exchange and AEAD ciphers only (no CBC, SHA-1, CCM8, ARIA, Camellia, static RSA/DH).
# Both ECDSA and RSA forms, for an operator whose certificate is RSA; deploy/make_certs.sh makes P-384 ECDSA.
# TLS 1.3 keeps OpenSSL's default suites (AES-GCM, ChaCha20-Poly1305), all AEAD.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)

# The front's limits; tests shorten the timeouts (nginx_conf(limits=...)). Why each number:
FRONT_LIMITS = {
    # The largest request body a Flower 1.42 SuperNode sends is one push-object: an array chunk of
    # FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE = 5 MiB (flwr/common/constant.py, flwr/app/message/array.py) plus its
    # protobuf framing (object id, node, run; well under 1 KB). Other bodies (push-messages, heartbeats, the message
    # and record objects that reference chunks) are a few KB. The FAB travels in a response (get-fab), not a body.
    # 8 MB leaves 3 MB of headroom; tests/test_front_abuse.py checks the chunk size against the installed flwr.
    "max_body": "8m",
    # Between two successive reads of the header / the body (not the whole transfer), and between two writes of a
    # reply: a SuperNode on a slow hospital link still sends 5 MB in well under a minute; a stalled sender is cut.
    "header_timeout": "10s",
    "body_timeout": "20s",
    "send_timeout": "60s",
    "keepalive_timeout": "65s",
    # Per client address. A SuperNode keeps 1-3 connections (httpx pool: messages, objects, heartbeat thread); 16 sites
    # behind one hospital NAT/proxy need at most 48. Requests: an idle SuperNode polls pull-messages about once a
    # second (client/launcher.py) and heartbeats every 30 s; a model transfer is one request per 5 MiB chunk back to
    # back (a 100 MB model: ~20 push-object or pull-object requests). 40 r/s sustained and a burst of 400 cover 16
    # sites polling together with several transferring models at the same moment; past that nginx answers 503, which
    # the SuperNode retries with backoff (flwr/supercore/retry/http_retry.py: 502/503/504 are retryable, 429 is not).
    "conn_per_addr": 48,
    "rate_per_addr": "40r/s",
    "burst_per_addr": 400,
    # Across all addresses: bounds the bodies nginx holds at once (each at most max_body, in memory).
    "conn_total": 128,
    # Requests open at the SuperLink at once: bounds what it holds in request bodies (x max_body); past it nginx answers
    # 502 at once (retryable for a SuperNode). Sixteen sites rarely have more than one request each in flight.
    "upstream_conns": 32,
}


def _size(text: str | int) -> int:
    """An nginx size ("8m", "512k", bytes) in bytes."""
    text = str(text)
    return int(text[:-1]) * {"k": 1024, "m": 1024 * 1024}[text[-1].lower()] if text[-1].isalpha() else int(text)


def find_nginx(name: str = "nginx") -> str:
    """Path of the nginx binary, or a SpineFedError that says how to install it."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise SpineFedError(
            f"nginx not found ({name}): install Debian's package (`apt-get install -y nginx`, or "
            "`bash deploy/install.sh --with-nginx`), or set front.nginx in coordinator.yaml"
        )
    return found


def nginx_conf(
    *,
    prefix: Path,
    log_dir: Path,
    listen_host: str,
    listen_port: int,
    certificate: Path,
    key: Path,
    upstream_port: int,
    upstream_ca: Path,
    user: str | None = None,
    limits: dict | None = None,
) -> str:
    """The whole nginx.conf for the front (one server block, Fleet paths only); `limits` overrides FRONT_LIMITS."""
    lim = {**FRONT_LIMITS, **(limits or {})}
    if set(lim) - set(FRONT_LIMITS):
        raise ValueError(f"unknown front limits: {sorted(set(lim) - set(FRONT_LIMITS))}")
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    temps = "\n".join(f"    {name}_temp_path {prefix / 'temp' / name};" for name in TEMP_DIRS)
    # nginx's map compares plain strings case-insensitively; an anchored case-sensitive regex is exact.
    exact = f'        "~^/v1/fleet/({"|".join(FLEET_PATHS)})$" 1;'
    user_line = f"user {user};\n" if user else ""
    return f"""# Generated by `server` (server/front.py); rewritten at every start. Fleet API only.
{user_line}daemon off;
master_process on;
worker_processes 1;
# A graceful stop must end in bounded time even with SuperNodes' keep-alive connections still open.
worker_shutdown_timeout 5s;
pid {prefix / "nginx.pid"};
error_log {log_dir / "front-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    # Client address, request line, status, sizes and the upstream that served it ("-": answered by nginx itself, the
    # SuperLink never saw the request); nothing of the payload.
    log_format fleet '$remote_addr [$time_local] "$request" $status $body_bytes_sent $request_length '
                     'upstream=$upstream_addr $request_time';
    access_log {log_dir / "front-access.log"} fleet;
{temps}
    server_tokens off;
    # The Fleet-only rule: the raw URI as sent (no decoding, no dot-segment or slash merging; query included) must
    # equal one of Flower's Fleet paths exactly. Checked before any location is chosen, so nothing else is proxied.
    map $request_uri $fleet_exact {{
        default 0;
{exact}
    }}
    # Bodies: at most one Flower chunk plus headroom (server/front.py FRONT_LIMITS); an oversized Content-Length gets
    # 413 at once, an oversized chunked body 413 once the limit is read. Request buffering stays on: nginx reads the
    # whole body before it opens the request to the SuperLink, so a slow or refused body never reaches it and the
    # SuperLink only ever receives complete bodies under the limit. The buffer is 1 MB larger than the limit: bodies
    # stay in the worker's memory (pages are touched only as bytes arrive) and a chunked body hits the limit before
    # the buffer is full, so nothing goes to a temp file: the front writes no copy of a site's update to disk and its
    # workers need no access into the state folder.
    client_max_body_size {lim["max_body"]};
    client_body_buffer_size {_size(lim["max_body"]) + 1024 * 1024};
    proxy_request_buffering on;
    proxy_buffering off;
    client_header_timeout {lim["header_timeout"]};
    client_body_timeout {lim["body_timeout"]};
    send_timeout {lim["send_timeout"]};
    keepalive_timeout {lim["keepalive_timeout"]};
    reset_timedout_connection on;
    # Per client address (several sites behind one hospital proxy share it) and in total; 503 is what a SuperNode
    # retries with backoff.
    limit_conn_zone $binary_remote_addr zone=fleet_addr:1m;
    limit_conn_zone $server_port zone=fleet_all:64k;
    limit_req_zone $binary_remote_addr zone=fleet_rate:1m rate={lim["rate_per_addr"]};
    limit_conn_status 503;
    limit_req_status 503;
    upstream superlink {{
        server 127.0.0.1:{upstream_port} max_conns={lim["upstream_conns"]};
        keepalive 8;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {":".join(TLS12_CIPHERS)};
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:fleet:1m;
        ssl_session_tickets off;
        limit_conn fleet_addr {lim["conn_per_addr"]};
        limit_conn fleet_all {lim["conn_total"]};
        if ($fleet_exact = 0) {{
            return 404;
        }}
        location ~ ^/v1/fleet/[a-z-]+$ {{
            limit_except POST {{ deny all; }}
            limit_req zone=fleet_rate burst={lim["burst_per_addr"]} nodelay;
            proxy_pass https://superlink;
            proxy_ssl_trusted_certificate {upstream_ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # DNS SAN of the loopback certificate (nginx matches DNS names)
            proxy_ssl_session_reuse on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _worker_user() -> str | None:
    """As root, nginx workers drop to www-data (Debian) or nobody; otherwise they run as the caller."""
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets `sig` when `server` dies (Linux), so no front or SuperLink outlives it."""

    def set_pdeathsig() -> None:
        with contextlib.suppress(OSError):  # not Linux/glibc: rely on the explicit stop
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG

    return set_pdeathsig


class Front:
    """nginx as a foreground child: write config, test it (`nginx -t`), start, stop (graceful, then kill)."""

    def __init__(self, *, nginx: str, prefix: Path, log_dir: Path, env: dict | None = None, **conf):
        self.nginx, self.prefix, self.log_dir, self.env = find_nginx(nginx), Path(prefix), Path(log_dir), env
        self.conf = conf
        self.proc: subprocess.Popen | None = None

    @property
    def conf_file(self) -> Path:
        return self.prefix / "nginx.conf"

    def write(self) -> Path:
        user = _worker_user()
        for name in TEMP_DIRS:
            folder = self.prefix / "temp" / name
            folder.mkdir(parents=True, exist_ok=True)
            if user:
                entry = pwd.getpwnam(user)
                os.chown(folder, entry.pw_uid, entry.pw_gid)
        if user:  # workers must reach their temp folders inside the (owner-only) state folder
            os.chmod(self.prefix, 0o711)
            os.chmod(self.prefix.parent, 0o711)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        text = nginx_conf(prefix=self.prefix, log_dir=self.log_dir, user=user, **self.conf)
        self.conf_file.write_text(text)
        return self.conf_file

    def _cmd(self, *extra: str) -> list[str]:
        return [
            self.nginx,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf_file),
            "-e",
            str(self.log_dir / "front-error.log"),
            *extra,
        ]

    def test(self) -> None:
        res = subprocess.run(self._cmd("-t", "-q"), capture_output=True, text=True, env=self.env)
        if res.returncode != 0:
            raise SpineFedError(f"nginx refused its configuration {self.conf_file}: {res.stderr.strip()[-400:]}")

    def start(self) -> subprocess.Popen:
        self.write()
        self.test()
        out = (self.log_dir / "front.out").open("ab")
        self.proc = subprocess.Popen(
            self._cmd(), stdout=out, stderr=subprocess.STDOUT, env=self.env, preexec_fn=die_with_parent()
        )
        out.close()
        return self.proc

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGQUIT: graceful shutdown (workers finish their requests), SIGTERM/SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # nginx workers do not notice their master's death: one killed master would leave them serving the port.
        # The front never reloads, so the workers seen now are all it will have.
        workers = identify(children(proc.pid))
        try:
            for sig, wait in ((signal.SIGQUIT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    if sig == signal.SIGKILL:
                        kill_same({**workers, **identify(children(proc.pid))})
                    proc.send_signal(sig)
                    proc.wait(timeout=wait)
                    return
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    return
        finally:
            kill_same(workers)  # only a worker that outlived its master is still the same process
