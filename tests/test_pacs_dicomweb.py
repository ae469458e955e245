"""`client prepare` from a real PACS over DICOMweb (#23): Debian's Orthanc + its DICOMweb plugin on loopback.

The module starts Orthanc with a config it writes (loopback only, DICOM port off, basic authentication on, storage in
tmp), uploads three of the small virtual sites through its REST API (site01 plain, site02 RLE, site03 JPEG-LS with
lesion_instance rows), and runs the real `client` CLI. Debian's Orthanc cannot check bearer tokens, so a small stub
server in a thread checks the `Authorization: Bearer` header and forwards to Orthanc with the basic credentials; the
same stub answers with things that are not DICOM. Skipped, with the reason, where Orthanc or the plugin is missing
(`.ci/run` installs them: apt-get install orthanc orthanc-dicomweb).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import http.server
import ipaddress
import re
import ssl
import threading
from pathlib import Path

import numpy as np
import orthancserver
import pytest
import requests

from client.cli import main
from common.config import load_site_config
from common.dicom import is_dicom_file
from common.errors import ConfigError
from common.prepare import prepare

SITES = ("site01", "site02", "site03")
USER, PASSWORD, TOKEN = "spinefed", "pacs-secret", "tok-123"


@pytest.fixture(scope="module")
def orthanc(small_sites, tmp_path_factory):
    """A running Orthanc holding three small virtual sites: its DICOMweb URL."""
    if orthancserver.ORTHANC is None or orthancserver.PLUGIN is None:
        pytest.skip(orthancserver.MISSING)
    root, _ = small_sites
    with orthancserver.running(tmp_path_factory.mktemp("orthanc"), USER, PASSWORD) as base:
        files = [p for site in SITES for p in sorted((root / site).rglob("*"))]
        orthancserver.upload(base, USER, PASSWORD, [p for p in files if is_dicom_file(p) and "_truth" not in p.parts])
        yield f"{base}/dicom-web"


def _site(
    tmp: Path, data_root: Path, pacs_url: str, auth: str = f"{USER}:{PASSWORD}", name: str = "site01", **data
) -> Path:
    """A dicomweb site.yaml in tmp (cache, secret, store, auth file there); manifest.csv from data_root."""
    tmp.mkdir(parents=True, exist_ok=True)
    auth_file = tmp / "pacs.auth"
    auth_file.write_text(auth + "\n")
    auth_file.chmod(0o600)
    keys = {"root": str(data_root), "cache": "cache", "secret": "secret.key", "source": "dicomweb", "url": pacs_url,
            "auth_file": "pacs.auth", "store": "store", **data}  # fmt: skip
    lines = [f"site: {name}", "data:", *(f"  {k}: {v}" for k, v in keys.items())]
    lines += ["preprocess:", "  size: 64", "  margin: 0.5"]
    (tmp / "site.yaml").write_text("\n".join(lines) + "\n")
    return tmp / "site.yaml"


def _stacks(cache: Path) -> dict[str, bytes]:
    with (cache / "index.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {r["patient_id"]: np.load(cache / r["file"]).tobytes() for r in rows if r["status"] == "ok"}


def _index(cache: Path) -> dict[str, dict]:
    with (cache / "index.csv").open(encoding="utf-8") as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder_caches(small_sites, tmp_path_factory):
    """The same three sites prepared from their folders (the reference the DICOMweb path must equal)."""
    root, _ = small_sites
    out = {}
    for site in SITES:
        tmp = tmp_path_factory.mktemp(f"folder-{site}")
        cfg = tmp / "site.yaml"
        cfg.write_text(f"site: {site}\ndata:\n  root: {root / site}\n  cache: cache\n  secret: secret.key\n"
                       "preprocess:\n  size: 64\n  margin: 0.5\n")  # fmt: skip
        prepare(load_site_config(cfg), workers=1)
        out[site] = tmp / "cache"
    return out


def test_prepare_from_orthanc_equals_folder(orthanc, small_sites, folder_caches, tmp_path, capsys):
    """Stacks prepared from DICOMweb are byte-identical to those prepared from the same files on disk; the store
    holds the PACS's files unchanged (stored transfer syntax: RLE and JPEG-LS stay compressed); a re-run fetches
    nothing."""
    root, _ = small_sites
    for site in SITES:
        cfg = _site(tmp_path / site, root / site, orthanc, name=site)
        assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "3 of 3 patient(s) complete" in out and "0 unchanged" in out
        reference, fetched = _stacks(folder_caches[site]), _stacks(tmp_path / site / "cache")
        assert len(reference) == 3 and fetched.keys() == reference.keys()
        assert all(fetched[k] == reference[k] for k in reference), site
        store = tmp_path / site / "store"
        originals = {_sha(p) for p in (root / site).rglob("*") if p.is_file()}
        files = list(store.rglob("*.dcm"))
        assert files and all(_sha(p) in originals for p in files)  # the PACS's bytes, not a re-encoding
        assert (store.stat().st_mode & 0o077) == 0 and all((p.stat().st_mode & 0o077) == 0 for p in files)
        assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert f"0 new instance(s) (0.0 MB), {len(files)} unchanged" in out, out
        assert _stacks(tmp_path / site / "cache") == reference


def test_progress_and_nothing_identifying_in_the_prepare_log(orthanc, small_sites, tmp_path, capsys):
    root, _ = small_sites
    cfg = _site(tmp_path, root / "site01", orthanc)
    assert main(["prepare", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err  # not a terminal: plain progress lines, patients and megabytes
    assert "fetching from PACS (0.0 MB): 0/3 patient (0%)" in err
    assert re.search(r"fetching from PACS \(\d+\.\d MB\): 3/3 patient \(100%\), done in", err), err
    text = (tmp_path / "cache-prepare.log").read_text()
    assert "PACS fetch: 3 of 3 row(s) complete" in text
    assert not any(pid in text for pid in _index(tmp_path / "cache")), "a PatientID in the log"
    assert PASSWORD not in text


@pytest.mark.parametrize(
    "auth, url, expected",
    [
        (f"{USER}:wrong", None, "HTTP 401 on a QIDO-RS study query: the credentials in data.auth_file were refused"),
        (f"{USER}:{PASSWORD}", "http://127.0.0.1:{closed}/dicom-web", "cannot reach it (Connection refused)"),
    ],
    ids=["wrong-password", "unreachable"],
)
def test_unusable_pacs_exits_2_writing_nothing(orthanc, small_sites, tmp_path, capsys, auth, url, expected):
    root, _ = small_sites
    url = (url or orthanc).replace("{closed}", str(orthancserver.free_port()))
    cfg = _site(tmp_path, root / "site01", url, auth=auth)
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and "wrong" not in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()
    assert main(["check", "--config", str(cfg)]) == 1
    assert f"FAIL  PACS: PACS {url}: " in capsys.readouterr().out


def test_missing_patient_is_a_row_skip(orthanc, small_sites, tmp_path, capsys):
    root, _ = small_sites
    data = tmp_path / "data"
    data.mkdir()
    text = (root / "site01" / "manifest.csv").read_text()
    extra = "NOT-ON-PACS,benign,1.2.3.4,,10,10,20,20,,,,L1\n"
    (data / "manifest.csv").write_text(text + extra)
    cfg = _site(tmp_path, data, orthanc)
    assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0
    assert "3 of 4 patient(s) complete" in capsys.readouterr().out
    index = _index(tmp_path / "cache")
    assert index["NOT-ON-PACS"]["status"] == "skipped"
    assert index["NOT-ON-PACS"]["reason"].startswith("manifest line 5: not found on the PACS (no study for this")
    assert sum(r["status"] == "ok" for r in index.values()) == 3


def test_no_suitable_series_and_stale_store_copy(orthanc, small_sites, tmp_path):
    """A row whose series choice fails on the PACS is skipped with the folder path's reason, and is not prepared
    from what the store kept of an earlier fetch."""
    root, _ = small_sites
    data = tmp_path / "data"
    data.mkdir()
    src = (root / "site01" / "manifest.csv").read_text().splitlines()
    (data / "manifest.csv").write_text("\n".join(src) + "\n")
    cfg = _site(tmp_path, data, orthanc)
    assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0
    header, first, *rest = src
    cols = header.split(",")
    row = dict(zip(cols, first.split(",")))
    row["t1_series_uid"] = "1.2.3.999"  # a series the PACS does not have
    (data / "manifest.csv").write_text("\n".join([header, ",".join(row[c] for c in cols), *rest]) + "\n")
    assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0
    reason = _index(tmp_path / "cache")[row["patient_id"]]["reason"]
    assert reason == (
        "manifest line 2: t1_series_uid 1.2.3.999 not found among this patient's DICOM series (searched on the PACS)"
    )


def test_interrupted_fetch_resumes_and_refetches_damaged_files(orthanc, small_sites, folder_caches, tmp_path):
    from client.pacs import Fetcher, Store, connect

    root, _ = small_sites
    config = load_site_config(_site(tmp_path, root / "site02", orthanc, name="site02"))
    pacs, rows = connect(config)
    store = Store(config.dicomweb.store, config.dicomweb.url)
    first = Fetcher(pacs, store)
    first.stop_after = 10
    with pytest.raises(KeyboardInterrupt):
        first.run(rows)
    assert len(list(config.dicomweb.store.rglob("*.dcm"))) == 10  # complete files only, no temporaries
    second = Fetcher(pacs, Store(config.dicomweb.store, config.dicomweb.url)).run(rows)
    assert second.failed == {} and second.fetched == 3
    total = second.new_instances + second.unchanged
    assert second.unchanged == 10 and second.new_instances == total - 10
    victim = sorted(config.dicomweb.store.rglob("*.dcm"))[3]
    victim.write_bytes(b"")  # e.g. emptied by a power loss after the rename
    third = Fetcher(pacs, Store(config.dicomweb.store, config.dicomweb.url)).run(rows)
    assert (third.new_instances, third.unchanged) == (1, total - 1) and victim.stat().st_size > 0
    prepare(config.for_prepare(), workers=1)
    assert _stacks(config.cache) == _stacks(folder_caches["site02"])


def test_client_check_reports_the_pacs(orthanc, small_sites, tmp_path, capsys):
    root, _ = small_sites
    cfg = _site(tmp_path, root / "site01", orthanc)
    main(["check", "--config", str(cfg)])
    out = capsys.readouterr().out
    line = (
        f"OK    PACS: PACS {orthanc}: reachable, authenticated (basic); 3 studies for the first 3 manifest patient(s)"
    )
    assert line + " (3 of them found)" in out, out


# --- configuration and the auth file ----------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    cases = {
        "url: ''": "key 'data.url'",
        "url: ftp://pacs/dicom-web": "key 'data.url': expected the DICOMweb service's http(s):// URL",
        "url: https://user:pw@pacs/dicom-web": "key 'data.url': expected a URL without user or password",
        "store: cache/dicom": "key 'data.store': expected a folder apart from data.cache",
        "source: pacs": "key 'data.source': expected one of folder, dicomweb",
    }
    for line, expected in cases.items():
        key, value = line.split(": ", 1)
        cfg = _site(tmp_path / key, tmp_path, "https://pacs.example/dicom-web", **{key: value})
        with pytest.raises(ConfigError) as exc:
            load_site_config(cfg)
        assert expected in str(exc.value), (line, str(exc.value))
    (tmp_path / "folder.yaml").write_text(
        "site: a\ndata:\n  root: .\n  cache: c\n  secret: s\n  url: https://pacs.example/dicom-web\n"
    )
    with pytest.raises(ConfigError, match="key 'data.source': expected dicomweb where data.url is set"):
        load_site_config(tmp_path / "folder.yaml")


def test_auth_file_owner_only_and_never_shown(tmp_path, capsys):
    cfg = _site(tmp_path, tmp_path, "http://127.0.0.1:9/dicom-web", auth="someone:hunter2")
    (tmp_path / "manifest.csv").write_text("patient_id,lesion_instance,x0,y0,x1,y1\nP1,3,1,1,5,5\n")
    (tmp_path / "pacs.auth").chmod(0o640)
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "key 'data.auth_file'" in err and "is readable by others (mode 640); run chmod 600" in err
    (tmp_path / "pacs.auth").chmod(0o600)
    (tmp_path / "pacs.auth").write_text("hunter2 without a user\n")
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "must hold one line: user:password, or Bearer <token>" in err and "hunter2" not in err


# --- bearer tokens and answers that are not DICOM: a stub in front of Orthanc -----------------------------------


class _Stub(http.server.ThreadingHTTPServer):
    """Checks `Authorization: Bearer TOKEN`, then forwards to Orthanc with basic auth, or answers `mode`'s way."""

    daemon_threads = True

    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.upstream, self.mode = upstream, "forward"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}/dicom-web"


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        server: _Stub = self.server
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, b'{"error": "bearer token required"}', "application/json")
        retrieval = "metadata" not in self.path and "/series/" in self.path
        if server.mode == "html" or (server.mode == "html-retrieval" and retrieval):
            return self._send(200, b"<html><body>Please log in</body></html>", "text/html")
        if server.mode == "forbidden":
            return self._send(403, b"forbidden", "text/plain")
        if server.mode == "500-retrieval" and retrieval:
            return self._send(500, b"internal error", "text/plain")
        if server.mode == "not-dicom-part" and retrieval:
            body = b"--B\r\nContent-Type: application/dicom\r\n\r\nnot a DICOM file at all\r\n--B--\r\n"
            return self._send(200, body, 'multipart/related; type="application/dicom"; boundary=B')
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept",)}
        up = requests.get(server.upstream + self.path[len("/dicom-web") :], headers=headers, auth=(USER, PASSWORD),
                          timeout=30)  # fmt: skip
        self._send(up.status_code, up.content, up.headers.get("Content-Type", "application/octet-stream"))


@pytest.fixture
def stub(orthanc):
    server = _Stub(orthanc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_bearer_token(stub, small_sites, folder_caches, tmp_path, capsys):
    root, _ = small_sites
    cfg = _site(tmp_path / "ok", root / "site01", stub.url, auth=f"Bearer {TOKEN}")
    assert main(["prepare", "--quiet", "--config", str(cfg)]) == 0
    assert _stacks(tmp_path / "ok" / "cache") == _stacks(folder_caches["site01"])
    main(["check", "--config", str(cfg)])
    assert "OK    PACS: " in capsys.readouterr().out
    bad = _site(tmp_path / "bad", root / "site01", stub.url, auth="Bearer not-the-token")
    assert main(["prepare", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "not-the-token" not in err


def test_answers_that_are_not_dicom_are_refused(stub, small_sites, tmp_path, capsys):
    root, _ = small_sites
    stub.mode = "html"  # e.g. a login page where the DICOMweb service should be
    cfg = _site(tmp_path / "a", root / "site01", stub.url, auth=f"Bearer {TOKEN}")
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "answered a DICOMweb query with text/html, not DICOM JSON; is data.url the DICOMweb service's root?" in err
    assert not (tmp_path / "a" / "store").exists()
    for mode, reason in (
        ("html-retrieval", "refused an instance of series {}: the PACS answered a retrieval with text/html, not DICOM"),
        ("not-dicom-part", "refused an instance of series {}: the PACS sent a part that is not a DICOM file (no DICM"),
        ("500-retrieval", "series {}: the PACS answered HTTP 500 to a WADO-RS retrieval"),  # a failed instance
    ):
        stub.mode = mode
        cfg = _site(tmp_path / mode, root / "site01", stub.url, auth=f"Bearer {TOKEN}")
        assert main(["prepare", "--quiet", "--config", str(cfg)]) == 1  # no patient usable
        rows = _index(tmp_path / mode / "cache").values()
        for r in rows:
            assert r["status"] == "skipped" and re.match(r"manifest line \d: fetch incomplete \(", r["reason"])
            uid = re.search(r"series ([0-9.]+)", r["reason"]).group(1)
            assert reason.format(uid) in r["reason"], r["reason"]
            assert r["reason"].endswith("; run `client prepare` again to fetch the rest")
        assert not list((tmp_path / mode / "store").rglob("*.dcm"))
        assert "Traceback" not in capsys.readouterr().err


def test_folder_source_is_unchanged(tmp_path):
    (tmp_path / "site.yaml").write_text("site: a\ndata:\n  root: .\n  cache: c\n  secret: s\n")
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.dicomweb is None and cfg.for_prepare() is cfg and cfg.manifest == tmp_path / "manifest.csv"


def test_forbidden_account_exits_2(stub, small_sites, tmp_path, capsys):
    root, _ = small_sites
    stub.mode = "forbidden"
    cfg = _site(tmp_path, root / "site01", stub.url, auth=f"Bearer {TOKEN}")
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 403 on a QIDO-RS study query: the account in data.auth_file may not do this" in err
    assert not (tmp_path / "store").exists()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (the PACS's own CA, as hospitals have): (cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test PACS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "pacs.crt", folder / "pacs.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_with_the_pacs_ca_and_without(orthanc, small_sites, folder_caches, tmp_path, capsys):
    """HTTPS to the PACS: verified with data.ca_bundle (prepare works, stacks equal); without it the site's trust
    store does not know the PACS's CA: exit 2 with the TLS failure, nothing written."""
    root, _ = small_sites
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _Stub(orthanc, tls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bad = _site(tmp_path / "no-ca", root / "site01", server.url, auth=f"Bearer {TOKEN}")
        assert main(["prepare", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"PACS {server.url}: TLS failure (self-signed certificate)" in err, err
        assert not (tmp_path / "no-ca" / "store").exists()
        good = _site(tmp_path / "ca", root / "site01", server.url, auth=f"Bearer {TOKEN}", ca_bundle=str(cert))
        assert main(["prepare", "--quiet", "--config", str(good)]) == 0
        assert _stacks(tmp_path / "ca" / "cache") == _stacks(folder_caches["site01"])
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_uid_names_a_store_folder_only_when_it_is_digits_and_dots():
    from client.pacs import UID

    assert UID.match("1.2.840.10008.5.1.4.1.1.4") and UID.match("2")
    # a hostile or broken PACS must never steer a write or an rmtree outside the store
    for bad in ("..", "../..", "1.2/../../etc", "1.2\n", "1..2", "", "1.2.", "/1.2"):
        assert not UID.match(bad), bad
