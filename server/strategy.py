"""Robust federated strategies: Flower's FedAvg / FedProx / FedAdam / FedYogi with the sharp edges taken off.

What the mixin adds to the stock strategy (flwr.serverapp.strategy), in the order a round meets it:
- Sampling: a bounded wait for a quorum (server/quorum.py) instead of `sample_nodes`, which waits forever; optional
  allow-lists of nodes for training and evaluation (a held-out site gets no training message).
- Reply filtering before Flower validates anything: Error replies, wrong record counts, metric keys other than the
  fixed schema (common/replies.py), missing/extra/misshaped tensors, NaN/Inf anywhere. A rejected reply is logged
  with its site and reason and the round goes on with the rest; one bad site can no longer kill the ServerApp with
  `InconsistentMessageReplies`.
- All-failed rounds: no usable reply → the global tensors stay unchanged, and the round is recorded as such.
- BatchNorm: running statistics (and every other norm tensor, see `common.model.is_norm_buffer`) are averaged
  plainly, weighted by examples, and never pass through the server optimizer: FedAdam/FedYogi on running variances
  yields negative or NaN variances (Flower #1060).
- FedBN (`strategy.fedbn`): the instruction carries `fedbn = 1`; each site then keeps its own BN tensors in its run
  state and overlays them on the global ones. The server still averages the BN tensors it receives, and that average
  is the rule for a site that never trained (held-out site, prediction elsewhere): it uses the global averaged
  statistics.
- Metrics: counts and histograms are summed (Flower's default would average them), per-site replies are kept.
- Progress and checkpointing: `on_round_end(round, arrays, record)` after every round.
- Evaluate-on-receipt (`evaluate_first`, set by server/federation.py): the model a training message delivers is
  scored by the site before it trains (common/replies.py EVALUATE_FIRST), instead of an evaluate message that
  would carry the same tensors again. Round 1 scores the starting model (`on_initial`); with every-round evaluation,
  round r + 1 scores round r's model, so round r's record (and its checkpoint) is completed and passed to
  `on_round_end` when those replies are in; the last round is evaluated by evaluate messages as before.
- Wire precision (`transfer_dtype`, common/transfer.py): the global tensors go out in it (train and evaluate); a
  reply's floating-point tensors must come in it (else rejected: one schema per experiment) and are turned into
  float32 before any other check, so filtering, aggregation, the global state and checkpoints are all float32.
- Wire packing (common/transfer.py): all tensors of a message travel as one buffer (Flower's per-tensor transport
  cost dominated rounds); a reply is unpacked into named tensors first, and one whose layout does not fit is rejected.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from common.replies import EVALUATE_FIRST, EVALUATE_KEYS, EVALUATION, METRICS, NUM_EXAMPLES, PREDICTIONS, TRAIN_KEYS
from common.transfer import decode_arrays
from server.experiment import ExperimentConfig
from server.quorum import wait_for_nodes
from server.wire import HeldArray, array_of, held_record, packed_record, read_packed, view, weighted_mean

log = logging.getLogger("flwr.spinefed.strategy")  # child of flwr: shown in `flwr run --stream`


@dataclass
class RoundRecord:
    """What happened in one round, per site (site names from the census, else `node-<id>`)."""

    round: int
    sent: list[str] = field(default_factory=list)
    accepted: dict[str, dict] = field(default_factory=dict)  # site → train metrics
    failed: dict[str, str] = field(default_factory=dict)  # site → Error reason (from the site, privacy-safe)
    rejected: dict[str, str] = field(default_factory=dict)  # site → why the coordinator dropped the reply
    missing: list[str] = field(default_factory=list)  # no reply before the deadline
    all_failed: bool = False
    metrics: dict = field(default_factory=dict)
    evaluation: dict[str, dict] = field(default_factory=dict)  # site → evaluate metrics (+ predictions)
    evaluation_summary: dict = field(default_factory=dict)
    seconds: float = 0.0


def _finite(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _reason(text: str) -> str:
    """The site's own message from an Error reason (simulation wraps it in Ray's traceback text)."""
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.replace("'>", "").split())[:300]


def sum_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Counts, histograms (element-wise) and example totals summed; losses averaged weighted by examples, over the
    sites that reported one (a DP site withholds its train loss as −1; a site without a threshold sends −1)."""
    out: dict = {}
    means: dict[str, list[float]] = {}  # key → [weighted sum, weight] over the sites that reported the value
    for r in records:
        m = next(iter(r.metric_records.values()))
        w = float(m[weight_key])
        for key, value in m.items():
            if key in ("train-loss", "threshold", "seconds"):
                acc = means.setdefault(key, [0.0, 0.0])
                if float(value) >= 0 and w > 0:
                    acc[0], acc[1] = acc[0] + float(value) * w, acc[1] + w
            elif key in ("auc", "auc-var", "reported", "shared"):  # per-site quantities: see the per-site replies
                continue
            elif key == "epsilon":  # the largest ε any site has spent
                out[key] = max(out.get(key, -1.0), float(value))
            elif isinstance(value, list):
                prev = out.get(key, [0.0] * len(value))
                out[key] = [float(a) + float(b) for a, b in zip(prev, value, strict=True)]
            else:
                out[key] = out.get(key, 0) + value
    for key, (total, weight) in means.items():
        out[key] = total / weight if weight else -1.0
    return MetricRecord(out)


class RobustMixin:
    """Goes in front of a Flower strategy class in the MRO; see the module docstring."""

    def setup_robust(
        self,
        exp: ExperimentConfig,
        norm_keys: Collection[str],
        *,
        expected_sites: int | None = None,
        round_offset: int = 0,
        on_round_end: Callable[[int, ArrayRecord, RoundRecord], None] | None = None,
    ) -> None:
        self.exp = exp
        self.norm_keys = set(norm_keys)
        self.quorum = exp.quorum
        self.expected_sites = expected_sites
        self.round_offset = round_offset
        self.final_round = exp.rounds
        self.on_round_end = on_round_end
        self.census: dict[int, str] = {}
        self.train_nodes: Collection[int] | None = None
        self.eval_nodes: Collection[int] | None = None
        self.history: list[RoundRecord] = []
        self.latest: ArrayRecord | None = None
        self._expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._current: RoundRecord | None = None
        self._t0 = 0.0
        self.evaluate_first: dict | None = None  # the evaluate instruction's config, to send within training
        self.initial_first = False  # round 1 also scores the starting model (tag <tag>-initial)
        self.on_initial: Callable[[RoundRecord], None] | None = None
        self._pending: tuple[ArrayRecord, RoundRecord] | None = None  # finished round awaiting its evaluation
        self._first_target: RoundRecord | None = None  # what this round's evaluate-first replies score
        self._ready: tuple[ArrayRecord, RoundRecord] | None = None  # the previous round, now evaluated

    # ----- naming and sampling -------------------------------------------------------------------------------------
    def site_of(self, node_id: int) -> str:
        return self.census.get(node_id, f"node-{node_id}")

    def _nodes(self, grid, allowed) -> list[int]:
        return wait_for_nodes(
            grid, self.quorum.min_sites, self.quorum.join_timeout_s, wanted=self.expected_sites, allowed=allowed
        )

    def _messages(self, arrays, config, node_ids, message_type) -> list[Message]:
        # Only the outgoing copy changes: `arrays` (the global state, FedOpt's current_arrays, _expected) stays
        # float32 and per tensor. TransferOverflow here stops the run before anything is sent (common/transfer.py).
        arrays = packed_record({k: view(a) for k, a in arrays.items()}, self.exp.transfer_dtype)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=message_type, dst_node_id=n) for n in node_ids]

    # ----- training --------------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._t0 = time.monotonic()
        self._current = RoundRecord(round=rnd)
        self.latest = arrays
        self._expected = {}
        current = {}
        for key, arr in arrays.items():
            a = view(arr)  # read-only, no copy: only read (shapes, FedOpt deltas)
            current[key] = a
            self._expected[key] = (tuple(a.shape), a.dtype)
        if hasattr(self, "current_arrays"):  # FedOpt family: delta_t is taken against these
            self.current_arrays = current
        if hasattr(self, "proximal_mu"):
            config["proximal-mu"] = float(self.proximal_mu)
        config["server-round"] = rnd
        config["fedbn"] = int(self.exp.strategy.fedbn)
        first = self._evaluate_first_config(rnd)
        if first is not None:
            config[EVALUATE_FIRST] = json.dumps(first, sort_keys=True)
        elif EVALUATE_FIRST in config:  # Flower hands the same ConfigRecord to every round
            del config[EVALUATE_FIRST]
        node_ids = self._nodes(grid, self.train_nodes)
        self._current.sent = [self.site_of(n) for n in node_ids]
        log.info("round %d/%d: training at %d site(s)", rnd, self.final_round, len(node_ids))
        return self._messages(arrays, config, node_ids, MessageType.TRAIN)

    def _evaluate_first_config(self, rnd: int) -> dict | None:
        """The evaluate config this round's training messages carry, or None; notes which record it completes."""
        self._first_target = None
        if self.evaluate_first is None:
            return None
        base = {**self.evaluate_first, "fedbn": int(self.exp.strategy.fedbn)}
        if self._pending is not None:
            self._first_target = self._pending[1]
            return {**base, "server-round": self._pending[1].round}
        if rnd == 1 and self.initial_first:
            self._first_target = RoundRecord(round=0)
            return {**base, "tag": f"{base['tag']}-initial", "server-round": 0}
        return None

    def _split_evaluations(self, replies: list[Message]) -> tuple[list[Message], list[str]]:
        """Take the evaluate-first parts out of training replies (Flower's FedAvg accepts one MetricRecord only), as
        evaluation replies of their own (a site's Error reply stands for both); and the sites whose training reply
        carried none."""
        out, without = [], []
        for msg in replies:
            if msg.has_error():
                out.append(msg)
                continue
            content, part = msg.content, RecordDict()
            if EVALUATION not in content.metric_records:
                without.append(self.site_of(msg.metadata.src_node_id))
                continue
            for key in (EVALUATION, PREDICTIONS):
                if key in content:
                    part[METRICS if key == EVALUATION else key] = content[key]
                    del content[key]
            out.append(Message(content=part, metadata=msg.metadata))
        return out, without

    def _fused_evaluation(self, replies: list[Message], sent: list[str]) -> None:
        target, self._first_target = self._first_target, None
        parts, without = self._split_evaluations(replies)
        ev = self._collect_evaluation(parts, [s for s in sent if s not in without], target.round)
        for site in without:
            ev.rejected[site] = "the training reply carried no evaluation of the received model (another release?)"
            log.warning("round %d: site %s did not evaluate on receipt", target.round, site)
        if target.round == 0:
            if self.on_initial is not None:
                self.on_initial(ev)
            return
        self._merge_evaluation(self._pending[1], ev)
        self._ready, self._pending = self._pending, None  # passed on at this round's end, like a round's own record

    def _check(self, msg: Message, keys: frozenset, with_arrays: bool) -> str | None:
        """Why this reply cannot be aggregated, or None."""
        content = msg.content
        if len(content.metric_records) != 1:
            return f"expected one MetricRecord, got {len(content.metric_records)}"
        metrics = next(iter(content.metric_records.values()))
        if set(metrics.keys()) != keys:
            missing, extra = sorted(keys - set(metrics.keys())), sorted(set(metrics.keys()) - keys)
            return f"metric keys differ from the schema (missing {missing}, extra {extra})"
        bad = [k for k, v in metrics.items() if not _finite(v)]
        if bad:
            return f"non-finite metric(s) {bad}"
        if not float(metrics[NUM_EXAMPLES]) > 0:
            return "num-examples is not positive"
        if not with_arrays:
            return None
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}"
        name, record = next(iter(content.array_records.items()))
        try:  # packed on the wire (common/transfer.py): named tensors again (views into the reply) before any check
            arrays = read_packed(record)
        except ValueError as exc:
            return str(exc)
        if set(arrays) != set(self._expected):
            missing, extra = set(self._expected) - set(arrays), set(arrays) - set(self._expected)
            return f"tensor keys differ ({len(missing)} missing, {len(extra)} extra)"
        wire = self.exp.transfer_dtype
        for key, a in arrays.items():
            if a.dtype.kind == "f" and a.dtype != wire:
                return f"tensor {key} sent as {a.dtype}; this experiment transfers {wire}"
        arrays = decode_arrays(arrays)  # float16 on the wire → float32 before any other check
        for key, a in arrays.items():
            shape, _ = self._expected[key]
            # A 0-d tensor (BN batch counter) sent as shape (1,) (np.ascontiguousarray does that) is the same tensor.
            if tuple(a.shape) != shape and not (a.size == 1 == int(np.prod(shape))):
                return f"tensor {key} has shape {tuple(a.shape)}, expected {shape}"
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                return f"tensor {key} holds NaN or Inf"
        content[name] = held_record(arrays)  # what Flower's aggregation reads, without copying the reply again
        return None

    def _filter(self, replies: Iterable[Message], keys: frozenset, with_arrays: bool, rec: RoundRecord, sent):
        accepted, seen = [], set()
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            seen.add(site)
            if msg.has_error():
                rec.failed[site] = _reason(str(msg.error.reason))
                log.warning("round %d: site %s replied with an error: %s", rec.round, site, rec.failed[site])
                continue
            why = self._check(msg, keys, with_arrays)
            if why:
                rec.rejected[site] = why
                log.warning("round %d: reply of site %s dropped: %s", rec.round, site, why)
                continue
            accepted.append(msg)
        rec.missing = sorted(set(sent) - seen)
        for site in rec.missing:
            log.warning("round %d: no reply from site %s before the deadline", rec.round, site)
        return accepted

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rec = self._current or RoundRecord(round=server_round + self.round_offset)
        replies = list(replies)
        if self._first_target is not None:
            self._fused_evaluation(replies, rec.sent)
        accepted = self._filter(replies, TRAIN_KEYS, True, rec, rec.sent)
        for msg in accepted:
            rec.accepted[self.site_of(msg.metadata.src_node_id)] = dict(next(iter(msg.content.metric_records.values())))
        if not accepted:
            rec.all_failed = True
            log.error("round %d: no usable reply from any site; the global tensors stay unchanged", rec.round)
            return None, None
        self._restore_shapes(accepted)
        arrays, metrics = super().aggregate_train(rec.round, accepted)
        arrays = self._finish(arrays, accepted)
        rec.metrics = dict(metrics) if metrics is not None else {}
        self.latest = arrays
        return arrays, metrics

    def _restore_shapes(self, accepted: list[Message]) -> None:
        """0-d tensors sent back as shape (1,) get the global shapes again: FedOpt's delta needs equal shapes."""
        for msg in accepted:
            record = next(iter(msg.content.array_records.values()))
            for key, (shape, _) in self._expected.items():
                if tuple(record[key].shape) != shape:
                    record[key] = HeldArray(np.reshape(record[key].numpy(), shape))

    def _finish(self, arrays: ArrayRecord, accepted: list[Message]) -> ArrayRecord:
        """Norm tensors: plain weighted mean of the replies (not the optimizer's step); dtypes as sent."""
        norm = [k for k in self._expected if k in self.norm_keys]
        out = {k: a.numpy() for k, a in arrays.items()}
        if norm:
            weights = [float(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES]) for m in accepted]
            total = sum(weights)
            for key in norm:
                acc = None
                for msg, w in zip(accepted, weights, strict=True):
                    a = next(iter(msg.content.array_records.values()))[key].numpy().astype(np.float64) * (w / total)
                    acc = a if acc is None else acc + a
                out[key] = acc
        for key, (shape, dtype) in self._expected.items():
            value = np.reshape(out[key], shape)
            if dtype.kind in "iu":
                value = np.rint(value)
            out[key] = np.asarray(value.astype(dtype, copy=False), order="C")  # not ascontiguousarray: it makes 0-d 1-d
        record = ArrayRecord()  # not ArrayRecord(dict): that rebuilds each Array
        for key in self._expected:
            record[key] = array_of(out[key])
        return record

    # ----- evaluation ------------------------------------------------------------------------------------------------
    def wants_evaluation(self, rnd: int) -> bool:
        return self.exp.evaluate == "every-round" or (self.exp.evaluate == "final" and rnd == self.final_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        rnd = server_round + self.round_offset
        if not self.wants_evaluation(rnd) or (self.evaluate_first is not None and rnd < self.final_round):
            return []  # evaluated on receipt by the next round's training messages
        config["server-round"] = rnd
        config["fedbn"] = int(self.exp.strategy.fedbn)
        node_ids = self._nodes(grid, self.eval_nodes)
        self._eval_sent = [self.site_of(n) for n in node_ids]
        log.info("round %d: evaluating at %d site(s)", rnd, len(node_ids))
        return self._messages(arrays, config, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        rec = self._current or RoundRecord(round=server_round + self.round_offset)
        replies = list(replies)
        if not replies and not getattr(self, "_eval_sent", None):
            return None
        ev = self._collect_evaluation(replies, getattr(self, "_eval_sent", []), rec.round)
        self._eval_sent = []
        self._merge_evaluation(rec, ev)
        return MetricRecord(ev.evaluation_summary) if ev.evaluation_summary else None

    def _collect_evaluation(self, replies: Iterable[Message], sent: list[str], rnd: int) -> RoundRecord:
        """Evaluation replies through the filters, as a record of their own (evaluation, its summary, failed,
        rejected, missing)."""
        ev = RoundRecord(round=rnd, sent=list(sent))
        accepted = self._same_bins(self._filter(replies, EVALUATE_KEYS, False, ev, sent), ev)
        for msg in accepted:
            entry = dict(next(iter(msg.content.metric_records.values())))
            if PREDICTIONS in msg.content.config_records:
                entry["predictions"] = dict(msg.content.config_records[PREDICTIONS])
            ev.evaluation[self.site_of(msg.metadata.src_node_id)] = entry
        if accepted:
            ev.evaluation_summary = dict(sum_metrics([m.content for m in accepted], NUM_EXAMPLES))
        else:
            log.error("round %d: no usable evaluation reply", rnd)
        return ev

    @staticmethod
    def _merge_evaluation(rec: RoundRecord, ev: RoundRecord) -> None:
        rec.evaluation, rec.evaluation_summary = ev.evaluation, ev.evaluation_summary
        rec.failed.update({f"{k} (evaluate)": v for k, v in ev.failed.items()})
        rec.rejected.update({f"{k} (evaluate)": v for k, v in ev.rejected.items()})

    def _same_bins(self, accepted: list[Message], rec: RoundRecord) -> list[Message]:
        """Histograms on other bins cannot be summed: keep the replies on the first reply's bins."""
        out = []
        for msg in accepted:
            m = next(iter(msg.content.metric_records.values()))
            ok = len(m["hist-pos"]) == len(m["hist-neg"]) and (
                not out or len(m["hist-pos"]) == len(next(iter(out[0].content.metric_records.values()))["hist-pos"])
            )
            if ok:
                out.append(msg)
            else:
                rec.rejected[self.site_of(msg.metadata.src_node_id)] = "histogram bins differ from the other sites'"
        return out

    # ----- end of round, state ---------------------------------------------------------------------------------------
    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Passed to `strategy.start` as evaluate_fn, which Flower calls after every round (and once before)."""
        if server_round == 0 or self._current is None:
            return None
        rec, self._current = self._current, None
        rec.seconds = time.monotonic() - self._t0
        if self._ready is not None:
            self._emit(*self._ready)
            self._ready = None
        self.latest = arrays
        self.history.append(rec)
        log.info(
            "round %d/%d done in %.1f s: %d site(s) ok, %d failed, %d rejected, %d missing%s",
            rec.round,
            self.final_round,
            rec.seconds,
            len(rec.accepted),
            len(rec.failed),
            len(rec.rejected),
            len(rec.missing),
            " — ALL FAILED, weights unchanged" if rec.all_failed else "",
        )
        if self.evaluate_first is not None and self.exp.evaluate == "every-round" and rec.round < self.final_round:
            self._pending = (arrays, rec)  # its evaluation comes back with the next round's training replies
            return None
        self._emit(arrays, rec)
        return None

    def _emit(self, arrays: ArrayRecord, rec: RoundRecord) -> None:
        if self.on_round_end is not None:
            self.on_round_end(rec.round, arrays, rec)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server-optimizer moments (FedAdam/FedYogi), for the checkpoint."""
        out = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"{name}/{key}"] = np.asarray(value)
        return out

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t"):
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + "/")}
            if part and hasattr(self, name):
                setattr(self, name, part)


class _HeldMean(FedAvg):
    """FedAvg's averaging step over the replies' held tensors (server/wire.py weighted_mean: one pass per reply
    instead of Flower's two full-size temporaries); everything else, and every strategy built on FedAvg, unchanged."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        tensors = [{k: a.numpy() for k, a in next(iter(c.array_records.values())).items()} for c in contents]
        return held_record(weighted_mean(tensors, weights)), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


# In the MRO _HeldMean sits right above FedAvg: FedProx / FedAdam / FedYogi call it as their super().aggregate_train.
_BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}
_CLASSES = {
    name: type(
        f"Robust{base.__name__}", (RobustMixin, _HeldMean) if base is FedAvg else (RobustMixin, base, _HeldMean), {}
    )
    for name, base in _BASES.items()
}


def make_strategy(exp: ExperimentConfig, norm_keys: Collection[str], **robust) -> RobustMixin:
    """The experiment's strategy with the robust mixin; `robust` goes to `RobustMixin.setup_robust`.

    Flower's `min_*` counts are set to the quorum (they are only used in its logs: sampling is ours).
    """
    st, q = exp.strategy, exp.quorum.min_sites
    common = dict(min_train_nodes=q, min_evaluate_nodes=q, min_available_nodes=q, train_metrics_aggr_fn=sum_metrics)
    common["evaluate_metrics_aggr_fn"] = sum_metrics
    if st.name == "fedprox":
        strategy = _CLASSES["fedprox"](proximal_mu=st.proximal_mu, **common)
    elif st.name in ("fedadam", "fedyogi"):
        strategy = _CLASSES[st.name](eta=st.eta, eta_l=exp.lr, beta_1=st.beta_1, beta_2=st.beta_2, tau=st.tau, **common)
    else:
        strategy = _CLASSES["fedavg"](**common)
    strategy.setup_robust(exp, norm_keys, **robust)
    return strategy
