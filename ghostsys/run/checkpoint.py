"""Checkpoints that survive `kill -9`: per-rank files in a step directory made visible by one rename.

Layout: ``<run>/checkpoints/step_00000120/rank0.pt`` (one file per rank, since ranks may hold
different running statistics and, under ZeRO, different optimizer partitions). Files are written
into ``step_….tmp/`` and the directory is renamed only after every rank has written, so a
directory without ``.tmp`` is always complete. Files hold tensors and plain Python only and are
read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ghostsys.run import dist
from ghostsys.run.config import ConfigError


class Checkpointer:
    """Save and resume the engine state plus the RNG state of one rank."""

    def __init__(self, root: Path, info: dist.DistInfo, keep: int = 2) -> None:
        self.root, self.info, self.keep = Path(root), info, max(1, keep)

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def save(self, step: int, engine) -> None:
        """Write this rank's state for `step`; the step becomes visible once all ranks wrote."""
        tmp = self.root / f"step_{step:08d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "world_size": self.info.world_size, "engine": engine.state_dict(),
                 "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        part = tmp / f"rank{self.info.rank}.pt.part"
        torch.save(state, part)
        os.replace(part, tmp / f"rank{self.info.rank}.pt")
        dist.barrier()
        if self.info.is_main:
            final = self.root / f"step_{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def resume(self, engine) -> int:
        """Load the newest complete checkpoint into `engine`; return its step (0 when there is none)."""
        if self.info.is_main and self.root.is_dir():
            for stale in self.root.glob("step_*.tmp"):  # a save interrupted by a kill
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        done = self._complete()
        if not done:
            return 0
        path = done[-1] / f"rank{self.info.rank}.pt"
        if not path.exists():
            ranks = len(list(done[-1].glob("rank*.pt")))
            raise ConfigError(f"checkpoint {done[-1]} was written by {ranks} process(es) but {self.info.world_size} "
                              f"were launched; relaunch with {ranks} or pass another --out")
        state = torch.load(path, map_location=self.info.device, weights_only=True)
        engine.load_state_dict(state["engine"])
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
        return int(state["step"])
