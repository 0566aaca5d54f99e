"""Engine checks run on every rank under a real launcher; each rank writes its results to OUT/rank<r>.json.

tests/test_engines.py launches this through torchrun / accelerate launch / deepspeed and compares the
weights with a single-process reference. It also defines the shared problem (model, data, optimizer),
so the reference in the test trains exactly the same thing. Several checks share one launch because
process start-up (torch + deepspeed imports) dominates the test time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launchers run us by path, not from the repo root

import torch
import torch.distributed as tdist
from torch import nn

from ghostsys.run import dist
from ghostsys.run.cli import exit_process
from ghostsys.run.engines import ENGINES, Engine, make_engine

M, D_IN, HIDDEN, D_OUT = 16, 8, 16, 4
STEPS, LR, MOMENTUM, WD, GAMMA = 3, 0.1, 0.9, 0.01, 0.5
NFPS = (1, 2)
# (dtype, ZeRO stages) per engine: DeepSpeed cannot train float64 (the adapter refuses it; see engines.py).
GRID = {"accelerate": ("float64", (0,)), "deepspeed": ("float32", (0, 1, 2))}


def build_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """2-layer MLP, no BatchNorm (BN equivalence is tested elsewhere); float32 weights are float64's rounded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT)).double().to(dtype)


def global_batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded global batch of M samples for one step (same on every rank and in the reference)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(M, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(M, D_OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error, mean over the samples given."""
    return ((out - y) ** 2).sum(dim=1).mean()


def flat_params(model: nn.Module) -> list[float]:
    """All parameters as one flat list (JSON floats round-trip float64 exactly)."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]).tolist()


def wrong_scaling(cls: type[Engine]) -> type[Engine]:
    """A deliberately wrong adapter: undoes the 1/nfp scaling (the negative control)."""
    return type(f"Unscaled{cls.__name__}", (cls,), {"backward": lambda self, loss: cls.backward(self, loss * self.nfp)})


def new_engine(name: str, dtype: torch.dtype, nfp: int, world: int, zero: int, seed: int = 0,
               cls: type[Engine] | None = None) -> Engine:
    """Fresh model, SGD(momentum, wd) and StepLR wrapped in the named engine."""
    model = build_model(dtype, seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
    kw = dict(nfp=nfp, micro_batch=M // (world * nfp), world_size=world, zero_stage=zero)
    if cls is None:
        return make_engine(name, model, opt, sched, **kw)
    return cls(model, opt, sched, **kw)


def train(engine: Engine, dtype: torch.dtype, rank: int, world: int, nfp: int, steps: range) -> None:
    """The loop's contract: rank's contiguous block, nfp contiguous micro-batches, backward ×nfp, step ×1."""
    for step in steps:
        x, y = global_batch(step, dtype)
        per = M // world
        xs, ys = x[rank * per:(rank + 1) * per].chunk(nfp), y[rank * per:(rank + 1) * per].chunk(nfp)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            with engine.micro_context(is_last=i == nfp - 1):
                engine.backward(loss_fn(engine.model(xm.to(engine.device)), ym.to(engine.device)))
        engine.step()


def contract_error(name: str, dtype: torch.dtype, world: int, zero: int) -> str:
    """step() after 1 of nfp=2 backward passes must raise (same on every rank), not silently update."""
    eng = new_engine(name, dtype, 2, world, zero)
    x, y = global_batch(0, dtype)
    eng.backward(loss_fn(eng.model(x.to(eng.device)), y.to(eng.device)))
    try:
        eng.step()
    except RuntimeError as err:
        return str(err)
    return "no error"


def run_checks(name: str, world: int, rank: int, out: Path) -> dict:
    """Per ZeRO stage of GRID: each nfp, a checkpoint round trip, the unscaled adapter; flat weights by key."""
    res = {}
    dname, zeros = GRID[name]
    dtype, nfp = getattr(torch, dname), max(NFPS)
    for zero in zeros:
        key = f"{name}/{dname}/zero{zero}"
        for k in NFPS:
            eng = new_engine(name, dtype, k, world, zero)
            train(eng, dtype, rank, world, k, range(STEPS))
            res[f"{key}/nfp{k}/train"] = flat_params(eng.unwrapped)
        # Round trip: 1 step, save this rank's state, load into an engine built from other weights, finish.
        eng = new_engine(name, dtype, nfp, world, zero)
        train(eng, dtype, rank, world, nfp, range(1))
        path = out / f"ckpt_{name}_zero{zero}_rank{rank}.pt"
        torch.save(eng.state_dict(), path)
        resumed = new_engine(name, dtype, nfp, world, zero, seed=99)
        resumed.load_state_dict(torch.load(path, weights_only=True))
        train(resumed, dtype, rank, world, nfp, range(1, STEPS))
        res[f"{key}/nfp{nfp}/resumed"] = flat_params(resumed.unwrapped)
        eng = new_engine(name, dtype, nfp, world, zero, cls=wrong_scaling(ENGINES[name]))
        train(eng, dtype, rank, world, nfp, range(STEPS))
        res[f"{key}/nfp{nfp}/unscaled"] = flat_params(eng.unwrapped)
    res[f"{name}/contract"] = contract_error(name, dtype, world, zeros[0])
    return res


def main() -> None:
    """Parse, join the launcher's process group, run the checks, write OUT/rank<r>.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", nargs="+", choices=sorted(ENGINES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--local_rank", type=int, help="passed by the deepspeed launcher; unused")
    args = ap.parse_args()
    info = dist.init(timeout_s=180)  # generous: 2 shared CPU cores, several launches at once
    try:
        res = {k: v for name in args.engine for k, v in run_checks(name, info.world_size, info.rank, args.out).items()}
        backend = tdist.get_backend() if tdist.is_initialized() else None  # DeepSpeed may add a 1-rank group
        summary = {"rank": info.rank, "world": info.world_size, "backend": backend, "results": res}
        (args.out / f"rank{info.rank}.json").write_text(json.dumps(summary))
    finally:
        dist.shutdown()  # exiting with a live gloo group aborts some successful runs


if __name__ == "__main__":
    exit_process(main)
