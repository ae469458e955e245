"""The site's audit log: one JSON line for every message the site sends to the coordinator (a Flower client mod).

Each line: time (UTC), run id, round (group id), kind (query/train/evaluate reply, or error), size in bytes of what
the records carry, SHA-256 over that content, Flower's object id of the reply (what the SuperLink stores; not in
simulation, where no SuperLink stores it), the names of the records, the metric names (never their values), tensor
count. An Error reply (a refusal, or any exception in the app) is a line of kind `error` with the request's kind,
Flower's error code, the size and SHA-256 of the exact reason text that leaves (Flower sends
`<class 'X'>:<'message'>`), and the reason's first words when X is a refusal written to leave the site (SiteRefusal,
NotApproved: privacy-safe by construction); for any other exception only its class. It lets a site's privacy officer
see what left, when and how much, without the log itself becoming a copy of the data. File: site.yaml `audit_log`,
default `<cache>-audit.jsonl` beside the cache folder.

Attached in client/app.py as `ClientApp(mods=[audit_mod])`: every reply and every Error the app raises. What the app
never sees is recorded by the site's launcher (client/launcher.py `install_gate`, wrapping Flower's push of the
reply): a bundle refused before it is unpacked, an app that cannot be loaded. A reply is recorded once (`RECORDED`).
Writing the log must never break or alter a reply: any failure here is logged at the site and the reply goes out
unchanged. Note: the ClientApp code, this module included, comes from the coordinator's app bundle, but a deployed
site runs its installed copy (client/launcher.py imports it before the bundle's); the log is only as trustworthy as
the release the site installed (issue 8).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from flwr.app import Context, Message

from common.errors import SpineFedError

log = logging.getLogger("spinefed.site.audit")  # stays at the site
# Exceptions whose message is written to leave the site (hashes, versions, counts, settings; never an identifier).
SAFE_REFUSALS = ("client.tasks.SiteRefusal", "client.approval.NotApproved")
FLOWER_LOAD_ERROR = "An exception was raised when attempting to load `ClientApp`"  # Flower's fixed text
REASON_WORDS, REASON_CHARS = 16, 200
# Ids of the requests whose reply (or Error) this process has recorded: the launcher records only what is not here.
RECORDED: set[str] = set()
_REASON = re.compile(r"^<class '([\w.]+)'>:<'(.*)'>$", re.DOTALL)


def flower_reason(exc: BaseException) -> str:
    """The reason text of the Error reply Flower makes of an exception a ClientApp raised (flwr 1.42
    supernode/runtime/run_clientapp.py and the simulation engine: the same format)."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def error_entry(reason: str, code: int | None = None) -> dict:
    """The audit fields of an Error reply: size and hash of the exact reason, and a privacy-safe head of it."""
    raw = reason.encode()
    entry: dict = {"kind": "error", "error": True, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if code is not None:
        entry["error_code"] = int(code)
    m = _REASON.match(reason)
    if m:
        entry["exception"] = m.group(1).rsplit(".", 1)[-1]
        if m.group(1) in SAFE_REFUSALS:
            entry["reason"] = " ".join(m.group(2).split()[:REASON_WORDS])[:REASON_CHARS]
    elif reason == FLOWER_LOAD_ERROR:
        entry["reason"] = reason
    return entry


def audit_path(node_config: dict, run_config: dict) -> Path | None:
    """Where this node's audit log goes (None when the node has no site configuration)."""
    from client.tasks import site_config_path
    from common.config import load_site_config

    try:
        cfg = load_site_config(site_config_path(node_config, run_config))
    except (SpineFedError, OSError, ValueError, LookupError, TypeError):  # no usable site.yaml (or sim-sites list)
        return None  # no site: the ClientApp refuses the message itself; nothing of the site's data goes out
    return cfg.audit_log or cfg.cache.parent / f"{cfg.cache.name}-audit.jsonl"


def describe(reply: Message, object_id: bool = True) -> dict:
    """What the audit line says about one outgoing reply (sizes, hashes, names; no values).

    `object_id` False: without Flower's object id. Computing it caches a second view of every tensor in the reply,
    which Flower's simulation engine (Ray) then pickles as a copy: the reply would travel at twice its size.
    """
    digest, size, arrays = hashlib.sha256(), 0, 0
    if reply.has_error():
        return {"request": reply.metadata.message_type, **error_entry(reply.error.reason or "", reply.error.code)}
    entry: dict = {"kind": reply.metadata.message_type, "error": False}
    content = reply.content
    for name, record in sorted(content.array_records.items()):
        for key, arr in record.items():
            digest.update(f"{name}/{key}:{arr.dtype}:{tuple(arr.shape)}".encode())
            digest.update(arr.data)
            size += len(arr.data)
            arrays += 1
    metric_names: list[str] = []
    for kind, records in (("metrics", content.metric_records), ("configs", content.config_records)):
        for name, record in sorted(records.items()):
            text = json.dumps({k: v for k, v in record.items()}, sort_keys=True, default=repr).encode()
            digest.update(f"{kind}/{name}:".encode() + text)
            size += len(text)
            if kind == "metrics":
                metric_names += [f"{name}.{k}" for k in sorted(record)]
    entry.update(
        size=size,
        sha256=digest.hexdigest(),
        records=sorted([*content.array_records, *content.metric_records, *content.config_records]),
        tensors=arrays,
        metric_names=metric_names,
    )
    if object_id:
        with contextlib.suppress(Exception):  # an id Flower cannot compute here is not worth failing the reply for
            entry["object_id"] = reply.object_id
    return entry


def write_line(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def _base(msg: Message) -> dict:
    return {"run": msg.metadata.run_id, "round": msg.metadata.group_id, "request": msg.metadata.message_type}


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: run the app, then record what the reply carries before it leaves."""
    from flwr.common.constant import ErrorCode

    base = _base(msg)
    RECORDED.add(msg.metadata.message_id)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # the reply boundary: every failure is recorded, then re-raised unchanged
        # Flower turns this into an Error reply carrying flower_reason(exc): record exactly that, then let it go.
        _record(context, {**base, **error_entry(flower_reason(exc), ErrorCode.CLIENT_APP_RAISED_EXCEPTION)})
        raise
    try:
        # A virtual site (simulation: node config `partition-id`) sends through no SuperLink object store.
        _record(context, {**base, **describe(reply, object_id="partition-id" not in context.node_config)})
    except Exception:  # the reply boundary: auditing must never change or stop the reply
        log.exception("audit: could not describe the reply (it was sent unchanged)")
    return reply


def record_unseen(request: Message | None, reply: Message, context: Context | None) -> None:
    """The launcher's hook, called as Flower pushes a reply: record it unless the app's mod already did (a bundle
    refused before it was unpacked, an app that could not be loaded). Never raises."""
    try:
        if context is None or reply.metadata.reply_to_message_id in RECORDED:
            return
        RECORDED.add(reply.metadata.reply_to_message_id)
        base = _base(request) if request is not None else {"run": reply.metadata.run_id}
        _record(context, {**base, **describe(reply, object_id=False), "recorded_by": "launcher"})
    except Exception:  # called from Flower's push of the reply: a raise here would lose the reply
        log.exception("audit: could not record a reply the launcher sent (it was sent unchanged)")


def _record(context: Context, entry: dict) -> None:
    try:
        path = audit_path(dict(context.node_config), dict(context.run_config))
        if path is None:
            return
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), **entry}
        write_line(path, entry)
    except Exception:  # also runs while a ClientApp error propagates: it must not replace that error
        log.exception("audit: could not write the audit log")
