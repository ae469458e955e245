"""ClientApp handlers called directly with built Messages (explicit Metadata and Context), as Flower would call them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app
from client.evalstore import EvalStore, default_folder
from client.tasks import SiteRefusal
from common import acquisition
from common.metrics import histogram_cells
from common.model import ModelConfig, build_model, get_exchange_arrays
from common.replies import (
    EVALUATE_FIRST,
    EVALUATE_KEYS,
    EVALUATION,
    MEMBERSHIP,
    MEMBERSHIP_KEYS,
    PREDICTIONS,
    QUERY_KEYS,
    TRAIN_KEYS,
)
from common.transfer import unpack_arrays
from tests.fakes import context, message
from tests.tinysites import TINY_MODEL, TINY_TRAIN, make_site


@pytest.fixture(scope="session")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_sites")
    return {
        "a": make_site(root, "hospA", seed=1),
        "shared": make_site(root, "hospS", seed=2, share_predictions=True),
    }


@pytest.fixture(scope="session")
def global_arrays():
    torch.manual_seed(0)
    return get_exchange_arrays(build_model(ModelConfig.from_dict(TINY_MODEL)), TINY_MODEL["trainable"])


def no_identifiers(reply: Message) -> None:
    text = repr(reply.content) + json.dumps({k: dict(v) for k, v in reply.content.config_records.items()})
    for record in reply.content.metric_records.values():  # the census's acquisition keys hold "/" by design
        for key in record:
            if key.startswith(acquisition.CENSUS_PREFIX):
                assert acquisition.is_level(key.split("/", 2)[2]), key
                text = text.replace(key, "")
    assert "PATIENT-" not in text and "/" not in text.replace("hist-", "")


def test_query_is_a_census_of_counts(sites):
    reply = app(message("query"), context(sites["a"]))
    m = reply.content.metric_records["metrics"]
    assert {k for k in m if not k.startswith(acquisition.CENSUS_PREFIX)} == QUERY_KEYS
    # a cache prepared before #24 (no acquisition columns): every patient's levels are unknown, floor applied
    assert m["acq/manufacturer/unknown"] == m["acq/lossy-compression/unknown"] == 12 and m["acq-min-cell"] >= 1
    assert (m["num-examples"], m["n-malignant"], m["n-benign"], m["n-unlabelled"]) == (12, 4, 8, 0)
    assert reply.content.config_records["site"]["site"] == "hospA"
    no_identifiers(reply)


def test_train_replies_the_fixed_schema(sites, global_arrays):
    ctx = context(sites["a"])
    reply = app(message("train", {"fedbn": 1}, global_arrays), ctx)
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    arrays = unpack_arrays({k: a.numpy() for k, a in reply.content.array_records["arrays"].items()})
    assert set(reply.content.array_records["arrays"].keys()) == {"packed", "packed-layout"}  # one buffer on the wire
    assert sorted(arrays) == sorted(global_arrays)
    assert all(np.isfinite(a).all() for a in arrays.values())
    m = reply.content.metric_records["metrics"]
    assert set(m.keys()) == TRAIN_KEYS
    assert m["dp"] == 0 and m["epsilon"] == -1.0 and m["num-examples"] > 0
    assert not np.allclose(arrays["fc.weight"], global_arrays["fc.weight"])
    assert "fedbn-norm" in ctx.state.array_records  # FedBN: the site's own BN tensors stay with the run state


def test_evaluate_stores_scores_and_replies_aggregates(sites, global_arrays):
    cfg = {"subset": "all", "tag": "t-eval", "report": 1, "min-cell": 3}
    reply = app(message("evaluate", cfg, global_arrays), context(sites["a"]))
    m = reply.content.metric_records["metrics"]
    assert set(m.keys()) == EVALUATE_KEYS
    assert m["num-examples"] == 12 and m["stored"] == 12 and m["reported"] == 1
    assert (m["n-pos"], m["n-neg"]) == (4, 8)
    assert sum(m["hist-pos"]) == pytest.approx(4) and sum(m["hist-neg"]) == pytest.approx(8)
    assert 0.0 <= m["auc"] <= 1.0 and m["shared"] == 0
    assert PREDICTIONS not in reply.content.config_records
    keys, labels, scores, _ = EvalStore(default_folder(sites["a"].parent / "cache")).arrays("t-eval")
    assert len(keys) == 12 and ((scores >= 0) & (scores <= 1)).all()
    no_identifiers(reply)


def test_evaluate_without_report_sends_placeholders_only(sites, global_arrays):
    cfg = {"subset": "all", "tag": "t-noreport", "report": 0}
    m = app(message("evaluate", cfg, global_arrays), context(sites["a"])).content.metric_records["metrics"]
    assert set(m.keys()) == EVALUATE_KEYS and m["reported"] == 0 and m["auc"] == -1.0 and sum(m["hist-pos"]) == 0


def test_sharing_site_adds_pseudonymous_scores(sites, global_arrays):
    cfg = {"subset": "all", "tag": "t-share", "report": 1}
    reply = app(message("evaluate", cfg, global_arrays), context(sites["shared"]))
    assert reply.content.metric_records["metrics"]["shared"] == 1
    pred = reply.content.config_records[PREDICTIONS]
    assert len(pred["keys"]) == 12 and all(k.startswith("hospS-k") for k in pred["keys"])
    assert "PATIENT-" not in json.dumps(dict(pred))


def test_refusals_name_no_path_or_patient(tmp_path, sites, global_arrays):
    missing = make_site(tmp_path, "hospX")
    (missing.parent / "cache" / "index.csv").unlink()
    with pytest.raises(SiteRefusal) as err:
        app(message("query"), context(missing))
    assert str(tmp_path) not in str(err.value) and "PATIENT" not in str(err.value)

    dp = make_site(tmp_path, "hospDP")
    dp.write_text(dp.read_text() + f"privacy:\n  dp: true\n  ledger: {tmp_path / 'hospDP-ledger.json'}\n")
    with pytest.raises(SiteRefusal, match="differential privacy"):
        app(message("train", {}, global_arrays), context(dp))

    bad = {k: v for k, v in list(global_arrays.items())[1:]}  # a tensor missing: generic, path-free refusal
    with pytest.raises(SiteRefusal) as err:
        app(message("train", {}, bad), context(sites["a"]))
    assert "site's log" in str(err.value) and str(sites["a"].parent) not in str(err.value)


def test_simulation_node_finds_its_site_by_partition(tmp_path, sites):
    listing = tmp_path / "sites.json"
    listing.write_text(json.dumps([str(sites["shared"]), str(sites["a"])]))
    ctx = Context(7, 42, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {"sim-sites": str(listing)})
    assert app(message("query"), ctx).content.config_records["site"]["site"] == "hospA"


def test_batch_counters_arriving_as_shape_1_are_accepted(sites, global_arrays):
    # A site that builds its record with np.ascontiguousarray sends 0-d counters as shape (1,).
    wire = {k: (v.reshape(1) if v.ndim == 0 else v) for k, v in global_arrays.items()}
    assert any(v.ndim == 0 for v in global_arrays.values())
    reply = app(message("train", {}, wire), context(sites["a"]))
    assert set(reply.content.metric_records["metrics"].keys()) == TRAIN_KEYS


def test_fp16_transfer_site_loads_fp32_and_replies_fp16(sites, global_arrays):
    from client import tasks
    from common.transfer import payload_bytes

    wire = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in global_arrays.items()}
    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    tasks.load_global(model, wire, TINY_MODEL["trainable"], None)
    state = model.state_dict()
    for key, value in wire.items():  # float32 in the model, holding exactly the float16 values received
        assert state[key].dtype == (torch.float32 if value.dtype == np.float16 else torch.int64)
        np.testing.assert_array_equal(state[key].numpy(), value.astype(state[key].numpy().dtype))
    # The load-and-return path (no training): the reply is float16 for float tensors, integer counters untouched.
    reply = app(message("train", {"noop": 1, "transfer-dtype": "float16"}, wire), context(sites["a"]))
    arrays = unpack_arrays({k: a.numpy() for k, a in reply.content.array_records["arrays"].items()})
    assert {v.dtype for v in arrays.values()} == {np.dtype(np.float16), np.dtype(np.int64)}
    assert payload_bytes(arrays) == payload_bytes(global_arrays, "float16") < payload_bytes(global_arrays)
    assert set(reply.content.metric_records["metrics"].keys()) == TRAIN_KEYS


def test_fp16_transfer_overflow_is_refused_at_the_site(sites, global_arrays):
    big = dict(global_arrays) | {"fc.weight": np.full_like(global_arrays["fc.weight"], 1e6)}  # float32 arriving
    with pytest.raises(SiteRefusal, match="fc.weight.*float16"):
        app(message("train", {"noop": 1, "transfer-dtype": "float16"}, big), context(sites["a"]))
    with pytest.raises(SiteRefusal, match="transfer-dtype"):
        app(message("train", {"noop": 1, "transfer-dtype": "int8"}, global_arrays), context(sites["a"]))


def _audit_lines(site_yaml) -> list[dict]:
    path = site_yaml.parent / "cache-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_virtual_sites_reply_travels_at_its_own_size_and_a_real_sites_audit_names_the_object_id(sites, global_arrays):
    import cloudpickle  # what Flower's simulation engine (Ray) pickles replies with

    payload = sum(np.asarray(a).nbytes for a in global_arrays.values())
    for node_config, with_id in (({"partition-id": 0}, False), ({}, True)):
        ctx = Context(run_id=7, node_id=42, node_config={"site-config": str(sites["a"]), **node_config},
                      state=RecordDict(), run_config={})  # fmt: skip
        before = len(_audit_lines(sites["a"]))
        reply = app(message("train", {}, global_arrays), ctx)
        line = _audit_lines(sites["a"])[before]
        assert line["kind"] == "train" and line["size"] >= payload
        assert ("object_id" in line) is with_id
        if not with_id:  # computing Flower's object id caches a second view of the tensors, pickled as a copy
            assert len(cloudpickle.dumps(reply)) < payload * 1.1 + 100_000


def test_a_training_message_can_ask_for_the_received_model_to_be_scored_first(sites, global_arrays):
    first = {"subset": "all", "tag": "t-first", "report": 1, "min-cell": 3}
    evaluated = app(message("evaluate", {**first, "tag": "t-separate"}, global_arrays), context(sites["shared"]))
    base = {"model": json.dumps(TINY_MODEL), "train": json.dumps(TINY_TRAIN), "server-round": 0}
    reply = app(
        message("train", {EVALUATE_FIRST: json.dumps({**base, **first})}, global_arrays), context(sites["shared"])
    )
    ev, separate = reply.content.metric_records[EVALUATION], evaluated.content.metric_records["metrics"]
    assert set(ev.keys()) == EVALUATE_KEYS and set(reply.content.metric_records["metrics"].keys()) == TRAIN_KEYS
    # the tensors as received, before training on them: the same scores as an evaluate message with them
    same = {k for k in EVALUATE_KEYS if k != "seconds"}
    assert {k: ev[k] for k in same} == {k: separate[k] for k in same}
    assert reply.content.config_records[PREDICTIONS]["keys"] == evaluated.content.config_records[PREDICTIONS]["keys"]
    store = EvalStore(default_folder(sites["shared"].parent / "cache"))
    assert np.array_equal(store.arrays("t-first")[2], store.arrays("t-separate")[2])
    assert set(unpack_arrays({k: a.numpy() for k, a in reply.content.array_records["arrays"].items()})) == set(
        global_arrays
    )
    no_identifiers(Message(RecordDict({k: reply.content[k] for k in (EVALUATION, PREDICTIONS)}), reply_to=reply))


def test_with_fedbn_the_received_model_is_scored_with_the_sites_own_norm_tensors_from_before_this_training(
    sites, global_arrays
):
    ctx = context(sites["a"])
    app(message("train", {"fedbn": 1}, global_arrays), ctx)  # round 1: the site keeps its own BN tensors
    own = {k: v.numpy().copy() for k, v in ctx.state.array_records["fedbn-norm"].items()}
    first = {"subset": "all", "tag": "t-bn", "report": 1, "min-cell": 1, "fedbn": 1}
    separate = app(message("evaluate", {**first, "tag": "t-bn-separate"}, global_arrays), ctx)
    base = {"model": json.dumps(TINY_MODEL), "train": json.dumps(TINY_TRAIN), "server-round": 1}
    cfg = {"fedbn": 1, "server-round": 2, EVALUATE_FIRST: json.dumps({**base, **first})}
    fused = app(message("train", cfg, global_arrays), ctx)
    store = EvalStore(default_folder(sites["a"].parent / "cache"))
    assert np.array_equal(store.arrays("t-bn")[2], store.arrays("t-bn-separate")[2])  # round 1's own BN, as before
    assert fused.content.metric_records[EVALUATION]["auc"] == separate.content.metric_records["metrics"]["auc"]
    after = ctx.state.array_records["fedbn-norm"]
    assert any(not np.array_equal(after[k].numpy(), own[k]) for k in own)  # and the training then updated them


def test_the_sites_min_cell_is_a_floor_an_experiment_can_raise_but_not_lower(tmp_path, global_arrays, caplog):
    strict = make_site(tmp_path, "hospF", n=20, n_malignant=8, seed=4, privacy={"min_cell": 6})

    def hists(min_cell: int, tag: str) -> tuple[list, list]:
        cfg = {"subset": "all", "tag": tag, "report": 1, "min-cell": min_cell, "validation": 1}
        m = app(message("evaluate", cfg, global_arrays), context(strict)).content.metric_records["metrics"]
        return [list(m[k]) for k in ("hist-pos", "hist-neg", "val-hist-pos", "val-hist-neg")]

    with caplog.at_level("WARNING", logger="spinefed.site"):
        lowered = hists(1, "t-low")
    assert "floor 6 applies" in caplog.text  # answered at the site's value, and logged at the site
    assert lowered == hists(6, "t-six")

    def smallest_cell(hs) -> float:
        """Every released cell describes at least this many patients (a class smaller than the floor is sent as one
        cell over the whole score range: its count, which the reply's counts carry anyway, and no score)."""
        cells = [c for h in hs for c in histogram_cells(h) if (c[0], c[1]) != (0, len(h))]
        return min((count for _, _, count in cells), default=float("inf"))

    assert smallest_cell(lowered) >= 6 - 1e-9 and sum(lowered[0]) + sum(lowered[1]) == pytest.approx(20)
    assert smallest_cell(hists(12, "t-high")) >= 12 - 1e-9  # a stricter request is honoured
    report = app(
        message("query", {"action": "report", "requests": json.dumps({"tags": {"t-low": {}}, "min-cell": 1})}),
        context(strict),
    ).content.config_records["report"]["report"]
    assert smallest_cell([json.loads(report)["tags"]["t-low"]["hist-pos"]]) >= 6 - 1e-9


def test_no_reply_carries_a_raw_patient_score_unless_the_site_shares_predictions(tmp_path, global_arrays):
    """A threshold chosen at one site is one validation patient's score: train and evaluate replies carry none."""
    site = make_site(tmp_path, "hospR", n=40, n_malignant=14, seed=6)
    counts = app(message("query", {"action": "membership", "k": 0, "val-fraction": 0.25}), context(site))
    assert min(counts.content.metric_records[MEMBERSHIP]["all-pos"][1], counts.content.metric_records[MEMBERSHIP]["all-neg"][1]) > 0  # fmt: skip
    ctx = context(site)
    reply = app(message("train", {"fedbn": 0}, global_arrays), ctx)
    trained = unpack_arrays({k: a.numpy() for k, a in reply.content.array_records["arrays"].items()})
    cfg = {"subset": "all", "tag": "t-raw", "report": 1, "min-cell": 5, "validation": 1}
    ev = app(message("evaluate", cfg, trained), ctx).content.metric_records["metrics"]
    _, _, scores, _ = EvalStore(default_folder(site.parent / "cache")).arrays("t-raw")  # every patient's score
    values = []
    for m in (reply.content.metric_records["metrics"], ev):
        for v in m.values():
            values += [float(x) for x in (v if isinstance(v, list) else [v])]
    assert not any(np.isclose(v, s, rtol=0, atol=1e-12) for v in values for s in scores if 0 < s < 1)
    assert "threshold" not in TRAIN_KEYS and "val-threshold" not in EVALUATE_KEYS


def test_membership_query_answers_class_counts_only(sites):
    raw = {"action": "membership", "k": 3, "fold-seed": 0, "val-fraction": 0.25, "seed": 0}
    reply = app(message("query", raw), context(sites["a"]))
    m = reply.content.metric_records[MEMBERSHIP]
    assert set(m.keys()) == MEMBERSHIP_KEYS and len(m["fold-pos"]) == 3
    assert sum(m["fold-pos"]) == 4 and sum(m["fold-neg"]) == 8 and m["all-pos"][2] == 4
    no_identifiers(reply)
