"""Final-model file (common/modelfile.py): round trip, refusal of corrupt/mismatched files, metadata checks, model card."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import SpineFedError
from common.model import ModelConfig, build_model
from common.modelfile import load_model, read_meta, save_model, sidecar_path, write_model_card

CFG = ModelConfig(arch="resnet18", image_size=32)
VALIDATION = {
    "protocol": "tenfold",
    "n": 30,
    "accuracy": {"value": 0.9, "lo": 0.74, "hi": 0.97, "k": 27, "n": 30},
    "sensitivity": {"value": 0.8, "lo": 0.49, "hi": 0.94, "k": 8, "n": 10},
    "specificity": {"value": 0.95, "lo": 0.76, "hi": 0.99, "k": 19, "n": 20},
    "auc": {"value": 0.93, "lo": 0.84, "hi": 1.0, "var": 0.002, "method": "delong"},
}
SITES = {
    "site01": {"patients": 12, "benign": 8, "malignant": 4},
    "site02": {"patients": 18, "benign": 12, "malignant": 6},
}


def _save(path, cfg=CFG, **over):
    torch.manual_seed(0)
    model = build_model(cfg)
    kw = dict(
        threshold=0.4,
        validation=VALIDATION,
        training_sites=SITES,
        provenance={"config_hash": "c0ffee", "app_bundle": "fab123", "cache_hashes": {"site01": "aa"}, "seeds": [0]},
        synthetic=True,
        dp={"site02": {"enabled": True, "epsilon": 2.5, "delta": 1e-5}},
    )
    kw.update(over)
    return model, save_model(path, model, cfg, **kw)


def test_round_trip(tmp_path):
    model, meta = _save(tmp_path / "final.pt")
    loaded, meta2 = load_model(tmp_path / "final.pt")
    assert meta2 == json.loads(json.dumps(meta))
    x = torch.randn(2, 6, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    for key in ("format", "format_version", "created", "package", "weights", "model", "threshold", "validation",
                "training_sites", "dp", "provenance", "synthetic", "intended_use", "research_use_only"):  # fmt: skip
        assert key in meta2
    assert meta2["threshold"] == {"value": 0.4, "source": meta["threshold"]["source"]}
    assert meta2["dp"]["enabled_sites"] == ["site02"]
    assert meta2["dp"]["per_site"]["site01"] == {"enabled": False, "epsilon": None}


def test_round_trip_of_another_registered_backbone(tmp_path):
    """load_model rebuilds whatever backbone the sidecar names (here DenseNet-121, GroupNorm, 6-channel conv0)."""
    cfg = ModelConfig(arch="densenet121", input_mode="conv1", norm="group", trainable="last-stage+head", image_size=32)
    model, meta = _save(tmp_path / "dn.pt", cfg=cfg)
    loaded, meta2 = load_model(tmp_path / "dn.pt")
    assert meta2["model"]["arch"] == "densenet121" and loaded.features.conv0.in_channels == 6
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_corrupt_weights_are_refused(tmp_path):
    _save(tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(SpineFedError, match="SHA-256"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("damage", ["missing_weights", "missing_sidecar", "bad_json", "not_ours", "version"])
def test_unusable_files_give_clear_errors(tmp_path, damage):
    path = tmp_path / "m.pt"
    _save(path)
    side = sidecar_path(path)
    if damage == "missing_weights":
        path.unlink()
    elif damage == "missing_sidecar":
        side.unlink()
    elif damage == "bad_json":
        side.write_text(side.read_text()[:50])
    elif damage == "not_ours":
        side.write_text('{"format": "something-else"}')
    else:
        meta = json.loads(side.read_text())
        meta["format_version"] = 99
        side.write_text(json.dumps(meta))
    with pytest.raises(SpineFedError, match="m.pt"):
        load_model(path)


def test_mismatched_architecture_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    meta = json.loads(sidecar_path(path).read_text())
    meta["model"]["arch"] = "resnet34"  # hash still matches: only the architecture disagrees
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(SpineFedError, match="do not fit the resnet34"):
        load_model(path)


def test_garbage_weights_with_matching_hash(tmp_path):
    import hashlib

    path = tmp_path / "m.pt"
    _save(path)
    path.write_bytes(b"not a torch file")
    meta = json.loads(sidecar_path(path).read_text())
    meta["weights"]["sha256"] = hashlib.sha256(b"not a torch file").hexdigest()
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(SpineFedError, match="not a readable PyTorch file"):
        load_model(path)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"validation": {**VALIDATION, "records": [{"key": "k1", "score": 0.3}]}}, "per-patient"),
        ({"provenance": {"patient_ids": ["X"]}}, "per-patient"),
        ({"training_sites": {"site01": {"patients": "12"}}}, "count"),
        ({"dp": {"site01": {"enabled": True}}}, "epsilon"),
        ({"dp": {"site99": {"enabled": False}}}, "not one of the training sites"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_bad_metadata_rejected_before_writing(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        _save(tmp_path / "m.pt", **over)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.json").exists()


def test_model_card_sections_and_no_patient_ids(tmp_path, small_sites):
    import csv

    _, meta = _save(tmp_path / "m.pt")
    text = write_model_card(tmp_path / "m.md", read_meta(tmp_path / "m.pt"))
    assert (tmp_path / "m.md").read_text(encoding="utf-8") == text
    for heading in ("## Intended use", "## Model", "## Training sites (patient counts only)", "## Validation",
                    "## Differential privacy", "## Limitations", "## Provenance"):  # fmt: skip
        assert heading in text
    assert "Research use only" in text and "SYNTHETIC DATA" in text
    assert "not a fracture detector" in text.lower() or "Not a detector" in text
    assert "0.80 (95% CI 0.49–0.94), 8/10" in text.replace("0.800", "0.80")
    assert "| site02 | yes | 2.50 |" in text
    assert (
        "outside the vertebral body" in text and "generalization" in text and "one abnormal vertebral segment" in text
    )
    assert "c0ffee" in text
    root, _ = small_sites
    ids = [r["patient_id"] for m in root.glob("*/manifest.csv") for r in csv.DictReader(m.open(encoding="utf-8"))]
    assert ids
    sidecar = sidecar_path(tmp_path / "m.pt").read_text()
    assert not [i for i in ids if i in text or i in sidecar]


def test_card_without_synthetic_or_dp(tmp_path):
    _, meta = _save(tmp_path / "m.pt", synthetic=False, dp=None, validation={"protocol": "site-held-out"})
    text = write_model_card(tmp_path / "m.md", meta)
    assert "SYNTHETIC" not in text
    assert "No site trained with differential privacy." in text
    assert "No validation results recorded" in text
    assert "come from sites that did not train the model" in text


@pytest.mark.parametrize("path", ["", ".", "/"])
def test_a_path_without_a_file_name_is_a_user_error(path):
    # Path("") is Path("."): pathlib's with_suffix raised a bare ValueError for the sidecar.
    with pytest.raises(SpineFedError, match="names no file"):
        read_meta(path)
    with pytest.raises(SpineFedError):
        load_model(path)


def test_class_counts_alone_give_the_patient_total(tmp_path):
    # The coordinator records each training site's census as class counts: the card and `client predict` must still
    # state how many patients trained the model (they said 0).
    sites = {"site01": {"benign": 7, "malignant": 3}, "site02": {"benign": 5, "malignant": 5}}
    _, meta = _save(tmp_path / "m.pt", training_sites=sites)
    assert {s: c["patients"] for s, c in meta["training_sites"].items()} == {"site01": 10, "site02": 10}
    assert "2 site(s), 20 patients in total." in write_model_card(tmp_path / "m.md", meta)
