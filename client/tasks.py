"""What a site does for each federated message — census, train, evaluate — as plain functions over its cache.

The ClientApp (client/app.py) only decodes messages and encodes replies around these. Everything here runs at the
site. What these functions return leaves the site, so it is counts, tensors and aggregates only; per-key scores only
when the site's config says `share_predictions: true`. Exceptions that reach a reply must be `SiteRefusal`, whose
message is written here and names no patient, file or path (`refusal()` turns anything else into a generic one).

Differential privacy (site.yaml `privacy.dp`): the site's budget, δ, clip norm, spend-rate limits, class weight and
ledger come from its own config only; the instruction's `experiment-id` and `planned-rounds` fix the noise once per
experiment (common/privacy.py), and privacy keys an instruction may carry are ignored. What leaves a DP site in a
train reply: the DP-trained tensors (frozen ones exactly as received), counts, the planned steps, `dp` 1, `epsilon`
(the site's whole ledger) and `delta`; `train-loss` is withheld (−1). No reply carries a decision threshold (one
validation patient's raw score); the minimum cell count of every histogram is at least the site's `privacy.min_cell`.

Which site a node is: node config `site-config` = path of the site's site.yaml (real SuperNodes:
`flower-supernode --node-config 'site-config="/etc/spinefed/site.yaml"'`). In simulation a virtual node has only
`partition-id`; the run config key `sim-sites` then names a JSON list of site.yaml paths indexed by partition-id
(written by `simulate run`). A node-config `site-config` always wins, so a run config cannot re-point a real site.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from client.evalstore import EvalStore, default_folder, threshold_of
from client.securesum import SiteSums
from common import acquisition
from common import metrics as M
from common.acquisition import ATTRIBUTES, UNKNOWN, is_level
from common.config import SiteConfig, load_site_config
from common.errors import SpineFedError
from common.model import ModelConfig, build_model, get_exchange_arrays, set_exchange_arrays
from common.securesum import SumRefused, b64
from common.sitedata import SiteData
from common.splits import assign_folds, inner_split_indices, membership_counts
from common.transfer import TRANSFER_DTYPES, TransferOverflow, decode_arrays, encode_arrays

log = logging.getLogger("spinefed.site")  # stays at the site


class SiteRefusal(SpineFedError):
    """A refusal whose message is safe to send to the coordinator."""


def refusal(exc: BaseException, what: str) -> SiteRefusal:
    """The exception as it may leave the site: SiteRefusal as is, anything else as a generic line."""
    if isinstance(exc, SiteRefusal):
        return exc
    log.error("%s failed at this site", what, exc_info=exc)  # full details stay in the site's log
    return SiteRefusal(f"{what} failed at the site ({exc.__class__.__name__}); details are in the site's log")


@dataclass(frozen=True)
class Site:
    config: SiteConfig
    data: SiteData

    @property
    def name(self) -> str:
        return self.config.site


def site_config_path(node_config: dict, run_config: dict) -> Path:
    if node_config.get("site-config"):
        return Path(str(node_config["site-config"]))
    if "partition-id" in node_config and run_config.get("sim-sites"):
        paths = json.loads(Path(str(run_config["sim-sites"])).read_text())
        return Path(paths[int(node_config["partition-id"])])
    raise SiteRefusal("this node has no site configuration (node config key 'site-config')")


@lru_cache(maxsize=8)
def _open(path: str, stamp: float) -> Site:
    cfg = load_site_config(path)
    return Site(cfg, SiteData.open(cfg.cache, cfg.site))


def open_site(node_config: dict, run_config: dict) -> Site:
    """The node's site and its cache (cached per process while index.csv is unchanged)."""
    try:
        path = site_config_path(node_config, run_config)
        cfg = load_site_config(path)
        index = cfg.cache / "index.csv"
        site = _open(str(path), index.stat().st_mtime if index.is_file() else 0.0)
    except SiteRefusal:
        raise
    except Exception as exc:  # on every reply's path: any unusable config or cache leaves the site as this one line
        log.error("site configuration or cache unusable", exc_info=exc)
        raise SiteRefusal("the site's configuration or prepared cache is not usable; see the site's log") from None
    if len(site.data) == 0:
        raise SiteRefusal("the site has no usable patients (nothing prepared)")
    return site


def census(site: Site) -> dict:
    """Counts only: patients by class, and the site's acquisition mix (common/acquisition.census_counts: patients
    per scanner attribute level, cells under the site's minimum cell count suppressed)."""
    counts = site.data.counts()
    floor = site_min_cell(site, site.config.privacy.min_cell)
    return {
        "num-examples": len(site.data),
        "n-benign": counts["benign"],
        "n-malignant": counts["malignant"],
        "n-unlabelled": int((site.data.labels < 0).sum()),
        **acquisition.census_counts(site.data.attributes, floor),
    }


def membership(site: Site, cfg: dict) -> dict:
    """Class counts of every unit's parts under the experiment's split plan (common/splits.membership_counts):
    counts only, so the coordinator can report the balance and plan which units a site sits out."""
    try:
        k, fold_seed = int(cfg.get("k", 0)), int(cfg.get("fold-seed", 0))
        fraction, split_seed = float(cfg.get("val-fraction", 0.2)), int(cfg.get("seed", 0))
    except (TypeError, ValueError):
        raise SiteRefusal("membership query: k, fold-seed, val-fraction and seed must be numbers") from None
    if not (0 <= k <= 100 and 0 <= fraction < 1):
        raise SiteRefusal("membership query: k must be in [0, 100] and val-fraction in [0, 1)")
    counts = membership_counts(list(site.data.keys), site.data.labels.tolist(), k, fold_seed, fraction, split_seed)
    return {name: [int(v) for v in values] for name, values in counts.items()}


def sit_out_reason(site: Site, idx: np.ndarray) -> str | None:
    """Why the site cannot train a unit on the inner-train patients `idx` (a class missing), or None."""
    labels = site.data.labels[idx]
    missing = [name for name, cls in (("malignant", 1), ("benign", 0)) if not (labels == cls).any()]
    if missing:
        return f"no {' and no '.join(missing)} training patient in this unit at this site: it sits the unit out"
    return None


def fold_of(site: Site, k: int, seed: int) -> np.ndarray:
    """Fold of every patient (−1: unlabelled, or no fold plan)."""
    if k < 2:
        return np.full(len(site.data), -1, dtype=np.int64)
    folds = assign_folds(list(site.data.keys), site.data.labels.tolist(), k=k, seed=seed)
    return np.array([folds.get(key, -1) for key in site.data.keys], dtype=np.int64)


def inner_split_of(site: Site, train_idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner-train, validation) of the training patients: each patient's own key and the experiment's seed decide
    (common/splits.py), the same in every round, message and unit, so validation patients are never trained on and
    the site can rebuild the split later (for the threshold histograms) without storing it."""
    return inner_split_indices(train_idx, site.data.keys, fraction, seed)


def select(
    site: Site, subset: str, k: int, seed: int, held_out: int, val_fraction: float = 0.2, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, folds) of the labelled patients in `subset`: train (all but the held-out fold), held-out, all,
    inner-train / validation (the fixed inner split of train, see `inner_split_of`)."""
    folds = fold_of(site, k, seed)
    labelled = site.data.labels >= 0
    if subset in ("validation", "inner-train"):
        train_idx, _ = select(site, "train", k, seed, held_out)
        tr, val = inner_split_of(site, train_idx, val_fraction, split_seed)
        idx = val if subset == "validation" else tr
        if idx.size == 0:
            raise SiteRefusal(f"no labelled patients in the requested subset ({subset})")
        return idx, folds[idx]
    if subset == "all" or held_out < 0:
        mask = labelled
    elif subset == "held-out":
        mask = labelled & (folds == held_out)
    elif subset == "train":
        mask = labelled & (folds != held_out)
    else:
        raise SiteRefusal(f"unknown subset {subset!r}")
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        raise SiteRefusal(f"no labelled patients in the requested subset ({subset})")
    return idx, folds[idx]


def _model(model_cfg: dict, seed: int) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig.from_dict(model_cfg)
    torch.manual_seed(seed)  # frozen parts without pretrained weights must be the same at every site and the server
    return build_model(cfg), cfg


def norm_keys(model: torch.nn.Module, keys) -> list[str]:
    """Keys of normalisation layers (weights and statistics) among `keys`: what FedBN keeps at the site."""
    norm = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
    prefixes = [name + "." for name, mod in model.named_modules() if isinstance(mod, norm)]
    return [k for k in keys if any(k.startswith(p) for p in prefixes)]


def load_global(model, arrays: dict, trainable: str, local_norm: dict | None) -> None:
    """Global tensors; with FedBN the site's own norm tensors on top (a site that never trained keeps the global)."""
    if local_norm:
        arrays = {**arrays, **{k: v for k, v in local_norm.items() if k in arrays}}
    # float16 on the wire (transfer_dtype) → float32 before anything else: the model, FedBN overlays and training
    # all work in float32 (common/transfer.py).
    arrays = decode_arrays(arrays)
    # A 0-d tensor (BN batch counter) may arrive as shape (1,) (np.ascontiguousarray does that): restore the shapes.
    state = model.state_dict()
    arrays = {
        k: np.reshape(v, tuple(state[k].shape)) if k in state and np.size(v) == 1 else v for k, v in arrays.items()
    }
    set_exchange_arrays(model, arrays, trainable)


def wire(arrays: dict, cfg: dict) -> dict:
    """The reply's tensors in the instruction's `transfer-dtype` (common/transfer.py); a tensor beyond the float16
    range is refused (an Error reply naming the tensor), never sent as inf or as float32 (one schema per round)."""
    dtype = str(cfg.get("transfer-dtype", "float32"))
    if dtype not in TRANSFER_DTYPES:
        raise SiteRefusal(f"unknown transfer-dtype {dtype[:20]!r}; expected one of {', '.join(TRANSFER_DTYPES)}")
    try:
        return encode_arrays(arrays, dtype)
    except TransferOverflow as exc:
        raise SiteRefusal(str(exc)) from None


def train(site: Site, arrays: dict, cfg: dict, local_norm: dict | None = None) -> tuple[dict, dict, dict]:
    """One round of local training. Returns (exchanged tensors in the wire dtype, metrics, float32 norm tensors for
    FedBN)."""
    from common import training  # lazy: the census needs neither the optimizer code nor its imports

    t0 = time.monotonic()
    privacy = site.config.privacy  # the site's own settings: nothing in the instruction can change them
    if privacy.dp:
        from common.dp_training import dp_site_refusal  # lazy: Opacus only where DP is on

        _warn_privacy_keys(cfg)
        reason = dp_site_refusal(privacy, cfg["model"])  # before loading anything
        if reason:
            raise SiteRefusal(reason)
    model, mcfg = _model(cfg["model"], cfg["seed"])
    load_global(model, arrays, mcfg.trainable, local_norm)
    idx, _ = select(site, "train", cfg["k"], cfg["fold-seed"], cfg["held-out"])
    if cfg.get("noop"):  # bench/federation_overhead.py: the fixed cost of a round (load and return the tensors)
        metrics = {k: 0 for k in ("train-loss", "steps", "val-examples", "dp")} | {"delta": -1.0, "epsilon": -1.0}
        out = wire(get_exchange_arrays(model, mcfg.trainable), cfg)
        return out, {**metrics, "num-examples": int(idx.size), "seconds": time.monotonic() - t0}, {}
    tcfg = training.TrainConfig.from_dict(cfg["train"])
    # The inner validation split is fixed for the whole experiment (not re-drawn per round as fit would do with a
    # per-round seed): the final model's validation scores, which choose the threshold, are of never-trained patients.
    inner, val = inner_split_of(site, idx, tcfg.val_fraction, cfg["seed"])
    reason = sit_out_reason(site, inner)
    if reason:
        raise SiteRefusal(reason)
    tcfg = replace(
        tcfg,
        val_fraction=0.0,  # fit gets the inner-train patients only; validation is scored here
        epochs=cfg["epochs"],
        lr=cfg["lr"],
        fedprox_mu=cfg["proximal-mu"],
        seed=cfg["seed"] * 1000 + cfg["server-round"],
        device=site.config.train_device,  # the site decides its hardware
        image_size=mcfg.image_size,
    )
    # FedProx pulls towards the weights at entry, which are the round's global tensors (fit's default).
    if privacy.dp:
        out, res, dp_round, epsilon = _train_private(site, model, mcfg, inner, tcfg, cfg)
    else:
        res = training.fit(model, site.data, inner, tcfg, trainable=mcfg.trainable)
        out, dp_round, epsilon = get_exchange_arrays(model, mcfg.trainable), None, -1.0
    # No threshold in the reply: one validation patient's raw score would leave the site. The coordinator chooses
    # the threshold from the pooled validation histograms (minimum cell count applied) at evaluation.
    _log_usage(site, cfg, "train", inner, val=val)
    metrics = {
        "num-examples": int(res.n_examples),
        # Under DP the training loss is a noiseless function of the trained patients (a membership signal): withheld.
        "train-loss": -1.0 if dp_round else float(res.train_loss),
        # Under DP: the reserved (planned) steps, public; fit's count would follow the Poisson draws.
        "steps": int(dp_round.steps) if dp_round else int(res.steps),
        "val-examples": int(val.size),
        "dp": int(dp_round is not None),
        "epsilon": float(epsilon),
        "delta": float(privacy.delta) if dp_round else -1.0,
        "seconds": time.monotonic() - t0,
    }
    # FedBN keeps the float32 tensors; only the reply is cast.
    return wire(out, cfg), metrics, {k: out[k] for k in norm_keys(model, out)}


# Keys a coordinator might send to weaken a site's privacy. They are never read (the site's privacy settings come
# from its site.yaml only); seeing one is logged at the site so that site IT can ask the coordinator why.
PRIVACY_KEYS = ("dp", "privacy", "epsilon", "epsilon-budget", "epsilon_budget", "delta", "max-grad-norm", "ledger")


def _warn_privacy_keys(cfg: dict) -> None:
    sent = sorted(k for k in cfg if k in PRIVACY_KEYS or k.replace("_", "-") in PRIVACY_KEYS)
    if sent:
        log.warning("the instruction carries privacy setting(s) %s; ignored (the site's own settings apply)", sent)


def _train_private(site: Site, model, mcfg: ModelConfig, inner: np.ndarray, tcfg, cfg: dict):
    """One DP round (common/dp_training.py): → (exchanged tensors, fit result, DPRound, ε spent by the site so far).

    Budget, δ, clip norm and the ledger come from the site's config; the instruction only declares the experiment
    (`experiment-id`) and how many rounds it will train at this site in total (`planned-rounds`), which fix the
    noise once per experiment (common/privacy.py, PrivacyLedger.plan). A wrong declaration costs utility, never
    privacy: every round is checked against the site's whole ledger. Refusals (budget spent, nothing to train
    privately, ledger unreadable) become SiteRefusal: their messages name no patient, file or path.
    """
    from common import training
    from common.dp_training import DPConfigurationError, start_dp_round
    from common.privacy import LedgerError, PrivacyBudgetExceeded

    try:
        experiment = str(cfg["experiment-id"])
        planned = int(cfg["planned-rounds"])
    except (KeyError, TypeError, ValueError):
        raise SiteRefusal(
            "this site trains with differential privacy and needs the experiment's 'experiment-id' and "
            "'planned-rounds' in every training instruction"
        ) from None
    if not experiment or planned < 1:
        raise SiteRefusal("this site trains with differential privacy: 'experiment-id' empty or 'planned-rounds' < 1")
    unit = str(cfg.get("unit") or "train")
    try:
        dp = start_dp_round(
            site.config.privacy,
            experiment=experiment,
            n_site=int((site.data.labels >= 0).sum()),
            batch_size=tcfg.batch_size,
            epochs=tcfg.epochs,
            planned_rounds_total=planned,
            purpose=f"{experiment[:24]} {unit} round {cfg['server-round']}"[:200],
        )
        # The class weight is the site's declared public constant, never one from the training labels.
        res = training.fit(
            model,
            site.data,
            inner,
            tcfg,
            trainable=mcfg.trainable,
            make_private=dp.make_private,
            pos_weight=site.config.privacy.class_weight,
        )
    except (PrivacyBudgetExceeded, DPConfigurationError, LedgerError) as exc:
        raise SiteRefusal(str(exc)) from None
    out = dp.exchange_arrays(model)
    epsilon = dp.finish()
    log.info(
        "DP round %s %s: ε spent by this site %.3f (budget %g)",
        unit,
        cfg["server-round"],
        epsilon,
        site.config.privacy.epsilon_budget,
    )
    return out, res, dp, epsilon


def _log_usage(site: Site, cfg: dict, kind: str, idx: np.ndarray, val: np.ndarray | None = None) -> None:
    entry = {"kind": kind, "unit": cfg.get("unit", ""), "round": cfg.get("server-round", 0)}
    entry.update({"k": cfg["k"], "fold-seed": cfg["fold-seed"], "held-out": cfg["held-out"]})
    entry["keys"] = [site.data.keys[i] for i in idx]
    if val is not None:
        entry["val_keys"] = [site.data.keys[i] for i in val]
    try:
        EvalStore(default_folder(site.config.cache)).log_usage(entry)
    except OSError:  # the audit log must not stop training; the site's log says why
        log.exception("could not append to the usage log")


def site_min_cell(site: Site, requested) -> int:
    """The minimum cell count a reply applies: the experiment's request, never below the site's `privacy.min_cell`.
    A lower (or unreadable) request is answered at the site's value and logged here."""
    floor = site.config.privacy.min_cell
    try:
        asked = int(requested)
    except (TypeError, ValueError):
        asked = None
    if asked is None or asked < floor:
        log.warning("the experiment asks for minimum cell count %r; the site's floor %d applies", requested, floor)
        return floor
    return asked


def _hists(labels: np.ndarray, scores: np.ndarray, min_cell: int) -> tuple[list[float], list[float]]:
    hp, hn = M.score_histogram(labels, np.clip(scores, 0.0, 1.0))
    return [float(v) for v in M.suppress_small_cells(hp, min_cell)], [
        float(v) for v in M.suppress_small_cells(hn, min_cell)
    ]


def _exact(labels: np.ndarray, scores: np.ndarray, bins: int) -> np.ndarray:
    """[malignant ‖ benign] integer score histograms: a site's input to a secure sum (common/securesum.py)."""
    hp, hn = M.score_histogram(labels, np.clip(scores, 0.0, 1.0), M.edges_for(bins))
    return np.concatenate([hp, hn]).astype(np.int64)


def _secure_part(site: Site, spec, labels: np.ndarray, scores: np.ndarray, min_cell: int) -> dict | None:
    """This site's masked input for the summation `spec` (JSON from the coordinator): {"masked", "min-cell"}, or
    {"refused": why, "clear": the input with the minimum cell count applied, or None where even that may not leave
    (client/securesum.py's release rule)}. None when the coordinator asked for no summation or the site's
    `privacy.secure_pooling` is off: the caller sends its clear histogram as before."""
    if not spec or not site.config.privacy.secure_pooling:
        return None
    sums, sum_id = None, ""
    try:
        spec = json.loads(spec) if isinstance(spec, str) else dict(spec)
        sums, sum_id = SiteSums(default_folder(site.config.cache), str(spec.get("run", ""))), str(spec.get("id", ""))
        bins = int(spec.get("bins", M.N_HIST_BINS))
        if not 10 <= bins <= 10_000:
            raise SumRefused(f"a histogram of {bins} bins is not summed (10 to 10000)")
        sums.keep(sum_id, _exact(labels, scores, bins))
        return {"masked": sums.contribute(spec), "min-cell": int(min_cell)}
    except (SumRefused, ValueError, TypeError, AttributeError) as exc:
        log.warning("secure summation refused: %s", exc)
        why = str(exc)[:200]
    try:
        clear = sums.clear(sum_id, min_cell) if sums is not None and sum_id else None
    except SumRefused:
        clear = None
    return {"refused": why, "clear": clear}


def run_public_key(site: Site, run: str) -> bytes:
    """The site's X25519 public key for one protocol run's secure sums (made on first use, kept at the site)."""
    try:
        return SiteSums(default_folder(site.config.cache), run).public_key()
    except SumRefused as exc:
        raise SiteRefusal(f"secure summation: {exc}") from None


def securesum(site: Site, request: dict) -> dict:
    """The `securesum` query: `op` mask (a new attempt over a stored input), reveal (this attempt's self-mask seed,
    when the coordinator received every participant's vector) or clear (the fallback: the stored input with the
    site's minimum cell count applied). Refusals (client/securesum.py's release rule) are Error replies."""
    if not site.config.privacy.secure_pooling:
        raise SiteRefusal("secure pooling is off at this site (privacy.secure_pooling)")
    op = str(request.get("op", ""))
    spec = request.get("spec") or request
    try:
        sums = SiteSums(default_folder(site.config.cache), str(spec.get("run", "")))
        sum_id = str(spec.get("id", ""))
        if op == "mask":
            return {"masked": sums.contribute(spec), "min-cell": int(site.config.privacy.min_cell)}
        if op == "reveal":
            return {"seed": sums.reveal(sum_id, str(request.get("nonce", "")), list(request.get("received", [])))}
        if op == "clear":
            return {"hist": sums.clear(sum_id, site_min_cell(site, request.get("min-cell")))}
    except (SumRefused, ValueError, TypeError, AttributeError) as exc:
        raise SiteRefusal(f"secure summation: {str(exc)[:200]}") from None
    raise SiteRefusal(f"secure summation: unknown step {op!r} (mask, reveal or clear)")


def evaluate(
    site: Site, arrays: dict, cfg: dict, local_norm: dict | None = None
) -> tuple[dict, dict | None, dict | None]:
    """Score the requested subset, keep the scores in the site's store, reply aggregates (see common/replies.py).

    `subset` "none" scores no test patients (a training site asked for its validation histogram only). With
    `validation` 1 the site also scores its fixed inner validation split (training patients held out of every round)
    and returns that histogram (minimum cell count applied): the coordinator pools those to choose the threshold, so
    the threshold never sees a test score. The test scores are stored under `tag` with the `unit` (model) that made
    them and the `threshold` (−1: the coordinator sends each model's threshold at report time).

    The aggregate fields describe everything stored under the tag and are only filled when `report` is 1: sending
    them after every fold would let the coordinator difference two cumulative histograms into one fold's (a few
    patients' scores). Until then they are placeholders (zeros, −1).
    """
    from common import training

    t0 = time.monotonic()
    model, mcfg = _model(cfg["model"], cfg["seed"])
    load_global(model, arrays, mcfg.trainable, local_norm)
    tcfg = replace(
        training.TrainConfig.from_dict(cfg["train"]), device=site.config.train_device, image_size=mcfg.image_size
    )
    nbins = len(M.DEFAULT_EDGES) - 1
    out = {"num-examples": 0, "stored": 0, "reported": int(cfg["report"]), "seconds": 0.0}
    out.update({"n-pos": 0, "n-neg": 0, "auc": -1.0, "auc-var": -1.0, "tp": 0, "fp": 0, "tn": 0, "fn": 0})
    out.update({"hist-pos": [0.0] * nbins, "hist-neg": [0.0] * nbins, "shared": 0})
    out.update({"val-examples": 0, "val-hist-pos": [0.0] * nbins, "val-hist-neg": [0.0] * nbins})
    min_cell = site_min_cell(site, cfg.get("min-cell"))
    secure = None
    if cfg.get("validation"):
        # Per-key membership: a small site's validation split may be empty; it then sends empty histograms.
        train_idx, _ = select(site, "train", cfg["k"], cfg["fold-seed"], cfg["held-out"])
        _, val = inner_split_of(site, train_idx, tcfg.val_fraction, cfg["seed"])
        vs = np.asarray(training.predict(model, site.data, val, tcfg), dtype=np.float64) if val.size else np.zeros(0)
        # Into the secure sum when the coordinator asks for one (exact counts); otherwise in the clear, suppressed.
        secure = _secure_part(site, cfg.get("securesum"), site.data.labels[val], vs, min_cell)
        if val.size:
            out["val-examples"] = int(val.size)
            if secure is None:
                out["val-hist-pos"], out["val-hist-neg"] = _hists(site.data.labels[val], vs, min_cell)
            elif secure.get("clear"):
                half = len(secure["clear"]) // 2
                out["val-hist-pos"], out["val-hist-neg"] = secure["clear"][:half], secure["clear"][half:]
        if secure is not None:
            secure.pop("clear", None)
            _log_usage(site, cfg, "validate", val)
    store = EvalStore(default_folder(site.config.cache))
    if cfg["subset"] == "held-out" and not (fold_of(site, cfg["k"], cfg["fold-seed"]) == cfg["held-out"]).any():
        # Per-key folds: a small site may have no patient in this fold. It scores no one and says so by its count.
        _log_usage(site, cfg, "test", np.zeros(0, dtype=np.int64))
    elif cfg["subset"] != "none":
        idx, folds = select(site, cfg["subset"], cfg["k"], cfg["fold-seed"], cfg["held-out"])
        scores = np.asarray(training.predict(model, site.data, idx, tcfg), dtype=np.float64)
        keys = [site.data.keys[i] for i in idx]
        out["num-examples"] = int(idx.size)
        out["stored"] = store.record(
            cfg["tag"], keys, site.data.labels[idx], scores, folds, str(cfg.get("unit", "")), float(cfg["threshold"])
        )
        _log_usage(site, cfg, "test", idx)
    elif not cfg.get("validation"):
        raise SiteRefusal("nothing to evaluate (no subset and no validation requested)")
    else:
        out["num-examples"] = out["val-examples"]  # the weight of this reply; no test patients were scored
    predictions = None
    if cfg["report"]:
        agg, predictions = tag_report(site, store, cfg["tag"], {}, min_cell, default=cfg["threshold"])
        out.update({k: agg[k] for k in ("n-pos", "n-neg", "tp", "fp", "tn", "fn", "hist-pos", "hist-neg")})
        out.update({"auc": agg["auc"], "auc-var": agg["auc-var"], "shared": int(predictions is not None)})
    out["seconds"] = time.monotonic() - t0
    return out, predictions, secure


def tag_report(
    site: Site,
    store: EvalStore,
    tag: str,
    thresholds: dict[str, float],
    min_cell: int,
    default: float = -1.0,
    strata: bool = False,
) -> tuple[dict, dict | None]:
    """The aggregate of everything stored under `tag`, each patient called at its own model's threshold.

    Leaves the site: counts, the site's AUC with its DeLong variance, Brier sum, score histograms with the minimum
    cell count applied; with `strata`, the same per acquisition level (`acquisition_strata`); per-key scores only
    when the site shares predictions.
    """
    keys, y, s, f = store.arrays(tag)
    t = store.thresholds(tag, thresholds, default if default >= 0 else 0.5)
    calls = s >= t
    auc, var = M.delong_auc(y, s) if y.size else (float("nan"), float("nan"))
    hp, hn = _hists(y, s, min_cell) if y.size else ([0.0] * (len(M.DEFAULT_EDGES) - 1),) * 2
    out = {"n": int(y.size), "n-pos": int((y == 1).sum()), "n-neg": int((y == 0).sum())}
    out.update(M.confusion_of(y, calls).as_dict())
    out.update({"auc": auc if np.isfinite(auc) else -1.0, "auc-var": var if np.isfinite(var) else -1.0})
    out.update({"brier-sum": float(np.sum((s - y) ** 2)), "hist-pos": hp, "hist-neg": hn})
    out["folds"] = sorted({int(v) for v in f})
    if strata:
        out["strata"] = acquisition_strata(site, keys, y, s, calls, min_cell)
    predictions = None
    if site.config.share_predictions:
        predictions = {"keys": keys, "scores": s.tolist(), "labels": y.tolist(), "folds": f.tolist()}
        predictions["thresholds"] = t.tolist()
    return out, predictions


def acquisition_strata(site: Site, keys: list[str], y: np.ndarray, s: np.ndarray, calls: np.ndarray, min_cell: int):
    """Per acquisition attribute (common/acquisition.py) with a known level at this site, per level: n, n-pos,
    n-neg, confusion counts at each patient's own model threshold and the site's DeLong AUC and variance (−1 with a
    class missing). `keys`/`y`/`s`/`calls`: the tag's stored patients (store keys, mapped to the cache's attributes;
    a key the cache no longer holds is UNKNOWN).

    The minimum cell count applies per level: a level of fewer than `min_cell` patients leaves as {"suppressed": 1}
    only, and so does the next smallest level while the suppressed levels together hold fewer than `min_cell`
    patients, so that no suppressed level can be derived as the tag's total minus the others (the census's rule,
    common.acquisition.hidden_levels). A level that is not a short bin name (common.acquisition.is_level) leaves as
    "other": no free text from a header leaves the site."""
    where = {k: i for i, k in enumerate(site.data.keys)}
    rows = [where.get(k, -1) for k in keys]
    out: dict[str, dict] = {}
    for name in ATTRIBUTES:
        values = site.data.attributes.get(name) or ()
        levels = [values[i] if 0 <= i < len(values) else UNKNOWN for i in rows]
        levels = np.array([v if v == UNKNOWN or is_level(v) else "other" for v in levels], dtype=object)
        if not (levels != UNKNOWN).any():
            continue
        cells = {}
        for level in sorted(set(levels.tolist())):
            m = levels == level
            auc, var = M.delong_auc(y[m], s[m]) if m.any() else (float("nan"), float("nan"))
            cell = {"n": int(m.sum()), "n-pos": int((y[m] == 1).sum()), "n-neg": int((y[m] == 0).sum())}
            cell.update(M.confusion_of(y[m], calls[m]).as_dict())
            cell.update({"auc": auc if np.isfinite(auc) else -1.0, "auc-var": var if np.isfinite(var) else -1.0})
            cells[level] = cell
        hidden = acquisition.hidden_levels({lv: c["n"] for lv, c in cells.items()}, min_cell)  # as the census
        out[name] = {lv: ({"suppressed": 1} if lv in hidden else c) for lv, c in cells.items()}
    return {"min-cell": int(min_cell), "attributes": out}


def compare(site: Site, store: EvalStore, tag_a: str, tag_b: str, thr_a: dict, thr_b: dict) -> dict:
    """Paired comparison of two protocols' scores on the patients both scored (e.g. tenfold vs site-held-out).

    Leaves the site: n, AUCs, their paired DeLong difference and variance, and the discordant counts of correct calls
    overall / among malignant / among benign patients (b: A right and B wrong, c: the reverse) — no per-patient data.
    """
    ea, eb = store.load(tag_a), store.load(tag_b)
    common_keys = sorted(set(ea) & set(eb))
    out = {"n": len(common_keys)}
    if not common_keys:
        return out
    y = np.array([ea[k]["label"] for k in common_keys], dtype=np.int64)
    sa = np.array([ea[k]["score"] for k in common_keys])
    sb = np.array([eb[k]["score"] for k in common_keys])

    def calls(entries, thr):
        return np.array([entries[k]["score"] >= threshold_of(entries[k], thr) for k in common_keys])

    ra, rb = calls(ea, thr_a) == (y == 1), calls(eb, thr_b) == (y == 1)
    d = M.delong_paired_test(y, sa, sb)
    out.update({"n-pos": int((y == 1).sum()), "n-neg": int((y == 0).sum())})
    out.update({k: (float(d[k]) if np.isfinite(d[k]) else -1.0) for k in ("auc_a", "auc_b")})
    out["auc-diff"] = float(d["difference"]) if np.isfinite(d["difference"]) else 0.0
    out["auc-diff-var"] = float(d["var"]) if np.isfinite(d["var"]) else -1.0
    for name, mask in (("", np.ones_like(y, dtype=bool)), ("-pos", y == 1), ("-neg", y == 0)):
        out[f"correct-a{name}"] = int(ra[mask].sum())
        out[f"correct-b{name}"] = int(rb[mask].sum())
        out[f"b{name}"] = int((ra & ~rb)[mask].sum())
        out[f"c{name}"] = int((~ra & rb)[mask].sum())
    return out


def reader_calls(site: Site) -> dict[str, int]:
    """key → reader call (1 malignant, 0 benign) from the optional site-side CSV named by site.yaml `readers:`.

    Read straight from site.yaml (an optional key the shared site-config loader ignores): the file stays at the site.
    """
    from common.config import read_yaml

    raw = read_yaml(site.config.file).get("readers")
    if not raw:
        return {}
    path = Path(str(raw)).expanduser()
    path = path if path.is_absolute() else site.config.file.parent / path
    import csv

    out = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            call = str(row.get("reader_call", "")).strip().lower()
            value = {"malignant": 1, "1": 1, "benign": 0, "0": 0}.get(call)
            if row.get("key") and value is not None:
                out[row["key"].strip()] = value
    return out


def reader_comparison(site: Site, store: EvalStore, tag: str, thresholds: dict) -> dict:
    """McNemar counts of the model (out-of-fold calls under `tag`) against the site's reader, computed here.

    Leaves the site: n, correct counts of both and the discordant counts b (model right, reader wrong) and c.
    """
    readers = reader_calls(site)
    entries = store.load(tag)
    keys = sorted(k for k in entries if k in readers)
    out = {"n": len(keys)}
    if not keys:
        return out
    y = np.array([entries[k]["label"] for k in keys])
    thr = [threshold_of(entries[k], thresholds) for k in keys]
    model = np.array([entries[k]["score"] >= t for k, t in zip(keys, thr, strict=True)]) == (y == 1)
    reader_calls_ = np.array([readers[k] for k in keys])
    reader = reader_calls_ == y
    out.update({"model-correct": int(model.sum()), "reader-correct": int(reader.sum())})
    out.update({"b": int((model & ~reader).sum()), "c": int((~model & reader).sum())})
    out.update(
        {
            "reader-tp": int(((reader_calls_ == 1) & (y == 1)).sum()),
            "reader-tn": int(((reader_calls_ == 0) & (y == 0)).sum()),
        }
    )
    out.update({"n-pos": int((y == 1).sum()), "n-neg": int((y == 0).sum())})
    return out


def report(site: Site, requests: dict) -> dict:
    """The one cumulative report of a protocol run (a QUERY with action `report`): per tag, comparisons, readers.

    `requests`: {"tags": {tag: {model: threshold}}, "compare": [[name, tag_a, tag_b]], "readers": [tag],
    "strata": [tag] (per acquisition level, see acquisition_strata), "min-cell": n}. Tags this site holds nothing
    under are answered with n = 0.
    """
    store = EvalStore(default_folder(site.config.cache))
    thresholds = requests.get("tags", {})
    min_cell = site_min_cell(site, requests.get("min-cell"))
    out: dict = {"tags": {}, "compare": {}, "readers": {}, "shared": {}}
    stratified = set(requests.get("strata", []))  # tags the coordinator stratifies by acquisition
    for tag, thr in thresholds.items():
        agg, predictions = tag_report(site, store, tag, thr, min_cell, strata=tag in stratified)
        out["tags"][tag] = agg
        if predictions is not None:
            out["shared"][tag] = predictions
    # Secure sums of the tags' exact histograms (pooled AUC, ROC, calibration): one summation per spec, each naming
    # the tag whose histogram goes in. A tag summed securely sends no histogram of its own.
    for spec in requests.get("securesum", []):
        tag = str(spec.get("tag", ""))
        _, y, s, _ = store.arrays(tag)
        part = _secure_part(site, spec, y, s, min_cell)
        if part is None:
            continue
        if tag in out["tags"]:  # summed securely, or in the clear only where the release rule allows
            values = part.pop("clear", None) or [0.0] * (2 * (len(M.DEFAULT_EDGES) - 1))
            half = len(values) // 2
            out["tags"][tag].update({"hist-pos": values[:half], "hist-neg": values[half:]})
            out["tags"][tag]["hist-secure"] = int("masked" in part)
        if "masked" in part:
            part["masked"] = b64(part["masked"])
        out.setdefault("secure", {})[str(spec.get("id", ""))] = part
    for name, a, b in requests.get("compare", []):
        out["compare"][name] = compare(site, store, a, b, thresholds.get(a, {}), thresholds.get(b, {}))
    for tag in requests.get("readers", []):
        try:
            out["readers"][tag] = reader_comparison(site, store, tag, thresholds.get(tag, {}))
        except (OSError, ValueError) as exc:
            log.error("reader file unusable", exc_info=exc)
            raise SiteRefusal("the site's reader file is not usable; see the site's log") from None
    return out


def cache_hash(site: Site) -> str:
    """sha256 over (key, label, stack bytes) of the usable patients: which cache a result came from, no identifiers."""
    import hashlib

    h = hashlib.sha256()
    for key, label, path in zip(site.data.keys, site.data.labels.tolist(), site.data.files, strict=True):
        h.update(f"{key}\x1f{label}\x1f".encode())
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()
