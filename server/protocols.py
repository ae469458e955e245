"""Validation protocols inside the ServerApp (the same code in simulation and deployment): tenfold, site-held-out,
local-only baseline with the cross-site matrix, the final model, and the one cumulative report at the end.

A protocol run is a list of units; each unit is one federated training from the same initial tensors
(server/federation.run_training, its own checkpoint folder) followed by one evaluation message per site:
- tenfold `tenfold/fold-KK`: every site trains on its folds ≠ K (each site assigns its own patients from the shared
  seed; the coordinator never sees patient lists), scores its inner validation split and its fold K;
- site-held-out `site-held-out/SITE`: the other sites train (train_nodes excludes SITE, and the run checks from the
  round records that SITE got no training message), score their inner validation split; SITE scores all its patients;
- local-only `local/SITE` (baseline, all sites at once: each round sends every site its own model): SITE trains alone
  on its folds ≠ 0, scores its validation split and fold 0; every other site scores all its patients with that model
  (the cross-site matrix);
- `final`: every site trains on all its patients; validation only; the deployable model (common/modelfile.py).

Threshold flow (no peeking): the evaluation message asks the training sites for their inner-validation histograms
(a fixed split of the training patients that no round trained on), as masked vectors of a secure sum over at least
three sites (server/securesum.py; one more query reveals the masks' seeds), else per site with the minimum cell count
applied. The coordinator pools them and picks the Youden threshold on the bin edges. Test scores stay in the sites' evaluation stores, tagged with
the unit; the thresholds of every unit travel once, in the final report query, and each site calls each patient at
the threshold of the model that scored it. Rounds are fixed in advance (the experiment's `rounds`; no round is chosen
from any score). Why thresholds at report time rather than with the test evaluation: it saves one message per site and
unit (a ClientApp start, ≈ 4 s) and the threshold still depends on validation data only.

Differential privacy: every training instruction declares `experiment-id` (the progress record's tag, stable across
resume) and the site's `planned-rounds` (its rounds over every unit it trains in: folds, held-out units, local-only,
final), from which a DP site fixes its noise once (client/tasks.py). A DP site's ε comes back in each reply's
`epsilon`; refusals (budget spent) are Error replies and the unit goes on without the site. results.json `privacy`
holds ε per site and per unit.

What leaves a site: training tensors and train metrics (schema in common/replies.py); evaluation placeholders plus
validation histograms; once at the end, per tag counts, AUC with DeLong variance, Brier sum and suppressed
histograms, paired comparison summaries and reader McNemar counts (client/tasks.report).

Resume: out/protocol/progress.json records each finished unit (threshold, validation, sites) atomically; a restart
with `resume` skips them, continues an interrupted unit from its round checkpoint, and re-sends the interrupted unit's
evaluation (the store replaces a key's earlier score, so that is idempotent). A random nonce in every evaluation tag,
kept in progress.json, keeps a fresh run from mixing with scores an older run left in the sites' stores.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import metrics as M
from common.acquisition import mix_of
from common.errors import SpineFedError
from common.fileio import atomic_write_json
from common.replies import ARRAYS, CONFIG, EVALUATE_KEYS, MEMBERSHIP, MEMBERSHIP_KEYS, REPORT, SECURESUM, TRAIN_KEYS
from server import aggregates as A
from server import securesum as SS
from server import stratified as ST
from server.experiment import ExperimentConfig
from server.federation import census, initial_arrays, round_configs, run_training
from server.protocol_kinds import Unit, fold_count
from server.protocol_registry import KINDS, kind_of
from server.replyfilter import check_reply, error_reason, strata_problem
from server.wire import packed_record

log = logging.getLogger("flwr.spinefed.protocols")  # child of flwr: shown in `flwr run --stream`


class ProtocolError(SpineFedError):
    """A protocol invariant was violated (e.g. a held-out site received a training message)."""


def _slug(name: str) -> str:
    return name.replace("/", "__")


def plan_units(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    """The units of the experiment's protocol, in running order: every registered kind the experiment includes
    (server/protocol_registry.py: tenfold, site-held-out, repeated tenfold, local-only, final)."""
    return [u for kind in KINDS.values() if kind.included(exp) for u in kind.plan(exp, list(sites), base_tag)]


@dataclass
class Pooling:
    """What secure summation of the score histograms needs (server/securesum.py): the run it belongs to, the sites'
    run keys (from the membership replies; a site with secure pooling off gives none) and their class counts."""

    run: str
    keys: dict[str, bytes]
    counts: dict[int, dict[str, dict]]  # fold seed → site → membership counts


def query_membership(
    grid, exp: ExperimentConfig, nodes: dict[str, int], run: str = ""
) -> tuple[dict[str, dict], dict[str, str], dict[str, bytes]]:
    """Each site's class counts of every unit's parts under this experiment's split plan (counts only; see
    common/splits.membership_counts): (site → counts, site → why it gave none, site → its public key for the secure
    sums of run `run`, from sites that take part in them)."""
    val_fraction = float(exp.train.get("val_fraction", 0.2))
    cfg = {"action": "membership", "k": fold_count(exp), "fold-seed": exp.folds.seed, "seed": exp.seed}
    cfg["val-fraction"] = val_fraction
    if run:
        cfg["run"] = run
    msgs = [
        Message(RecordDict({CONFIG: ConfigRecord(dict(cfg))}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes.values()
    ]
    site_of = {n: s for s, n in nodes.items()}
    counts, missing, keys = {}, {}, {}
    for node, msg in _exchange(grid, msgs, exp.quorum.round_timeout_s).items():
        site = site_of.get(node, f"node-{node}")
        record = None if msg.has_error() else msg.content.metric_records.get(MEMBERSHIP)
        if record is None or set(record) != MEMBERSHIP_KEYS:
            missing[site] = error_reason(str(msg.error.reason)) if msg.has_error() else "no membership counts"
            continue
        counts[site] = {k: [int(v) for v in record[k]] for k in sorted(MEMBERSHIP_KEYS)}
        key = msg.content.config_records.get(SECURESUM, {}).get("public-key")
        if isinstance(key, bytes) and len(key) == 32:
            keys[site] = key
    for site in nodes:
        if site not in counts and site not in missing:
            missing[site] = "no reply before the deadline"
    return counts, missing, keys


def _counts(unit: Unit, by_seed: dict[int, dict[str, dict]], site: str) -> dict | None:
    """A site's membership counts under the unit's fold seed (every seed of the plan is queried)."""
    return by_seed.get(unit.exp.folds.seed, {}).get(site)


def _validation_counts(unit: Unit, counts: dict | None) -> tuple[int, int]:
    """(malignant, benign) inner-validation patients a training site scores for `unit`'s threshold."""
    if not counts:
        return 0, 0
    if kind_of(unit.kind).per_fold:
        f = unit.exp.folds.held_out
        return counts["val-pos"][f], counts["val-neg"][f]
    return counts["all-pos"][1], counts["all-neg"][1]


def _training_counts(unit: Unit, counts: dict) -> tuple[int, int]:
    """(malignant, benign) inner-train patients a site would train on in `unit`."""
    if kind_of(unit.kind).per_fold:
        f = unit.exp.folds.held_out
        return counts["train-pos"][f], counts["train-neg"][f]
    return counts["all-pos"][0], counts["all-neg"][0]


def apply_sit_outs(units: list[Unit], by_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, str]]:
    """Drop from each unit's training sites those with no inner-train patient of one class (they would pull the model
    towards one class only). `by_seed`: fold seed → site → membership counts. Returns unit → {site: reason}; a site
    without counts is left in (it refuses itself)."""
    sat_out: dict[str, dict[str, str]] = {}
    for unit in units:
        reasons = {}
        for site in unit.train_sites:
            counts = _counts(unit, by_seed, site)
            if counts is None:
                continue
            pos, neg = _training_counts(unit, counts)
            missing = [name for name, n in (("malignant", pos), ("benign", neg)) if n == 0]
            if missing:
                reasons[site] = (
                    f"no {' and no '.join(missing)} training patient in this unit ({pos} malignant, {neg} benign)"
                )
        if reasons:
            unit.train_sites = tuple(s for s in unit.train_sites if s not in reasons)
            sat_out[unit.name] = reasons
    return sat_out


# ----- messages ------------------------------------------------------------------------------------------------------
def _check(msg: Message, keys: frozenset, layout=None, wire_dtype: str = "float32") -> tuple[str | None, dict]:
    """The coordinator's reply checks (server/replyfilter.py, as in every round); a site's Error is `error: <its
    reason>`. Counts may be zero here (a site that only validates scores no test patient): nothing is weighted."""
    if msg.has_error():
        return f"error: {error_reason(str(msg.error.reason))}", {}
    return check_reply(msg, keys, layout, wire_dtype, positive_examples=False)


def _metrics(msg: Message):
    return next(iter(msg.content.metric_records.values()))


def _exchange(grid, msgs: list[Message], timeout: float) -> dict[int, Message]:
    replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
    return {r.metadata.src_node_id: r for r in replies}


def _arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return packed_record(arrays)  # one buffer on the wire


def evaluate_unit(
    grid,
    unit: Unit,
    arrays: dict,
    nodes: dict[str, int],
    census: dict[str, int] | None = None,
    pooling: Pooling | None = None,
) -> dict:
    """One evaluation message per involved site: validation histograms (training sites), test scores (test sites).

    `census`: site → its census total; a reply counting more patients than that is dropped (a hostile site could
    otherwise set the pooled threshold with an inflated histogram). `pooling`: the training sites' validation
    histograms go into a secure sum (server/securesum.py) where at least three of them take part; the others send
    theirs with their minimum cell count applied. Returns {threshold, threshold_choice (with `pooling`: how the
    histograms were pooled), validation: {site: n}, tested: {site: n}, failed: {site: reason}}.
    """
    _, ev = round_configs(unit.exp, tag=unit.tag, report=False, extra={"unit": unit.name})
    record = _arrays_record(arrays)
    nb = M.N_VALIDATION_BINS  # the Youden cut is searched on this grid; clear histograms are spread onto it
    summation, clear_sites = None, {}
    if pooling is not None:
        with_input = [
            s
            for s in unit.train_sites
            if s in nodes and sum(_validation_counts(unit, _counts(unit, pooling.counts, s)))
        ]
        summation, clear_sites = SS.plan(pooling.run, f"{unit.name}/validation", pooling.keys, with_input, 2 * nb)
    msgs = []
    for site, node in nodes.items():
        validate, subset = site in unit.train_sites, unit.test.get(site, "none")
        if not validate and subset == "none":
            continue
        cfg = ConfigRecord({**dict(ev), "subset": subset, "validation": int(validate), "server-round": unit.exp.rounds})
        cfg["fedbn"] = int(unit.exp.strategy.fedbn)
        if summation is not None and site in summation.peers:
            cfg["securesum"] = json.dumps(summation.spec())
        content = RecordDict({ARRAYS: record, CONFIG: cfg})
        msgs.append(Message(content, message_type=MessageType.EVALUATE, dst_node_id=node))
    site_of = {n: s for s, n in nodes.items()}
    replies = _exchange(grid, msgs, unit.exp.quorum.round_timeout_s)
    out: dict = {"validation": {}, "tested": {}, "failed": {}}
    vp, vn = np.zeros(nb), np.zeros(nb)
    masked, min_cells, refused = {}, {}, {}
    for node, msg in replies.items():
        site = site_of.get(node, f"node-{node}")
        why, _ = _check(msg, EVALUATE_KEYS)
        if why:
            out["failed"][site] = why[:300]
            log.warning("%s: evaluation at %s unusable: %s", unit.name, site, why[:300])
            continue
        m = _metrics(msg)
        counted = max(
            float(m["num-examples"]), float(m["val-examples"]), sum(m["val-hist-pos"]) + sum(m["val-hist-neg"])
        )
        if census and site in census and counted > census[site] + 1e-6:
            out["failed"][site] = f"counts {counted:g} patients, above the site's census total {census[site]}"
            log.warning("%s: evaluation at %s dropped: %s", unit.name, site, out["failed"][site])
            continue
        if summation is not None and site in summation.peers:
            vec, cell, why = SS.masked_vector(msg.content.config_records.get(SECURESUM), summation.size)
            if vec is not None:
                masked[site], min_cells[site] = vec, cell
            else:
                refused[site] = why
        if site in unit.train_sites and m["val-examples"] > 0:
            # Zeros from a site whose histogram went into the secure sum; its clear histogram otherwise.
            vp = vp + M.regrid(m["val-hist-pos"], nb)
            vn = vn + M.regrid(m["val-hist-neg"], nb)
            out["validation"][site] = int(m["val-examples"])
        if unit.test.get(site, "none") != "none":
            out["tested"][site] = int(m["num-examples"])
    for site in set(unit.test) | set(unit.train_sites):
        if site in nodes and site not in out["validation"] and site not in out["tested"] and site not in out["failed"]:
            out["failed"][site] = "no reply before the deadline"
    pooled_info = {"pooling": "per-site suppressed", "clear_sites": clear_sites} if pooling is not None else None
    if summation is not None:
        totals = {s: _validation_counts(unit, _counts(unit, pooling.counts, s)) for s in summation.peers}
        ask = SS.asker(grid, nodes, unit.exp.quorum.round_timeout_s)
        result = SS.finish(ask, summation, masked, min_cells, totals, unit.exp.min_cell)
        result["dropped"].update({s: f"{why}; it sent its histogram in the clear" for s, why in refused.items()})
        if result["mode"] != "none":
            half = len(result["sum"]) // 2
            vp, vn = vp + M.regrid(result["sum"][:half], nb), vn + M.regrid(result["sum"][half:], nb)
        pooled_info = SS.describe(result, clear_sites)
    choice = A.youden_from_histograms(vp, vn)
    choice["rule"] = "pooled validation histograms (Youden)"
    if pooled_info is not None:
        choice["pooling"] = pooled_info
        if pooled_info["pooling"] == "secure sum":
            choice["rule"] = "secure sum of the sites' exact validation histograms (Youden)"
    if not choice["youden"] > 0:
        # No ranking left in the pooled histograms (small splits merge into one cell under the minimum cell count, or
        # nothing beats chance). No site sends a raw validation score, so there is nothing finer to fall back to.
        choice["threshold"] = 0.5
        why = choice.get("note") or "the pooled validation histograms carry no ranking (too few validation patients)"
        choice["rule"] = f"0.5: {why.removesuffix(': 0.5')}"
    out["threshold"] = choice["threshold"]
    out["threshold_choice"] = choice
    return out


def train_local(
    grid,
    units: list[Unit],
    nodes: dict[str, int],
    out: Path,
    resume: bool,
    *,
    experiment_id: str | None = None,
    planned_rounds: dict[str, int] | None = None,
    records: list[dict] | None = None,
) -> dict[str, dict]:
    """The local-only baseline: every site trains its own model alone, all sites in the same message batch per round.

    A "federation of one": the site's own update is the model (no server optimizer); per-round checkpoint of every
    site's tensors in out/local_checkpoint.npz. Returns site → final tensors (sites that failed are left out).
    `experiment_id` / `planned_rounds` (site → rounds): the DP declarations (server/federation.round_configs);
    `records`, when given, receives one {round, accepted: site → train metrics, failed: site → reason} per round.
    """
    exp = units[0].exp
    ck = out / "local_checkpoint.npz"
    start, models = 0, {u.train_sites[0]: initial_arrays(exp) for u in units}
    if resume and ck.is_file():
        with np.load(ck, allow_pickle=False) as z:
            start = int(z["__round__"])
            for key in z.files:
                if "::" in key:
                    site, name = key.split("::", 1)
                    models.setdefault(site, {})[name] = z[key]
    layout = {k: (v.shape, v.dtype) for k, v in initial_arrays(exp).items()}
    failed: dict[str, str] = {}
    for rnd in range(start + 1, exp.rounds + 1):
        msgs = []
        for unit in units:
            site = unit.train_sites[0]
            if site in failed or site not in nodes:
                continue
            planned = (planned_rounds or {}).get(site, exp.rounds)
            train_cfg, _ = round_configs(
                exp, extra={"unit": unit.name}, experiment_id=experiment_id, planned_rounds=planned
            )
            cfg = ConfigRecord({**dict(train_cfg), "server-round": rnd, "fedbn": 0, "proximal-mu": 0.0})
            # In the experiment's wire precision, like a federated round; the site replies in it (common/transfer.py).
            content = RecordDict({ARRAYS: packed_record(models[site], exp.transfer_dtype), CONFIG: cfg})
            msgs.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=nodes[site]))
        site_of = {n: s for s, n in nodes.items()}
        replies = _exchange(grid, msgs, exp.quorum.round_timeout_s)
        record: dict = {"round": rnd, "accepted": {}, "failed": {}}
        for node, msg in replies.items():
            site = site_of[node]
            if msg.has_error():  # the site's own (privacy-safe) refusal, e.g. its privacy budget is spent
                record["failed"][site] = error_reason(str(msg.error.reason))
            # Packed on the wire in the experiment's dtype (common/transfer.py); float32 again, in the sent shapes.
            why, arrays = _check(msg, TRAIN_KEYS, layout, exp.transfer_dtype)
            if why:
                failed[site] = why[:300]
                log.warning("local-only round %d: site %s dropped: %s", rnd, site, why[:300])
                continue
            models[site] = {k: np.array(v) for k, v in arrays.items()}  # own copies: the reply is read in place
            record["accepted"][site] = dict(_metrics(msg))
        if records is not None:
            records.append(record)
        for m in msgs:
            site = site_of[m.metadata.dst_node_id]
            if m.metadata.dst_node_id not in replies and site not in failed:
                failed[site] = "no reply before the deadline"
        payload = {f"{s}::{k}": v for s, arrs in models.items() for k, v in arrs.items()}
        tmp = out / "local_checkpoint.tmp.npz"
        np.savez(tmp, __round__=np.array(rnd), **payload)
        tmp.replace(ck)
        log.info("local-only round %d/%d: %d site(s) trained", rnd, exp.rounds, len(msgs) - len(failed))
    return {s: m for s, m in models.items() if s not in failed}


# ----- the runner ----------------------------------------------------------------------------------------------------
class Progress:
    """out/protocol/progress.json: the nonce of this protocol run and every finished unit."""

    def __init__(self, folder: Path, exp: ExperimentConfig, resume: bool):
        self.path = folder / "progress.json"
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if not resume:
                raise ProtocolError(f"{self.path}: a protocol run exists here; resume it or use another output folder")
            if data["fingerprint"] != exp.fingerprint():
                raise ProtocolError(f"{self.path}: progress belongs to another experiment; use a new output folder")
            self.data = data
        else:
            self.data = {"fingerprint": exp.fingerprint(), "nonce": uuid.uuid4().hex[:8], "units": {}}
            self.save()

    @property
    def base_tag(self) -> str:
        return f"{self.data['fingerprint'][:12]}-{self.data['nonce']}"

    def done(self, name: str) -> bool:
        return name in self.data["units"]

    def finish(self, name: str, info: dict) -> None:
        self.data["units"][name] = info
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _sent_training(summary: dict) -> set[str]:
    return {s for r in summary.get("rounds", []) for s in r.get("sent", [])}


def run_protocol(
    grid,
    exp: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    expected_sites: int | None = None,
    on_unit: Callable[[str, dict], None] | None = None,
    synthetic: bool | None = None,
    quick: bool = False,
    app_hash: str | None = None,
) -> dict:
    """Run the experiment's protocol; writes out/results.json, out/report.md, out/report.html; returns the results.

    `synthetic`: whether the sites' data are synthetic (None: unknown, the report says so); `quick`: a reduced smoke-
    test plan (the report says it is not evidence); `app_hash`: the app bundle's hash for the provenance.
    """
    from server import report as R

    out = Path(out)
    t0 = time.monotonic()
    progress = Progress(out / "protocol", exp, resume)
    sites_info = census(grid, exp, expected_sites)
    nodes = {info["site"]: node for node, info in sites_info.items()}
    census_totals = {info["site"]: int(info["num-examples"]) for info in sites_info.values() if "num-examples" in info}
    names = sorted(nodes)
    units = plan_units(exp, names, progress.base_tag)
    log.info("protocol %s: %d unit(s) over %d site(s)", exp.protocol, len(units), len(names))
    # Membership is per patient (common/splits.py), so classes balance only in expectation: a site with no training
    # patient of one class in a unit sits it out, planned here from its counts and reported, never silently.
    membership, no_counts, run_keys = query_membership(grid, exp, nodes, run=progress.base_tag)
    by_seed = {exp.folds.seed: membership}
    for seed in sorted({u.exp.folds.seed for u in units} - {exp.folds.seed}):  # e.g. the repeats of a tenfold
        by_seed[seed] = query_membership(grid, exp.with_(folds=replace(exp.folds, seed=seed)), nodes)[0]
    pooling = Pooling(progress.base_tag, run_keys, by_seed)
    sat_out = apply_sit_outs(units, by_seed)
    for name, reasons in sat_out.items():
        for site, why in reasons.items():
            log.warning("%s: %s sits this unit out: %s", name, site, why)
    # DP declarations: one experiment for the sites' ledgers (stable across resume: the progress record's tag), and
    # each site's local rounds over every model this run trains on its data (all units, local-only and final included).
    planned = planned_rounds(units, names)
    dp_decl = {"experiment_id": progress.base_tag, "planned_rounds": planned}
    for unit in [u for u in units if not kind_of(u.kind).alone]:
        if progress.done(unit.name):
            log.info("%s: done earlier, skipped", unit.name)
            continue
        missing = [s for s in unit.train_sites if s not in nodes]
        if missing:
            raise ProtocolError(f"{unit.name}: training site(s) {missing} are not connected")
        if not unit.train_sites:
            why = "no site has training patients of both classes in this unit"
            log.warning("%s: not trained: %s", unit.name, why)
            progress.finish(unit.name, {"kind": unit.kind, "tag": unit.tag, "failed": {"*": why},
                                        "sat_out": sat_out.get(unit.name, {})})  # fmt: skip
            continue
        u0 = time.monotonic()
        folder = out / "units" / _slug(unit.name)
        train_nodes = {nodes[s] for s in unit.train_sites}
        # The quorum of a unit is at most its training sites (a site-held-out unit trains n − 1 of n).
        q = replace(unit.exp.quorum, min_sites=min(unit.exp.quorum.min_sites, len(train_nodes)))
        summary = run_training(
            grid,
            unit.exp.with_(quorum=q),
            folder,
            resume=resume or (folder / "checkpoint").exists(),
            expected_sites=len(train_nodes),
            train_nodes=train_nodes,
            eval_tag=unit.tag,
            eval_report=False,
            sites=sites_info,
            extra_config={"unit": unit.name},
            **dp_decl,
        )
        leaked = _sent_training(summary) - set(unit.train_sites)
        if leaked:  # the invariant of site-held-out, checked on what was actually sent
            raise ProtocolError(f"{unit.name}: site(s) {sorted(leaked)} received a training message")
        with np.load(folder / "final_arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        ev = evaluate_unit(grid, unit, arrays, nodes, census_totals, pooling)
        info = {
            "kind": unit.kind,
            "tag": unit.tag,
            "threshold": ev["threshold"],
            "threshold_choice": ev["threshold_choice"],
        }
        info.update({"train_sites": list(unit.train_sites), "trained_sites": sorted(_sent_training(summary))})
        info.update({"validation": ev["validation"], "tested": ev["tested"], "failed": ev["failed"]})
        info.update({"rounds": len(summary["rounds"]), "all_failed_rounds": summary["all_failed_rounds"]})
        info["privacy"] = summary.get("privacy", {})
        info["sat_out"] = sat_out.get(unit.name, {})
        info["seconds"] = time.monotonic() - u0
        progress.finish(unit.name, info)
        log.info("%s done in %.0f s (threshold %.2f)", unit.name, info["seconds"], ev["threshold"])
        if on_unit:
            on_unit(unit.name, info)
    local = [u for u in units if kind_of(u.kind).alone and not progress.done(u.name)]
    for unit in [u for u in local if not u.train_sites]:
        info = {"kind": unit.kind, "tag": unit.tag, "failed": sat_out[unit.name], "sat_out": sat_out[unit.name]}
        progress.finish(unit.name, info)
    local = [u for u in local if u.train_sites]
    if local:
        u0 = time.monotonic()
        records: list[dict] = []
        models = train_local(grid, local, nodes, out / "protocol", resume, records=records, **dp_decl)
        privacy = A.privacy_by_site(records)
        for unit in local:
            site = unit.train_sites[0]
            own = {site: privacy[site]} if site in privacy else {}
            if site not in models:
                reason = (own.get(site, {}).get("refusals") or ["training failed"])[-1]
                info = {"kind": unit.kind, "tag": unit.tag, "failed": {site: reason}, "privacy": own}
                progress.finish(unit.name, info)
                continue
            ev = evaluate_unit(grid, unit, models[site], nodes, census_totals, pooling)
            info = {
                "kind": unit.kind,
                "tag": unit.tag,
                "threshold": ev["threshold"],
                "threshold_choice": ev["threshold_choice"],
            }
            info.update({"train_sites": [site], "trained_sites": [site], "validation": ev["validation"]})
            info.update({"tested": ev["tested"], "failed": ev["failed"], "rounds": unit.exp.rounds})
            info["privacy"] = own
            info["seconds"] = (time.monotonic() - u0) / len(local)
            progress.finish(unit.name, info)
            if on_unit:
                on_unit(unit.name, info)
    site_reports, pooled = collect_reports(grid, exp, units, progress, nodes, census_totals, pooling)
    results = build_results(exp, units, progress, sites_info, site_reports, time.monotonic() - t0, pooled)
    results["membership"] = membership_summary(exp, membership, no_counts, sat_out)
    results.update(synthetic=synthetic, quick=bool(quick))
    results["provenance"]["app_bundle_hash"] = app_hash
    export_final_model(out, exp, units, progress, results)
    atomic_write_json(out / "results.json", results)
    R.render(results, out)
    return results


def membership_summary(exp: ExperimentConfig, membership: dict, no_counts: dict, sat_out: dict) -> dict:
    """results.json `membership`: the rule, each site's per-fold class counts, and the units sites sat out."""
    return {
        "rule": (
            "per patient: fold = floor(k × u), inner validation when v < val_fraction, u and v from SHA-256 of the "
            "seed and the patient's pseudonym key (common/splits.py); classes balance only in expectation"
        ),
        "k": fold_count(exp),
        "val_fraction": float(exp.train.get("val_fraction", 0.2)),
        "per_site": membership,
        "no_counts": no_counts,
        "sat_out": sat_out,
    }


def planned_rounds(units: list[Unit], sites: list[str]) -> dict[str, int]:
    """Site → local training rounds over every unit it trains in (the models × rounds a DP site must budget for)."""
    return {s: sum(u.exp.rounds for u in units if s in u.train_sites) for s in sites}


def _requests_for(site: str, exp: ExperimentConfig, units: list[Unit], progress: Progress) -> dict:
    tags: dict[str, dict] = {}
    for u in units:
        if kind_of(u.kind).results is None or not progress.done(u.name):  # no scores stored (the final model)
            continue
        tags.setdefault(u.tag, {})[u.name] = progress.data["units"][u.name].get("threshold", 0.5)
    kinds = {u.kind: u.tag for u in units}
    compare = []
    if "tenfold" in kinds and "site-held-out" in kinds:
        compare.append(["tenfold-vs-site-held-out", kinds["tenfold"], kinds["site-held-out"]])
    local_tag = next((u.tag for u in units if u.kind == "local" and u.owner == site), None)
    if "tenfold" in kinds and local_tag:
        compare.append(["tenfold-vs-local", kinds["tenfold"], local_tag])
    readers = [t for k, t in kinds.items() if kind_of(k).readers]
    strata = [t for k, t in kinds.items() if k in ST.KINDS and t in tags]  # per acquisition level (server/stratified)
    return {"tags": tags, "compare": compare, "readers": readers, "strata": strata, "min-cell": exp.min_cell}


def report_summations(units: list[Unit], progress: Progress, pooling: Pooling) -> dict[str, tuple]:
    """The report's secure sums: summation id → (Summation or None, sites in the clear, site → the tag it sums).

    One per tag of a kind that pools its tags (tenfold, site-held-out, each repeat of a repeated tenfold) over the
    sites that scored patients under it, and one over the local-only models' own-site scores (each site's own tag:
    the diagonal of the cross-site matrix)."""
    nb = len(M.DEFAULT_EDGES) - 1
    done = {u.name: progress.data["units"].get(u.name, {}) for u in units if progress.done(u.name)}
    groups: dict[str, dict[str, str]] = {}
    for u in units:
        tested = done.get(u.name, {}).get("tested", {})
        kind = kind_of(u.kind)
        if kind.pooled_tags:
            for site, n in tested.items():
                if n:
                    groups.setdefault(f"report/{u.tag}", {})[site] = u.tag
        elif kind.alone and tested.get(u.owner):
            groups.setdefault("report/local-diagonal", {})[u.owner] = u.tag
    out = {}
    for sum_id, tags in groups.items():
        summation, clear = SS.plan(pooling.run, sum_id, pooling.keys, sorted(tags), 2 * nb)
        out[sum_id] = (summation, clear, tags)
    return out


def collect_reports(
    grid,
    exp: ExperimentConfig,
    units: list[Unit],
    progress: Progress,
    nodes: dict,
    census: dict | None = None,
    pooling: Pooling | None = None,
) -> tuple[dict, dict]:
    """The one cumulative report query: (site → its report (client/tasks.report), summation id → how its histograms
    were pooled). A report counting more patients under a tag than the site's census total is dropped (listed in
    results.json `reports_missing`). With `pooling`, the tags' histograms go into secure sums (`report_summations`)."""
    sums = report_summations(units, progress, pooling) if pooling is not None else {}
    msgs = []
    for site, node in nodes.items():
        req = _requests_for(site, exp, units, progress)
        req["securesum"] = [
            {**summation.spec(), "tag": tags[site]}
            for summation, _, tags in sums.values()
            if summation is not None and site in summation.peers
        ]
        cfg = ConfigRecord({"action": "report", "requests": json.dumps(req)})
        msgs.append(Message(RecordDict({CONFIG: cfg}), message_type=MessageType.QUERY, dst_node_id=node))
    site_of = {n: s for s, n in nodes.items()}
    out = {}
    for node, msg in _exchange(grid, msgs, exp.quorum.round_timeout_s).items():
        site = site_of.get(node, f"node-{node}")
        if msg.has_error() or REPORT not in msg.content.config_records:
            log.warning("report of %s unusable: %s", site, msg.error.reason if msg.has_error() else "no report")
            continue
        report = json.loads(str(msg.content.config_records[REPORT]["report"]))
        counted = max((float(t.get("n", 0)) for t in report.get("tags", {}).values()), default=0.0)
        if census and site in census and counted > census[site]:
            log.warning("report of %s dropped: %g patients under one tag, census total %d", site, counted, census[site])
            continue
        _check_strata(site, report)
        out[site] = report
    pooled = {}
    for sum_id, (summation, clear_sites, tags) in sums.items():
        if summation is None:
            pooled[sum_id] = {"mode": "none", "info": SS.describe(None, clear_sites)}
            continue
        masked, min_cells, refused, totals = {}, {}, {}, {}
        for site in summation.peers:
            part = out.get(site, {}).get("secure", {}).get(sum_id)
            tag = out.get(site, {}).get("tags", {}).get(tags[site], {})
            totals[site] = (int(tag.get("n-pos", 0)), int(tag.get("n-neg", 0)))
            if isinstance(part, dict) and isinstance(part.get("masked"), str):
                part = {**part, "masked": SS.unb64(part["masked"])}
            vec, cell, why = SS.masked_vector(part if isinstance(part, dict) else None, summation.size)
            if vec is not None:
                masked[site], min_cells[site] = vec, cell
            elif site in out:
                refused[site] = why
        result = SS.finish(SS.asker(grid, nodes, exp.quorum.round_timeout_s), summation, masked, min_cells, totals,
                           exp.min_cell)  # fmt: skip
        result["dropped"].update({s: f"{why}; its histogram went in the clear" for s, why in refused.items()})
        for site, values in result["clear"].items():  # the fallback: the site's own suppressed histogram
            half = len(values) // 2
            out[site]["tags"][tags[site]].update({"hist-pos": values[:half], "hist-neg": values[half:]})
            out[site]["tags"][tags[site]]["hist-secure"] = 0
        pooled[sum_id] = {"mode": result["mode"], "info": SS.describe(result, clear_sites)}
        if result["mode"] == "secure":
            pooled[sum_id].update(sum=result["sum"], participants=result["participants"], floor=result["floor"])
    return out, pooled


def _check_strata(site: str, report: dict) -> None:
    """Drop a tag's acquisition strata that fail the coordinator's checks (server/replyfilter.strata_problem); the
    tag's other figures stand, and the reason stays with it (`strata-dropped`) for the stratified block."""
    for tag, rep in (report.get("tags") or {}).items():
        why = strata_problem(rep) if isinstance(rep, dict) else None
        if why:
            log.warning("report of %s: acquisition strata of %s dropped: %s", site, tag, why)
            rep.pop("strata", None)
            rep["strata-dropped"] = why[:200]


def stratified_results(res: dict, units: list[Unit], progress: Progress, sites_info: dict, reports: dict) -> None:
    """results.json `stratified` (per protocol in server/stratified.KINDS: results by acquisition level) and
    `warnings` (worst site, extrapolation, too few malignant cases), from the sites' reports and the census."""
    kinds = {u.kind: u.tag for u in units}
    res["stratified"] = {}
    for name in ST.KINDS:
        key = kind_of(name).results_key if name in KINDS else name
        if name in kinds and key in res["protocols"]:
            tagged = {s: r["tags"].get(kinds[name], {}) for s, r in reports.items()}
            block = ST.stratify({s: r for s, r in tagged.items() if r.get("n", 0) > 0})
            block["strata_dropped"] = {s: r["strata-dropped"] for s, r in tagged.items() if r.get("strata-dropped")}
            res["stratified"][key] = block
    census_by_site = {info["site"]: mix_of(info) for info in sites_info.values()}
    held_out = {}
    for u in units:
        if u.kind == "site-held-out" and progress.done(u.name):
            info = progress.data["units"][u.name]
            if info.get("tested"):
                # the sites that actually trained the unit's model (a site can drop out after planning)
                held_out[next(iter(u.test))] = list(info.get("trained_sites") or info.get("train_sites", []))
    res["warnings"] = ST.warnings(res, census_by_site, held_out)


def build_results(
    exp: ExperimentConfig,
    units: list[Unit],
    progress: Progress,
    sites_info: dict,
    reports: dict,
    seconds: float,
    pooled: dict | None = None,
) -> dict:
    """Everything the report shows, from the sites' aggregates and the progress record (JSON-ready). `pooled`:
    summation id → the secure sums of the report's histograms (collect_reports)."""
    pooled = pooled or {}
    from common.evaluation import PAPER

    kinds = {u.kind: u.tag for u in units}
    sites = {
        info["site"]: {
            "n": int(info.get("num-examples", 0)),
            "n_benign": int(info.get("n-benign", 0)),
            "n_malignant": int(info.get("n-malignant", 0)),
            "cache_hash": info.get("cache-hash", ""),
        }
        for info in sites_info.values()
    }
    res: dict = {
        "format": "spinefed-results",
        "protocol": exp.protocol,
        "synthetic": None,  # set by the caller that knows (simulate run: True)
        "quick": False,
        "experiment": exp.to_dict(),
        "provenance": {
            "experiment_fingerprint": exp.fingerprint(),
            "experiment_file": str(exp.file) if exp.file else None,
            "app_bundle_hash": None,
            "seeds": {"experiment": exp.seed, "folds": exp.folds.seed},
            "evaluation_tag": progress.base_tag,
            "cache_hashes": {s: v["cache_hash"] for s, v in sites.items()},
        },
        "sites": sites,
        "n_sites": len(sites),
        "n_patients": sum(v["n"] for v in sites.values()),
        "units": progress.data["units"],
        "protocols": {},
        "contrasts": {},
        "paper": dict(PAPER),
        "min_cell": exp.min_cell,
        "ci_level": 95,
        "pretrained": bool(exp.model.get("pretrained")),
        # Measured in tests/test_metrics.py on realistic synthetic sites (common/metrics.suppression_cost, min count
        # 5, merge rule): mean |pooled-histogram AUC − exact AUC|. simulate run replaces it by the run's own figure.
        "suppression": {"measured": False, "reference_error": 0.075, "reference_min_count": 5},
        "seconds": seconds,
    }
    for kind in KINDS.values():  # every registered protocol's block, in registry order
        ran = [u for u in units if u.kind == kind.name]
        block = kind.results(ran, reports, pooled) if ran and kind.results is not None else None
        if block is not None:
            res["protocols"][kind.results_key] = block
    contrasts = {}
    gen = {s: r["compare"].get("tenfold-vs-site-held-out", {}) for s, r in reports.items()}
    if any(v.get("n") for v in gen.values()):
        contrasts["tenfold_vs_site_held_out"] = A.paired_contrast(gen, "tenfold", "site-held-out")
    loc = {s: r["compare"].get("tenfold-vs-local", {}) for s, r in reports.items()}
    if any(v.get("n") for v in loc.values()):
        contrasts["federated_vs_local"] = A.paired_contrast(loc, "federated tenfold", "local-only")
    res["contrasts"] = contrasts
    res["verdict"] = A.verdict(contrasts.get("tenfold_vs_site_held_out", {})) if "site-held-out" in kinds else None
    readers = {}
    for kind in [k for k in kinds if kind_of(k).readers]:
        if kind in kinds:
            rows = {s: r["readers"].get(kinds[kind], {}) for s, r in reports.items()}
            if any(v.get("n") for v in rows.values()):
                readers[kind] = A.reader_summary(rows)
    res["readers"] = readers
    res["shared_predictions"] = {s: r["shared"] for s, r in reports.items() if r.get("shared")}
    res["reports_missing"] = sorted(set(sites) - set(reports))
    res["privacy"] = privacy_summary(progress.data["units"], sites)
    stratified_results(res, units, progress, sites_info, reports)
    return res


def privacy_summary(units: dict[str, dict], sites) -> dict:
    """results.json `privacy`: per site ε (last reported: its whole ledger), DP rounds, refusals; per unit ε."""
    per_site = A.merge_privacy([info.get("privacy", {}) for info in units.values()])
    for site in sites:
        per_site.setdefault(site, A.empty_privacy())
    per_unit = {
        name: {s: p["epsilon"] for s, p in info.get("privacy", {}).items() if p.get("dp")}
        for name, info in units.items()
    }
    return {
        "any_dp": any(p["dp"] for p in per_site.values()),
        "per_site": per_site,
        "per_unit": {k: v for k, v in per_unit.items() if v},
        "accountant": "RDP upper bound at each site's own delta (common/privacy.py), over every model on its data",
        "threat_model": (
            "DP protects each patient against whoever reads the released weights; it does not cover the "
            "coordinator's evaluation queries"
        ),
        "unprotected": (
            "outside DP (exact, from the data): evaluation outputs (counts, AUCs with DeLong variance, Brier sums, "
            "score histograms: their exact sum over >= 3 sites by secure summation, or per site with the site's "
            "minimum cell count), census and per-fold class counts, the pooled inner-validation histograms that set "
            "the threshold, each site's patient count (sets the sample rate); "
            "the DP class weight is a constant each site declares in site.yaml (public)"
        ),
    }


def export_final_model(out: Path, exp: ExperimentConfig, units: list[Unit], progress: Progress, results: dict) -> None:
    """Write the deployable model (common/modelfile.py) when the plan trained one; its validation = tenfold results."""
    final = next((u for u in units if u.kind == "final" and progress.done(u.name)), None)
    if final is None:
        return
    import torch

    from common import modelfile
    from common.model import ModelConfig, build_model, set_exchange_arrays

    folder = out / "units" / _slug(final.name)
    with np.load(folder / "final_arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    torch.manual_seed(exp.seed)
    cfg = ModelConfig.from_dict(exp.model)
    model = build_model(cfg)
    state = model.state_dict()
    set_exchange_arrays(model, {k: np.reshape(v, tuple(state[k].shape)) for k, v in arrays.items()}, cfg.trainable)
    ten = results["protocols"].get("tenfold", {}).get("pooled")
    validation = {"protocol": "federated tenfold" if ten else "none (no tenfold in this run)"}
    if ten:
        validation.update({k: ten[k] for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "auc")})
    info = progress.data["units"][final.name]
    sites = {s: {"benign": v["n_benign"], "malignant": v["n_malignant"]} for s, v in results["sites"].items()}
    training_sites = {s: sites[s] for s in info["trained_sites"] if s in sites}
    # ε each DP site reported after its last round of the final model (its whole ledger at that point).
    dp = {
        s: {"enabled": True, "epsilon": float(p["epsilon"]), "accountant": "RDP, the site's own delta"}
        | ({"delta": float(p["delta"])} if p.get("delta", -1) > 0 else {})
        for s, p in info.get("privacy", {}).items()
        if p.get("dp") and s in training_sites
    }
    meta = modelfile.save_model(
        out / "model.pt",
        model,
        cfg,
        threshold=float(info["threshold"]),
        validation=validation,
        training_sites=training_sites,
        provenance={k: v for k, v in results["provenance"].items() if k != "experiment_file"},
        synthetic=bool(results.get("synthetic")),
        dp=dp or None,
        threshold_source="pooled inner-validation histograms of the training sites (Youden's J)",
    )
    modelfile.write_model_card(out / "model_card.md", meta)
    results["final_model"] = {"file": "model.pt", "threshold": float(info["threshold"]), "card": "model_card.md"}
