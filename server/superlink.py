"""The coordinator's SuperLink (and, in process isolation, its SuperExec) as child processes of `server`.

Choices, and why:
- bound to 127.0.0.1 only: the Control API on the same port has no authentication (server/front.py exposes the
  Fleet API to the sites);
- TLS on loopback with a private CA that `server` makes once in state_dir/loopback (`--enable-supernode-auth`
  refuses to start without TLS). It adds no authentication — anyone who can connect to 127.0.0.1 can speak TLS to
  it — so the coordinator host must not have untrusted local users (deployment rule). nginx terminates the sites'
  TLS with the coordinator's certificate and re-encrypts to this one (verified);
- `--enable-supernode-auth`: only public keys registered with `server register-site` may connect;
- `--database state_dir/superlink.db`: registrations and run history survive a restart;
- `--isolation process` with `--superexec-auth-secret-file`: Flower ignores the secret in subprocess isolation, so
  `server` starts `flower-superexec` itself with the same secret; the Runtime API then refuses callers without it;
- runtime dependency installation, telemetry and update checks off (server/flwrctl.flwr_env).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from pathlib import Path

from server.coordinator import CoordinatorConfig
from server.flwrctl import BIN, wait_healthy
from server.front import die_with_parent


def loopback_tls(state_dir: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) for the SuperLink on 127.0.0.1, made once (EC P-256, 10 years)."""
    folder = Path(state_dir) / "loopback"
    ca_crt, crt, key = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    if ca_crt.is_file() and crt.is_file() and key.is_file():
        return ca_crt, crt, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spinefed loopback CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_bytes = srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    crt.write_bytes(srv.public_bytes(pem))
    ca_crt.write_bytes(ca.public_bytes(pem))
    return ca_crt, crt, key


def superlink_command(cfg: CoordinatorConfig) -> list[str]:
    ca, crt, key = loopback_tls(cfg.state_dir)
    cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(cfg.superlink_port)]
    cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
    cmd += ["--database", str(cfg.database), "--enable-supernode-auth", "--disable-runtime-dependency-installation"]
    cmd += ["--isolation", cfg.isolation, "--log-file", str(cfg.log_dir / "superlink.log")]
    if cfg.isolation == "process":
        cmd += ["--superexec-auth-secret-file", str(cfg.secret_file)]
    return cmd


def superexec_command(cfg: CoordinatorConfig, parent_pid: int) -> list[str]:
    ca = cfg.state_dir / "loopback" / "ca.crt"
    cmd = [str(BIN / "flower-superexec"), "--runtime-api-address", cfg.local_address, "--root-certificates", str(ca)]
    return cmd + ["--superexec-auth-secret-file", str(cfg.secret_file), "--parent-pid", str(parent_pid)]


class SuperLink:
    """Start/stop the SuperLink (+ SuperExec). Output goes to log_dir; `--log-file` keeps Flower's own log."""

    def __init__(self, cfg: CoordinatorConfig, env: dict):
        self.cfg, self.env = cfg, env
        self.proc: subprocess.Popen | None = None
        self.superexec: subprocess.Popen | None = None

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        out = log.open("ab")
        try:
            return subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.cfg.state_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        finally:
            out.close()

    def start(self, timeout: float = 60.0) -> None:
        self.proc = self._spawn(superlink_command(self.cfg), self.cfg.log_dir / "superlink.out")
        wait_healthy(self.cfg.superlink_port, self.proc, timeout, ca=self.cfg.state_dir / "loopback" / "ca.crt")
        if self.cfg.isolation == "process":
            self.superexec = self._spawn(superexec_command(self.cfg, self.proc.pid), self.cfg.log_dir / "superexec.log")

    def alive(self) -> bool:
        procs = [p for p in (self.proc, self.superexec) if p is not None]
        return bool(procs) and all(p.poll() is None for p in procs)

    def stop(self, grace_s: float = 15.0) -> None:
        for proc in (self.superexec, self.proc):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.proc = self.superexec = None
