"""Test fakes shared by several test modules: in-process grids, Flower messages and contexts, app bundles, small
training caches and configs. Test modules import them from here, never from each other."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from client.app import app as client_app
from common.replies import EVALUATE_FIRST, EVALUATE_KEYS, EVALUATION, TRAIN_KEYS
from common.sitedata import SiteData
from common.training import TrainConfig
from common.transfer import pack_arrays, unpack_arrays
from server.experiment import ExperimentConfig
from tests.tinysites import TINY_MODEL, TINY_TRAIN

REPO = Path(__file__).resolve().parent.parent


# ----- the protocol runner over the real ClientApp (tests/test_protocols.py and others) -------------------------------
class ClientGrid:
    """Nodes 1..n run the real ClientApp in-process, one Context (state) per node; every message is logged."""

    def __init__(self, site_yamls: list, fail_after: int | None = None, drop=None):
        self.contexts = {
            i + 1: Context(
                run_id=7, node_id=i + 1, node_config={"site-config": str(p)}, state=RecordDict(), run_config={}
            )
            for i, p in enumerate(site_yamls)
        }
        self.log: list[tuple[int, str, dict]] = []
        self.replies: list[Message] = []
        self.fail_after = fail_after
        self.drop = drop  # drop(node, config) → True: that node's reply never arrives (a site lost mid-protocol)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            cfg = dict(msg.content.config_records.get("config", {}))
            self.log.append((node, msg.metadata.message_type, cfg))
            if self.fail_after is not None and len(self.log) > self.fail_after:
                raise KeyboardInterrupt("simulated coordinator crash")
            meta = Metadata(
                run_id=7,
                message_id=f"m{len(self.log)}",
                src_node_id=0,
                dst_node_id=node,
                reply_to_message_id="",
                group_id="1",
                created_at=time.time(),
                ttl=3600.0,
                message_type=msg.metadata.message_type,
            )
            inbound = Message(content=msg.content, metadata=meta)
            reply = client_app(inbound, self.contexts[node])
            self.replies.append(reply)
            if self.drop is None or not self.drop(node, cfg):
                replies.append(reply)
        return replies


def protocol_experiment(protocol: str, **kw) -> ExperimentConfig:
    data = {"protocol": protocol, "rounds": 1, "model": TINY_MODEL, "train": TINY_TRAIN, "min_cell": 2}
    data["folds"] = {"k": 3, "seed": 0}
    data["quorum"] = {"min_sites": 1, "join_timeout_s": 1, "round_timeout_s": 60}
    data.update(kw)
    return ExperimentConfig.from_dict(data)


# ----- one Flower message and a site's Context, for calling the ClientApp directly ------------------------------------
def message(kind: str, config: dict | None = None, arrays: dict | None = None) -> Message:
    content = RecordDict()
    if config is not None:
        base = {"model": json.dumps(TINY_MODEL), "train": json.dumps(TINY_TRAIN), "epochs": 1, "lr": 1e-3}
        content["config"] = ConfigRecord({**base, "server-round": 1, **config})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    meta = Metadata(
        run_id=7,
        message_id=f"msg-{kind}",
        src_node_id=1,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def context(site_yaml) -> Context:
    return Context(run_id=7, node_id=42, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


# ----- app bundles as `flwr build` makes them -------------------------------------------------------------------------
VERSION = "0.1.0"


def build_fab(version: str = VERSION, app_code: bytes = b"print('the ClientApp')\n") -> bytes:
    """A small FAB built exactly as `flwr build`/`flwr run` build one (Flower's builder, our pyproject's app table)."""
    from flwr.cli.build import build_fab_from_files

    pyproject = (REPO / "pyproject.toml").read_text().replace('version = "0.1.0"', f'version = "{version}"')
    files = {"pyproject.toml": pyproject.encode(), "client/app.py": app_code, "common/model.py": b"X = 1\n",
             "server/app.py": b"Y = 2\n"}  # fmt: skip
    return build_fab_from_files(files)[0]


def flip_one_byte(fab: bytes, member: str) -> bytes:
    """The bundle with one byte of `member` changed (and its CONTENT line fixed up, as an attacker would)."""
    import hashlib
    import io
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(fab))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        changed = bytearray(src.read(member))
        changed[0] ^= 0x01
        for info in src.infolist():
            data = bytes(changed) if info.filename == member else src.read(info.filename)
            if info.filename == ".info/CONTENT":
                lines = data.decode().splitlines()
                sha = hashlib.sha256(changed).hexdigest()
                lines = [f"{member},{sha},{len(changed) * 8}" if ln.startswith(member + ",") else ln for ln in lines]
                data = "\n".join(lines).encode()
            dst.writestr(info, data)
    return out.getvalue()


# ----- a prepared cache a small network learns from, and a small training config --------------------------------------
SIZE = 32  # side of the stacks write_cache writes


def write_cache(root, n: int = 20, size: int = SIZE, seed: int = 0) -> SiteData:
    """A prepared cache as `client prepare` writes it, with a sign a small network learns in a few steps: malignant
    stacks have a dark T1 body ("diffuse low T1") and a bright T2 focus; benign ones a thin dark T1 band."""
    rng = np.random.default_rng(seed)
    (root / "stacks").mkdir(parents=True)
    rows = []
    for i in range(n):
        label = "malignant" if i % 2 else "benign"
        x = rng.normal(0, 0.3, (6, size, size)).astype(np.float32)
        lo, hi = size // 4, 3 * size // 4
        if label == "malignant":
            x[0:3, lo:hi, lo:hi] -= 1.5
            x[3:6, lo + 4 : hi - 4, lo + 4 : hi - 4] += 1.5
        else:
            x[0:3, lo : lo + 3, lo:hi] -= 1.5
        key = f"k{i:03d}"
        np.save(root / "stacks" / f"{key}.npy", x)
        rows.append(
            {
                "patient_id": f"P{i}",
                "key": key,
                "label": label,
                "status": "ok",
                "reason": "",
                "file": f"stacks/{key}.npy",
            }
        )
    rows.append(
        {"patient_id": "PX", "key": "kskip", "label": "benign", "status": "skipped", "reason": "edge", "file": ""}
    )
    with (root / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return SiteData.open(root, site="test")


def small(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=4, lr=1e-3, device="cpu", num_threads=1, augment=False, val_fraction=0.25)
    return TrainConfig(**{**base, **kw})


# ----- a grid of scripted sites for the strategy (tests/test_server_strategy.py and others) ---------------------------
NBINS = 100


def train_metrics(n=10, **extra) -> dict:
    m = {k: 0.0 for k in TRAIN_KEYS} | {"num-examples": n, "dp": 0, "epsilon": -1.0, "train-loss": 0.5}
    return m | extra


def eval_metrics(n=10) -> dict:
    m = {k: 0 for k in EVALUATE_KEYS} | {"num-examples": n, "n-pos": 3, "n-neg": n - 3, "auc": 0.7, "auc-var": 0.01}
    return m | {"hist-pos": [0.0] * (NBINS - 1) + [3.0], "hist-neg": [float(n - 3)] + [0.0] * (NBINS - 1)}


class FakeGrid:
    """Nodes answer through `responders[node](message) -> Message | None`; None = a dead site (no reply)."""

    def __init__(self, responders: dict, connected: list[int] | None = None):
        self.responders = responders
        self.connected = list(responders) if connected is None else connected
        self.log: list[tuple[int, str, dict]] = []

    def get_node_ids(self):
        return list(self.connected)

    def send_and_receive(self, messages, *, timeout=None):
        replies, waited = [], False
        for msg in messages:
            node = msg.metadata.dst_node_id
            cfg = dict(msg.content.config_records.get("config", ConfigRecord()))
            self.log.append((node, msg.metadata.message_type, cfg))
            reply = self.responders[node](msg)
            if reply is None and not waited:
                time.sleep(min(timeout or 0, 1.0))  # what the real grid does: wait until the deadline
                waited = True
            elif reply is not None:
                replies.append(reply)
        return replies


def reply(msg, arrays=None, metrics=None, error=None, packed=True, truncated=False, evaluation=None):
    """A site's reply; its tensors packed into one buffer as a site sends them (or per tensor, as older sites did);
    `evaluation`: the evaluate-first metrics a training reply carries when its instruction asked for them."""
    if error:
        return Message(Error(code=0, reason=error), reply_to=msg)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    if arrays is not None:
        if packed:
            arrays = pack_arrays(arrays)
            if truncated:  # the layout now describes more bytes than were sent
                arrays["packed"] = arrays["packed"][:-4]
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


def responder(shift=0.0, n=10, nan=False, extra_key=False, missing_key=False, error=None, dead=False, bad_shape=False,
              packed=True, truncated=False):  # fmt: skip
    def answer(msg):
        kind = msg.metadata.message_type
        if dead:
            return None
        if error:
            return reply(msg, error=error)
        if kind == "query":
            return reply(msg, metrics={"num-examples": n})
        if kind == "evaluate":
            return reply(msg, metrics=eval_metrics(n))
        arrays = named(msg)
        for k, v in arrays.items():
            if v.dtype.kind == "f":
                arrays[k] = v + shift if "running_var" not in k else v * (1 + shift)
            else:
                arrays[k] = v + 1
        if nan:
            arrays["fc.weight"][0] = np.nan
        if "bn.num_batches_tracked" in arrays:  # as np.ascontiguousarray at a site would send it
            arrays["bn.num_batches_tracked"] = arrays["bn.num_batches_tracked"].reshape(1)
        if bad_shape:
            arrays["fc.weight"] = arrays["fc.weight"][:, :-1]
        metrics = train_metrics(n)
        if extra_key:
            metrics["my-extra"] = 1.0
        if missing_key:
            metrics.pop("train-loss")
        first = EVALUATE_FIRST in msg.content.config_records["config"]
        return reply(
            msg, arrays, metrics, packed=packed, truncated=truncated, evaluation=eval_metrics(n) if first else None
        )

    return answer


def named(msg) -> dict[str, np.ndarray]:
    """The tensors of a message as the server sent them: packed on the wire, by name here."""
    return unpack_arrays({k: v.numpy() for k, v in msg.content.array_records["arrays"].items()})


def bn_arrays():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "bn.weight": np.ones(4, np.float32),
        "bn.bias": np.zeros(4, np.float32),
        "bn.running_mean": rng.normal(size=4).astype(np.float32),
        "bn.running_var": np.full(4, 0.02, np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "fc.weight": rng.normal(size=(1, 4)).astype(np.float32),
    }


NORM = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def training_experiment(**kw) -> ExperimentConfig:
    data = {"rounds": 2, "quorum": {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 2}, "evaluate": "none"}
    for key, value in kw.items():
        data[key] = value
    return ExperimentConfig.from_dict(data)


def start(strategy, grid, arrays, rounds=2):
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        num_rounds=rounds,
        timeout=strategy.quorum.round_timeout_s,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=strategy.end_round,
    )
