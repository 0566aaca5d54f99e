"""Feeding the loop: this rank's micro-batches, in process or through a torch DataLoader with workers.

Both paths deliver exactly the mode-independent contiguous micro-batches of ``BatchOrder`` (rank r
gets block r of the seeded global batch, micro-batch i is block i of that) and load and augment
them through the same function, so a run is the same experiment whichever path feeds it:

- in process (the default for in-memory tensors): one tensor index per micro-batch, zero copies
  beyond the gather, no worker processes, no pickling;
- DataLoader (file-backed data sets such as ImageNet folders, or any data set with
  ``--num-workers N``): a **batch sampler** yields the same index blocks step after step, starting
  at the step a resumed run starts from; worker processes decode and augment (augmentation is
  counter-based per (seed, epoch, sample), so which worker handles a sample cannot matter), memory is
  pinned on CUDA, and each worker keeps at least two steps' micro-batches prefetched.

The DataLoader is handed its own seeded generator: without one it draws its base seed from torch's
global RNG, which would shift the noise of NoisyBatchNorm and make results depend on the worker
count.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ghostsys.run.data import BatchOrder, augment, derive_seed, fetch

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["MicroBatchSampler", "KeyedDataset", "Feed", "load_micro", "auto_workers"]

# Most worker processes "auto" starts per rank: decoding JPEGs scales well to here on a GPU node.
_MAX_AUTO_WORKERS = 8


def load_micro(dataset: Any, idx: torch.Tensor, epoch: int, seed: int, aug: dict | None) -> Batch:
    """Gather samples `idx` and, if `aug` (augment()'s keywords) is given, augment them for `epoch`."""
    x, y = fetch(dataset, idx)
    if aug is not None:
        x = augment(x, idx, epoch, seed, **aug)
    return x, y


class MicroBatchSampler(Sampler[list]):
    """Batch sampler: rank `rank`'s n_fp micro-batches of every step in [start_step, stop_step), in order.

    Each yielded batch is a list of (epoch, sample index) keys for :class:`KeyedDataset`; the epoch
    travels with the indices so that workers can augment without knowing the step.
    """

    def __init__(self, order: BatchOrder, rank: int, world_size: int, nfp: int, start_step: int, stop_step: int) -> None:
        if not 0 <= start_step <= stop_step:
            raise ValueError(f"need 0 <= start_step <= stop_step, got {start_step}, {stop_step}")
        order._check(rank, world_size, nfp)
        self.order, self.rank, self.world_size, self.nfp = order, rank, world_size, nfp
        self.start_step, self.stop_step = start_step, stop_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            epoch = step // self.order.steps_per_epoch
            for idx in self.order.local_micro_batches(step, self.rank, self.world_size, self.nfp):
                yield [(epoch, i) for i in idx.tolist()]

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.nfp


class KeyedDataset(Dataset):
    """A data set seen through (epoch, index) keys; ``__getitems__`` loads and augments a whole micro-batch."""

    def __init__(self, base: Any, seed: int, aug: dict | None) -> None:
        self.base, self.seed, self.aug = base, seed, aug

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Batch:
        epochs = {e for e, _ in keys}
        if len(epochs) != 1:
            raise ValueError(f"a micro-batch spans epochs {sorted(epochs)}; the batch order never does that")
        idx = torch.tensor([i for _, i in keys], dtype=torch.long)
        return load_micro(self.base, idx, epochs.pop(), self.seed, self.aug)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        x, y = self.__getitems__([key])
        return x[0], y[0]


def _as_is(batch: Batch) -> Batch:
    return batch  # __getitems__ already built the batch (a module-level function: workers pickle it)


def is_in_memory(dataset: Any) -> bool:
    """True for data sets held as tensors (sliced in place), False for file-backed ones."""
    return hasattr(dataset, "x") and hasattr(dataset, "y")


def auto_workers(requested: int, dataset: Any, local_procs: int = 1) -> int:
    """Worker processes for `requested` (-1 = auto: none for in-memory tensors, else the CPUs this process may
    use shared among the node's `local_procs` ranks, 1 to 8)."""
    if requested >= 0:
        return requested
    if is_in_memory(dataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_MAX_AUTO_WORKERS, cpus // max(1, local_procs)))


def make_loader(dataset: Any, batch_sampler: Sampler, *, seed: int, aug: dict | None, workers: int, nfp: int,
                pin: bool) -> DataLoader:
    """A DataLoader over `batch_sampler`'s index blocks, with its own generator (the global RNG stays untouched)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        # At least two optimizer steps in flight: a step consumes nfp micro-batches.
        kw.update(prefetch_factor=max(2, -(-2 * nfp // workers)))
    return DataLoader(KeyedDataset(dataset, seed, aug), batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=_as_is, pin_memory=pin, generator=torch.Generator().manual_seed(derive_seed(seed, "loader")),
                      **kw)


class Feed:
    """This rank's training micro-batches step by step, and its share of the evaluation set, on the device."""

    def __init__(self, *, order: BatchOrder, train_set: Any, val_set: Any, rank: int, world_size: int, nfp: int,
                 seed: int, aug: dict | None, device: torch.device, dtype: torch.dtype, stop_step: int,
                 num_workers: int = -1, local_procs: int | None = None) -> None:
        self.order, self.train_set, self.val_set = order, train_set, val_set
        self.rank, self.world_size, self.nfp, self.seed, self.aug = rank, world_size, nfp, seed, aug
        self.device, self.dtype, self.stop_step = device, dtype, stop_step
        local = local_procs or world_size
        self.workers = auto_workers(num_workers, train_set, local)
        self.eval_workers = auto_workers(num_workers, val_set, local)
        self.pin = device.type == "cuda"
        self._it: Iterator[Batch] | None = None
        self._next_step = -1

    @property
    def uses_loader(self) -> bool:
        """True when batches come through a DataLoader (workers, or a file-backed data set)."""
        return self.workers > 0 or not is_in_memory(self.train_set)

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        nb = self.pin  # pinned host memory copies asynchronously
        return x.to(self.device, self.dtype, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def train_batches(self, step: int) -> list[Batch]:
        """The n_fp micro-batches of global step `step` for this rank."""
        if not self.uses_loader:
            epoch = step // self.order.steps_per_epoch
            return [self._to_device(load_micro(self.train_set, idx, epoch, self.seed, self.aug))
                    for idx in self.order.local_micro_batches(step, self.rank, self.world_size, self.nfp)]
        if self._it is None or step != self._next_step:  # first call, a resumed start, or a jump: restart there
            self.close()
            sampler = MicroBatchSampler(self.order, self.rank, self.world_size, self.nfp, step, max(step + 1, self.stop_step))
            self._it = iter(make_loader(self.train_set, sampler, seed=self.seed, aug=self.aug, workers=self.workers,
                                        nfp=self.nfp, pin=self.pin))
        batches = [self._to_device(next(self._it)) for _ in range(self.nfp)]
        self._next_step = step + 1
        return batches

    def eval_batches(self, lo: int, hi: int, chunk: int = 512) -> Iterator[Batch]:
        """Samples [lo, hi) of the evaluation set in chunks, un-augmented."""
        blocks = [list(range(s, min(s + chunk, hi))) for s in range(lo, hi, chunk)]
        if not (self.eval_workers > 0 or not is_in_memory(self.val_set)):
            for b in blocks:
                yield self._to_device(load_micro(self.val_set, torch.tensor(b, dtype=torch.long), 0, self.seed, None))
            return
        keyed = [[(0, i) for i in b] for b in blocks]
        loader = make_loader(self.val_set, keyed, seed=self.seed, aug=None, workers=self.eval_workers, nfp=1, pin=self.pin)
        for batch in loader:
            yield self._to_device(batch)

    def close(self) -> None:
        """Stop the training loader's workers (if any)."""
        self._it = None  # the iterator's __del__ shuts its workers down
