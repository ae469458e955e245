"""Nothing half-written is reused: a killed `simulate data` is detected and rebuilt, the quick run regenerates an
incomplete cohort, and a stand-in backbone counts as done only when its weights and sidecar agree."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.datagen import cohort_marker, completed, generate
from simulations.pretrain import completed_weights, sidecar_path

REPO = Path(__file__).resolve().parent.parent


def _simulate_data(out: Path, *extra: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "simulations.cli", "data", "--small", "--sites", "2", "--patients", "40"]
    cmd += ["--workers", "1", "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, text=True, start_new_session=True, **kw)


def test_a_killed_generation_is_detected_and_rebuilt(tmp_path):
    out = tmp_path / "data"
    proc = _simulate_data(out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill once some patients are written (each leaves its sign truth), well before the 40th.
    while time.monotonic() < deadline and len(list(out.glob(".partial-sites/*/_truth/*.npz"))) < 3:
        assert proc.poll() is None, "generation ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert completed(out) is None and not cohort_marker(out).exists()
    assert not (out / "site01" / "manifest.csv").exists(), "a reader must never see a site before it is complete"

    again = _simulate_data(out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-2000:]
    assert "interrupted" in stderr and stderr.count("interrupted") == 1, stderr[-2000:]
    meta = completed(out)
    assert meta is not None and sum(s["patients"] for s in meta["sites"]) == 40
    assert not (out / ".partial-sites").exists()
    for site in ("site01", "site02"):
        rows = (out / site / "manifest.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + next(s["patients"] for s in meta["sites"] if s["site"] == site)
    # The rebuilt site prepares cleanly: no second copy of any series beside the first.
    from common.config import load_site_config
    from common.prepare import prepare

    summary = prepare(load_site_config(out / "site01" / "site.yaml"), workers=1)
    assert summary.ok == len(rows) - 1, [o.reason for o in summary.outcomes if o.status != "ok"]


def test_generation_refuses_a_folder_it_did_not_write(tmp_path):
    from common.errors import SpineFedError

    (tmp_path / "site01").mkdir()
    (tmp_path / "site01" / "patient.dcm").write_bytes(b"not ours")
    with pytest.raises(SpineFedError, match="not written by `simulate data`"):
        generate(tmp_path, n_sites=1, n_patients=1, small_=True, workers=1)
    assert (tmp_path / "site01" / "patient.dcm").read_bytes() == b"not ours"


def test_quick_run_regenerates_an_incomplete_cohort_and_reuses_a_complete_one(tmp_path, capsys):
    from simulations.run import _quick_cohort

    folder = tmp_path / "data"
    (folder / ".partial-sites" / "site01").mkdir(parents=True)  # what a killed first run leaves
    (folder / "_cache").mkdir()
    _quick_cohort(folder, public=False, n_sites=2, n_patients=4)
    first = capsys.readouterr().out
    assert "interrupted" in first and "generating" in first
    meta = completed(folder)
    assert meta and meta["requested"] == {"n_sites": 2, "n_patients": 4}
    stamp = cohort_marker(folder).stat().st_mtime_ns
    _quick_cohort(folder, public=False, n_sites=2, n_patients=4)
    assert capsys.readouterr().out == "" and cohort_marker(folder).stat().st_mtime_ns == stamp  # reused as is
    _quick_cohort(folder, public=False, n_sites=2, n_patients=5)  # another plan: rebuilt, not mixed
    assert "another plan" in capsys.readouterr().out
    assert completed(folder)["requested"] == {"n_sites": 2, "n_patients": 5}


def test_stand_in_weights_count_only_with_a_matching_sidecar(tmp_path):
    weights = tmp_path / "standin.pt"
    weights.write_bytes(b"weights")
    assert completed_weights(weights) is None  # killed before the sidecar
    meta = {"weights_sha256": hashlib.sha256(b"weights").hexdigest(), "train_config": {}}
    sidecar_path(weights).write_text(json.dumps(meta))
    assert completed_weights(weights) == meta
    weights.write_bytes(b"other weights")  # killed after a new weights file, before its sidecar
    assert completed_weights(weights) is None
    sidecar_path(weights).write_text("{")
    assert completed_weights(weights) is None


def test_a_failed_preparation_says_why_in_one_line(tmp_path):
    from common.errors import SpineFedError
    from simulations.run import _sites

    site = tmp_path / "siteX"
    site.mkdir()
    (site / "site.yaml").write_text("site: siteX\ndata:\n  root: .\n  cache: ../_cache/siteX\n  secret: ../_secrets/x.key\n")
    with pytest.raises(SpineFedError) as err:
        _sites(tmp_path, None)
    message = str(err.value)
    assert "manifest.csv: manifest not found" in message and "\n" not in message  # the child's own reason
