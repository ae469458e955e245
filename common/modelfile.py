"""The final-model file: weights + a sidecar JSON that says what the model is, how well it was validated, and on what.

`save_model` writes `PATH` (the whole model's state dict, torch format) and `PATH.with_suffix('.json')` (the sidecar),
each atomically. `load_model` rebuilds the network from the sidecar's model config and refuses, with a SpineFedError,
a missing, unreadable, tampered (SHA-256 of the weights differs) or mismatched (other architecture) file.
`write_model_card` renders the sidecar as the markdown model card that ships with every final model.

Sidecar keys (format_version 1):
  format, format_version, created (UTC ISO 8601), package {name, version},
  weights {file, sha256, tensors, parameters},
  model (common.model.ModelConfig.to_dict(); `pretrained` reduced to the file name: paths stay where they were),
  threshold {value, source}: the validated decision threshold (malignant when P >= value) and where it came from,
  validation: the protocol results of the procedure that produced the model (metric dicts as in common/metrics.py),
  training_sites {site: {patients, benign, malignant, ...}}: integer counts only,
  dp {enabled_sites, per_site {site: {enabled, epsilon, delta, ...}}},
  provenance (config hash, app bundle hash, cache hashes, seeds, ...), synthetic (bool),
  intended_use, research_use_only (always true).

Nothing patient-level may enter the sidecar or the card (they travel with the model, beyond the sites): training-site
entries must be integer counts, and `validation`/`provenance` are checked for per-patient fields (keys, scores,
patient ids) before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.errors import SpineFedError
from common.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.model import ModelConfig, SpineNet, network, unwrap

log = logging.getLogger(__name__)

FORMAT = "spinefed-model"
FORMAT_VERSION = 1
INTENDED_USE = (
    "Second reader for one already-found vertebral fracture on sagittal T1W and T2W spine MRI: estimates the "
    "probability that the fracture is malignant (metastatic) rather than benign (osteoporotic/traumatic). "
    "Not a fracture detector, not a replacement for a radiologist's report."
)
RESEARCH_ONLY = "Research use only. Not a medical device; not for clinical decisions."
# Keys that hold per-patient data in this project's result dicts (common/evaluation.py OutOfFold records, evaluation
# stores); none may travel inside a model file.
_PATIENT_LEVEL_KEYS = {"patient_id", "patient_ids", "key", "keys", "records", "scores", "predictions", "labels"}
_VALIDATION_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "auc", "brier", "ece")


def sidecar_path(path: str | Path) -> Path:
    """model.pt → model.json beside it."""
    path = Path(path)
    if not path.name:  # "" or "." or "/": pathlib's with_suffix would raise a bare ValueError
        raise SpineFedError(f"model path {str(path)!r} names no file (give the final model .pt)")
    return path.with_suffix(".json")


def _package_version() -> str:
    try:
        return metadata.version("spinefed")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _jsonable(obj: Any, where: str) -> Any:
    """Plain JSON values (numpy scalars/arrays and Paths converted); anything else is a ValueError naming `where`."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"{where}: {type(obj).__name__} is not a JSON value")


def _check_no_patient_data(obj: Any, where: str) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if str(k).lower() in _PATIENT_LEVEL_KEYS:
                raise ValueError(f"{where}.{k}: per-patient data may not enter a model file (counts and metrics only)")
            _check_no_patient_data(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_no_patient_data(v, f"{where}[{i}]")


def _sites(training_sites: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for site, counts in training_sites.items():
        if not isinstance(counts, Mapping):
            raise ValueError(f"training_sites.{site}: expected a mapping of counts, e.g. {{'patients': 19}}")
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"training_sites.{site}.{name}: expected a count (integer >= 0), got {n!r}")
        out[str(site)] = {str(k): int(v) for k, v in counts.items()}
        if "patients" not in out[str(site)]:  # class counts only (the coordinator's census): their sum
            out[str(site)]["patients"] = sum(out[str(site)].get(c, 0) for c in ("benign", "malignant"))
    return out


def _dp(dp: Mapping[str, Any] | None, sites: dict) -> dict:
    """Normalise the DP statement: per site {enabled, epsilon, ...}; None means no site used DP."""
    per_site = {}
    for site in sites:
        entry = dict((dp or {}).get(site) or {})
        entry.setdefault("enabled", False)
        entry.setdefault("epsilon", None)
        per_site[site] = entry
    unknown = sorted((dp or {}).keys() - sites.keys())
    if unknown:
        raise ValueError(f"dp.{unknown[0]}: not one of the training sites ({', '.join(sites) or 'none'})")
    enabled = [s for s, e in per_site.items() if e["enabled"]]
    for s in enabled:
        eps = per_site[s]["epsilon"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
            raise ValueError(f"dp.{s}.epsilon: a DP site must state its spent epsilon (a number), got {eps!r}")
    return {"enabled_sites": enabled, "per_site": _jsonable(per_site, "dp")}


def save_model(
    path: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    *,
    threshold: float,
    validation: dict,
    training_sites: dict[str, dict[str, int]],
    provenance: dict,
    synthetic: bool,
    dp: dict | None,
    threshold_source: str = "inner validation split of the training data (Youden's J)",
) -> dict:
    """Write the final model (state dict at `path`) and its sidecar JSON; returns the sidecar as written.

    `dp`: {site: {"enabled": bool, "epsilon": float, "delta": float, ...}} for the sites that used DP (sites not
    named did not), or None when none did. Bad metadata is a ValueError raised before anything is written.
    """
    path = Path(path)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold!r}")
    if not isinstance(synthetic, bool):
        raise ValueError("synthetic: expected True or False")
    sites = _sites(training_sites)
    validation = _jsonable(validation, "validation")
    provenance = _jsonable(provenance, "provenance")
    _check_no_patient_data(validation, "validation")
    _check_no_patient_data(provenance, "provenance")
    net = unwrap(model)
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    cfg = model_cfg.to_dict()
    if cfg.get("pretrained"):
        cfg["pretrained"] = Path(cfg["pretrained"]).name
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package": {"name": "spinefed", "version": _package_version()},
        "weights": {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "tensors": len(state),
            "parameters": int(sum(p.numel() for p in net.parameters())),
        },
        "model": cfg,
        "threshold": {"value": float(threshold), "source": threshold_source},
        "validation": validation,
        "training_sites": sites,
        "dp": _dp(dp, sites),
        "provenance": provenance,
        "synthetic": synthetic,
        "intended_use": INTENDED_USE,
        "research_use_only": True,
    }
    # Weights first, sidecar second: a sidecar always describes weights that exist (the hash catches a stale pair).
    atomic_write_bytes(path, data)
    atomic_write_json(sidecar_path(path), meta)
    log.info("saved model %s (%d tensors, synthetic=%s)", path.name, len(state), synthetic)
    return meta


def read_meta(path: str | Path) -> dict:
    """The sidecar of model file `path`, checked for format and version (the weights are not read)."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise SpineFedError(f"model {path.name}: sidecar {side.name} not found (a model file travels as .pt + .json)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpineFedError(
            f"model {path.name}: sidecar {side.name} is not readable JSON ({exc.__class__.__name__})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpineFedError(f"model {path.name}: {side.name} is not a spinefed model sidecar")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SpineFedError(
            f"model {path.name}: format version {meta.get('format_version')!r}, this spinefed reads {FORMAT_VERSION}"
        )
    for key in ("weights", "model", "threshold", "validation", "training_sites", "dp", "synthetic"):
        if key not in meta:
            raise SpineFedError(f"model {path.name}: sidecar has no '{key}'")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[SpineNet, dict]:
    """Rebuild the model described by the sidecar, load its weights (strict), eval mode. Returns (model, meta)."""
    path = Path(path)
    if not path.is_file():
        raise SpineFedError(f"model {path}: file not found")
    meta = read_meta(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpineFedError(f"model {path.name}: cannot read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != meta["weights"].get("sha256"):
        raise SpineFedError(
            f"model {path.name}: weights do not match the sidecar's SHA-256 (corrupt, or the .pt and .json of "
            "different models); re-export the model"
        )
    try:
        cfg = ModelConfig.from_dict({**meta["model"], "pretrained": None})
    except (TypeError, ValueError) as exc:
        raise SpineFedError(f"model {path.name}: sidecar model config unusable ({exc})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises by content (EOFError, KeyError, RuntimeError, ...): one problem
        raise SpineFedError(f"model {path.name}: not a readable PyTorch file ({exc.__class__.__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SpineFedError(f"model {path.name}: expected a state dict (names → tensors)")
    # The bare network, not build_model: nothing to pretrain-load and no "training from scratch" warning.
    model = network(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]
        raise SpineFedError(
            f"model {path.name}: weights do not fit the {cfg.arch}/{cfg.input_mode}/{cfg.norm}-norm model its "
            f"sidecar describes ({first})"
        ) from None
    model.eval()
    return model.to(device), meta


# ----------------------------------------------------------------------------------------------------------------
# Model card


def _fmt_metric(name: str, m: Any) -> str:
    if not isinstance(m, Mapping) or "value" not in m:
        return f"{m}"
    v = m["value"]
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    ci = ""
    if m.get("lo") is not None and m.get("hi") is not None:
        ci = f" (95% CI {m['lo']:.2f}–{m['hi']:.2f})"
    counts = f", {m['k']:g}/{m['n']:g}" if "k" in m and "n" in m else ""
    method = f" [{m['method']}]" if m.get("method") else ""
    return f"{v:.3f}{ci}{counts}{method}"


def validation_rows(validation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value with CI) for the headline metrics of a validation dict (flat, or under 'pooled')."""
    src = validation.get("pooled", validation) if isinstance(validation.get("pooled"), Mapping) else validation
    return [(name, _fmt_metric(name, src[name])) for name in _VALIDATION_METRICS if name in src]


def headline(validation: Mapping[str, Any]) -> dict[str, Any]:
    """The validated sensitivity, specificity and AUC (metric dicts) plus protocol and n, for `predict`."""
    src = validation.get("pooled", validation) if isinstance(validation.get("pooled"), Mapping) else validation
    out = {"protocol": validation.get("protocol", "unknown"), "n": validation.get("n", src.get("n"))}
    for name in ("sensitivity", "specificity", "auc", "accuracy"):
        out[name] = src.get(name)
    return out


def write_model_card(path_md: str | Path, meta: Mapping[str, Any]) -> str:
    """Write the markdown model card for a model's sidecar `meta`; returns the text."""
    m = meta["model"]
    lines = [f"# Model card: spinefed {m['arch']} benign vs malignant vertebral fracture classifier", ""]
    lines += [f"**{RESEARCH_ONLY}**", ""]
    if meta.get("synthetic"):
        lines += [
            "> **SYNTHETIC DATA.** This model was trained and validated on synthetic phantom MRI (no real patients). "
            "Its figures say nothing about performance on real patients; do not use it on patients.",
            "",
        ]
    lines += ["## Intended use", "", meta.get("intended_use", INTENDED_USE), ""]
    lines += [
        "- Input: sagittal T1W and T2W slices of the lesion and its two neighbours (6 channels), cropped around a "
        "box drawn by the reader on the fractured vertebral body.",
        "- Output: P(malignant) and a call at the validated threshold; Grad-CAM maps show where the network looked, "
        "not why.",
        "- Users: radiologists, especially less experienced readers, as a second opinion after their own read.",
        "",
    ]
    lines += ["## Model", ""]
    lines += [
        f"- Architecture: {m['arch']}, input mode {m['input_mode']}, {m['norm']} norm, trained part "
        f"{m['trainable']}, image size {m['image_size']} px; starting weights: {m.get('pretrained') or 'none (random)'}",
        f"- Decision threshold: {meta['threshold']['value']:.3f} (malignant when P ≥ threshold); from "
        f"{meta['threshold']['source']}",
        f"- Weights: {meta['weights']['file']} (SHA-256 {meta['weights']['sha256']}, "
        f"{meta['weights']['parameters']:,} parameters)",
        "",
    ]
    sites = meta["training_sites"]
    lines += ["## Training sites (patient counts only)", ""]
    cols = sorted({k for c in sites.values() for k in c}, key=lambda k: (k != "patients", k))
    if sites:
        lines += ["| site | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for s, c in sites.items():
            lines.append(f"| {s} | " + " | ".join(str(c.get(k, "")) for k in cols) + " |")
        total = sum(c.get("patients", 0) for c in sites.values())
        lines += ["", f"{len(sites)} site(s), {total} patients in total.", ""]
    else:
        lines += ["(none recorded)", ""]
    val = meta.get("validation") or {}
    lines += ["## Validation", ""]
    lines.append(
        f"Protocol: {val.get('protocol', 'unknown')}"
        + (f", n = {val['n']}" if "n" in val else "")
        + ". Proportions with Wilson 95% CIs, AUC with its stated CI method."
        + (" Synthetic data." if meta.get("synthetic") else "")
    )
    lines.append("")
    rows = validation_rows(val)
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    else:
        lines.append("No validation results recorded: this model's performance is unknown.")
    lines += ["", "Evaluation outputs are not protected by differential privacy.", ""]
    dp = meta["dp"]
    lines += ["## Differential privacy", ""]
    if not dp["enabled_sites"]:
        lines.append("No site trained with differential privacy.")
    else:
        lines += ["| site | DP | ε spent | δ |", "|---|---|---|---|"]
        for s, e in dp["per_site"].items():
            eps = f"{e['epsilon']:.2f}" if e.get("enabled") and e.get("epsilon") is not None else "—"
            delta = f"{e['delta']:g}" if e.get("delta") is not None else "—"
            lines.append(f"| {s} | {'yes' if e.get('enabled') else 'no'} | {eps} | {delta} |")
        lines += ["", "ε covers every model released from that site's data (all protocol models and this one)."]
    lines.append("")
    lines += ["## Limitations", ""]
    if meta.get("synthetic"):
        lines.append("- Trained and validated on synthetic phantom data only; real-patient performance is unknown.")
    lines += [
        "- The source study (Yeh et al.) had one abnormal vertebral segment per patient; patients with several "
        "fractures (one boxed segment classified at a time) are untested. The network sees only the boxed "
        "segment's neighbourhood.",
        "- Findings outside the vertebral body matter (posterior elements, epidural and paraspinal soft tissue, "
        "other levels); the crop keeps only part of them, and other levels (skip metastases, multiple fractures) "
        "are outside the input.",
        "- The source study did not test generalization to other sites. "
        + (
            "The results above come from sites that did not train the model; per-site intervals at small sites are "
            "wide."
            if str(val.get("protocol", "")).startswith("site-held-out")
            else f"The results above ({val.get('protocol', 'unknown')}) are not evidence for hospitals outside the "
            "federation; see the site-held-out protocol."
        ),
        "- Needs a sagittal T1W and T2W series with both neighbouring slices of the lesion; other sequences (STIR, "
        "post-contrast) are not used.",
        "- Not a detector: it assumes a fracture is present and boxed; it says nothing about other findings.",
        "",
    ]
    lines += ["## Provenance", ""]
    lines += [f"- {k}: `{json.dumps(v, sort_keys=True)}`" for k, v in (meta.get("provenance") or {}).items()]
    lines += [
        f"- created: {meta.get('created')}; package: spinefed {meta.get('package', {}).get('version')}",
        f"- synthetic: {str(bool(meta.get('synthetic'))).lower()}",
        "",
        f"_{RESEARCH_ONLY}_",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(Path(path_md), text)
    return text
