"""ghostsys' own overhead: the training loop of launch/run.py against a bare PyTorch loop (``python -m ghostsys.profile.overhead``).

Not a test: it measures (DESIGN §9: the loop within 3 % of a bare loop on the same model, data and
batch). Both run in this one process with the same torch threads, in repetitions that alternate
which goes first, so slow drift of a shared machine hits both alike:

- ghostsys: ``ghostsys.run.train.train(cfg)``, what ``launch/run.py`` calls (mode accumulate, n_fp 1,
  one process, the accelerate engine, progress bar and per-step metrics line included);
- bare: the same model (``build_model``, same norm layers and seed), the same in-memory data set and
  batch size, ``SGD``, ``cross_entropy``, ``backward``, ``step``, ``zero_grad`` and ``loss.item()``.

Each repetition times a window of steps after a warm-up, with clocks read at the same point of the
step (its start); the figure is the ratio of the medians over repetitions of the wall time per step,
with the p10-p90 spread of the per-repetition ratios and the machine's load average.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ghostsys.profile.callback import quantile
from ghostsys.run.config import RunConfig
from ghostsys.run.data import load_dataset
from ghostsys.run.modes import norm_factory
from ghostsys.run.train import Callback, Setup, train
from ghostsys.nn.models import build_model


# wall: perf_counter (device synchronized). thread: this thread's CPU time (one torch thread, CPU only),
# which time spent descheduled on a shared machine does not inflate; blocking I/O does not count there.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_now = CLOCKS["wall"]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _now()


class _Window(Callback):
    """Wall clock at the start of step W and of step W+T (the same points the bare loop reads)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.W, self.T, self.t0, self.t1 = warmup, steps, 0.0, 0.0

    def on_step_start(self, s: Setup, step: int) -> None:
        if step == self.W:
            self.t0 = _clock(s.info.device)
        elif step == self.W + self.T:
            self.t1 = _clock(s.info.device)


def ghostsys_loop(cfg: RunConfig, warmup: int, steps: int) -> float:
    """Seconds per step of train(cfg) over steps [warmup, warmup+steps)."""
    clock = _Window(warmup, steps)
    with tempfile.TemporaryDirectory(prefix="ghostsys-overhead-") as d, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        train(cfg.replace(out=d), callbacks=[clock])
    return (clock.t1 - clock.t0) / steps


def bare_loop(cfg: RunConfig, warmup: int, steps: int) -> float:
    """Seconds per step of a plain PyTorch loop on the same model, data and batch."""
    train_set, _, meta = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=meta["num_classes"], in_shape=tuple(meta["input_shape"]),
                        norm=norm_factory(cfg)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all = train_set.x, train_set.y
    perm = torch.randperm(len(y_all))
    per_epoch = len(y_all) // cfg.batch_size
    t0 = 0.0
    for step in range(warmup + steps + 1):
        if step == warmup:
            t0 = _clock(device)
        elif step == warmup + steps:
            return (_clock(device) - t0) / steps
        idx = perm[(step % per_epoch) * cfg.batch_size:(step % per_epoch + 1) * cfg.batch_size]
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what a bare loop logs; ghostsys reads its step's (loss, correct, count) too
    raise AssertionError("unreachable")


def measure(cfg: RunConfig, *, reps: int, warmup: int, steps: int, clock: str = "wall") -> dict[str, Any]:
    """Interleaved repetitions of both loops; medians, ratio and spread."""
    global _now
    if clock == "thread" and (torch.get_num_threads() != 1 or cfg.device != "cpu"):
        raise ValueError("--clock thread measures one CPU thread: use --threads 1 --device cpu")
    _now = CLOCKS[clock]
    cfg = cfg.replace(max_steps=warmup + steps + 1, epochs=warmup + steps + 1, eval_every=10**9, nprocs=0)
    load0 = os.getloadavg()[0]
    ours, bare, ratios = [], [], []
    for r in range(reps):
        order = (ghostsys_loop, bare_loop) if r % 2 == 0 else (bare_loop, ghostsys_loop)
        got = {fn.__name__: fn(cfg, warmup, steps) for fn in order}
        ours.append(got["ghostsys_loop"])
        bare.append(got["bare_loop"])
        ratios.append(ours[-1] / bare[-1])
    med_ours, med_bare = statistics.median(ours), statistics.median(bare)
    return {"model": cfg.model, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "reps": reps, "clock": clock,
            "warmup_steps": warmup, "timed_steps": steps, "ghostsys_step_s": med_ours, "bare_step_s": med_bare,
            "overhead": med_ours / med_bare - 1, "ratio_p10": quantile(ratios, 0.1), "ratio_p90": quantile(ratios, 0.9),
            "ghostsys_step_s_all": ours, "bare_step_s_all": bare, "loadavg_1m_start": load0,
            "loadavg_1m_end": os.getloadavg()[0], "device": cfg.device, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ghostsys.profile.overhead``."""
    p = argparse.ArgumentParser(prog="python -m ghostsys.profile.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn", help="model (default cnn)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--reps", type=int, default=7, help="repetitions of each loop, alternating (default 7)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per repetition (default 3)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall (default) or thread: CPU time of the one training thread, robust on a loaded machine")
    p.add_argument("--out", default="", help="write overhead.json into this folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = RunConfig(mode="accumulate", model=a.model, batch_size=a.batch_size, device=a.device).validate()
    row = measure(cfg, reps=a.reps, warmup=a.warmup, steps=a.steps, clock=a.clock)
    print(f"ghostsys loop {1000 * row['ghostsys_step_s']:.2f} ms/step vs bare PyTorch {1000 * row['bare_step_s']:.2f} "
          f"ms/step: overhead {100 * row['overhead']:+.1f}% (per-rep ratio p10-p90 {row['ratio_p10']:.3f}-"
          f"{row['ratio_p90']:.3f}; {a.reps} reps x {a.steps} steps, model {a.model}, M={a.batch_size}, "
          f"{row['threads']} thread(s), {a.clock} clock, load {row['loadavg_1m_start']:.1f}->{row['loadavg_1m_end']:.1f})")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "overhead.json").write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
