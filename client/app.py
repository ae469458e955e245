"""The hospital's Flower ClientApp: decode the instruction, run client/tasks.py, reply in the fixed schema.

Replies: train → one ArrayRecord (the exchanged tensors) + one MetricRecord (common.replies.TRAIN_KEYS), and when the
instruction asks to evaluate first, the evaluation of the received tensors as well (EVALUATION); evaluate →
one MetricRecord (EVALUATE_KEYS) and, only at sites that share predictions, a ConfigRecord of per-key scores; query →
a MetricRecord of counts + a ConfigRecord with the site's name, cache hash and installed spinefed version. Refusals
raise `SiteRefusal`, which Flower turns into an Error reply carrying only the refusal's (privacy-safe) message.

FedBN: the site's own norm tensors live in `context.state` for the run (Flower keeps it per node and run).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from client.approval import installed_version
from client.audit import audit_mod
from common.replies import (
    ARRAYS,
    CONFIG,
    EVALUATE_FIRST,
    EVALUATION,
    INSTRUCTION_DEFAULTS,
    MEMBERSHIP,
    METRICS,
    PREDICTIONS,
    REPORT,
    SECURESUM,
    SITE,
)
from common.transfer import npy_view, pack_npy, unpack_arrays

app = ClientApp(mods=[audit_mod])  # client/audit.py: one audit line per outgoing reply
_FEDBN = "fedbn-norm"
_NPY = "numpy.ndarray"  # Flower's SType of .npy bytes


def _config(msg: Message) -> dict:
    return _parse(dict(msg.content.config_records.get(CONFIG, ConfigRecord())))


def _parse(raw: dict) -> dict:
    cfg = {**INSTRUCTION_DEFAULTS, **raw}
    cfg["model"] = json.loads(cfg.get("model", "{}"))
    cfg["train"] = json.loads(cfg.get("train", "{}"))
    return cfg


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    """The instruction's tensors by name (they travel packed, common/transfer.py): read-only views into the message,
    which loading them into the model copies anyway."""
    try:
        record = msg.content.array_records[ARRAYS]
        views = {k: npy_view(v.data) if v.stype == _NPY else v.numpy() for k, v in record.items()}
        return unpack_arrays(views, copy=False)
    except ValueError as exc:
        raise tasks.SiteRefusal(f"the instruction's tensors cannot be read: {exc}") from None


def _fedbn_key(cfg: dict) -> str:
    # One slot per protocol unit: fold k's own BN tensors must not leak into fold k+1 of the same run.
    return _FEDBN + (f"/{cfg['unit']}" if cfg.get("unit") else "")


def _local_norm(context: Context, cfg: dict) -> dict | None:
    if not cfg["fedbn"] or _fedbn_key(cfg) not in context.state.array_records:
        return None
    return {k: v.numpy() for k, v in context.state.array_records[_fedbn_key(cfg)].items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def _packed(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """The reply's tensors as one buffer, written once (np.save per Array would copy it four times)."""
    record = ArrayRecord()  # not ArrayRecord(dict): that rebuilds each Array
    for key, (size, data) in pack_npy(arrays).items():
        record[key] = Array(dtype="uint8", shape=(size,), stype=_NPY, data=data)
    return record


@app.query()
def query(msg: Message, context: Context) -> Message:
    raw = dict(msg.content.config_records.get(CONFIG, ConfigRecord()))
    action = str(raw.get("action", "census"))
    try:
        site = tasks.open_site(context.node_config, context.run_config)
        content = RecordDict({METRICS: MetricRecord(tasks.census(site))})
        if action == "report":
            text = json.dumps(tasks.report(site, json.loads(str(raw.get("requests", "{}")))), default=float)
            content[REPORT] = ConfigRecord({"report": text})
        elif action == "membership":  # class counts of every unit's parts (common/replies.py MEMBERSHIP_KEYS)
            content[MEMBERSHIP] = MetricRecord(tasks.membership(site, raw))
            if raw.get("run") and site.config.privacy.secure_pooling:  # the site's key for this run's secure sums
                content[SECURESUM] = ConfigRecord({"public-key": tasks.run_public_key(site, str(raw["run"]))})
        elif action == "securesum":  # a step of a secure summation (client/securesum.py)
            content[SECURESUM] = ConfigRecord(tasks.securesum(site, json.loads(str(raw.get("request", "{}")))))
        else:
            # The site's installed release (the launcher ran this bundle only because its version is the same).
            content[SITE] = ConfigRecord({"site": site.name, "cache-hash": tasks.cache_hash(site),
                                          "version": installed_version()})  # fmt: skip
    except Exception as exc:  # the reply boundary: whatever failed, only a SiteRefusal's text leaves the site
        raise tasks.refusal(exc, action) from None
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        cfg = _config(msg)
        site = tasks.open_site(context.node_config, context.run_config)
        arrays = _arrays(msg)
        content = RecordDict()
        if cfg.get(EVALUATE_FIRST):  # score the received model before training on it (common/replies.py)
            ecfg = _parse(json.loads(str(cfg[EVALUATE_FIRST])))
            _evaluation_into(content, *tasks.evaluate(site, arrays, ecfg, _local_norm(context, ecfg)), EVALUATION)
        out, metrics, norm = tasks.train(site, arrays, cfg, _local_norm(context, cfg))
        if cfg["fedbn"]:
            context.state.array_records[_fedbn_key(cfg)] = _record(norm)
        content[ARRAYS], content[METRICS] = _packed(out), MetricRecord(metrics)
    except Exception as exc:  # the reply boundary: whatever failed, only a SiteRefusal's text leaves the site
        raise tasks.refusal(exc, "training") from None
    return Message(content, reply_to=msg)


def _evaluation_into(
    content: RecordDict, metrics: dict, predictions: dict | None, secure: dict | None, key: str
) -> None:
    content[key] = MetricRecord(metrics)
    if predictions is not None:
        content[PREDICTIONS] = ConfigRecord(predictions)
    if secure is not None:  # the masked validation histogram (bytes: never averaged by Flower), or the refusal
        content[SECURESUM] = ConfigRecord(secure)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        cfg = _config(msg)
        site = tasks.open_site(context.node_config, context.run_config)
        content = RecordDict()
        _evaluation_into(content, *tasks.evaluate(site, _arrays(msg), cfg, _local_norm(context, cfg)), METRICS)
    except Exception as exc:  # the reply boundary: whatever failed, only a SiteRefusal's text leaves the site
        raise tasks.refusal(exc, "evaluation") from None
    return Message(content, reply_to=msg)
