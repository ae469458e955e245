"""The training data path (common/training.py's device loader, common/augment.py, the DP loader in
common/dp_training.py): the same seed gives the same trained weights as before the data path moved onto the device,
and the device-side code that runs on a GPU runs here on CPU tensors (device is a parameter, nothing CUDA-only)."""

from __future__ import annotations

import csv
import hashlib
import warnings

import numpy as np
import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, WeightedRandomSampler

from common.augment import augment_batch
from common.config import PrivacyConfig
from common.dp_training import start_dp_round
from common.errors import SpineFedError
from common.model import ModelConfig, build_model
from common.sitedata import SiteData
from common.training import DeviceBatches, StackDataset, TrainConfig, fit, load_stacks, predict

torch.set_num_threads(1)
SIZE = 32
N = 14


def _write_cache(root, n: int = N, size: int = SIZE) -> SiteData:
    """A prepared cache (stacks/<key>.npy + index.csv); malignant stacks carry a dark T1 body, benign a dark band."""
    rng = np.random.default_rng(3)
    (root / "stacks").mkdir(parents=True)
    with (root / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "key", "label", "status", "reason", "file"])
        for i in range(n):
            x = rng.normal(0, 0.3, (6, size, size)).astype(np.float32)
            lo, hi = size // 4, 3 * size // 4
            if i % 2:
                x[0:3, lo:hi, lo:hi] -= 1.5
            else:
                x[0:3, lo : lo + 3, lo:hi] -= 1.5
            np.save(root / "stacks" / f"k{i:03d}.npy", x)
            w.writerow([f"P{i}", f"k{i:03d}", "malignant" if i % 2 else "benign", "ok", "", f"stacks/k{i:03d}.npy"])
    return SiteData.open(root, site="t")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> SiteData:
    return _write_cache(tmp_path_factory.mktemp("datapath"))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=1e-3, device="cpu", num_threads=1, augment=True, val_fraction=0.25, seed=5)
    return TrainConfig(**{**base, **kw})


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"arch": "resnet18", "image_size": SIZE, **kw}))


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Digests of (trained weights, predict's scores on the inner-validation split), computed with the DataLoader-based
# data path this replaced (the parent of commit 21b89fb) on CPU, one thread: the device data path draws the same
# batches and the same augmentation from the same generators in the same order, so a seed still trains bit-identical
# weights. Floating-point kernels differ between CPU models: on another machine, regenerate these at that commit.
PINNED = {
    "shuffle": ({}, ("832ace6bfd9f77ea", "c96d58458adc703b")),
    "sampler": ({"imbalance": "sampler"}, ("42b787712b40aa0c", "dc0adb14886c0372")),
    "no augmentation": ({"augment": False, "epochs": 1, "val_fraction": 0.0}, ("b86d18cf267f0921", None)),
    "resized": ({"image_size": 24, "epochs": 1}, ("df5850c1da698af3", "f692fa35729f8951")),
}


@pytest.mark.parametrize("case", list(PINNED))
def test_seed_trains_the_same_weights_as_before(site, case):
    kw, (weights, scores) = PINNED[case]
    net = _model()
    res = fit(net, site, np.arange(N), _cfg(**kw))
    assert _digest(net) == weights
    if scores is not None:  # predict gives the inner-validation scores fit chose the threshold on
        p = predict(net, site, res.val_indices, _cfg(**kw))
        assert hashlib.sha256(p.tobytes()).hexdigest()[:16] == scores
        np.testing.assert_allclose(p, res.val_scores, rtol=1e-6)


def test_seeded_dp_fit_trains_the_same_weights_as_before(site, tmp_path):
    """Opacus' Poisson sampler (seeded for the test) still draws every batch; the stacks are gathered on the device."""
    priv = PrivacyConfig(
        dp=True,
        epsilon_budget=50.0,
        delta=1e-5,
        max_grad_norm=1.0,
        ledger=tmp_path / "privacy" / "ledger.json",
        ledger_record=tmp_path / "keys" / "record.json",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        dp = start_dp_round(
            priv, experiment="e", n_site=N, batch_size=4, epochs=2, planned_rounds_total=2, purpose="r", seed=0
        )
        net = _model(norm="batch", trainable="layer4+head")
        res = fit(net, site, np.arange(N), _cfg(), trainable="layer4+head", make_private=dp.make_private)
        dp.finish()
    assert dp.steps_taken() == dp.steps
    assert res.steps == 11  # non-empty physical batches, of Poisson-random sizes
    assert _digest(net) == "5373e6041636c411"


def _batches(loader) -> list[list[int]]:
    return [yb.long().tolist() for _, yb in loader]


@pytest.mark.parametrize("balanced", [False, True])
def test_device_batches_are_the_dataloaders_batches(balanced):
    """Same batches, epoch after epoch, and the same generator states after (so later draws do not move)."""
    n, bs = 11, 4
    x, y = torch.randn(n, 6, 8, 8), torch.arange(n, dtype=torch.float32)  # label = index: the batch says who
    weights = torch.as_tensor(np.where(np.arange(n) % 3 == 0, 0.5, 0.1))

    def make(generator):
        if balanced:
            return WeightedRandomSampler(weights, n, replacement=True, generator=generator)
        return RandomSampler(range(n), generator=generator)

    def loader(cls, generator):  # as fit builds them
        if balanced:
            return cls(StackDataset(x, y), batch_size=bs, sampler=make(generator), drop_last=True)
        return cls(StackDataset(x, y), batch_size=bs, shuffle=True, generator=generator, drop_last=True)

    torch.manual_seed(7)
    g_old = torch.Generator().manual_seed(3)
    old = loader(DataLoader, g_old)
    expected = [_batches(old) for _ in range(3)]
    global_old = torch.get_rng_state()

    torch.manual_seed(7)
    g_new = torch.Generator().manual_seed(3)
    new = loader(DeviceBatches, g_new)
    assert [_batches(new) for _ in range(3)] == expected
    assert torch.equal(g_new.get_state(), g_old.get_state())
    assert torch.equal(torch.get_rng_state(), global_old)


def test_epoch_drawn_augmentation_is_the_per_step_augmentation():
    n = 10
    x, y = torch.randn(n, 6, 16, 16), torch.arange(n, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    loader = DeviceBatches(
        StackDataset(x, y), batch_size=4, shuffle=True, generator=g, augment=torch.Generator().manual_seed(1)
    )
    per_step = torch.Generator().manual_seed(1)
    for _ in range(2):
        for xb, yb in loader:
            assert torch.equal(xb, augment_batch(x[yb.long()], per_step))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__)
        return func(*args, **(kwargs or {}))


# A tensor made from host data, a copy between devices (or dtypes), a value read back to the host, a random draw.
HOST_WORK = {"lift_fresh", "_to_copy", "copy_", "_local_scalar_dense", "item", "rand", "randperm", "random_"}


@pytest.mark.parametrize("poisson", [False, True])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_a_training_step_does_no_host_work(device, poisson):
    """The code a GPU runs, run here on CPU tensors: after an epoch's one-time setup, each batch is gathered and
    augmented by device ops only (what would stall a GPU: host-made tensors, copies, reads, host-side draws), for
    shuffled batches and for Opacus' Poisson sampling (independent draws, batches of random size) alike."""
    n = 12
    x, y = torch.randn(n, 6, 16, 16, device=device), torch.arange(n, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(0)
    if poisson:
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=0.4, generator=g, steps=4)
    else:
        sampler = BatchSampler(RandomSampler(range(n), generator=g), 4, False)
    loader = DeviceBatches(
        StackDataset(x, y), batch_sampler=sampler, generator=g, augment=torch.Generator().manual_seed(1)
    )
    steps = iter(loader)
    next(steps)  # the epoch's setup: its draws, one copy of the indices and one of the parameters
    sizes = []
    for _ in range(3 if poisson else 2):
        with _Ops() as rec:
            xb, yb = next(steps)
        assert xb.device.type == device and xb.shape[1:] == (6, 16, 16) and yb.shape == xb.shape[:1]
        assert rec.ops and not rec.ops & HOST_WORK, rec.ops & HOST_WORK
        sizes.append(len(yb))
    assert len(set(sizes)) > 1 if poisson else sizes == [4, 4]


def test_load_stacks_reads_in_place_resizes_and_names_the_key(site, tmp_path):
    expected = np.stack([np.load(f) for f in site.files])
    assert torch.equal(load_stacks(site, np.arange(N)), torch.from_numpy(expected))
    small = load_stacks(site, [3, 1], image_size=16)
    one = torch.nn.functional.interpolate(
        torch.from_numpy(expected[[3, 1]]), size=(16, 16), mode="bilinear", antialias=True
    )
    assert torch.equal(small, one)
    # A stack stored as float64 (another writer) is read and converted; a truncated one names its key only.
    other = _write_cache(tmp_path / "c", n=4)
    np.save(other.files[2], np.load(other.files[2]).astype(np.float64))
    np.testing.assert_array_equal(load_stacks(other, [0, 2])[1].numpy(), np.load(other.files[2]).astype(np.float32))
    raw = other.files[1].read_bytes()
    other.files[1].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SpineFedError, match="key k001 unreadable") as exc:
        load_stacks(other, [0, 1, 2])
    assert "P1" not in str(exc.value) and str(other.cache) not in str(exc.value)
