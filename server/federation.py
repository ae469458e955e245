"""One federated training of an experiment on whatever sites the grid reaches: census, rounds, checkpoints.

Used by the ServerApp (server/app.py) and by the protocol runner (one call per fold / held-out site). Writes into
`out`: `checkpoint/` after every round (server/checkpoint.py), `rounds.csv` (one row per round), `rounds.jsonl`
(the full per-site record of each round), `tensorboard/` (the same per-round scalars, when TensorBoard is installed:
server/tblog.py) and `federation.json` (census, rounds, initial and final evaluation, improvement).

When the experiment evaluates (`evaluate` final or every-round), the starting model is first scored on the same
subset (round 0, its own evaluation tag), so that every run states what training gained on those patients:
`federation.json` `initial_evaluation` and `improvement` (server/aggregates.improvement). Where every evaluating site
also trains, the sites score a model when a training message delivers it (evaluate-on-receipt, server/strategy.py):
round 1 scores the starting model, and with every-round evaluation round r + 1 scores round r's, so a round's line in
`rounds.csv`/`rounds.jsonl` and its checkpoint are written once that evaluation is back (one round later).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import metrics as M
from common.model import ModelConfig, build_model, get_exchange_arrays, is_norm_buffer
from common.replies import METRICS, SITE
from server import checkpoint
from server.aggregates import evaluation_score, improvement, privacy_by_site
from server.experiment import ExperimentConfig
from server.quorum import wait_for_nodes
from server.strategy import RoundRecord, make_strategy
from server.tblog import RoundLog

log = logging.getLogger("flwr.spinefed.federation")  # child of flwr: shown in `flwr run --stream`

CSV_COLUMNS = (
    "round",
    "seconds",
    "sites_sent",
    "sites_ok",
    "sites_failed",
    "sites_rejected",
    "sites_missing",
    "all_failed",
    "num_examples",
    "train_loss",
    "epsilon_max",
    "eval_examples",
    "eval_pooled_auc",
)


def initial_arrays(exp: ExperimentConfig) -> dict[str, np.ndarray]:
    """The exchanged tensors of the starting model (same seed as the sites, so frozen parts agree)."""
    torch.manual_seed(exp.seed)
    model = build_model(ModelConfig.from_dict(exp.model))
    return dict(get_exchange_arrays(model, exp.trainable))


def census(grid, exp: ExperimentConfig, expected: int | None = None) -> dict[int, dict]:
    """Ask every connected site for its name and counts (bounded wait). node id → {site, counts…}."""
    nodes = wait_for_nodes(grid, exp.quorum.min_sites, exp.quorum.join_timeout_s, wanted=expected)
    out, refused = census_replies(grid, nodes, exp.quorum.round_timeout_s)
    for node, reason in refused.items():
        log.warning("census: node %d refused: %s", node, reason)
    log.info("census: %s", ", ".join(f"{v['site']} ({v.get('num-examples', '?')} patients)" for v in out.values()))
    return out


def census_replies(grid, nodes: list[int], timeout: float) -> tuple[dict[int, dict], dict[int, str]]:
    """Send the census query to `nodes`; (node → {site, counts…, cache-hash, version}, node → Error reason).

    A node in neither dict did not answer within `timeout`. Error reasons are Flower's text as the site sent it
    (client/tasks.py and client/approval.py keep them free of patient identifiers and paths)."""
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    out, refused = {}, {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            refused[node] = str(reply.error.reason)
            continue
        content = reply.content
        info = dict(content.config_records[SITE]) if SITE in content.config_records else {}
        metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
        out[node] = {"site": str(info.get("site", f"node-{node}")), **metrics}
        for key in ("cache-hash", "version"):  # provenance: which cache and release answered (no identifiers)
            if key in info:
                out[node][key] = str(info[key])
    return out, refused


def evaluation_tag(exp: ExperimentConfig) -> str:
    """The sites' evaluation-store tag: the same for every fold of one experiment, so out-of-fold scores add up."""
    return f"{exp.with_(folds=replace(exp.folds, held_out=-1)).fingerprint()[:16]}-{exp.protocol}"


def round_configs(
    exp: ExperimentConfig,
    noop: bool = False,
    tag: str | None = None,
    report: bool = True,
    extra: dict | None = None,
    *,
    experiment_id: str | None = None,
    planned_rounds: int | None = None,
) -> tuple[ConfigRecord, ConfigRecord]:
    """What every site receives with a train / evaluate instruction (plus server-round, fedbn, proximal-mu).

    `transfer-dtype` is the wire precision the site must reply in (the experiment's `transfer_dtype`).

    `report` False: sites store the scores but send only counts (for all folds but the last of a protocol, so that
    differences between cumulative replies cannot isolate one fold's few patients).
    `experiment-id` and `planned-rounds` are for DP sites (client/tasks.py): a stable name of the experiment (default:
    its fingerprint) and the local rounds it will train at the site over the whole experiment (models × rounds;
    default: this training's rounds). A DP site fixes its noise once from them; they cannot change its budget.
    """
    base = {
        "experiment-id": experiment_id or exp.fingerprint(),
        "planned-rounds": int(planned_rounds or exp.rounds),
        "epochs": exp.local_epochs,
        "lr": exp.lr,
        "seed": exp.seed,
        "k": exp.folds.k,
        "fold-seed": exp.folds.seed,
        "held-out": exp.folds.held_out,
        "model": json.dumps(exp.model, sort_keys=True),
        "train": json.dumps(exp.train, sort_keys=True),
        "transfer-dtype": exp.transfer_dtype,  # the sites reply in it (common/transfer.py)
    }
    if noop:
        base["noop"] = 1
    base.update(extra or {})
    subset = "held-out" if exp.folds.k and exp.folds.held_out >= 0 else "all"
    ev = {**base, "subset": subset, "tag": tag or evaluation_tag(exp), "report": int(report)}
    ev.update({"min-cell": exp.min_cell, "threshold": -1.0})
    return ConfigRecord(base), ConfigRecord(ev)


def _train_loss(rec: RoundRecord):
    """Example-weighted mean train loss over the sites that sent one (DP sites withhold theirs: −1)."""
    pairs = [(float(a["train-loss"]), float(a.get("num-examples", 0))) for a in rec.accepted.values()]
    pairs = [(loss, n) for loss, n in pairs if loss >= 0 and n > 0]
    if not pairs:
        return ""
    return round(sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs), 6)


def _csv_row(rec: RoundRecord) -> dict:
    m, ev = rec.metrics, rec.evaluation_summary
    pooled = M.histogram_auc(ev["hist-pos"], ev["hist-neg"]) if ev.get("hist-pos") else float("nan")
    return {
        "round": rec.round,
        "seconds": round(rec.seconds, 2),
        "sites_sent": len(rec.sent),
        "sites_ok": len(rec.accepted),
        "sites_failed": len(rec.failed),
        "sites_rejected": len(rec.rejected),
        "sites_missing": len(rec.missing),
        "all_failed": int(rec.all_failed),
        "num_examples": m.get("num-examples", 0),
        "train_loss": _train_loss(rec),
        "epsilon_max": max((float(a.get("epsilon", -1.0)) for a in rec.accepted.values()), default=""),
        "eval_examples": ev.get("num-examples", ""),
        "eval_pooled_auc": "" if not np.isfinite(pooled) else round(pooled, 4),
    }


def evaluate_initial(grid, strategy, arrays: ArrayRecord, eval_cfg: ConfigRecord) -> dict:
    """Score the starting tensors where the final evaluation will score (round 0): {subset, evaluation, summary,
    failed}.

    Tagged `<tag>-initial` in the sites' stores, so these scores never mix with the trained model's. Through the
    strategy's own parts (sampling, wire, filters: schema, NaN, histogram bins) like any evaluation round. Used when
    round 1 cannot score it on receipt (some evaluating site does not train; see `run_training`).
    """
    cfg = ConfigRecord({**dict(eval_cfg), "tag": f"{eval_cfg['tag']}-initial"})
    ev = strategy.evaluate_initial(grid, arrays, cfg, timeout=strategy.quorum.round_timeout_s)
    return initial_result(ev, str(cfg["subset"]))


def initial_result(ev: RoundRecord, subset: str) -> dict:
    """federation.json `initial_evaluation` from the round-0 evaluation record (per-key scores left out)."""
    evaluation = {site: {k: v for k, v in e.items() if k != "predictions"} for site, e in ev.evaluation.items()}
    failed = {**ev.failed, **ev.rejected, **dict.fromkeys(ev.missing, "no reply before the deadline")}
    score = evaluation_score(evaluation, ev.evaluation_summary)
    log.info("initial model: pooled AUC %.3f on %d patient(s) (%s)", score["pooled_auc"], score["n"], subset)
    return {"subset": subset, "evaluation": evaluation, "summary": ev.evaluation_summary, "failed": failed}


def _improvement(initial: dict | None, history: list[dict]) -> dict:
    """Final against initial evaluation, when both exist (see server/aggregates.improvement)."""
    last = history[-1] if history else {}
    if not initial or not initial["evaluation"] or not last.get("evaluation"):
        return {}
    final = {"evaluation": last["evaluation"], "summary": last.get("evaluation_summary", {})}
    out = {"subset": initial["subset"], "round": last["round"], **improvement(initial, final)}
    auc = out["pooled_auc"]
    log.info("pooled AUC %.3f → %.3f after round %d", auc["initial"], auc["final"], last["round"])
    return out


def _wire_bytes(record: ArrayRecord, dtype: str) -> int:
    """Bytes of the exchanged tensors on the wire (floating tensors in the experiment's transfer dtype)."""
    size = np.dtype(dtype).itemsize
    return sum(a.numpy().size * size if np.dtype(a.dtype).kind == "f" else a.numpy().nbytes for a in record.values())


def run_training(
    grid,
    exp: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    expected_sites: int | None = None,
    train_nodes: Collection[int] | None = None,
    noop: bool = False,
    eval_tag: str | None = None,
    eval_report: bool = True,
    sites: dict[int, dict] | None = None,
    extra_config: dict | None = None,
    experiment_id: str | None = None,
    planned_rounds: dict[str, int] | None = None,
) -> dict:
    """Train the experiment federated; returns (and writes) the federation summary.

    For protocols: `train_nodes` limits who trains (a held-out site gets no training message); `eval_tag` and
    `eval_report` are passed to the sites' evaluation (see `round_configs`); `sites` is a census already taken (no
    new query per fold); `extra_config` is added to every instruction (e.g. the protocol unit's name).
    DP declarations (see `round_configs`): `experiment_id` (default the fingerprint) and `planned_rounds`, site name →
    local rounds over the whole experiment (default: this training's rounds at every site).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, fingerprint = out / "checkpoint", exp.fingerprint()
    arrays, state, start, history, initial = initial_arrays(exp), {}, 0, [], None
    if checkpoint.exists(ckpt_dir):
        if not resume:
            raise checkpoint.CheckpointError(f"{ckpt_dir}: a checkpoint exists; resume it or use another output folder")
        ck = checkpoint.load(ckpt_dir, fingerprint)
        arrays, state, start, history = ck.global_arrays, ck.strategy_state, ck.round, ck.meta.get("history", [])
        initial = ck.meta.get("initial_evaluation")  # scored before round 1 of the first run
        log.info("resuming after round %d of %d", start, exp.rounds)
    sites = sites if sites is not None else census(grid, exp, expected_sites)
    norm = [k for k in arrays if is_norm_buffer(k)]
    fallback = max(planned_rounds.values(), default=exp.rounds) if planned_rounds else exp.rounds
    train_cfg, eval_cfg = round_configs(
        exp, noop, eval_tag, eval_report, extra_config, experiment_id=experiment_id, planned_rounds=fallback
    )
    tb = RoundLog(out)

    def on_round_end(rnd: int, record: ArrayRecord, rec: RoundRecord) -> None:
        history.append(asdict(rec))
        tensors = {k: v.numpy() for k, v in record.items()}
        meta = {"history": history, "initial_evaluation": initial}
        checkpoint.save(ckpt_dir, checkpoint.Checkpoint(rnd, fingerprint, tensors, strategy.strategy_state(), meta))
        row = _csv_row(rec)
        new = not (out / "rounds.csv").exists()
        with (out / "rounds.csv").open("a", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        with (out / "rounds.jsonl").open("a") as fh:
            fh.write(json.dumps(asdict(rec), default=float) + "\n")
        tb.round(rnd, row, rec.accepted, _wire_bytes(record, exp.transfer_dtype))
        if rec.evaluation:
            tb.evaluation(rnd, evaluation_score(rec.evaluation, rec.evaluation_summary))

    def on_initial(ev: RoundRecord) -> None:
        nonlocal initial
        initial = initial_result(ev, str(eval_cfg["subset"]))
        tb.evaluation(0, evaluation_score(initial["evaluation"], initial["summary"]))

    # Evaluate-on-receipt (server/strategy.py) where every evaluating site also trains: the starting model is scored
    # by round 1's training messages, and with every-round evaluation each model by the next round's.
    on_receipt = exp.evaluate != "none" and not noop and train_nodes is None
    strategy = make_strategy(
        exp,
        norm,
        expected_sites=expected_sites,
        round_offset=start,
        on_round_end=on_round_end,
        census={node: info["site"] for node, info in sites.items()},
        census_counts={
            info["site"]: int(info.get("num-examples", 0)) for info in sites.values() if "num-examples" in info
        },
        train_nodes=train_nodes,
        site_configs={site: {"planned-rounds": int(n)} for site, n in (planned_rounds or {}).items()},
        evaluate_on_receipt=dict(eval_cfg) if on_receipt else None,
        score_initial=on_receipt and start == 0,
        on_initial=on_initial,
    )
    strategy.load_strategy_state(state)
    t0 = time.monotonic()
    final = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
    try:
        if start == 0 and exp.evaluate != "none" and not noop and not on_receipt:
            initial = evaluate_initial(grid, strategy, final, eval_cfg)
            tb.evaluation(0, evaluation_score(initial["evaluation"], initial["summary"]))
        if start < exp.rounds:
            strategy.start(
                grid=grid,
                initial_arrays=final,
                num_rounds=exp.rounds - start,
                timeout=exp.quorum.round_timeout_s,
                train_config=train_cfg,
                evaluate_config=eval_cfg,
                evaluate_fn=strategy.end_round,
            )
            final = strategy.latest or final
    finally:
        tb.close()
    failed = [h["round"] for h in history if h.get("all_failed")]
    summary = {
        "fingerprint": fingerprint,
        "experiment": exp.to_dict(),
        "census": list(sites.values()),
        "rounds": history,
        "all_failed_rounds": failed,
        "resumed_after": start,
        "seconds": time.monotonic() - t0,
        "initial_evaluation": initial or {},
        "final_evaluation": history[-1].get("evaluation", {}) if history else {},
        "improvement": _improvement(initial, history),
        "privacy": privacy_by_site(history),
    }
    if failed:
        log.error("round(s) %s had no usable reply: the global tensors did not change there", failed)
    (out / "federation.json").write_text(json.dumps(summary, indent=1, default=float))
    np.savez(out / "final_arrays.npz", **{k: v.numpy() for k, v in final.items()})
    return summary
