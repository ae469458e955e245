"""Local training as plain functions over a site's cached stacks: `fit`, `predict`, `choose_threshold`.

The same functions serve local-only training, the centralized baseline, pretraining and the Flower ClientApp, which
only adds the exchange of tensors around them. Nothing here sees test data: `fit` takes the training indices, holds
out an inner validation split of them, and makes every choice (decision threshold, best epoch) there.

Speed: a site's stacks (≤ a few hundred patients, ~1.2 MB each at 224 px) are read once per fit into one tensor (a
few threads, straight from the files), moved once to the GPU when training there, and gathered and augmented there
batch-wise (DeviceBatches): the host draws an epoch's batches and augmentation at once, so no training step copies
from the host or waits for the GPU; no per-sample worker processes.

Hooks for differential privacy (Opacus) without rewriting fit: `optimizer_factory(params, cfg)` builds the optimizer,
`make_private(model, optimizer, loader) -> (model, optimizer, loader)` may wrap all three (e.g.
`PrivacyEngine.make_private`). The frozen part stays in eval mode whatever wraps the model (see SpineNet.train).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from common.augment import AugmentConfig, apply_params, augment_batch, draw_params
from common.errors import SpineFedError
from common.model import apply_trainable, exchange_keys, set_exchange_arrays, unwrap
from common.sitedata import SiteData
from common.splits import inner_split_indices

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
IMBALANCE = ("weighted", "sampler", "none")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings; travel with experiments as plain values (to_dict/from_dict).

    imbalance: "weighted" (BCE pos_weight = benign/malignant in the training split; default, see the measured
    comparison in bench/train_throughput.py --imbalance, and the only one that survives Opacus' Poisson sampling),
    "sampler" (class-balanced WeightedRandomSampler), "none". image_size None: the stacks' own size.
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    augment: bool = True
    imbalance: str = "weighted"
    fedprox_mu: float = 0.0
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    image_size: int | None = None
    num_threads: int | None = None
    amp: bool = True  # bf16 autocast, on CUDA only
    compile: bool = False  # torch.compile the forward (CUDA; not with make_private)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.imbalance not in IMBALANCE:
            raise ValueError(f"train.imbalance: expected one of {', '.join(IMBALANCE)}, got {self.imbalance!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("train.epochs and train.batch_size: expected integers >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train.val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")
        if self.fedprox_mu < 0 or self.lr <= 0:
            raise ValueError("train.fedprox_mu: expected >= 0; train.lr: expected > 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What one local fit produced. Scores and labels are for the inner validation split only (never test data).

    best_epoch is 1-based; the model holds that epoch's weights. train_loss is the data loss (without the FedProx
    term) averaged over the last epoch's batches.
    """

    n_examples: int
    steps: int
    train_loss: float
    val_indices: np.ndarray
    val_labels: np.ndarray
    val_scores: np.ndarray
    threshold: float
    best_epoch: int


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA, else Apple MPS, else CPU; an explicit name that is not available is a SpineFedError."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpineFedError(f"train.device {name!r}: no CUDA device available here (use 'auto' or 'cpu')")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SpineFedError(f"train.device {name!r}: MPS not available here (use 'auto' or 'cpu')")
    return device


class StackDataset(Dataset):
    """In-memory stacks (N, 6, S, S) and float labels; batched fetch through `__getitems__` (one gather per batch)."""

    def __init__(self, x: Tensor, y: Tensor, augment: bool = False, seed: int = 0):
        self.x, self.y, self.augment = x, y, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, idx: list[int]) -> list[tuple[Tensor, Tensor]]:
        sel = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        x = self.x.index_select(0, sel)
        if self.augment:
            x = augment_batch(x, self.generator)
        y = self.y.index_select(0, sel)
        return list(zip(x.unbind(0), y.unbind(0), strict=True))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the device: a copy from pageable memory would sync the stream
    (torch waits for it), from pinned memory it is queued like a kernel (the pinned block is kept until it is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceBatches(DataLoader):
    """A DataLoader over in-memory stacks whose batches are gathered where the stacks live (the GPU when training
    there): the loader `fit` builds, and what a make_private hook receives (a genuine DataLoader, Opacus accepts it).

    Built like any DataLoader over a StackDataset (batch_size/shuffle/sampler/drop_last/generator, or batch_sampler),
    and it draws the same batches from the same generators in the same order, including the one number per epoch a
    DataLoader draws for its workers' seed: a seed trains the same weights as the plain DataLoader it replaced. What
    differs is where the work happens: at the start of each epoch the sampler's index lists are drawn on the host at
    once and moved to the device in one copy, and so are the epoch's augmentation parameters (`augment`: a seeded CPU
    generator, None for none); a training step then does no host-to-device copy and no sync, so the host keeps
    queueing kernels ahead of the GPU. No worker processes, no collate function: stacks are already one tensor.
    """

    def __init__(
        self,
        dataset: StackDataset,
        *args,
        augment: torch.Generator | None = None,
        augment_cfg: AugmentConfig = AugmentConfig(),
        **kwargs,
    ):
        if dataset.augment:
            raise ValueError("DeviceBatches augments whole batches itself: give it a StackDataset without augment")
        super().__init__(dataset, *args, **kwargs)
        self.augment, self.augment_cfg = augment, augment_cfg

    @classmethod
    def of(cls, loader: DataLoader, augment: torch.Generator | None = None) -> DeviceBatches | None:
        """The same batches as `loader` (e.g. the DPDataLoader a make_private hook returned: its Poisson sampler and
        generator), gathered on the device; None when `loader` is not a plain single-process DataLoader over a
        StackDataset."""
        if isinstance(loader, DeviceBatches):
            return loader
        ds = getattr(loader, "dataset", None)
        if not isinstance(loader, DataLoader) or not isinstance(ds, StackDataset) or ds.augment:
            return None
        if loader.num_workers or loader.batch_sampler is None:
            return None
        return cls(ds, batch_sampler=loader.batch_sampler, generator=loader.generator, augment=augment)

    def with_batch_sampler(self, batch_sampler, generator: torch.Generator | None) -> DeviceBatches:
        """The same stacks and augmentation over other index lists (e.g. Opacus' Poisson sampling, split)."""
        return DeviceBatches(
            self.dataset,
            batch_sampler=batch_sampler,
            generator=generator,
            augment=self.augment,
            augment_cfg=self.augment_cfg,
        )

    @property
    def augments(self) -> bool:
        return self.augment is not None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the DataLoader's per-epoch draw
        batches = [list(b) for b in self.batch_sampler]
        sizes = [len(b) for b in batches]
        x, y = self.dataset.x, self.dataset.y
        flat = _to_device(torch.as_tensor([i for b in batches for i in b], dtype=torch.long), x.device)
        params, mirror_any = None, []
        if self.augment is not None:
            c = x.shape[1]
            # Batch by batch, as the training steps always drew them (an empty Poisson batch draws nothing).
            drawn = [draw_params(n, c, self.augment, self.augment_cfg) for n in sizes if n]
            mirror_any = [bool((p[:, -1].numpy() > 0.5).any()) for p in drawn]  # host values: nothing to sync
            params = _to_device(torch.cat(drawn), x.device) if drawn else None
        start, k = 0, 0
        for n in sizes:
            sel = flat[start : start + n]
            xb, yb = x.index_select(0, sel), y.index_select(0, sel)
            if params is not None and n:
                xb = apply_params(xb, params[start : start + n], mirror_any[k])
                k += 1
            start += n
            yield xb, yb


def _read_one(data: SiteData, i: int, image_size: int | None, out: Tensor | None) -> Tensor:
    """Patient i's stack, checked (and resized when image_size is set); read straight into `out` when it fits."""
    try:
        a = data.read_stack(i, None if out is None else out.numpy())
    except (OSError, ValueError) as exc:
        # Name the pseudonymous key only: this message may travel to the coordinator.
        raise SpineFedError(f"stack of key {data.keys[i]} unreadable ({exc.__class__.__name__})") from None
    if a.ndim != 3 or a.shape[0] != 6 or a.shape[1] != a.shape[2]:
        raise SpineFedError(f"stack of key {data.keys[i]}: shape {a.shape}, expected (6, S, S)")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if image_size is not None and t.shape[-1] != image_size:
        t = F.interpolate(t[None], size=(image_size, image_size), mode="bilinear", antialias=True)[0]
    return t


def load_stacks(data: SiteData, indices, image_size: int | None = None, device=None) -> Tensor:
    """Stacks of `indices` as one float32 tensor (N, 6, S, S), resized (bilinear, antialiased) when image_size is set.

    The first stack fixes the shape; the others are read by a few threads (file reads and resizing release the GIL),
    straight into the one tensor when they need no resizing, which is then moved to `device` in one copy.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        size = image_size or 0
        out = torch.empty((0, 6, size, size), dtype=torch.float32)
        return out if device is None else out.to(device)
    first = _read_one(data, int(indices[0]), image_size, None)
    out = torch.empty((len(indices), *first.shape), dtype=torch.float32)
    out[0] = first

    def read(j: int) -> None:
        i = int(indices[j])
        t = _read_one(data, i, image_size, out[j])
        if t.shape != out.shape[1:]:
            raise SpineFedError(f"stack of key {data.keys[i]}: size {tuple(t.shape)} differs; set train.image_size")
        if t.data_ptr() != out[j].data_ptr():  # not read in place (resized, or stored in another dtype)
            out[j] = t

    rest = range(1, len(indices))
    workers = min(8, os.cpu_count() or 1, len(rest))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(read, rest))  # list(): the first error is raised here
    else:
        for j in rest:
            read(j)
    return out if device is None else out.to(device)


def stack_dataset(
    data: SiteData, indices, image_size: int | None = None, augment: bool = False, seed: int = 0, device=None
) -> StackDataset:
    """Dataset of (float tensor (6, S, S), float label) for `indices`; unlabelled patients get label -1."""
    indices = np.asarray(indices, dtype=np.int64)
    x = load_stacks(data, indices, image_size, device)
    y = torch.as_tensor(data.labels[indices].astype(np.float32), device=x.device)
    return StackDataset(x, y, augment=augment, seed=seed)


def choose_threshold(labels, scores) -> float:
    """Youden's J on (labels, scores): malignant when score >= threshold. 0.5 with one class or no informative cut."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.size == 0 or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j))
    if j[best] <= 0 or not np.isfinite(thresholds[best]):
        return 0.5
    return float(min(max(thresholds[best], 0.0), 1.0))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads for the duration of a call (the process default is restored after)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def _autocast(device: torch.device, cfg: TrainConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)


def default_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum 0.9); no weight decay on norm weights and biases (1-D tensors)."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scores(model: nn.Module, x: Tensor, device: torch.device, cfg: TrainConfig) -> np.ndarray:
    """P(malignant) for each row of x, eval mode, no grad; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    out = []
    bs = max(2 * cfg.batch_size, 16)
    with torch.inference_mode(), _autocast(device, cfg):
        for start in range(0, x.shape[0], bs):
            xb = x[start : start + bs].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model(xb).float()))
    if was_training:
        model.train()
    return torch.cat(out).cpu().double().numpy() if out else np.zeros(0)  # one copy to the host, one sync


def predict(model: nn.Module, data: SiteData, indices, cfg: TrainConfig) -> np.ndarray:
    """P(malignant) per index (float64), batched, eval mode, no grad; the model is moved to cfg's device."""
    device = pick_device(cfg.device)
    with _threads(cfg.num_threads):
        model.to(device, memory_format=torch.channels_last)
        # On a GPU the stacks go there in one copy (as in fit), not batch by batch.
        x = load_stacks(data, indices, cfg.image_size, device if device.type == "cuda" else None)
        return _scores(model, x, device, cfg)


def _val_loss(labels: np.ndarray, scores: np.ndarray, pos_weight: float) -> float:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    w = np.where(labels == 1, pos_weight, 1.0)
    return float(np.mean(-w * (labels * np.log(p) + (1 - labels) * np.log(1 - p))))


def fit(
    model: nn.Module,
    data: SiteData,
    indices,
    cfg: TrainConfig,
    *,
    trainable: str = "all",
    global_state: Mapping[str, Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    optimizer_factory: Callable[[list[nn.Parameter], TrainConfig], torch.optim.Optimizer] | None = None,
    make_private: Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple] | None = None,
    pos_weight: float | None = None,
) -> FitResult:
    """Train `model` in place on `indices` minus an inner validation split; choose threshold and epoch there.

    global_state: the round's global tensors by state-dict key, for FedProx (mu > 0); None → the weights at entry.
    Under make_private the proximal pull is applied as a decoupled step after each optimizer step (the global weights
    are public, so it costs no privacy), because Opacus' per-sample gradients do not include a loss term on the
    parameters. progress(step, total_steps) is called after every optimizer step. On return the model holds the
    best epoch's weights (by inner-validation AUC, then loss; the last epoch when there is no validation split) and
    is in eval mode.

    pos_weight: the malignant-class loss weight, given instead of the one `cfg.imbalance` derives from the training
    labels. Under make_private nothing is derived from the labels: pos_weight is the site's declared public constant
    (default 1, none), because a weight computed from private labels scales every malignant patient's loss by
    something that moves when one patient is added, which the DP accounting does not cover; and the released model
    is the last epoch's (no epoch is chosen on validation data).
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = data.labels[indices]
    if indices.size == 0:
        raise SpineFedError("no patients to train on")
    if (labels < 0).any():
        raise SpineFedError(f"{int((labels < 0).sum())} training patient(s) have no benign/malignant label")
    private = make_private is not None
    train_idx, val_idx = inner_split_indices(indices, data.keys, cfg.val_fraction, cfg.seed)
    y_train = data.labels[train_idx]
    val_labels = data.labels[val_idx]
    device = pick_device(cfg.device)
    # The stacks live where the model trains when that is a GPU (a site's set is small); else in CPU memory.
    data_device = device if device.type == "cuda" else None

    with _threads(cfg.num_threads):
        torch.manual_seed(cfg.seed)
        net = unwrap(model)
        model.to(device, memory_format=torch.channels_last)
        apply_trainable(model, trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        n_pos, n_neg = int((y_train == 1).sum()), int((y_train == 0).sum())
        if pos_weight is None:
            weighted = cfg.imbalance == "weighted" and n_pos and n_neg and not private
            pos_weight = n_neg / n_pos if weighted else 1.0
        criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))

        # One read of the inner-train and validation stacks, one copy to where they are used.
        x_all = load_stacks(data, np.concatenate([train_idx, val_idx]), cfg.image_size, data_device)
        n = train_idx.size
        train_x, val_x = x_all[:n], x_all[n:]
        train_y = torch.as_tensor(y_train.astype(np.float32)).to(train_x.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        # A last batch of one sample would break BatchNorm in train mode (and carry a noisy gradient anyway).
        drop_last = n > cfg.batch_size and n % cfg.batch_size == 1
        train_ds = StackDataset(train_x, train_y)
        aug_gen = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment else None
        if cfg.imbalance == "sampler" and n_pos and n_neg and not private:
            weights = np.where(y_train == 1, 1.0 / n_pos, 1.0 / n_neg)
            sampler = WeightedRandomSampler(torch.as_tensor(weights), n, replacement=True, generator=generator)
            loader = DeviceBatches(
                train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, augment=aug_gen
            )
        else:
            loader = DeviceBatches(
                train_ds,
                batch_size=cfg.batch_size,
                shuffle=True,
                generator=generator,
                drop_last=drop_last,
                augment=aug_gen,
            )

        optimizer = (optimizer_factory or default_optimizer)(params, cfg)
        if private:
            model.train()  # Opacus validates that the model is in training mode
            apply_trainable(model, trainable)
            model, optimizer, loader = make_private(model, optimizer, loader)
            # A hook that returned a DataLoader of its own over the stacks (Opacus' make_private: a DPDataLoader)
            # keeps its batches, gathered on the device; any other loader is iterated as it is.
            loader = DeviceBatches.of(loader, aug_gen) or loader
        # DeviceBatches augment (also inside DPRound's loader); a loader that does not is augmented here, per batch.
        augment_here = aug_gen is not None and not getattr(loader, "augments", False)
        forward = torch.compile(model) if cfg.compile and not private else model

        prox: list[tuple[Tensor, Tensor]] = []
        if cfg.fedprox_mu > 0:
            named = dict(net.named_parameters())
            for name in exchange_keys(net, trainable):
                if name in named and named[name].requires_grad:
                    ref = global_state[name] if global_state is not None else named[name]
                    prox.append((named[name], torch.as_tensor(ref).detach().to(device, torch.float32).clone()))

        keep = set(exchange_keys(net, trainable))
        total = cfg.epochs * len(loader)
        step, best_key, best_epoch, best_state, best_scores = 0, None, cfg.epochs, None, np.zeros(0)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            apply_trainable(model, trainable)
            loss_sum, batches = torch.zeros((), device=device), 0
            for xb, yb in loader:
                xb = xb.to(device, non_blocking=True)  # no-op where the stacks already live on the device
                yb = yb.to(device, non_blocking=True).float()
                if augment_here:
                    xb = augment_batch(xb, aug_gen)
                xb = xb.contiguous(memory_format=torch.channels_last)
                with _autocast(device, cfg):
                    logits = forward(xb)
                loss = criterion(logits.float(), yb)
                total_loss = loss
                if prox and not private:
                    total_loss = loss + cfg.fedprox_mu / 2 * sum(((p - g) ** 2).sum() for p, g in prox)
                optimizer.zero_grad(set_to_none=True)
                total_loss.backward()
                optimizer.step()
                if prox and private:
                    with torch.no_grad():
                        for p, g in prox:
                            p.sub_(cfg.lr * cfg.fedprox_mu * (p - g))
                loss_sum += loss.detach()  # no .item() here: a sync per step would stall the GPU
                batches += 1
                step += 1
                if progress is not None:
                    progress(step, total)
            # Read back only where the host waits anyway (validation below, the end): an epoch of a small site is a
            # few steps on a GPU, and a read per epoch would drain its queue that often.
            last_loss = loss_sum, max(batches, 1)

            if val_idx.size:
                scores = _scores(model, val_x, device, cfg)
                auc = roc_auc_score(val_labels, scores) if len(np.unique(val_labels)) == 2 else 0.5
                key = (round(float(auc), 6), -_val_loss(val_labels, scores, pos_weight))
                if log.isEnabledFor(logging.DEBUG):
                    loss = float(last_loss[0]) / last_loss[1]
                    log.debug("epoch %d: train loss %.4f, inner-val AUC %.3f loss %.4f", epoch, loss, auc, -key[1])
                # Under DP the last epoch is released: an epoch chosen on validation scores would be outside DP.
                if best_key is None or key > best_key or private:
                    best_key, best_epoch, best_scores = key, epoch, scores
                    if cfg.epochs > 1 and epoch < cfg.epochs:
                        best_state = {k: v.detach().clone() for k, v in net.state_dict().items() if k in keep}
                    else:
                        best_state = None  # the model already holds it

        train_loss = float(last_loss[0]) / last_loss[1]
        if best_state is not None and best_epoch != cfg.epochs:
            set_exchange_arrays(net, best_state, trainable)
        model.eval()

    threshold = choose_threshold(val_labels, best_scores)
    return FitResult(
        n_examples=int(train_idx.size),
        steps=step,
        train_loss=train_loss,
        val_indices=val_idx,
        val_labels=val_labels.copy(),
        val_scores=best_scores,
        threshold=threshold,
        best_epoch=best_epoch,
    )
