"""The site's audit log: one JSON line for every message the site sends to the coordinator (a Flower client mod).

Each line: time (UTC), run id, round (group id), kind (query/train/evaluate reply, or error), size in bytes of what
the records carry, SHA-256 over that content, Flower's object id of the reply (what the SuperLink stores; not in
simulation, where no SuperLink stores it), the names of the records, the metric names (never their values), tensor
count, and for an Error reply the length and hash of its reason. It lets a site's privacy officer see what left,
when and how much, without the log itself becoming a copy of the data. File: site.yaml `audit_log`, default `<cache>-audit.jsonl` beside the cache folder.

Attached in client/app.py as `ClientApp(mods=[audit_mod])`. Writing the log must never break or alter a reply: any
failure here is logged at the site and the reply goes out unchanged. Note: the ClientApp code, this module included,
comes from the coordinator's app bundle; the log is only as trustworthy as the bundle the site approved (issue 8).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from pathlib import Path

from flwr.app import Context, Message

log = logging.getLogger("spinefed.site.audit")  # stays at the site


def audit_path(node_config: dict, run_config: dict) -> Path | None:
    """Where this node's audit log goes (None when the node has no site configuration)."""
    from client.tasks import site_config_path
    from common.config import load_site_config

    try:
        cfg = load_site_config(site_config_path(node_config, run_config))
    except Exception:  # no site: the ClientApp refuses the message itself; nothing of the site's data goes out
        return None
    return cfg.audit_log or cfg.cache.parent / f"{cfg.cache.name}-audit.jsonl"


def describe(reply: Message, object_id: bool = True) -> dict:
    """What the audit line says about one outgoing reply (sizes, hashes, names; no values).

    `object_id` False: without Flower's object id. Computing it caches a second view of every tensor in the reply,
    which Flower's simulation engine (Ray) then pickles as a copy: the reply would travel at twice its size.
    """
    digest, size, arrays = hashlib.sha256(), 0, 0
    entry: dict = {"kind": reply.metadata.message_type, "error": reply.has_error()}
    if reply.has_error():
        reason = (reply.error.reason or "").encode()
        entry.update(size=len(reason), sha256=hashlib.sha256(reason).hexdigest(), error_code=int(reply.error.code))
        return entry
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


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: run the app, then record what the reply carries before it leaves."""
    base = {"run": msg.metadata.run_id, "round": msg.metadata.group_id, "request": msg.metadata.message_type}
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        # Flower turns this into an Error reply carrying str(exc): record that it leaves, then let it go.
        reason = str(exc).encode()
        _record(context, {**base, "kind": "error", "error": True, "size": len(reason),
                          "sha256": hashlib.sha256(reason).hexdigest()})  # fmt: skip
        raise
    try:
        # A virtual site (simulation: node config `partition-id`) sends through no SuperLink object store.
        _record(context, {**base, **describe(reply, object_id="partition-id" not in context.node_config)})
    except Exception:
        log.exception("audit: could not describe the reply (it was sent unchanged)")
    return reply


def _record(context: Context, entry: dict) -> None:
    try:
        path = audit_path(dict(context.node_config), dict(context.run_config))
        if path is None:
            return
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), **entry}
        write_line(path, entry)
    except Exception:
        log.exception("audit: could not write the audit log")
