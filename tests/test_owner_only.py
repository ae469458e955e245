"""Owner-only by construction (issue #20 item 4): `client` and `server`, started from a shell whose umask is 022, leave
nothing group- or world-readable; the prepare log names DICOM files by pseudonym, never by their path below data.root
(export folder names are often PatientIDs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dicomfactory import write_manifest, write_patient, write_site_yaml

from common import umask
from common.prepare import FILE_MAP

ROOT = Path(__file__).resolve().parent.parent
# Folder names the way PACS exports often name them: PatientID and name.
PATIENT_FOLDERS = ["PID0012345 DOE^JANE", "PID0067890", "PID0099999 ROE^RICHARD"]


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """A console command in a fresh interpreter started with the usual login umask (022)."""
    code = f"import sys; from {argv[0]}.cli import main; sys.exit(main({list(argv[1:])!r}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: os.umask(0o022))  # fmt: skip


def _dicom_site(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for i, folder in enumerate(PATIENT_FOLDERS[:2]):
        rows.append(write_patient(data, f"GOOD{i}"))
        made = max((p for p in data.iterdir() if p.is_dir() and p.name.startswith("exp_")), key=os.path.getmtime)
        made.rename(data / folder)
    broken = data / PATIENT_FOLDERS[2] / "IM0001.dcm"  # a DICOM preamble with a garbage header: unreadable
    broken.parent.mkdir()
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    write_manifest(data, rows)
    return write_site_yaml(root)


def test_client_prepare_and_keygen_under_umask_022_leave_nothing_readable_and_no_patient_folder_in_the_log(tmp_path):
    site_yaml = _dicom_site(tmp_path)
    before = set(tmp_path.rglob("*"))
    res = _run("client", "prepare", "--config", str(site_yaml), "--quiet", "--workers", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _run("client", "keygen", "--config", str(site_yaml), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    made = sorted(set(tmp_path.rglob("*")) - before)
    assert any(p.name == "index.csv" for p in made) and any(p.name == "supernode.key" for p in made)
    assert umask.exposed(made) == []
    log = (tmp_path / "cache-prepare.log").read_text()
    assert "unreadable DICOM file file-" in log
    for folder in PATIENT_FOLDERS:
        for part in folder.split():
            assert part not in log
    # the way back for site IT: the owner-only map in the cache, and the terminal of the person who ran prepare
    mapping = (tmp_path / "cache" / FILE_MAP).read_text()
    assert f"{PATIENT_FOLDERS[2]}/IM0001.dcm" in mapping and umask.exposed([tmp_path / "cache" / FILE_MAP]) == []
    name = mapping.split("\t")[0]
    assert name in log


def test_a_log_file_left_readable_by_an_earlier_run_is_made_owner_only(tmp_path):
    site_yaml = _dicom_site(tmp_path)
    old = tmp_path / "cache-prepare.log"
    old.write_text("an earlier run\n")
    old.chmod(0o644)
    assert (
        _run("client", "prepare", "--config", str(site_yaml), "--quiet", "--workers", "1", cwd=tmp_path).returncode == 0
    )
    assert old.stat().st_mode & 0o077 == 0


def test_server_state_logs_and_runs_are_owner_only_under_umask_022(tmp_path):
    (tmp_path / "certs").mkdir()
    for name in ("front.crt", "front.key"):
        (tmp_path / "certs" / name).write_text("placeholder\n")
    (tmp_path / "coordinator.yaml").write_text(textwrap.dedent("""\
        name: spinefed
        front:
          certificate: certs/front.crt
          key: certs/front.key
          nginx: /nonexistent/nginx
        """))  # fmt: skip
    (tmp_path / "runs").mkdir()  # an earlier start under umask 022 left these readable
    (tmp_path / "runs" / "final_arrays.npz").write_bytes(b"x")
    os.chmod(tmp_path / "runs" / "final_arrays.npz", 0o644)
    before = set(tmp_path.rglob("*"))
    # Everything up to starting the SuperLink and the front: state, secret, FLWR_HOME, server.log; nginx is missing,
    # so it stops there (no live federation needed).
    res = _run("server", "--config", str(tmp_path / "coordinator.yaml"), cwd=tmp_path)
    assert res.returncode != 0 and "nginx not found" in res.stderr
    made = sorted(set(tmp_path.rglob("*")) - before)
    assert any(p.name == "server.log" for p in made) and any(p.name == "superexec.secret" for p in made)
    # the documented exception (deploy/OPERATOR_COORDINATOR.md): as root, traversal-only folders for nginx's workers
    state = tmp_path / "state"
    traverse = [state, state / "front", state / "front" / "temp"]
    roots = [tmp_path / d for d in ("state", "logs", "runs")]
    assert umask.exposed(roots, allow=traverse) == []
    res = _run("server", "status", "--config", str(tmp_path / "coordinator.yaml"), cwd=tmp_path)
    assert "not running" in res.stderr
    assert umask.exposed(roots, allow=traverse) == []


def test_atomic_writes_follow_the_umask_instead_of_forcing_0644(tmp_path):
    from common.fileio import atomic_write_json

    old = os.umask(0o077)
    try:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600
    assert umask.current() == old


def test_exposed_allows_traversal_only_folders_where_named(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o711)
    assert umask.exposed([folder], allow=[folder]) == []
    assert umask.exposed([folder]) != []
    folder.chmod(0o755)
    umask.tighten([folder], allow=[folder])
    assert folder.stat().st_mode & 0o777 == 0o711


def test_the_prepare_log_scrubs_any_path_below_data_root_even_in_a_traceback(tmp_path):
    import logging

    from common.config import load_site_config
    from common.prepare import LogScrubber

    site_yaml = _dicom_site(tmp_path)
    config = load_site_config(site_yaml)
    out = tmp_path / "scrubbed.log"
    handler = logging.FileHandler(out)
    handler.setFormatter(LogScrubber(config, "%(levelname)s %(message)s"))
    logger = logging.getLogger("test.scrub")
    logger.addHandler(handler)
    path = config.data_root / PATIENT_FOLDERS[0] / "IM 7.dcm"
    try:
        try:
            (path / "missing").read_bytes()
        except OSError:
            logger.exception("reading %s failed", path)
        logger.warning("root itself is fine: %s", config.data_root)
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = out.read_text()
    assert "PID0012345" not in text and "DOE" not in text and "<data.root>/file-" in text
    assert str(config.data_root) in text  # the root names no patient
    assert f"{PATIENT_FOLDERS[0]}/IM 7.dcm" in (config.cache / FILE_MAP).read_text()
