"""The site's audit log lists every outbound message, refusals and Error replies included (issue #20 item 5): one
line of kind `error` with the size and SHA-256 of the exact reason Flower sends, and the reason's first words only
when the refusal is written to leave the site."""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from client import audit, launcher
from client.app import app
from client.approval import NotApproved, bundle_hash
from client.tasks import SiteRefusal
from common.model import ModelConfig, build_model, get_exchange_arrays
from tests.fakes import VERSION, build_fab, flip_one_byte, message
from tests.tinysites import TINY_MODEL, make_site


def _lines(site_yaml) -> list[dict]:
    path = site_yaml.parent / "cache-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _context(site_yaml) -> Context:
    return Context(run_id=7, node_id=42, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


@pytest.fixture()
def arrays():
    torch.manual_seed(0)
    return get_exchange_arrays(build_model(ModelConfig.from_dict(TINY_MODEL)), TINY_MODEL["trainable"])


def test_a_refused_training_message_leaves_one_error_line_with_the_size_and_hash_of_what_left(tmp_path, arrays):
    site = make_site(tmp_path, "hospR", n=4, n_malignant=1)
    msg = message("train", {"noop": 1, "transfer-dtype": "int8"}, arrays)
    with pytest.raises(SiteRefusal, match="transfer-dtype") as raised:
        app(msg, _context(site))
    lines = _lines(site)
    assert len(lines) == 1
    line = lines[0]
    sent = (str(type(raised.value)) + ":<'" + str(raised.value) + "'>").encode()  # Flower's Error reason
    assert line["kind"] == "error" and line["request"] == "train" and line["error"] is True
    assert line["size"] == len(sent) and line["sha256"] == hashlib.sha256(sent).hexdigest()
    assert line["exception"] == "SiteRefusal" and "transfer-dtype" in line["reason"]
    assert line["run"] == 7 and line["round"] == "1" and "time" in line
    # the same Error as Flower builds it, described as the launcher would: the same size and hash
    reply = Message(Error(code=line["error_code"], reason=sent.decode()), reply_to=msg)
    described = audit.describe(reply)
    assert (described["size"], described["sha256"], described["kind"]) == (line["size"], line["sha256"], "error")
    # a reply the app's mod recorded is not recorded again when it is pushed
    audit.record_unseen(msg, reply, _context(site))
    assert len(_lines(site)) == 1


def test_an_unexpected_exception_is_recorded_by_class_only():
    entry = audit.error_entry(audit.flower_reason(ValueError("/data/PID0012345/IM1.dcm is broken")), 0)
    assert entry["exception"] == "ValueError" and "reason" not in entry
    assert "PID0012345" not in json.dumps(entry)


def test_a_bundle_the_launcher_refuses_is_in_the_audit_log(tmp_path, monkeypatch):
    fab = build_fab()
    site = make_site(tmp_path, "hospL", n=2, n_malignant=1)
    site.write_text(site.read_text() + f"federation:\n  approved_apps:\n    - {bundle_hash(fab)}\n")
    monkeypatch.setenv(launcher.ENV_CONFIG, str(site))
    run = types.SimpleNamespace(run_id=7, fab_id="spinefed/spinefed", fab_version=VERSION, fab_hash="x",
                                override_config={})  # fmt: skip
    request = message("query")
    audit.RECORDED.add(request.metadata.message_id)  # left by an earlier task: a new pull starts afresh
    pushed = []
    rc = types.SimpleNamespace(  # stand-in for flwr.supernode.runtime.run_clientapp
        pull_task_input=lambda client: (request, _context(site), run, fab),
        install_from_fab=lambda fab_file, *a, **k: None,
        push_message=lambda client, reply, context: pushed.append(reply),
    )
    launcher.install_gate(rc)
    msg, ctx, _, _ = rc.pull_task_input(None)
    with pytest.raises(NotApproved) as raised:
        rc.install_from_fab(flip_one_byte(fab, "client/app.py"), skip_prompt=True)
    # what Flower's run_clientapp then does: an Error reply with the exception's text, pushed to the SuperNode
    reason = str(type(raised.value)) + ":<'" + str(raised.value) + "'>"
    reply = Message(Error(code=0, reason=reason), reply_to=msg)
    rc.push_message(None, reply, ctx)
    assert pushed == [reply]  # sent unchanged
    (line,) = _lines(site)
    assert line["kind"] == "error" and line["request"] == "query" and line["recorded_by"] == "launcher"
    assert line["size"] == len(reason.encode()) and line["sha256"] == hashlib.sha256(reason.encode()).hexdigest()
    assert line["exception"] == "NotApproved" and line["reason"]
