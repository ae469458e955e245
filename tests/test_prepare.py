"""`client prepare` end to end on a small site of real DICOM: the cache contract, bad-input classes, privacy of the
cache, and incremental re-runs."""

from __future__ import annotations

import csv
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from dicomfactory import Variant, write_manifest, write_patient, write_site_yaml
from pydicom.uid import RLELossless

from client.cli import main as client_main
from common import acquisition
from common.sitedata import INDEX_COLUMNS, SiteData

GOOD = ["GOOD1", "GOOD2", "GOOD3", "GOOD4"]


def _site(root: Path) -> tuple[Path, list[dict]]:
    data = root / "data"
    data.mkdir(parents=True)
    rows = [
        write_patient(data, "GOOD1"),
        write_patient(data, "GOOD2", Variant(mirrored=True, t2_mirrored=True), label="malignant"),
        write_patient(data, "GOOD3", Variant(multiframe=True)),
        write_patient(data, "GOOD4", Variant(transfer_syntax=RLELossless), label="Malignant", use_instance=True),
    ]
    bad_label = write_patient(data, "BADLABEL")
    bad_label["label"] = "maybe"
    dup = write_patient(data, "DUP")
    box_out = write_patient(data, "BOXOUT")
    box_out["x1"] = 400
    no_slice = write_patient(data, "NOSLICE")
    no_slice["lesion_sop_uid"] = "1.2.3.4.5.6.7.8.9"
    no_t2 = write_patient(data, "NOT2", Variant(no_t2=True))
    broken = write_patient(data, "BROKEN")
    lesion_file = next(
        p for p in data.rglob("*") if p.is_file() and broken["lesion_sop_uid"].encode() in p.read_bytes()
    )
    content = lesion_file.read_bytes()
    lesion_file.write_bytes(content[: len(content) - 20000])  # pixel data cut short, header intact
    rows += [
        bad_label,
        dup,
        dict(dup),
        box_out,
        no_slice,
        no_t2,
        broken,
        {"patient_id": "NODICOM", "label": "benign", "lesion_instance": 5, "x0": 1, "y0": 1, "x1": 9, "y1": 9},
    ]
    (data / "README.txt").write_text("exported by PACS\n")
    (data / "exp_000001" / "junk.dcm").parent.mkdir(exist_ok=True)
    (data / "exp_000001" / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    write_manifest(data, rows)
    write_site_yaml(root)
    return root / "site.yaml", rows


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    config, rows = _site(root)
    assert client_main(["prepare", "--config", str(config), "--quiet", "--workers", "2"]) == 0
    return root, config, rows


def read_index(root: Path) -> dict[str, dict]:
    with (root / "cache" / "index.csv").open(encoding="utf-8") as fh:
        text = fh.read()
    assert not text.startswith("\ufeff")
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0].keys()) == list(INDEX_COLUMNS + acquisition.COLUMNS)  # #24: the acquisition levels last
    return {r["patient_id"]: r for r in rows}


def test_good_patients_become_stacks(site):
    root, _, _ = site
    index = read_index(root)
    for pid in GOOD:
        row = index[pid]
        assert row["status"] == "ok", row["reason"]
        stack = np.load(root / "cache" / row["file"])
        assert stack.shape == (6, 48, 48) and stack.dtype == np.float32
        assert (root / "cache" / "qc" / f"{row['key']}.png").is_file()
    data = SiteData.open(root / "cache")
    assert len(data) == 4 and data.counts() == {"benign": 2, "malignant": 2}


@pytest.mark.parametrize(
    ("pid", "reason"),
    [
        ("BADLABEL", "label 'maybe' is not benign or malignant"),
        ("DUP", "appears on several lines"),
        ("BOXOUT", "outside the 128×128 lesion image"),
        ("NOSLICE", "lesion slice not found"),
        ("NOT2", "missing series"),
        ("BROKEN", "cannot be decoded"),
        ("NODICOM", "no DICOM found"),
    ],
)
def test_bad_rows_are_skipped_with_their_line(site, pid, reason):
    root, _, rows = site
    index = read_index(root)
    assert index[pid]["status"] == "skipped" and index[pid]["file"] == ""
    assert reason in index[pid]["reason"]
    lines = [2 + i for i, r in enumerate(rows) if r["patient_id"] == pid]
    assert f"manifest line {lines[-1]}" in index[pid]["reason"]
    if len(lines) > 1:
        assert ", ".join(map(str, lines)) in index[pid]["reason"]
    assert not (root / "cache" / "stacks" / f"{index[pid]['key']}.npy").exists()


def test_private_files_are_owner_only_and_secret_outside_cache(site):
    root, _, _ = site
    secret = root / "private" / "pseudonym.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "cache" / "index.csv").stat().st_mode) == 0o600
    assert (root / "cache") not in secret.parents


def test_nothing_in_the_cache_but_index_holds_identifiers(site):
    root, _, rows = site
    identifiers = {r["patient_id"].encode() for r in rows} | {b"DOE^"}
    identifiers |= {r["lesion_sop_uid"].encode() for r in rows if r.get("lesion_sop_uid")}
    checked = 0
    for path in (root / "cache").rglob("*"):
        if path.is_file() and path.name != "index.csv":
            content = path.read_bytes()
            assert not [i for i in identifiers if i in content], path.name
            checked += 1
    assert checked >= 12  # stacks, fingerprints and montages of the good patients


def test_rerun_reuses_unchanged_patients_and_rebuilds_a_changed_one(site, tmp_path, capsys):
    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config = copy / "site.yaml"
    assert client_main(["prepare", "--config", str(config), "--quiet", "--workers", "1"]) == 0
    assert "4 ok (4 unchanged, reused)" in capsys.readouterr().out
    manifest = copy / "data" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    rows[0]["x0"] = str(int(rows[0]["x0"]) - 2)
    write_manifest(copy / "data", rows)
    before = read_index(copy)["GOOD1"]["key"]
    stack_before = np.load(copy / "cache" / "stacks" / f"{before}.npy")
    assert client_main(["prepare", "--config", str(config), "--quiet", "--workers", "1"]) == 0
    assert "4 ok (3 unchanged, reused)" in capsys.readouterr().out
    assert not np.array_equal(np.load(copy / "cache" / "stacks" / f"{before}.npy"), stack_before)


def test_a_patient_removed_from_the_manifest_leaves_no_stack(site, tmp_path):
    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = copy / "data" / "manifest.csv"
    rows = [r for r in csv.DictReader(manifest.open(encoding="utf-8")) if r["patient_id"] != "GOOD2"]
    key = read_index(copy)["GOOD2"]["key"]
    write_manifest(copy / "data", rows)
    assert client_main(["prepare", "--config", str(copy / "site.yaml"), "--quiet", "--workers", "1"]) == 0
    assert not list((copy / "cache").rglob(f"{key}*"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("patient_id,label,lesion_sop_uid,x0,y0,x1\nA,benign,1.2,1,2,3\n", "required column(s) missing: y1"),
        ("patient_id,label,x0,y0,x1,y1\n", "needs a lesion_sop_uid or lesion_instance column"),
        ("", "empty file"),
        (b"\xff\xfepatient_id", "not UTF-8"),
    ],
)
def test_unusable_manifest_stops_and_leaves_the_cache_untouched(site, tmp_path, capsys, content, message):
    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = copy / "data" / "manifest.csv"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = {p: p.stat().st_mtime_ns for p in (copy / "cache").rglob("*")}
    assert client_main(["prepare", "--config", str(copy / "site.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(manifest) in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in (copy / "cache").rglob("*")} == before


def test_bad_config_names_file_and_key(tmp_path, capsys):
    config = tmp_path / "site.yaml"
    config.write_text("site: x\ndata:\n  root: d\n  cache: c\n  secret: s\npreprocess:\n  size: big\n")
    assert client_main(["prepare", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "preprocess.size" in err


def test_nothing_usable_exits_non_zero(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_manifest(
        data, [{"patient_id": "X", "label": "benign", "lesion_instance": 1, "x0": 0, "y0": 0, "x1": 5, "y1": 5}]
    )
    config = write_site_yaml(tmp_path)
    assert client_main(["prepare", "--config", str(config), "--quiet"]) == 1
    assert "no usable patient" in capsys.readouterr().err


def test_files_are_written_atomically(tmp_path, monkeypatch):
    from common import fileio

    target = tmp_path / "x.npy"
    fileio.atomic_save_npy(target, np.zeros(3))

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_save_npy(target, np.ones(3))
    assert np.array_equal(np.load(target), np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_a_killed_prepare_leaves_only_complete_files(site, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "cache")
    cmd = [
        sys.executable,
        "-m",
        "client.cli",
        "prepare",
        "--config",
        str(copy / "site.yaml"),
        "--quiet",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((copy / "cache").glob("stacks/*.npy")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for npy in (copy / "cache").glob("stacks/*.npy"):
        assert np.load(npy).shape == (6, 48, 48)  # never a half-written stack
    # the next run finishes the job and clears any temporary leftovers
    assert client_main(["prepare", "--config", str(copy / "site.yaml"), "--quiet", "--workers", "1"]) == 0
    assert not list((copy / "cache").rglob("*.tmp"))
    assert len(SiteData.open(copy / "cache")) == 4


@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        ("dp: true", "'privacy.ledger' is missing"),  # DP without a ledger path: refused, with what to do
        ("dp: true\n  ledger: c/ledger.json", "lies inside the cache folder"),  # re-preparing would lose it
        ("delta: .nan", "privacy.delta"),
        ("max_epsilon_per_experiment: 9", "privacy.max_epsilon_per_experiment"),  # above the budget (8)
        ("min_cell: 0", "privacy.min_cell"),
    ],
)
def test_privacy_settings_are_checked_on_load(tmp_path, privacy, expected):
    from common.config import load_site_config
    from common.errors import ConfigError

    config = tmp_path / "site.yaml"
    config.write_text(f"site: x\ndata:\n  root: d\n  cache: c\n  secret: s.key\nprivacy:\n  {privacy}\n")
    with pytest.raises(ConfigError, match=expected) as err:
        load_site_config(config)
    assert str(config) in str(err.value)


def test_privacy_defaults_and_yaml_exponents(tmp_path):
    from common.config import load_site_config

    config = tmp_path / "site.yaml"
    config.write_text("site: x\ndata:\n  root: d\n  cache: c\n  secret: keys/s.key\nprivacy:\n  delta: 1e-6\n")
    priv = load_site_config(config).privacy
    assert priv.delta == 1e-6  # YAML 1.1 reads 1e-6 as text; the site meant the number
    assert (priv.min_cell, priv.max_noise_multiplier, priv.class_weight, priv.experiment_epsilon) == (5, 10.0, 1.0, 4.0)
    assert priv.ledger is None and priv.ledger_record == tmp_path / "keys" / "s-privacy-record.json"


def test_rerun_reads_no_unchanged_file_and_rereads_a_changed_one(site, tmp_path, monkeypatch):
    """The scan cache: an unchanged tree is not read again (only stat calls), a rewritten file is, unreadable files
    are always read again (so their reasons are logged again), a damaged cache is a full scan, never an error; the
    cache holds identifiers, so it is owner-only and lies beside the secret, outside the cache folder."""
    import common.dicom as dicom
    from common.config import load_site_config
    from common.prepare import prepare, scan_cache_path

    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config = load_site_config(copy / "site.yaml")
    first = prepare(config, workers=1)  # copied files are new files (new inodes): a full scan
    path = scan_cache_path(config)
    assert path.parent == config.secret.parent and config.cache not in path.parents
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    index = (copy / "cache" / "index.csv").read_bytes()

    read = []
    real = dicom.read_file
    monkeypatch.setattr(dicom, "read_file", lambda p: read.append(p) or real(p))
    again = prepare(config, workers=1)
    assert {Path(p).name for p in read} == {"junk.dcm"}  # the unreadable file only
    assert again.reused == first.ok and (copy / "cache" / "index.csv").read_bytes() == index
    assert (again.dicom_files, again.non_dicom_files, again.unreadable) == (
        first.dicom_files,
        first.non_dicom_files,
        first.unreadable,
    )

    good1 = next(p for p in (copy / "data").rglob("*") if p.is_file() and b"GOOD1" in p.read_bytes()[:4096])
    good1.write_bytes(good1.read_bytes())  # same bytes, rewritten: read again, to be sure
    read.clear()
    prepare(config, workers=1)
    assert sorted(Path(p).name for p in read) == sorted(["junk.dcm", good1.name])

    path.write_text('{"version": 1, "files": [')  # damaged: ignored, rewritten
    read.clear()
    assert prepare(config, workers=1).ok == first.ok and len(read) > 20
    assert prepare(config, workers=1).reused == first.ok


def test_a_patient_whose_files_cannot_be_put_in_place_is_skipped_alone(site, tmp_path, monkeypatch):
    """Workers leave temporary files that the parent makes durable and renames; a failure there (disk full, a
    permission) skips that patient with the usual reason, leaves no temporary file, and the others go on."""
    from common import fileio
    from common.config import load_site_config
    from common.prepare import prepare

    root, _, _ = site
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "cache")
    real = os.replace
    failed = []

    def replace(src, dst):
        if str(dst).endswith(".png") and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    summary = prepare(load_site_config(copy / "site.yaml"), workers=1)
    assert summary.ok == len(GOOD) - 1
    broken = [o for o in summary.outcomes if o.row.patient_id in GOOD and o.status != "ok"]
    assert len(broken) == 1 and "unexpected error (OSError)" in broken[0].reason
    assert not list((copy / "cache").rglob("*.tmp"))
    assert not list((copy / "cache" / "stacks").glob(f"{broken[0].key}.*"))  # no stack without its fingerprint
    monkeypatch.setattr(fileio.os, "replace", real)
    assert prepare(load_site_config(copy / "site.yaml"), workers=1).ok == len(GOOD)
