"""The coordinator's strategy: Flower's Message-API strategy (server/strategies.py, chosen by name) with the project's
parts in front of it. Each part is a small class that takes its settings in the constructor, overrides the strategy
methods it needs and calls `super()`, so Flower's class does its own work (FedProx sends `proximal-mu`, FedOpt keeps
`current_arrays`, FedAvgM its momentum) and a new strategy needs no change here.

In the order a round meets them (outermost first; `make_strategy` composes them):
- RoundBook: round numbering across resumes, one RoundRecord per round (who was sent what, who answered, what was
  accepted or dropped and why), the evaluation schedule (`evaluate` none / final / every-round), messages sorted by
  node with per-site instruction values (a DP site's `planned-rounds`), `on_round_end(round, arrays, record)` after
  every round, and `evaluate_initial`, the public way to score the starting model (round 0).
- EvaluateOnReceipt: the model a training message delivers is scored by the site before it trains
  (common/replies.py EVALUATE_FIRST) instead of an evaluate message that would carry the same tensors again. Round 1
  scores the starting model (`score_initial`); with every-round evaluation round r + 1 scores round r's model, so
  round r's record (and its checkpoint) is completed and passed on when those replies are in; the last round is
  evaluated by evaluate messages.
- ReplyFilter: the wire both ways. Instructions go out with their tensors packed into one buffer in the experiment's
  transfer dtype (common/transfer.py). Error replies, wrong record counts, metric keys other than the fixed schema,
  missing/extra/misshaped tensors, tensors not in the wire dtype, NaN/Inf anywhere (server/replyfilter.py, the same
  checks the protocol runner uses) are dropped with their site and reason before Flower validates anything: one bad site can no longer kill the
  ServerApp with `InconsistentMessageReplies`. No usable reply: the global tensors stay unchanged and the round is
  recorded as all-failed. Accepted tensors reach the aggregator as float32, held in memory (server/wire.py), and what
  it returns gets the layout that was sent (shapes, dtypes; integer tensors rounded).
- InfluenceBound (experiment.yaml `influence`): a reply claiming more examples than its site's census is rejected;
  an update farther from the global model than `max_update_ratio` × its norm is scaled back; no site weighs more than
  `max_site_share` of a round. Recorded per round in `bounded` (and `rejected`).
- FedBN (`fedbn`): every instruction carries `fedbn = 1`; each site then keeps its own BN tensors in its run state and
  overlays them on the global ones. The server still averages the BN tensors it receives, and that average is the
  rule for a site that never trained (held-out site, prediction elsewhere): it uses the global averaged statistics.
- NormAveraging: BatchNorm running statistics (`common.model.is_norm_buffer`) never reach the aggregator; they are
  averaged plainly, weighted by examples. FedAdam/FedYogi on running variances yield negative or NaN variances
  (Flower #1060), and a robust aggregator (median, Krum) should judge the trained tensors only.
- QuorumSampling: a bounded wait for a quorum (server/quorum.py) instead of Flower's `sample_nodes`, which waits
  forever; optional allow-lists of nodes for training and evaluation (a held-out site gets no training message).
- StrategyState: whatever Flower's class keeps between rounds (the attributes its constructor creates that are not
  its parameters: FedAdam's moments, FedAvgM's momentum, ...) for the checkpoint (server/checkpoint.py).
Metrics: counts and histograms are summed (Flower's default would average them), per-site replies are kept.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.model import is_norm_buffer
from common.replies import EVALUATE_FIRST, EVALUATE_KEYS, EVALUATION, METRICS, NUM_EXAMPLES, PREDICTIONS, TRAIN_KEYS
from server.experiment import ExperimentConfig, QuorumConfig
from server.quorum import wait_for_nodes
from server.replyfilter import check_reply, error_reason
from server.strategies import STRATEGIES
from server.wire import HeldArray, array_of, held_record, packed_record, view, weighted_mean

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
    # site → what bounded its influence this round (server/strategy.InfluenceBound): update ratio before scaling,
    # weight share before capping
    bounded: dict[str, dict] = field(default_factory=dict)
    # site → its update's distance from the global model / the global norm (to calibrate influence.max_update_ratio)
    update_ratios: dict[str, float] = field(default_factory=dict)
    all_failed: bool = False
    metrics: dict = field(default_factory=dict)
    evaluation: dict[str, dict] = field(default_factory=dict)  # site → evaluate metrics (+ predictions)
    evaluation_summary: dict = field(default_factory=dict)
    seconds: float = 0.0


def sum_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Counts, histograms (element-wise) and example totals summed; losses averaged weighted by examples, over the
    sites that reported one (a DP site withholds its train loss as −1); ε and δ: the largest any site reported."""
    out: dict = {}
    means: dict[str, list[float]] = {}  # key → [weighted sum, weight] over the sites that reported the value
    for r in records:
        m = next(iter(r.metric_records.values()))
        w = float(m[weight_key])
        for key, value in m.items():
            if key in ("train-loss", "seconds"):
                acc = means.setdefault(key, [0.0, 0.0])
                if float(value) >= 0 and w > 0:
                    acc[0], acc[1] = acc[0] + float(value) * w, acc[1] + w
            elif key in ("auc", "auc-var", "reported", "shared"):  # per-site quantities: see the per-site replies
                continue
            elif key in ("epsilon", "delta"):  # the largest ε (δ) any site has spent (uses)
                out[key] = max(out.get(key, -1.0), float(value))
            elif isinstance(value, list):
                prev = out.get(key, [0.0] * len(value))
                out[key] = [float(a) + float(b) for a, b in zip(prev, value, strict=True)]
            else:
                out[key] = out.get(key, 0) + value
    for key, (total, weight) in means.items():
        out[key] = total / weight if weight else -1.0
    return MetricRecord(out)


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def _merge_evaluation(rec: RoundRecord, ev: RoundRecord) -> None:
    rec.evaluation, rec.evaluation_summary = ev.evaluation, ev.evaluation_summary
    rec.failed.update({f"{k} (evaluate)": v for k, v in ev.failed.items()})
    rec.rejected.update({f"{k} (evaluate)": v for k, v in ev.rejected.items()})


def _with_content(msgs: Iterable[Message], change: Callable[[RecordDict, int], RecordDict]) -> list[Message]:
    """The messages with their content replaced by `change(content, node)` (contents are often shared: Flower builds
    one RecordDict per round)."""
    out = []
    for msg in msgs:
        node = msg.metadata.dst_node_id
        out.append(Message(change(msg.content, node), message_type=msg.metadata.message_type, dst_node_id=node))
    return out


class Part:
    """Base of the parts: the hooks whose `super()` chains end here, and what every part shares.

    `record` is the round under way (RoundBook keeps it; parts write into it what they learn about the round),
    `evaluating` the evaluation being collected; `census` names sites (node id → site name)."""

    record: RoundRecord | None = None
    evaluating: RoundRecord | None = None
    census: Mapping[int, str] = {}

    def site_of(self, node_id: int) -> str:
        return self.census.get(node_id, f"node-{node_id}")

    def evaluation_instruction(self, config: dict) -> dict:
        """The config an evaluation instruction carries, from the experiment's (parts add their keys)."""
        return config

    def round_done(self, arrays: ArrayRecord, rec: RoundRecord) -> list[tuple[ArrayRecord, RoundRecord]]:
        """The finished rounds to pass on now (a part may hold one back until it is complete)."""
        return [(arrays, rec)]


class RoundBook(Part):
    """Round numbering, records, the evaluation schedule, message order and per-site values; see the module
    docstring. The other parts record into its `record`."""

    def __init__(
        self,
        *,
        final_round: int,
        evaluate: str = "final",
        round_offset: int = 0,
        census: Mapping[int, str] | None = None,
        site_configs: Mapping[str, Mapping] | None = None,
        on_round_end: Callable[[int, ArrayRecord, RoundRecord], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.final_round, self.evaluate = final_round, evaluate
        self.round_offset = round_offset  # rounds done before this start (resume): Flower counts from 1 again
        self.census = dict(census or {})
        self.site_configs = {site: dict(extra) for site, extra in (site_configs or {}).items()}
        self.on_round_end = on_round_end
        self.history: list[RoundRecord] = []
        self.latest: ArrayRecord | None = None
        self._t0 = 0.0
        self._eval_sent: list[str] = []

    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset if server_round else 0  # round 0: the starting model

    def wants_evaluation(self, rnd: int) -> bool:
        return self.evaluate == "every-round" or (self.evaluate == "final" and rnd == self.final_round)

    def _outgoing(self, msgs: Iterable[Message], per_site: bool) -> list[Message]:
        """Messages by node; with `per_site`, each site's own instruction values added (a copy of the config)."""
        msgs = sorted(msgs, key=lambda m: m.metadata.dst_node_id)
        if not per_site or not self.site_configs:
            return msgs

        def change(content: RecordDict, node: int) -> RecordDict:
            extra = self.site_configs.get(self.site_of(node))
            if not extra:
                return content
            out = RecordDict(dict(content.items()))
            for key, config in content.config_records.items():
                out[key] = ConfigRecord({**dict(config), **extra})
            return out

        return _with_content(msgs, change)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        rnd = self._round(server_round)
        self._t0 = time.monotonic()
        self.record = RoundRecord(round=rnd)
        self.latest = arrays
        msgs = self._outgoing(super().configure_train(rnd, arrays, config, grid), per_site=True)
        self.record.sent = [self.site_of(m.metadata.dst_node_id) for m in msgs]
        log.info("round %d/%d: training at %d site(s)", rnd, self.final_round, len(msgs))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rnd = self._round(server_round)
        if self.record is None:
            self.record = RoundRecord(round=rnd)
        rec = self.record
        arrays, metrics = super().aggregate_train(rnd, replies)
        if arrays is None:
            rec.all_failed = True
            log.error("round %d: no usable reply from any site; the global tensors stay unchanged", rnd)
            return None, None
        rec.metrics = dict(metrics) if metrics is not None else {}
        self.latest = arrays
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        rnd = self._round(server_round)
        if rnd and not self.wants_evaluation(rnd):
            return []
        msgs = self._outgoing(super().configure_evaluate(rnd, arrays, config, grid), per_site=False)
        self._eval_sent = [self.site_of(m.metadata.dst_node_id) for m in msgs]
        if msgs:
            log.info("round %d: evaluating at %d site(s)", rnd, len(msgs))
        return msgs

    def collect_evaluation(self, replies: Iterable[Message], sent: list[str], rnd: int) -> RoundRecord:
        """Evaluation replies through the parts (filters) and the strategy's metric aggregation, as a record of their
        own (evaluation per site, its summary, failed, rejected, missing)."""
        ev = self.evaluating = RoundRecord(round=rnd, sent=list(sent))
        try:
            summary = super().aggregate_evaluate(rnd, list(replies))
        finally:
            self.evaluating = None
        ev.evaluation_summary = dict(summary) if summary is not None else {}
        if not ev.evaluation:
            log.error("round %d: no usable evaluation reply", rnd)
        return ev

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        rnd = self._round(server_round)
        replies = list(replies)
        sent, self._eval_sent = self._eval_sent, []
        if not replies and not sent:
            return None
        ev = self.collect_evaluation(replies, sent, rnd)
        if self.record is None:
            self.record = RoundRecord(round=rnd)
        _merge_evaluation(self.record, ev)
        return MetricRecord(ev.evaluation_summary) if ev.evaluation_summary else None

    def evaluate_initial(self, grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> RoundRecord:
        """Score `arrays` (the starting model) once before round 1, as round 0, through the same parts as any
        evaluation (sampling, instruction keys, wire, filters); the caller's config names the evaluation tag."""
        msgs = self.configure_evaluate(0, arrays, config, grid)
        sent, self._eval_sent = self._eval_sent, []
        return self.collect_evaluation(grid.send_and_receive(msgs, timeout=timeout), sent, 0)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Passed to `strategy.start` as evaluate_fn, which Flower calls after every round (and once before)."""
        if server_round == 0 or self.record is None:
            return None
        rec, self.record = self.record, None
        rec.seconds = time.monotonic() - self._t0
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
        for done_arrays, done in self.round_done(arrays, rec):
            if self.on_round_end is not None:
                self.on_round_end(done.round, done_arrays, done)
        return None


class EvaluateOnReceipt(Part):
    """Sites score the model a training message delivers before training on it; see the module docstring.

    `evaluate_on_receipt`: the evaluate instruction's config to send within training (None: off); `score_initial`:
    round 1 scores the starting model (tag <tag>-initial, passed to `on_initial`); `score_each_round`: round r + 1
    scores round r's model, whose record is held back until then. Needs RoundBook in front of it (its `final_round`,
    `record` and `collect_evaluation`)."""

    def __init__(
        self,
        *,
        evaluate_on_receipt: Mapping | None = None,
        score_initial: bool = False,
        score_each_round: bool = False,
        on_initial: Callable[[RoundRecord], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.evaluate_on_receipt = dict(evaluate_on_receipt) if evaluate_on_receipt is not None else None
        self.score_initial, self.score_each_round, self.on_initial = score_initial, score_each_round, on_initial
        self._pending: tuple[ArrayRecord, RoundRecord] | None = None  # finished round awaiting its evaluation
        self._target: RoundRecord | None = None  # what this round's evaluate-first replies score
        self._ready: tuple[ArrayRecord, RoundRecord] | None = None  # the previous round, now evaluated

    def _first_config(self, rnd: int) -> dict | None:
        self._target = None
        if self.evaluate_on_receipt is None:
            return None
        base = self.evaluation_instruction(dict(self.evaluate_on_receipt))
        if self._pending is not None:
            self._target = self._pending[1]
            return {**base, "server-round": self._pending[1].round}
        if rnd == 1 and self.score_initial:
            self._target = RoundRecord(round=0)
            return {**base, "tag": f"{base['tag']}-initial", "server-round": 0}
        return None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        first = self._first_config(server_round)
        if first is not None:
            config[EVALUATE_FIRST] = json.dumps(first, sort_keys=True)
        elif EVALUATE_FIRST in config:  # Flower hands the same ConfigRecord to every round
            del config[EVALUATE_FIRST]
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        if self.evaluate_on_receipt is not None and 1 <= server_round < self.final_round:
            return []  # evaluated on receipt by the next round's training messages
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _split(self, replies: list[Message]) -> tuple[list[Message], list[str]]:
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        target, self._target = self._target, None
        if target is not None:
            sent = self.record.sent if self.record is not None else []
            parts, without = self._split(replies)
            ev = self.collect_evaluation(parts, [s for s in sent if s not in without], target.round)
            for site in without:
                ev.rejected[site] = "the training reply carried no evaluation of the received model (another release?)"
                log.warning("round %d: site %s did not evaluate on receipt", target.round, site)
            if target.round == 0:
                if self.on_initial is not None:
                    self.on_initial(ev)
            else:
                _merge_evaluation(self._pending[1], ev)
                self._ready, self._pending = self._pending, None  # passed on at this round's end
        return super().aggregate_train(server_round, replies)

    def round_done(self, arrays: ArrayRecord, rec: RoundRecord) -> list[tuple[ArrayRecord, RoundRecord]]:
        ready = [self._ready] if self._ready is not None else []
        self._ready = None
        if self.evaluate_on_receipt is not None and self.score_each_round and rec.round < self.final_round:
            self._pending = (arrays, rec)  # its evaluation comes back with the next round's training replies
            return ready
        return ready + super().round_done(arrays, rec)


class ReplyFilter(Part):
    """The wire both ways: instructions go out packed in `transfer_dtype`; replies come back through the checks of
    server/replyfilter.py (they must be in that dtype too), and unusable ones are dropped with the reason recorded.
    See the module docstring."""

    def __init__(self, *, transfer_dtype: str = "float32", **kwargs) -> None:
        super().__init__(**kwargs)
        self.transfer_dtype = transfer_dtype
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # what this round sent

    def _packed(self, msgs: Iterable[Message]) -> list[Message]:
        """The messages with their tensors packed into one buffer in the transfer dtype (common/transfer.py).

        Only the outgoing copy changes: the global state stays float32 and per tensor. TransferOverflow here stops
        the run before anything is sent."""
        packed: dict[int, RecordDict] = {}  # one packed copy of each content (Flower shares one per round)

        def change(content: RecordDict, node: int) -> RecordDict:
            if id(content) not in packed:
                out = packed[id(content)] = RecordDict(dict(content.items()))
                for key, record in content.array_records.items():
                    out[key] = packed_record({k: view(a) for k, a in record.items()}, self.transfer_dtype)
            return packed[id(content)]

        return _with_content(msgs, change)

    def accept(self, replies: Iterable[Message], keys: frozenset, rec: RoundRecord, tensors: bool) -> list[Message]:
        """The usable replies; the others go into `rec` (failed: the site's Error; rejected: why; missing). With
        `tensors`, an accepted reply's ArrayRecord holds its tensors decoded, float32, in the sent layout."""
        accepted, seen = [], set()
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            seen.add(site)
            if msg.has_error():
                rec.failed[site] = error_reason(str(msg.error.reason))
                log.warning("round %d: site %s replied with an error: %s", rec.round, site, rec.failed[site])
                continue
            why, arrays = check_reply(msg, keys, self._layout if tensors else None, self.transfer_dtype)
            if why:
                rec.rejected[site] = why
                log.warning("round %d: reply of site %s dropped: %s", rec.round, site, why)
                continue
            if tensors:  # what the aggregator reads, without copying the reply again
                msg.content[next(iter(msg.content.array_records))] = held_record(arrays)
            accepted.append(msg)
        rec.missing = sorted(set(rec.sent) - seen)
        for site in rec.missing:
            log.warning("round %d: no reply from site %s before the deadline", rec.round, site)
        return accepted

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self._layout = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}
        # The parts and the strategy below get the global tensors held in memory, as they get the replies: what they
        # keep of them (FedOpt's and FedAvgM's current_arrays) are read-only views, not copies.
        held = held_record({k: view(a) for k, a in arrays.items()})
        return self._packed(super().configure_train(server_round, held, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        return self._packed(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rec = self.record if self.record is not None else RoundRecord(round=server_round)
        accepted = self.accept(replies, TRAIN_KEYS, rec, tensors=True)
        for msg in accepted:
            rec.accepted[self.site_of(msg.metadata.src_node_id)] = dict(_metrics(msg))
        if not accepted:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        return (None if arrays is None else self._as_sent(arrays)), metrics

    def _as_sent(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the layout that was sent: shapes, dtypes (integer tensors rounded)."""
        record = ArrayRecord()  # not ArrayRecord(dict): that rebuilds each Array
        for key, (shape, dtype) in self._layout.items():
            value = np.reshape(arrays[key].numpy(), shape)
            if dtype.kind in "iu":
                value = np.rint(value)
            record[key] = array_of(np.asarray(value.astype(dtype, copy=False), order="C"))  # (ascontiguousarray: 0-d)
        return record

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        ev = self.evaluating if self.evaluating is not None else RoundRecord(round=server_round)
        accepted = self._same_bins(self.accept(replies, EVALUATE_KEYS, ev, tensors=False), ev)
        for msg in accepted:
            entry = dict(_metrics(msg))
            if PREDICTIONS in msg.content.config_records:
                entry["predictions"] = dict(msg.content.config_records[PREDICTIONS])
            ev.evaluation[self.site_of(msg.metadata.src_node_id)] = entry
        return super().aggregate_evaluate(server_round, accepted) if accepted else None

    def _same_bins(self, accepted: list[Message], rec: RoundRecord) -> list[Message]:
        """Histograms on other bins cannot be summed: keep the replies on the first reply's bins."""
        out = []
        for msg in accepted:
            m = _metrics(msg)
            ok = len(m["hist-pos"]) == len(m["hist-neg"]) and (
                not out or len(m["hist-pos"]) == len(_metrics(out[0])["hist-pos"])
            )
            if ok:
                out.append(msg)
            else:
                rec.rejected[self.site_of(msg.metadata.src_node_id)] = "histogram bins differ from the other sites'"
        return out


class FedBN(Part):
    """`fedbn`: every instruction tells the sites to keep their own BatchNorm tensors (client side); see the module
    docstring for the rule at sites that never trained."""

    def __init__(self, *, fedbn: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fedbn = bool(fedbn)

    def evaluation_instruction(self, config: dict) -> dict:
        return super().evaluation_instruction({**config, "fedbn": int(self.fedbn)})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        config["fedbn"] = int(self.fedbn)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        config["fedbn"] = int(self.fedbn)
        return super().configure_evaluate(server_round, arrays, config, grid)


class NormAveraging(Part):
    """`norm_keys` (BatchNorm running statistics) bypass the aggregator: plain mean weighted by examples."""

    def __init__(self, *, norm_keys: Collection[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm_keys = frozenset(norm_keys)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        if not any(k in self.norm_keys for k in arrays):
            return super().configure_train(server_round, arrays, config, grid)
        trained = ArrayRecord()
        for key, value in arrays.items():
            if key not in self.norm_keys:
                trained[key] = value
        msgs = super().configure_train(server_round, trained, config, grid)  # what the strategy keeps and steps
        full: dict[int, RecordDict] = {}

        def change(content: RecordDict, node: int) -> RecordDict:  # the sites get every tensor
            if id(content) not in full:
                full[id(content)] = RecordDict(dict(content.items()))
                full[id(content)][self.arrayrecord_key] = arrays
            return full[id(content)]

        return _with_content(msgs, change)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        first = next(iter(replies[0].content.array_records.values())) if replies else {}
        norm = [k for k in first if k in self.norm_keys]
        if not norm:
            return super().aggregate_train(server_round, replies)
        trained, stats = [], []
        for msg in replies:
            name, record = next(iter(msg.content.array_records.items()))
            stats.append({k: record[k].numpy() for k in norm})
            rest = ArrayRecord()
            for key, value in record.items():
                if key not in self.norm_keys:
                    rest[key] = value
            content = RecordDict(dict(msg.content.items()))
            content[name] = rest
            trained.append(Message(content=content, metadata=msg.metadata))
        arrays, metrics = super().aggregate_train(server_round, trained)
        if arrays is None:
            return arrays, metrics
        weights = [float(_metrics(m)[NUM_EXAMPLES]) for m in replies]
        total = sum(weights)
        out = ArrayRecord()
        for key, value in arrays.items():
            out[key] = value
        for key in norm:
            acc = None
            for s, w in zip(stats, weights, strict=True):
                a = s[key].astype(np.float64) * (w / total)
                acc = a if acc is None else acc + a
            out[key] = HeldArray(acc)
        return out, metrics

    def load_strategy_state(self, state: dict) -> None:
        # Checkpoints written while norm statistics still went through the strategy hold its moments for them.
        state = {
            name: {k: v for k, v in value.items() if k not in self.norm_keys} if isinstance(value, dict) else value
            for name, value in state.items()
        }
        super().load_strategy_state(state)


class _Chosen:
    """A grid that offers exactly the nodes already chosen: Flower's sampling then takes them all (no waiting)."""

    def __init__(self, grid, nodes: list[int]):
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class InfluenceBound(Part):
    """How much one site can move the global model in a round (experiment.yaml `influence`, server/experiment.py).

    On the accepted training replies, before any aggregation: a num-examples above the site's census total is a
    false claim and the reply is rejected (its weight would let one site overwrite the model); an update farther
    from the round's global model than `max_update_ratio` × the global norm (L2 over the float tensors other than
    BatchNorm running statistics; the norm taken as at least 1) is scaled back onto that sphere; no reply weighs more than `max_site_share` of the
    round's total (weights above are lowered to the common cap, which is solved for exactly). Each intervention is
    logged and recorded in the round's `bounded` (and `rejected`). Robust aggregators (server/strategies.py) bound
    sign-flipped or subtle updates that these size limits cannot see."""

    def __init__(
        self,
        *,
        census_counts: Mapping[str, int] | None = None,
        max_site_share: float = 1.0,
        max_update_ratio: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.census_counts = dict(census_counts or {})
        self.max_site_share, self.max_update_ratio = float(max_site_share), float(max_update_ratio)
        self._global: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self._global = {k: a.numpy() for k, a in arrays.items()}  # held views, no copy (server/wire.py)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rec = self.record if self.record is not None else RoundRecord(round=server_round)
        kept = []
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            claimed, total = float(_metrics(msg)[NUM_EXAMPLES]), self.census_counts.get(site)
            if total is not None and claimed > total:
                rec.rejected[site] = f"num-examples {claimed:g} above the site's census total {total}"
                rec.accepted.pop(site, None)
                log.warning("round %d: reply of site %s dropped: %s", rec.round, site, rec.rejected[site])
                continue
            kept.append(self._bounded(msg, site, rec))
        if not kept:
            return None, None
        return super().aggregate_train(server_round, self._capped(kept, rec))

    def _bounded(self, msg: Message, site: str, rec: RoundRecord) -> Message:
        name, record = next(iter(msg.content.array_records.items()))
        keys = [k for k, a in record.items() if k in self._global and a.numpy().dtype.kind == "f"]
        keys = [k for k in keys if not is_norm_buffer(k)]
        delta2 = sum(float(np.sum((record[k].numpy().astype(np.float64) - self._global[k]) ** 2)) for k in keys)
        base2 = sum(float(np.sum(self._global[k].astype(np.float64) ** 2)) for k in keys)
        # A floor of 1 (L2) keeps a near-zero global model (a zero-initialised head) from freezing every update.
        ratio = (delta2**0.5) / max(base2**0.5, 1.0)
        rec.update_ratios[site] = ratio
        if ratio <= self.max_update_ratio:
            return msg
        scale = self.max_update_ratio / ratio
        out = {k: record[k].numpy() for k in record}
        for k in keys:
            g = self._global[k].astype(np.float32)
            out[k] = g + (out[k].astype(np.float32) - g) * np.float32(scale)
        rec.bounded.setdefault(site, {})["update_ratio"] = ratio
        log.warning(
            "round %d: update of site %s is %.3g x the global model's norm; scaled back to %g",
            rec.round,
            site,
            ratio,
            self.max_update_ratio,
        )
        content = RecordDict(dict(msg.content.items()))
        content[name] = held_record(out)
        return Message(content=content, metadata=msg.metadata)

    def _capped(self, msgs: list[Message], rec: RoundRecord) -> list[Message]:
        weights = [float(_metrics(m)[NUM_EXAMPLES]) for m in msgs]
        capped = cap_shares(weights, self.max_site_share)
        if capped == weights:
            return msgs
        out = []
        for msg, w, c in zip(msgs, weights, capped, strict=True):
            if c < w:
                site = self.site_of(msg.metadata.src_node_id)
                rec.bounded.setdefault(site, {})["weight"] = [w, c]
                log.warning("round %d: weight of site %s capped from %g to %.3g", rec.round, site, w, c)
                content = RecordDict(dict(msg.content.items()))
                name = next(iter(msg.content.metric_records))
                content[name] = MetricRecord({**dict(_metrics(msg)), NUM_EXAMPLES: c})
                msg = Message(content=content, metadata=msg.metadata)
            out.append(msg)
        return out


def cap_shares(weights: list[float], share: float) -> list[float]:
    """Weights lowered to a common cap c so that none exceeds `share` of the new total: c = share × Σ min(w, c).

    Exact: with the k largest capped, c = share × (sum of the others) / (1 − k × share), the k for which c falls
    between the k-th and (k+1)-th largest weight. When no cap can satisfy it (share × n <= 1), every weight becomes
    the mean weight (each site then carries 1/n, the least any cap allows)."""
    n = len(weights)
    if share >= 1 or n == 0:
        return list(weights)
    mean = sum(weights) / n
    order = sorted(weights, reverse=True)
    if order[0] <= share * sum(order):
        return list(weights)
    rest = sum(order)
    for k in range(1, n):
        rest -= order[k - 1]
        if k * share >= 1:
            break
        cap = share * rest / (1 - k * share)
        if order[k] <= cap <= order[k - 1]:
            return [min(w, cap) for w in weights]
    return [mean] * n


class QuorumSampling(Part):
    """Nodes for a round after a bounded wait for the quorum; `train_nodes` / `eval_nodes` allow-lists (None: all).
    Flower's `min_*` counts are set to the quorum (the wait has already made sure that many are there)."""

    def __init__(
        self,
        *,
        quorum: QuorumConfig,
        expected_sites: int | None = None,
        train_nodes: Collection[int] | None = None,
        eval_nodes: Collection[int] | None = None,
        **kwargs,
    ) -> None:
        q = quorum.min_sites
        super().__init__(min_train_nodes=q, min_evaluate_nodes=q, min_available_nodes=q, **kwargs)
        self.quorum, self.expected_sites = quorum, expected_sites
        self.train_nodes, self.eval_nodes = train_nodes, eval_nodes

    def sample(self, grid, allowed: Collection[int] | None) -> list[int]:
        return wait_for_nodes(
            grid, self.quorum.min_sites, self.quorum.join_timeout_s, wanted=self.expected_sites, allowed=allowed
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        chosen = _Chosen(grid, self.sample(grid, self.train_nodes))
        return super().configure_train(server_round, arrays, config, chosen)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        chosen = _Chosen(grid, self.sample(grid, self.eval_nodes))
        return super().configure_evaluate(server_round, arrays, config, chosen)


class StrategyState(Part):
    """The state Flower's strategy keeps between rounds, gathered generically for the checkpoint: every attribute its
    constructor creates that is not one of its parameters (those come from the experiment) or a function."""

    def __init__(self, **kwargs) -> None:
        before = set(vars(self))
        super().__init__(**kwargs)
        settings = set()
        for cls in type(self).__mro__[type(self).__mro__.index(StrategyState) + 1 :]:
            if "__init__" in vars(cls):
                settings |= set(inspect.signature(cls.__init__).parameters)
        self.state_names = tuple(
            sorted(k for k in set(vars(self)) - before if k not in settings and not callable(getattr(self, k)))
        )

    def strategy_state(self) -> dict[str, object]:
        """Attribute name → value (None, numbers, arrays, dicts or lists of arrays, ArrayRecords)."""
        return {name: getattr(self, name) for name in self.state_names}

    def load_strategy_state(self, state: Mapping[str, object]) -> None:
        unknown = sorted(set(state) - set(self.state_names))
        if unknown:
            raise ValueError(f"checkpointed strategy state {unknown} is not state of {type(self).__name__}")
        for name, value in state.items():
            setattr(self, name, value)


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


PARTS = (RoundBook, EvaluateOnReceipt, ReplyFilter, InfluenceBound, FedBN, NormAveraging, QuorumSampling, StrategyState)


def _compose(cls: type) -> type:
    # _HeldMean sits right above FedAvg in the MRO: every strategy that calls FedAvg's aggregate_train gets it.
    bases = (*PARTS, _HeldMean) if cls is FedAvg else (*PARTS, cls, _HeldMean)
    return type(f"Coordinated{cls.__name__}", bases, {})


CLASSES = {name: _compose(reg.cls) for name, reg in STRATEGIES.items()}


def make_strategy(
    exp: ExperimentConfig,
    norm_keys: Collection[str],
    *,
    evaluate_on_receipt: Mapping | None = None,
    score_initial: bool = False,
    **settings,
) -> RoundBook:
    """The experiment's strategy (by `strategy.name`, server/strategies.py) with the parts in front of it.

    `settings` go to the parts' constructors (census, census_counts, train_nodes, eval_nodes, expected_sites,
    round_offset, site_configs, on_round_end, on_initial); the rest comes from the experiment."""
    st = exp.strategy
    reg = STRATEGIES[st.name]
    flower = {key: st.value(key) for key in reg.params}
    flower.update({arg: getattr(exp, attr) for arg, attr in reg.from_experiment.items()})
    return CLASSES[st.name](
        train_metrics_aggr_fn=sum_metrics,
        evaluate_metrics_aggr_fn=sum_metrics,
        **flower,
        quorum=exp.quorum,
        norm_keys=norm_keys,
        fedbn=st.fedbn,
        transfer_dtype=exp.transfer_dtype,
        max_site_share=exp.influence.max_site_share,
        max_update_ratio=exp.influence.max_update_ratio,
        final_round=exp.rounds,
        evaluate=exp.evaluate,
        evaluate_on_receipt=evaluate_on_receipt,
        score_initial=score_initial,
        score_each_round=exp.evaluate == "every-round",
        **settings,
    )
