"""Anonymous abuse of the TLS front against a real coordinator on loopback (issue #20, item 2).

Starts `server` (SuperLink on 127.0.0.1 + the nginx front from server/front.py) with tests/deployhelpers.py, and
optionally one registered site (`client --site`), then from one client address:

1. six concurrent anonymous 250 MB POSTs to /v1/fleet/push-object with a Content-Length, then six chunked (no length);
2. a slow-body attack: N connections that declare a body under the limit and drip it (a few bytes every few seconds,
   never tripping the read timeout), plus N that stall after part of the body (cut by client_body_timeout), plus N
   that stall in the header (cut by client_header_timeout).

It samples the SuperLink's resident memory (VmRSS, /proc) every 0.1 s and prints idle / peak / after for each attack,
what the attackers got back, and whether a plain Fleet request still reaches the SuperLink and the site is still
online. Bounded: at most 6 x 2 x 250 MB sent, each attack at most --seconds, everything on 127.0.0.1.

    .venv/bin/python bench/front_abuse.py              # with one registered site (needs the client stack)
    .venv/bin/python bench/front_abuse.py --no-site    # front + SuperLink only

Seen here (2 cores, loopback, nginx 1.22.1, Flower 1.42, one registered site online, 2026-12-05): SuperLink idle
147 MB resident; 6 x 250 MB with a Content-Length: all six 413 (nginx refuses on the header and discards what is
sent), peak 147 MB, after 147 MB; 6 x 250 MB chunked: all six 413 at the 8 MB limit, peak 147, after 147; 12 drip +
12 stalled-body + 12 stalled-header connections for 45 s: the drips held open by the front and never passed on, the
stalled bodies cut at 20 s and headers at 10 s, peak 147 MB, after 147 MB; a Fleet request during and after the
attacks answered by the SuperLink; the site still online. (Before issue #20's front limits: 0.65 GB -> 3.0 GB
resident, 2.4 GB still held afterwards, as reported in the issue.)
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.front import FRONT_LIMITS, _size  # noqa: E402
from tests.deployhelpers import Deployment, pids_with  # noqa: E402

MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def superlink_pid(dep: Deployment) -> int:
    for pid in pids_with(dep.marker, "coordinator"):
        try:
            if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise RuntimeError("SuperLink process not found")


class Sampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def tls(dep: Deployment, timeout: float) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(dep.ca))
    sock = socket.create_connection(("127.0.0.1", dep.front_port), timeout=timeout)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def reply_status(sock) -> str:
    data = b""
    try:
        while b"\r\n" not in data:
            part = sock.recv(4096)
            if not part:
                break
            data += part
    except (OSError, ssl.SSLError):
        pass
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def big_post(dep: Deployment, size: int, chunked: bool, deadline: float, out: list):
    """POST `size` bytes of zeros to push-object, stopping when the front answers or closes."""
    sent = 0
    try:
        with tls(dep, timeout=30) as sock:
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
            sock.sendall(f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n\r\n".encode())
            block = b"\0" * MB
            piece = (b"%x\r\n" % MB + block + b"\r\n") if chunked else block
            try:
                while sent < size and time.monotonic() < deadline:
                    sock.sendall(piece)
                    sent += MB
                if chunked and sent >= size:
                    sock.sendall(b"0\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass
            out.append((reply_status(sock), sent))
    except (OSError, ssl.SSLError) as exc:
        out.append((type(exc).__name__, sent))


def slow(dep: Deployment, kind: str, seconds: float, out: list):
    """A slow client: 'drip' (a body under the limit, 64 bytes every 5 s), 'stall-body', 'stall-header'."""
    t0 = time.monotonic()
    declared = _size(FRONT_LIMITS["max_body"]) - MB
    try:
        with tls(dep, timeout=seconds + 30) as sock:
            if kind == "stall-header":
                sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: loc")
            else:
                sock.sendall(
                    f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Length: {declared}\r\n\r\n".encode()
                    + b"\0" * 1024
                )
            try:
                if kind == "drip":
                    while time.monotonic() - t0 < seconds:
                        time.sleep(5)
                        sock.sendall(b"\0" * 64)
                    out.append((kind, "still open (held by the front)", time.monotonic() - t0))
                    return
                out.append((kind, reply_status(sock), time.monotonic() - t0))
            except (OSError, ssl.SSLError):
                out.append((kind, "cut", time.monotonic() - t0))
    except (OSError, ssl.SSLError) as exc:
        out.append((kind, type(exc).__name__, time.monotonic() - t0))


def legit_request(dep: Deployment) -> str:
    """An (unsigned) Fleet request: a SuperLink answer (not the front's 404/413/502/503) shows the path still works."""
    import httpx

    try:
        res = httpx.post(f"https://{dep.front}/v1/fleet/get-run", content=b"", verify=str(dep.ca), timeout=20)
    except httpx.HTTPError as exc:
        return f"failed: {type(exc).__name__}"
    return f"{res.status_code} ({'from the SuperLink' if res.status_code not in (404, 413, 502, 503) else 'front'})"


def run_threads(threads):
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-site", action="store_true", help="no registered site (front + SuperLink only)")
    ap.add_argument("--size-mb", type=int, default=250)
    ap.add_argument("--posts", type=int, default=6)
    ap.add_argument("--slow", type=int, default=12, help="connections per slow-client kind")
    ap.add_argument("--seconds", type=float, default=45.0, help="bound on each attack")
    args = ap.parse_args(argv)
    if args.posts * 2 * args.size_mb > 6 * 2 * 250 or args.slow > 16 or args.seconds > 120:
        ap.error("bounded: at most 6 x 2 x 250 MB, 16 slow connections per kind, 120 s per attack")

    marker = uuid.uuid4().hex[:12]
    with tempfile.TemporaryDirectory(prefix="front_abuse-") as tmp:
        dep = Deployment(Path(tmp), marker)
        try:
            dep.start_server()
            if not args.no_site:
                dep.add_site("hospA", n=10, seed=0)
                dep.start_site("hospA")
                dep.wait_online(["hospA"])
            pid = superlink_pid(dep)
            time.sleep(3)
            idle = rss_mb(pid)
            print(f"front limits: {FRONT_LIMITS}")
            print(f"SuperLink pid {pid}: idle {idle:.0f} MB resident")

            for chunked in (False, True):
                out: list = []
                deadline = time.monotonic() + args.seconds
                t0 = time.monotonic()
                with Sampler(pid) as s:
                    run_threads([threading.Thread(target=big_post, args=(dep, args.size_mb * MB, chunked, deadline, out))
                                 for _ in range(args.posts)])  # fmt: skip
                    took = time.monotonic() - t0
                    time.sleep(3)
                after = rss_mb(pid)
                label = "chunked" if chunked else "Content-Length"
                print(f"\n{args.posts} x {args.size_mb} MB POST push-object ({label}): {took:.1f} s")
                print(f"  replies (status, MB the attacker got to send): {[(st, n // MB) for st, n in out]}")
                print(f"  SuperLink resident: idle {idle:.0f} MB, peak {s.peak:.0f} MB, after {after:.0f} MB "
                      f"(peak - idle {s.peak - idle:+.0f} MB)")  # fmt: skip

            out = []
            t0 = time.monotonic()
            with Sampler(pid) as s:
                threads = [threading.Thread(target=slow, args=(dep, kind, args.seconds, out))
                           for kind in ("drip", "stall-body", "stall-header") for _ in range(args.slow)]  # fmt: skip
                for t in threads:
                    t.start()
                time.sleep(min(10.0, args.seconds / 2))
                during = legit_request(dep)
                for t in threads:
                    t.join()
                time.sleep(3)
            after = rss_mb(pid)
            print(f"\nslow clients ({args.slow} each: drip, stall-body, stall-header), {time.monotonic() - t0:.0f} s:")
            for kind in ("drip", "stall-body", "stall-header"):
                rows = [(st, round(sec)) for k, st, sec in out if k == kind]
                print(f"  {kind}: {sorted(set(rows))}")
            print(f"  a Fleet request during the attack: {during}")
            print(f"  SuperLink resident: idle {idle:.0f} MB, peak {s.peak:.0f} MB, after {after:.0f} MB "
                  f"(peak - idle {s.peak - idle:+.0f} MB)")  # fmt: skip

            print(f"\nafter the attacks: a Fleet request: {legit_request(dep)}")
            if not args.no_site:
                print(f"  registered site hospA: {dep.site_states().get('hospA', 'unknown')}")
        finally:
            dep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
