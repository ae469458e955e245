"""`client predict` on phantom patients: output contract, synthetic refusal, same stack as `client prepare`, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from client.cli import main
from common.model import ModelConfig, build_model
from common.modelfile import save_model

CFG = ModelConfig(arch="resnet18", image_size=64)
VALIDATION = {
    "protocol": "tenfold",
    "n": 30,
    "sensitivity": {"value": 0.8, "lo": 0.49, "hi": 0.94, "k": 8, "n": 10},
    "specificity": {"value": 0.95, "lo": 0.76, "hi": 0.99, "k": 19, "n": 20},
    "auc": {"value": 0.93, "lo": 0.84, "hi": 1.0, "var": 0.002, "method": "delong"},
}


def _save(path, threshold=0.5, synthetic=True):
    torch.manual_seed(0)
    model = build_model(CFG)
    model.train()
    with torch.no_grad():  # BN statistics of a plausible input range, so scores are not all 0.5
        model(torch.randn(8, 6, 64, 64))
    save_model(path, model, CFG, threshold=threshold, validation=VALIDATION,
               training_sites={"site02": {"patients": 3, "benign": 2, "malignant": 1}},
               provenance={"seeds": [0]}, synthetic=synthetic, dp=None)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "synthetic": _save(d / "syn.pt"),
        "real": _save(d / "real.pt", synthetic=False),
        "t0": _save(d / "t0.pt", threshold=0.0, synthetic=False),
        "t1": _save(d / "t1.pt", threshold=1.0, synthetic=False),
    }


@pytest.fixture(scope="module")
def site(prepared_small_sites):
    """site01: its site.yaml, manifest rows and index rows."""
    root, configs, _ = prepared_small_sites
    cfg = next(c for c in configs if c.site == "site01")
    rows = list(csv.DictReader((cfg.manifest).open(encoding="utf-8")))
    index = {r["patient_id"]: r for r in csv.DictReader((cfg.cache / "index.csv").open(encoding="utf-8"))}
    return cfg, rows, index


def _run(capsys, *argv):
    rc = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_contract(capsys, models, site):
    cfg, rows, _ = site
    pid = rows[0]["patient_id"]
    rc, out, err = _run(capsys, "--model", models["real"], "--config", cfg.file, "--patient", pid, "--json")
    assert rc == 0, err
    r = json.loads(out)
    for key in ("research_use_only", "patient_id", "site", "probability_malignant", "threshold", "threshold_source",
                "call", "validated", "model", "box", "gradcam", "intended_use"):  # fmt: skip
        assert key in r
    assert r["research_use_only"] is True and r["patient_id"] == pid and r["site"] == "site01"
    assert 0.0 <= r["probability_malignant"] <= 1.0
    assert r["call"] == ("malignant" if r["probability_malignant"] >= r["threshold"] else "benign")
    v = r["validated"]
    assert v["protocol"] == "tenfold" and v["sensitivity"]["lo"] == 0.49 and v["auc"]["method"] == "delong"
    assert r["model"]["synthetic"] is False and r["model"]["training_patients"] == 3


@pytest.mark.parametrize("which, call", [("t0", "malignant"), ("t1", "benign")])
def test_call_follows_the_models_threshold(capsys, models, site, which, call):
    cfg, rows, _ = site
    rc, out, _ = _run(
        capsys, "--model", models[which], "--config", cfg.file, "--patient", rows[1]["patient_id"], "--json"
    )
    r = json.loads(out)
    assert rc == 0 and r["call"] == call and r["threshold"] == (0.0 if which == "t0" else 1.0)
    assert r["probability_malignant"] < 1.0  # else threshold 1.0 would call it malignant


def test_text_output(capsys, models, site):
    cfg, rows, _ = site
    rc, out, _ = _run(capsys, "--model", models["real"], "--config", cfg.file, "--patient", rows[0]["patient_id"])
    assert rc == 0
    assert out.startswith("RESEARCH USE ONLY")
    assert "P(malignant):" in out and "sensitivity 0.80 (95% CI 0.49-0.94), 8/10" in out and "AUC" in out
    assert "SYNTHETIC" not in out


def test_synthetic_model_refused_unless_allowed(capsys, models, site, tmp_path):
    cfg, rows, _ = site
    args = ["--model", models["synthetic"], "--config", cfg.file, "--patient", rows[0]["patient_id"]]
    rc, out, err = _run(capsys, *args, "--gradcam", tmp_path / "cam.png")
    assert rc == 3 and out == "" and "SYNTHETIC" in err and "--allow-synthetic-model" in err
    assert not (tmp_path / "cam.png").exists()
    rc, out, err = _run(capsys, *args, "--allow-synthetic-model", "--json")
    assert rc == 0 and json.loads(out)["model"]["synthetic"] is True
    rc, out, _ = _run(capsys, *args, "--allow-synthetic-model")
    assert rc == 0 and "SYNTHETIC-DATA MODEL" in out


def test_stack_is_the_one_client_prepare_builds(site):
    from client.predict import stack_from_site

    cfg, rows, index = site
    for row in rows:
        built, _, _ = stack_from_site(cfg, row["patient_id"])
        cached = np.load(cfg.cache / index[row["patient_id"]]["file"])
        np.testing.assert_array_equal(built.stack, cached)


def test_dicom_mode_matches_config_mode_and_writes_gradcam(capsys, models, site, tmp_path):
    cfg, rows, _ = site
    row = rows[2]
    _, out, _ = _run(capsys, "--model", models["real"], "--config", cfg.file, "--patient", row["patient_id"], "--json")
    by_config = json.loads(out)
    box = ",".join(row[k] for k in ("x0", "y0", "x1", "y1"))
    png = tmp_path / "cam.png"
    rc, out, err = _run(capsys, "--model", models["real"], "--dicom", cfg.data_root, "--patient", row["patient_id"],
                        "--lesion-sop-uid", row["lesion_sop_uid"], "--box", box, "--json", "--gradcam", png)  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["probability_malignant"] == pytest.approx(by_config["probability_malignant"], abs=1e-6)
    assert r["gradcam"]["file"] == str(png) and r["gradcam"]["layer"] == "layer4.1" and png.stat().st_size > 10_000


def _t2_removed(cfg, row, dest):
    """A copy of one patient's DICOM without the T2W series the stack would use."""
    from common.dicom import scan_tree
    from common.geometry import lr_position
    from common.manifest import read_manifest
    from common.series import choose_t1, choose_t2
    from common.stacks import find_lesion

    mrow = next(r for r in read_manifest(cfg.manifest) if r.patient_id == row["patient_id"])
    series = scan_tree(cfg.data_root).series[row["patient_id"]]
    t1 = choose_t1(series, mrow.lesion_sop_uid, mrow.lesion_instance, "", 0)
    t2 = choose_t2(series, t1, lr_position(find_lesion(t1, mrow).plane), "", 0)
    keep = {f.path for s in series if s is not t2 for f in s.frames}
    for i, p in enumerate(sorted(keep)):
        shutil.copy(p, dest / f"f{i:04d}")
    return dest


def _bad_cases(models, cfg, rows, tmp_path):
    row = rows[0]
    box = ",".join(row[k] for k in ("x0", "y0", "x1", "y1"))
    dicom = ["--dicom", cfg.data_root, "--patient", row["patient_id"], "--lesion-sop-uid", row["lesion_sop_uid"]]
    garbage = tmp_path / "garbage.pt"
    shutil.copy(models["real"].with_suffix(".json"), garbage.with_suffix(".json"))
    garbage.write_bytes(b"\x00" * 100)
    no_t2 = tmp_path / "no_t2"
    no_t2.mkdir()
    return {
        "unknown patient": (2, ["--model", models["real"], "--config", cfg.file, "--patient", "NOPE"], "not in"),
        "unreadable model": (2, ["--model", garbage, "--config", cfg.file, "--patient", row["patient_id"]], "SHA-256"),
        "missing model": (2, ["--model", tmp_path / "none.pt", "--config", cfg.file, "--patient", "x"], "not found"),
        "box outside": (1, ["--model", models["real"], *dicom, "--box", "0,0,5000,5000"], "outside"),
        "bad box": (2, ["--model", models["real"], *dicom, "--box", "1,2,3"], "--box"),
        "missing series": (
            1,
            [
                "--model",
                models["real"],
                "--dicom",
                _t2_removed(cfg, row, no_t2),
                "--lesion-sop-uid",
                row["lesion_sop_uid"],
                "--box",
                box,
            ],
            "T2",
        ),  # fmt: skip
        "no mode": (2, ["--model", models["real"], "--patient", "x"], "either --config"),
        "bad layer": (
            2,
            [
                "--model",
                models["real"],
                "--config",
                cfg.file,
                "--patient",
                row["patient_id"],
                "--gradcam",
                tmp_path / "c.png",
                "--gradcam-layer",
                "layer9",
            ],
            "layer9",
        ),  # fmt: skip
        "unknown slice": (
            1,
            [
                "--model",
                models["real"],
                "--dicom",
                cfg.data_root,
                "--patient",
                row["patient_id"],
                "--lesion-instance",
                "999",
                "--box",
                box,
            ],
            "not found",
        ),  # fmt: skip
    }


def test_bad_inputs_give_one_clear_line(capsys, models, site, tmp_path):
    cfg, rows, _ = site
    for name, (code, argv, words) in _bad_cases(models, cfg, rows, tmp_path).items():
        rc, out, err = _run(capsys, *argv)
        assert rc == code, (name, err)
        assert out == "", name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (name, err)
        assert "Traceback" not in err and "manifest line 0" not in err, name


@pytest.mark.parametrize("model", ["", "missing.pt", "."])
def test_empty_or_missing_model_is_one_line_naming_model(capsys, tmp_path, monkeypatch, model):
    # `--model ""` ended in a ValueError traceback ("PosixPath('.') has an empty name"); no site is needed to see it.
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "--model", model, "--config", tmp_path / "site.yaml", "--patient", "x")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model"), err
    assert "Traceback" not in err
