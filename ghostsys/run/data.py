"""Data: the synthetic default, the contiguous mode-independent batch order, augmentation, loading.

Every random choice here comes from its own generator seeded by a hash of (seed, purpose, epoch,
...) and never from the global RNG, so results cannot depend on how many processes, passes or
other consumers of randomness a run has (DESIGN §2).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ghostsys.run.datasets import (
    InMemoryDataset,
    channel_stats,
    fetch,
    image_folders,
    normalize,
    DIGITS_SCALE,
    read_cifar,
    read_digits,
    read_mnist,
    tensor_splits,
)

__all__ = ["InMemoryDataset", "BatchOrder", "augment", "fetch", "load_dataset", "synthetic", "DATASETS"]

DATASETS = ("synthetic", "digits", "mnist", "cifar10", "cifar100", "imagenet")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crops x[n, :, top[n]:top[n]+h, left[n]:left[n]+w] in one gather."""
    n, c = x.shape[:2]
    dev = x.device
    rows = (top.to(dev).view(-1, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (left.to(dev).view(-1, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
    return x[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]


# --- synthetic default -------------------------------------------------------------------------

# Difficulty of the synthetic task: template shift (px), amplitude range, clutter and noise std.
_SHIFT, _AMP, _CLUTTER, _NOISE = 2, (0.7, 1.3), 0.7, 0.5


def _synthetic_split(templates: torch.Tensor, n: int, shape: tuple[int, ...], g: torch.Generator, shift: int):
    num_classes = templates.shape[0]
    c, h, w = shape
    y = torch.arange(n) % num_classes  # balanced classes, in shuffled order
    y = y[torch.randperm(n, generator=g)]
    top = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    left = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    amp = _AMP[0] + (_AMP[1] - _AMP[0]) * torch.rand(n, 1, 1, 1, generator=g)
    signal = amp * _crop(templates[y], top, left, h, w)
    # Smooth distractors plus pixel noise keep it from being solved in a few steps: at the defaults the
    # SmallCNN with BatchNorm reaches ~0.7-0.8 validation accuracy after one epoch of 16 steps of 256
    # (lr 0.05, momentum 0.9) and ~0.9 after two; chance is 0.1.
    clutter = F.interpolate(torch.randn(n, c, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    clutter = clutter / clutter.flatten(1).std(1).mean()
    x = signal + _CLUTTER * clutter + _NOISE * torch.randn(n, c, h, w, generator=g)
    return x, y


def synthetic(
    n_train: int = 4096,
    n_val: int = 1024,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (3, 16, 16),
    seed: int = 0,
) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Seeded, learnable images: per-class smooth templates, randomly shifted and scaled, plus clutter and noise."""
    c, h, w = shape
    shift = _SHIFT
    base = torch.randn(num_classes, c, 5, 5, generator=_generator(seed, "synthetic-templates"))
    templates = F.interpolate(base, size=(h + 2 * shift, w + 2 * shift), mode="bicubic", align_corners=False)
    templates = templates / templates.flatten(1).std(1).view(-1, 1, 1, 1)
    # Separate streams: the validation set does not change when n_train does.
    x_tr, y_tr = _synthetic_split(templates, n_train, shape, _generator(seed, "synthetic-train"), shift)
    x_va, y_va = _synthetic_split(templates, n_val, shape, _generator(seed, "synthetic-val"), shift)
    mean, std = channel_stats(x_tr)  # normalized like the real data sets: by train statistics
    classes = [f"class{k}" for k in range(num_classes)]
    return (InMemoryDataset(normalize(x_tr, mean, std), y_tr, classes),
            InMemoryDataset(normalize(x_va, mean, std), y_va, classes))


# --- batch order -------------------------------------------------------------------------------


class BatchOrder:
    """The contiguous, seeded, mode-independent order of global batches (DESIGN §2).

    Epoch e is a permutation of the samples drawn from a generator seeded by (seed, e) alone; step s
    takes the s-th block of M samples of its epoch. Rank r of n_g gets block r of M/n_g samples of
    that global batch and its micro-batch i is block i of those, so every factorization n_g × n_fp of
    the same G_M puts the same samples in the same ghost groups. With drop_last=False the last batch
    of an epoch is filled from the start of the same permutation so every step has exactly M samples.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, drop_last: bool = True) -> None:
        if global_batch < 1:
            raise ValueError(f"global batch M must be >= 1, got {global_batch}")
        if drop_last and num_samples < global_batch:
            raise ValueError(f"global batch M={global_batch} exceeds the {num_samples} samples of the data set")
        self.num_samples, self.M, self.seed, self.drop_last = num_samples, global_batch, seed, drop_last
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Number of global batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.M
        return math.ceil(self.num_samples / self.M)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's sample permutation (depends only on seed and epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            perm = torch.randperm(self.num_samples, generator=_generator(self.seed, "batch-order", epoch))
            self._cache = (epoch, perm)
        return self._cache[1]

    def global_batch(self, step: int) -> torch.Tensor:
        """Sample indices of global step `step` (LongTensor of length M)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        idx = torch.arange(i * self.M, (i + 1) * self.M) % self.num_samples  # wraps only if drop_last=False
        return perm[idx]

    def _check(self, rank: int, world_size: int, nfp: int) -> None:
        M = self.M
        if world_size < 1 or nfp < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size n_g >= 1, n_fp >= 1 and 0 <= rank < n_g; got rank={rank}, "
                             f"n_g={world_size}, n_fp={nfp}")
        if M % (world_size * nfp):
            divisors = [d for d in range(1, M + 1) if M % d == 0]
            if M % world_size == 0:
                valid = [d for d in divisors if (M // world_size) % d == 0]
                hint = f"with n_g={world_size}, valid n_fp are {valid}"
            else:
                hint = f"n_g itself must divide M: valid n_g are {divisors}"
            raise ValueError(f"global batch M={M} is not divisible by n_g·n_fp = {world_size}·{nfp} = "
                             f"{world_size * nfp} (n_g processes × n_fp forward passes); {hint}")

    def local_micro_batches(self, step: int, rank: int, world_size: int, nfp: int) -> list[torch.Tensor]:
        """Rank `rank`'s n_fp micro-batches of step `step`: contiguous blocks of its contiguous block."""
        self._check(rank, world_size, nfp)
        local = self.global_batch(step).view(world_size, -1)[rank]
        return list(local.view(nfp, -1).unbind(0))

    def interleaved_micro_batches(self, step: int, rank: int, world_size: int, nfp: int) -> list[torch.Tensor]:
        """WRONG ON PURPOSE: DistributedSampler-style rank membership (samples r, r+n_g, ...).

        Only for fault-injection tests (a negative control the equivalence checker must catch):
        unsynced BatchNorm then normalizes strided groups that no explicit layer reproduces.
        """
        self._check(rank, world_size, nfp)
        local = self.global_batch(step)[rank::world_size]
        return list(local.view(nfp, -1).unbind(0))

    def ghost_groups(self, step: int, world_size: int, nfp: int, layer_groups: int = 1) -> list[torch.Tensor]:
        """All G_M = n_g·n_fp·G_layer ghost groups of step `step`, in global order (rank-major)."""
        groups = []
        for rank in range(world_size):
            for micro in self.local_micro_batches(step, rank, world_size, nfp):
                if len(micro) % layer_groups:
                    raise ValueError(f"micro-batch of {len(micro)} not divisible by G_layer={layer_groups}")
                groups.extend(micro.view(layer_groups, -1).unbind(0))
        return groups


# --- augmentation ------------------------------------------------------------------------------


def _sample_uniforms(seed: int, epoch: int, idx: torch.Tensor, k: int) -> np.ndarray:
    """k counter-based 64-bit draws per sample (splitmix64 of seed, epoch, index): no shared stream."""
    key = np.uint64(derive_seed(seed, "augment", epoch))
    golden, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    counters = idx.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        z = key + (counters + np.uint64(1)) * golden
        z = (z ^ (z >> np.uint64(30))) * m1
        z = (z ^ (z >> np.uint64(27))) * m2
        return z ^ (z >> np.uint64(31))


def augment(
    x: torch.Tensor, idx: torch.Tensor, epoch: int, seed: int, flip: bool = True, crop_pad: int = 4, cutout: int = 0
) -> torch.Tensor:
    """Random horizontal flip, pad-and-crop and Cutout; each sample's choices depend only on (seed, epoch, idx).

    Padding is zeros on the already-normalized tensor (the train mean colour); Cutout zeroes a
    `cutout`×`cutout` square (clipped at the border) centred anywhere in the image, as in DeVries & Taylor.
    """
    if x.dim() != 4 or len(idx) != len(x):
        raise ValueError(f"augment expects N×C×H×W images with one index per sample; got {tuple(x.shape)}, {len(idx)}")
    n, _, h, w = x.shape
    r = torch.from_numpy((_sample_uniforms(seed, epoch, idx, 5) >> np.uint64(11)).astype(np.int64))  # 53 bits
    out = x
    if flip:
        mask = (r[:, 0] & 1).bool().to(x.device)
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(-1), out)
    if crop_pad > 0:
        padded = F.pad(out, (crop_pad,) * 4)
        top, left = r[:, 1] % (2 * crop_pad + 1), r[:, 2] % (2 * crop_pad + 1)
        out = _crop(padded, top, left, h, w)
    if cutout > 0:
        cy, cx = (r[:, 3] % h).view(n, 1), (r[:, 4] % w).view(n, 1)
        rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
        in_r = (rows >= cy - cutout // 2) & (rows < cy - cutout // 2 + cutout)
        in_c = (cols >= cx - cutout // 2) & (cols < cx - cutout // 2 + cutout)
        hole = (in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w)).to(x.device)
        out = out.masked_fill(hole, 0.0)
    return out if out is not x else x.clone()


# --- loading -----------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    eval_split: str = "val",
) -> tuple[Any, Any, dict[str, Any]]:
    """(train, eval, meta) for `name` in DATASETS; eval is the stratified hold-out ('val') or the test set.

    MNIST/CIFAR: `val_fraction` of each class of the official train set is held out (0.1 gives the
    papers' 45k/5k on CIFAR), seeded by `seed`; normalized by per-channel train mean/std. Digits
    (scikit-learn, offline): a fixed stratified 20% test split, then the same seeded hold-out. ImageNet:
    the val folder is the eval set (`val_fraction` unused), images load lazily at `image_size`
    (default 224). Synthetic: `image_size` (default 16) sets the 3×S×S shape; no root needed.
    meta: num_classes, input_shape [C, H, W], name, eval_split, n_train, n_eval; plus mean/std (the
    per-channel train statistics applied) for tensor data sets, classes for folders.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        if eval_split != "val":
            raise ValueError("the synthetic data set has no test split; use eval_split='val'")
        s = image_size or 16
        train, evaluation = synthetic(shape=(3, s, s), seed=seed)
        meta = {"num_classes": 10, "input_shape": [3, s, s]}
    elif name == "imagenet":
        if eval_split != "val":
            raise ValueError("ImageNet folders provide train and val only; use eval_split='val'")
        if root is None:
            raise FileNotFoundError("ImageNet needs a local root with train/ and val/ class folders; pass --data-root DIR")
        s = image_size or 224
        train, evaluation = image_folders(root, s)
        meta = {"num_classes": len(train.classes), "input_shape": [3, s, s], "classes": list(train.classes)}
    elif name == "digits":  # ships inside scikit-learn: no root, works offline
        train, evaluation, stats = tensor_splits(read_digits(), seed=seed, val_fraction=val_fraction,
                                                 eval_split=eval_split, scale=DIGITS_SCALE)
        meta = {"num_classes": 10, "input_shape": list(train.x.shape[1:]), **stats}
    else:
        if root is None:
            raise FileNotFoundError(f"{name} needs a local data root (nothing is downloaded); pass --data-root DIR")
        arrays = read_mnist(root) if name == "mnist" else read_cifar(root, 10 if name == "cifar10" else 100)
        train, evaluation, stats = tensor_splits(arrays, seed=seed, val_fraction=val_fraction, eval_split=eval_split)
        num_classes = 100 if name == "cifar100" else 10
        meta = {"num_classes": num_classes, "input_shape": list(train.x.shape[1:]), **stats}
    meta.update(name=name, eval_split=eval_split, n_train=len(train), n_eval=len(evaluation))
    return train, evaluation, meta
