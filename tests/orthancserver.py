"""A throwaway Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) on loopback, for tests/test_pacs_dicomweb.py and
bench/pacs_fetch.py: a config of its own (loopback only, DICOM port off, basic authentication, storage in `work`),
the DICOMweb plugin at /dicom-web/, files uploaded through the REST API (POST /instances)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
PLUGIN = next(
    (p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
     if Path(p).is_file()),
    None,
)  # fmt: skip
MISSING = "Orthanc or its DICOMweb plugin is missing (as root: apt-get install orthanc orthanc-dicomweb)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(work: Path, user: str, password: str) -> Iterator[str]:
    """Start Orthanc with its files in `work`; yields its base URL (http://127.0.0.1:PORT) once it answers."""
    if ORTHANC is None or PLUGIN is None:
        raise RuntimeError(MISSING)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "spinefed-test",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    base = f"http://127.0.0.1:{port}"
    with (work / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{base}/system", auth=(user, password), timeout=2).ok:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (work / "orthanc.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"Orthanc did not start (exit {proc.poll()}): {tail}")
                time.sleep(0.05)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def upload(base: str, user: str, password: str, files: Iterable[Path]) -> int:
    """POST each file to /instances; returns how many."""
    n = 0
    with requests.Session() as s:
        s.auth = (user, password)
        for p in files:
            s.post(f"{base}/instances", data=Path(p).read_bytes(), timeout=60).raise_for_status()
            n += 1
    return n
