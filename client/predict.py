"""`client predict`: decision support for one patient — P(malignant), the call at the model's validated threshold,
the validated performance of the procedure that produced the model, and optionally a Grad-CAM PNG.

The stack is built exactly as `client prepare` builds it (common.stacks.build_stack over common.dicom.scan_tree), either
from the site's manifest and DICOM tree with the site's preprocess settings (`--config --patient`), or from a DICOM
folder plus the lesion slice and box given on the command line (`--dicom`). Everything stays on this machine: the
output names the patient for the local user only.

Models trained on synthetic data are refused unless `--allow-synthetic-model` is given: a phantom-trained model's
numbers say nothing about real patients, and nothing on screen should let it pass for a validated one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from common.cli import Command
from common.errors import PatientSkipped, SpineFedError

RESEARCH_ONLY = "RESEARCH USE ONLY - not a medical device, not for clinical decisions."
EXIT_SYNTHETIC = 3


def _strip_line(reason: str) -> str:
    """build_stack names a manifest line; on the --dicom path there is no manifest."""
    return re.sub(r"^manifest line \d+: ", "", reason)


def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' (stored T1W pixels, x1/y1 exclusive) → ints, checked like a manifest box."""
    parts = [p.strip() for p in (text or "").split(",")]
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
        raise SpineFedError(f"--box {text!r}: expected four whole numbers x0,y0,x1,y1") from None
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise SpineFedError(f"--box {text!r}: empty or negative (needs 0 <= x0 < x1, 0 <= y0 < y1)")
    return x0, y0, x1, y1


def stack_from_site(config, patient_id: str):
    """(StackResult, size, margin) for a manifest patient of the site, with the site's preprocess settings."""
    from common.dicom import scan_tree
    from common.manifest import read_manifest
    from common.stacks import build_stack

    rows = [r for r in read_manifest(config.manifest) if r.patient_id == patient_id]
    if not rows:
        raise SpineFedError(f"patient {patient_id!r} is not in {config.manifest}")
    row = rows[0]
    if row.problem:
        raise PatientSkipped(row.problem)
    series = scan_tree(config.data_root).series.get(patient_id, [])
    if not series:
        raise PatientSkipped(f"manifest line {row.line}: no DICOM found for this patient_id below {config.data_root}")
    pre = config.preprocess
    return build_stack(row, series, pre.size, pre.margin), pre.size, pre.margin


def stack_from_dicom(folder: Path, sop_uid: str, instance: int | None, box, size: int, margin: float, patient=None):
    """StackResult from a DICOM folder holding one patient's study (or pick one with `patient`)."""
    from common.dicom import scan_tree
    from common.manifest import ManifestRow
    from common.sitedata import UNLABELLED
    from common.stacks import build_stack

    if not Path(folder).is_dir():
        raise SpineFedError(f"--dicom {folder}: not a folder")
    scan = scan_tree(Path(folder))
    if not scan.series:
        raise SpineFedError(f"--dicom {folder}: no readable DICOM found (files are recognised by content)")
    if patient is None:
        if len(scan.series) > 1:
            raise SpineFedError(f"--dicom {folder}: holds {len(scan.series)} patients; choose one with --patient")
        patient = next(iter(scan.series))
    if patient not in scan.series:
        raise SpineFedError(f"--dicom {folder}: no DICOM of patient {patient!r}")
    row = ManifestRow(
        line=0, patient_id=patient, label=UNLABELLED, lesion_sop_uid=sop_uid or "", lesion_instance=instance, box=box
    )
    try:
        return build_stack(row, scan.series[patient], size, margin), patient
    except PatientSkipped as exc:
        raise PatientSkipped(_strip_line(str(exc))) from None


def _fmt(m: Any) -> str:
    if not isinstance(m, dict) or m.get("value") is None or not math.isfinite(m["value"]):
        return "n/a"
    ci = f" (95% CI {m['lo']:.2f}-{m['hi']:.2f})" if m.get("lo") is not None and m.get("hi") is not None else ""
    counts = f", {m['k']:g}/{m['n']:g}" if "k" in m and "n" in m else ""
    return f"{m['value']:.2f}{ci}{counts}"


def predict_one(model, meta: dict, stack, box, *, gradcam_out: Path | None, layer: str | None, target: str) -> dict:
    """Score one stack; returns the result record (see `render_text`), writing the Grad-CAM PNG when asked."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from common.modelfile import headline

    size = int(meta["model"]["image_size"])
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    box = tuple(float(v) for v in box)
    if x.shape[-1] != size:  # the same resize as training's load_stacks
        scale = size / x.shape[-1]
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
        box = tuple(v * scale for v in box)
    device = next(model.parameters()).device
    with torch.inference_mode():
        p = float(torch.sigmoid(model(x[None].to(device))[0].float()).cpu())
    threshold = float(meta["threshold"]["value"])
    call = "malignant" if p >= threshold else "benign"
    sites = meta["training_sites"]
    result = {
        "research_use_only": True,
        "probability_malignant": p,
        "threshold": threshold,
        "threshold_source": meta["threshold"].get("source"),
        "call": call,
        "validated": headline(meta.get("validation") or {}),
        "model": {
            "sha256": meta["weights"]["sha256"],
            "arch": meta["model"]["arch"],
            "input_mode": meta["model"]["input_mode"],
            "image_size": size,
            "created": meta.get("created"),
            "synthetic": bool(meta["synthetic"]),
            "training_sites": len(sites),
            "training_patients": sum(c.get("patients", 0) for c in sites.values()),
            "dp_sites": list(meta.get("dp", {}).get("enabled_sites", [])),
        },
        "box": [round(v, 2) for v in box],
        "gradcam": None,
        "intended_use": meta.get("intended_use", ""),
    }
    if gradcam_out is not None:
        from common.gradcam import gradcam, save_overlay

        cam = gradcam(model, x, layer=layer, target=target, threshold=threshold)
        title = f"P(malignant) = {p:.2f}; call at validated threshold {threshold:.2f}: {call.upper()}"
        footer = RESEARCH_ONLY + (" SYNTHETIC-DATA MODEL." if meta["synthetic"] else "")
        save_overlay(gradcam_out, x.numpy(), cam, box, title=title, footer=footer)
        result["gradcam"] = {"file": str(gradcam_out), "layer": cam.layer, "target": cam.target}
    return result


def render_text(r: dict) -> str:
    """Readable report of one prediction."""
    v = r["validated"]
    m = r["model"]
    lines = [RESEARCH_ONLY]
    if m["synthetic"]:
        lines.append("!!! SYNTHETIC-DATA MODEL: trained and validated on phantom data; meaningless for real patients.")
    who = f"Patient {r['patient_id']}" + (f" (site {r['site']})" if r.get("site") else "")
    lines += [
        who,
        f"  P(malignant): {r['probability_malignant']:.3f}",
        f"  Call:         {r['call'].upper()} (threshold {r['threshold']:.3f}, validated: {r['threshold_source']})",
        f"Validated performance of the procedure that produced this model (protocol {v.get('protocol')}"
        + (f", n = {v['n']}" if v.get("n") is not None else "")
        + "):",
        f"  sensitivity {_fmt(v.get('sensitivity'))}",
        f"  specificity {_fmt(v.get('specificity'))}",
        f"  AUC         {_fmt(v.get('auc'))}",
        f"Model: {m['arch']}/{m['input_mode']} at {m['image_size']} px, {m['training_patients']} patients at "
        f"{m['training_sites']} site(s), DP at {len(m['dp_sites'])} site(s); created {m['created']}",
    ]
    if r.get("gradcam"):
        g = r["gradcam"]
        lines.append(f"Grad-CAM: {g['file']} (layer {g['layer']}, evidence for {g['target']})")
    lines.append("Use: second reader for an already-found vertebral fracture (benign vs malignant); not a detector.")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from common.modelfile import load_model, read_meta

    _check_model_path(args.model)
    if bool(args.config) == bool(args.dicom):
        raise SpineFedError("give either --config with --patient, or --dicom with the lesion slice and --box")
    meta = read_meta(args.model)
    if meta["synthetic"] and not args.allow_synthetic_model:
        print(
            "!" * 78 + "\nREFUSED: this model was trained on SYNTHETIC data (phantom MRI, no real patients).\n"
            "Its validation figures say nothing about real patients. To run it anyway (testing only), add\n"
            "--allow-synthetic-model.\n" + "!" * 78,
            file=sys.stderr,
        )
        return EXIT_SYNTHETIC
    site = None
    if args.config:
        from common.config import load_site_config

        if not args.patient:
            raise SpineFedError("--config needs --patient ID (a patient_id in the site's manifest.csv)")
        if args.size is not None or args.margin is not None or args.box or args.lesion_sop_uid or args.lesion_instance:
            raise SpineFedError("with --config the manifest and the site's preprocess settings are used; drop "
                                "--box/--lesion-*/--size/--margin")  # fmt: skip
        config = load_site_config(args.config)
        site = config.site
        built, _, _ = stack_from_site(config, args.patient)
        patient = args.patient
    else:
        if not args.box or (args.lesion_sop_uid is None) == (args.lesion_instance is None):
            raise SpineFedError("--dicom needs --box and exactly one of --lesion-sop-uid or --lesion-instance")
        size = args.size if args.size is not None else int(meta["model"]["image_size"])
        margin = args.margin if args.margin is not None else 0.5
        built, patient = stack_from_dicom(
            args.dicom, args.lesion_sop_uid, args.lesion_instance, parse_box(args.box), size, margin, args.patient
        )
    model, meta = load_model(args.model, device=_device(args.device))
    result = {"patient_id": patient, "site": site}
    try:
        result.update(
            predict_one(
                model,
                meta,
                built.stack,
                built.box,
                gradcam_out=args.gradcam,
                layer=args.gradcam_layer,
                target=args.gradcam_target,
            )  # fmt: skip
        )
    except OSError as exc:  # e.g. the Grad-CAM folder is not writable
        raise SpineFedError(f"cannot write {exc.filename or 'output'}: {exc.strerror or exc}") from None
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0


def _check_model_path(path: Path) -> None:
    # argparse turns `--model ""` into Path("."), which has no file name (pathlib then raises ValueError on the
    # sidecar's .json); refuse it, like a missing file, before any other work.
    if not path.name:
        raise SpineFedError("--model: no file given (the final model .pt, its .json sidecar beside it)")
    if not path.is_file():
        raise SpineFedError(f"--model {path}: " + ("not a file" if path.exists() else "file not found"))


def _device(name: str):
    from common.training import pick_device

    return pick_device(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`client predict`'s own arguments (`--config` is the `client` CLI's shared option)."""
    p.add_argument("--model", type=Path, required=True, help="final model .pt (its .json sidecar beside it)")
    p.add_argument("--patient", help="patient_id (with --config; with --dicom only when the folder holds several)")
    p.add_argument("--dicom", type=Path, help="folder holding the patient's sagittal T1W and T2W series")
    p.add_argument("--lesion-sop-uid", help="SOPInstanceUID of the lesion slice in the sagittal T1W series")
    p.add_argument("--lesion-instance", type=int, help="InstanceNumber (multi-frame: 1-based frame) of that slice")
    p.add_argument("--box", help="x0,y0,x1,y1 of the fractured body in that T1W image's pixels (x1/y1 exclusive)")
    p.add_argument("--size", type=int, help="stack size for --dicom (default: the model's image size)")
    p.add_argument("--margin", type=float, help="crop margin for --dicom (default 0.5, as preprocess.margin)")
    p.add_argument("--gradcam", type=Path, metavar="OUT.png", help="write a Grad-CAM overlay PNG")
    p.add_argument("--gradcam-layer", help="backbone layer for Grad-CAM (default: the backbone's last feature map)")
    p.add_argument("--gradcam-target", choices=("call", "malignant", "benign"), default="call",
                   help="class whose evidence Grad-CAM shows (default: the model's call)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-synthetic-model", action="store_true",
                   help="run a model trained on synthetic data (testing only)")  # fmt: skip


COMMAND = Command(
    "predict",
    "decision support for one patient: P(malignant), call, validated performance, Grad-CAM",
    add_arguments,
    cmd_predict,
    description="Score one patient with a final model. Either --config site.yaml --patient ID (the site's "
    "manifest row, DICOM tree and preprocess settings, exactly as `client prepare`) or --dicom DIR with "
    "--lesion-sop-uid/--lesion-instance and --box. " + RESEARCH_ONLY + " Exit 0 ok, 1 patient unusable, "
    f"2 bad input/model, {EXIT_SYNTHETIC} synthetic-data model refused.",
)
