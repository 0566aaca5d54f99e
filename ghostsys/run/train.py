"""The one training loop every mode and engine runs through."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ghostsys.run import dist, preempt
from ghostsys.run.checkpoint import Checkpointer
from ghostsys.run.config import ConfigError, RunConfig
from ghostsys.run.data import BatchOrder
from ghostsys.run.engines import Engine, make_engine
from ghostsys.run.feed import Feed
from ghostsys.run.modes import MODES
from ghostsys.run.prepare import agreed, load_ds_config, open_data_and_model, resolve
from ghostsys.run.rundir import NewPaths, RunDir, environment
from ghostsys.run.schedules import make_schedule


# The profiler attributes collectives inside this range to the loop's own loss/accuracy reduction.
LOSS_STATS_RANGE = "ghostsys:loss_stats"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message names what to change."""


class Callback:
    """Instruments the loop from above (profiler samplers, the loss-landscape probe): every hook is optional.

    The loop never imports an upper wing (DESIGN §4); upper wings subclass this and pass instances
    to :func:`train`. Hooks run on every rank, in the order the callbacks were given.
    """

    def on_train_start(self, s: "Setup", start_step: int) -> None:
        """After the model, engine and checkpoint are ready, before the first (or resumed) step."""

    def on_step_start(self, s: "Setup", step: int) -> None:
        """Before the step's first forward (`step` counts from 0)."""

    def before_update(self, s: "Setup", step: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
        """After the step's backward passes, before the optimizer update; a returned dict joins the step's metrics."""

    def on_step_end(self, s: "Setup", step: int, record: dict[str, Any]) -> None:
        """After the update (and any evaluation); `record` is the metrics line about to be written (may be extended)."""

    def on_train_end(self, s: "Setup", summary: dict[str, Any]) -> None:
        """After the last step; `summary` is the summary row about to be written (may be extended)."""


@dataclass
class Setup:
    """Everything built before the first step, shared by training and the equivalence checker."""

    cfg: RunConfig
    info: dist.DistInfo
    engine: Engine
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    train_set: Any
    val_set: Any
    meta: dict
    dtype: torch.dtype = torch.float32  # the batches' dtype (the engine's compute dtype)
    steps_per_epoch: int = 0
    total_steps: int = 0
    feed: Feed | None = None  # this rank's batches (in process, or a DataLoader with workers)


def build(cfg: RunConfig, info: dist.DistInfo) -> Setup:
    """Data, model (same init on every rank and in every mode), mode wrapper, optimizer, engine.

    The data and the bare model come first (no collective there), so a bad --data-root, --model,
    --batch-size or --channel-groups is refused on every rank before anything waits for a peer.
    """
    dtype = getattr(torch, cfg.dtype)
    train_set, val_set, meta, order, model = agreed(lambda: open_data_and_model(cfg))
    model = MODES[cfg.mode].wrap(model, cfg).to(device=info.device, dtype=dtype)
    total = order.steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = make_schedule(cfg.schedule, optimizer, total_steps=total, steps_per_epoch=order.steps_per_epoch)
    engine = make_engine(cfg.engine, model, optimizer, scheduler, nfp=cfg.nfp, micro_batch=cfg.micro_batch,
                         world_size=cfg.world_size, zero_stage=cfg.zero_stage, ds_config=load_ds_config(cfg),
                         grad_clip=cfg.grad_clip, mixed_precision=cfg.mixed_precision)
    # Batches go in the dtype the engine computes in (DeepSpeed bf16 casts the weights, not the inputs).
    dtype = engine.input_dtype or dtype
    feed = Feed(order=order, train_set=train_set, val_set=val_set, rank=info.rank, world_size=info.world_size,
                nfp=cfg.nfp, seed=cfg.seed, aug=augment_kwargs(cfg), device=info.device, dtype=dtype,
                stop_step=total, num_workers=cfg.num_workers, local_procs=dist.local_world_size(info.world_size))
    return Setup(cfg, info, engine, optimizer, order, train_set, val_set, meta, dtype, order.steps_per_epoch, total, feed)


def augment_kwargs(cfg: RunConfig) -> dict | None:
    """augment()'s keywords for this run (flips and 4-px pad-and-crop, plus Cutout), or None without --augment."""
    return {"cutout": cfg.cutout} if cfg.augment else None


def micro_batches(s: Setup, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's n_fp micro-batches for a global step: contiguous blocks of the seeded global batch."""
    return s.feed.train_batches(step)


def train_step(s: Setup, step: int, *, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               on_logits: Callable[[torch.Tensor], None] | None = None,
               before_update: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], None] | None = None) -> torch.Tensor:
    """One optimizer step over n_fp micro-batches; returns the global (loss sum, correct, count).

    The equivalence checker passes its own `batches` (e.g. a deliberately wrong order) and observes
    each micro-batch's logits; `before_update(batches)` sees the gradients just before the update.
    """
    engine = s.engine
    batches = micro_batches(s, step) if batches is None else batches
    stats = torch.zeros(3, dtype=torch.float64, device=s.info.device)
    for i, (x, y) in enumerate(batches):
        with engine.micro_context(is_last=i == len(batches) - 1):
            logits = engine.model(x)
            loss = F.cross_entropy(logits, y)
            engine.backward(loss)
        if on_logits is not None:
            on_logits(logits.detach())
        stats += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                              torch.tensor(float(len(y)), device=stats.device, dtype=torch.float64)])
    if before_update is not None:
        before_update(batches)
    engine.step()
    if s.cfg.buffer_sync == "allreduce":
        dist.all_reduce_buffers_mean_(engine.unwrapped)
    with record_function(LOSS_STATS_RANGE):  # lets the profiler tell this reduction from the engine's
        return dist.all_reduce_sum_(stats)


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float]:
    """Loss and accuracy on the validation set, sharded over ranks, with ONE set of buffers.

    Under ``buffer_sync=engine`` ranks may hold different running statistics (DeepSpeed never
    syncs them; DDP overwrites them only at the next forward), so rank 0's are broadcast for the
    evaluation and each rank's own are put back afterwards; under ``allreduce`` all ranks agree.
    """
    model, info = s.engine.unwrapped, s.info
    own = [b.detach().clone() for b in model.buffers()]
    if info.world_size > 1 and s.cfg.buffer_sync == "engine":
        dist.broadcast_buffers_(model, src=0)
    was_training = model.training
    model.eval()
    n = len(s.val_set)
    lo, hi = n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)
    for x, y in s.feed.eval_batches(lo, hi, 512):
        logits = model(x)
        stats += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                              (logits.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=info.device, dtype=torch.float64)])
    dist.all_reduce_sum_(stats)
    for b, keep in zip(model.buffers(), own):
        b.copy_(keep)
    model.train(was_training)
    loss_sum, correct, count = stats.tolist()
    return {"eval_loss": loss_sum / count, "eval_acc": correct / count, "eval_samples": int(count),
            "eval_buffers": "rank0" if s.cfg.buffer_sync == "engine" else "allreduce-mean"}


@dataclass
class _Timer:
    """Step times with the device synchronized; warm-up steps are excluded from the figures."""

    device: torch.device
    warmup: int = 2
    times: list[float] = field(default_factory=list)
    _t0: float = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt

    def summary(self, batch: int) -> dict[str, float]:
        t = sorted(self.times[self.warmup:] or self.times)
        if not t:
            return {}
        med, p90 = t[len(t) // 2], t[min(len(t) - 1, math.ceil(0.9 * len(t)) - 1)]
        return {"step_time_median_s": med, "step_time_p90_s": p90, "samples_per_s": batch / med,
                "timed_steps": len(t)}


def train(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary row (on every rank).

    Every check comes before the run directory is written; a run that fails before its first step
    removes what it wrote (never what was there before).

    SIGUSR1 (``preempt.STOP_SIGNALS``) asks it to stop: all ranks stop at the same step boundary,
    write a checkpoint and raise :class:`ghostsys.run.preempt.Preempted`; the same call resumes.
    """
    with preempt.stop_on_signals() as stop:  # first: a signal during start-up must not kill the run
        cfg = resolve(cfg, dist.expected_world())
        info = dist.init(timeout_s=cfg.collective_timeout, device=None if cfg.device == "auto" else cfg.device)
        try:
            return _train(cfg, info, tuple(callbacks), stop)
        finally:
            dist.shutdown()


def _train(cfg: RunConfig, info: dist.DistInfo, callbacks: tuple[Callback, ...] = (),
           stop: preempt.StopRequest | None = None) -> dict[str, Any]:
    path = cfg.run_dir()
    agreed(lambda: _check_run_dir(path, cfg) if info.is_main else None)
    if (path / "summary.json").exists():  # the same command again after it finished: report, don't retrain
        import json

        summary = json.loads((path / "summary.json").read_text())
        if info.is_main:
            print(f"already complete: {path} (pass another --out to train again)", flush=True)
        return summary
    if info.is_main:
        print(cfg.pretty(), flush=True)
        for w in cfg.mode_warnings():
            print(f"warning: {w}", flush=True)
    s = build(cfg, info)
    ckpt = Checkpointer(path / "checkpoints", info, keep=cfg.keep_checkpoints)
    start = agreed(lambda: ckpt.resume(s.engine))
    new = NewPaths(path) if info.is_main else None
    run: RunDir | None = None
    try:
        if info.is_main:
            run = RunDir(path)
            run.write_config(cfg.resolved())
            if start:
                print(f"resuming from the checkpoint at step {start}", flush=True)
                run.truncate_metrics_after(start)
            run.write_env(environment() | {"world_size": info.world_size, "device": str(info.device)})
        summary = _loop(s, run, ckpt, start, callbacks, stop or preempt.StopRequest())
    except BaseException:
        if new is not None and (run is None or run.lines_written == 0):  # not one step done: leave no trace
            new.remove()
        raise
    if info.is_main:
        run.write_summary(summary)
        print(f"results: {path}  (eval acc {summary['eval_acc']:.3f}, {summary['factorization']})", flush=True)
    return summary


def _check_run_dir(path: Path, cfg: RunConfig) -> None:
    """Refuse a directory that holds a different experiment (reads only)."""
    import json

    existing = path / "config.json"
    if not existing.exists():
        return
    try:
        old = RunConfig.from_dict(json.loads(existing.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"--out {path}: its config.json cannot be read ({err}); pass another --out or remove "
                          "that directory") from None
    if old.identity() != cfg.identity():
        new_id, old_id = cfg.identity(), old.identity()
        diff = sorted(k for k in new_id.keys() | old_id.keys() if new_id.get(k) != old_id.get(k))
        raise ConfigError(f"--out {path} holds a run with a different configuration (differs in: {', '.join(diff)}); "
                          "pass another --out or remove that directory")


def _loop(s: Setup, run: RunDir | None, ckpt: Checkpointer, start: int,
          callbacks: tuple[Callback, ...], stop: preempt.StopRequest) -> dict[str, Any]:
    from tqdm import tqdm

    cfg, info = s.cfg, s.info
    timer = _Timer(info.device)
    bar = tqdm(total=s.total_steps, initial=start, disable=not (info.is_main and cfg.progress),
               desc=f"{cfg.mode}/{cfg.engine} {cfg.factorization}", unit="step", dynamic_ncols=True)
    last: dict[str, float] = {}
    evaluation: dict[str, Any] = {}
    wall0 = time.perf_counter()
    saved = start  # the step of the newest checkpoint on disk (start: the one resumed from, or none)
    for cb in callbacks:
        cb.on_train_start(s, start)
    for step in range(start, s.total_steps):
        # The step boundary: every rank learns whether any rank was asked to stop, so all stop here.
        if dist.any_rank(stop.requested):
            bar.close()
            if step > saved:
                ckpt.save(step, s.engine)
            raise preempt.Preempted(step, cfg.run_dir(), stop.signame, info.is_main)
        extra: dict[str, Any] = {}

        def hook(batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = step) -> None:
            for cb in callbacks:
                extra.update(cb.before_update(s, step, batches) or {})

        for cb in callbacks:
            cb.on_step_start(s, step)
        timer.start()
        total = train_step(s, step, before_update=hook if callbacks else None)
        dt = timer.stop()
        loss_sum, correct, count = total.tolist()
        last = {"step": step + 1, "epoch": step // s.steps_per_epoch, "train_loss": loss_sum / count,
                "train_acc": correct / count, "lr": s.optimizer.param_groups[0]["lr"], "step_time_s": dt, **extra}
        if not math.isfinite(last["train_loss"]):
            raise TrainingError(f"the training loss became {last['train_loss']} at step {step + 1} "
                                f"(lr {last['lr']:.4g}); lower --lr or check the data")
        done = step + 1
        at_epoch_end = done % s.steps_per_epoch == 0
        if (cfg.eval_every and done % cfg.eval_every == 0) or (not cfg.eval_every and at_epoch_end) or done == s.total_steps:
            evaluation = evaluate(s)
            last |= {k: v for k, v in evaluation.items() if k != "eval_buffers"}
        for cb in callbacks:
            cb.on_step_end(s, step, last)
        if run is not None:
            run.append_metrics(last)
        bar.update(1)
        # refresh=False: the bar redraws at its own pace (tqdm's mininterval), not on every step (measured ~0.5 ms).
        bar.set_postfix(loss=f"{last['train_loss']:.3f}", **({"acc": f"{evaluation['eval_acc']:.3f}"} if evaluation else {}),
                        refresh=False)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == s.total_steps:
            ckpt.save(done, s.engine)
            saved = done
    bar.close()
    s.feed.close()
    if not evaluation:  # resumed at the very end: nothing left to run, evaluate the loaded state
        evaluation = evaluate(s)
    summary = {
        "status": "complete", "mode": cfg.mode, "engine": cfg.engine, "norm": cfg.resolved_norm, "model": cfg.model,
        "dataset": cfg.dataset, "mixed_precision": cfg.mixed_precision, "world_size": cfg.world_size, "nfp": cfg.nfp, "ghost_groups": cfg.layer_groups,
        "sync_k": cfg.sync_k, "effective_gm": cfg.effective_gm, "factorization": cfg.factorization,
        "batch_size": cfg.batch_size, "micro_batch": cfg.micro_batch, "ghost_batch": cfg.ghost_batch,
        "buffer_sync": cfg.buffer_sync, "eval_split": cfg.eval_split, "steps": s.total_steps, "resumed_from": start,
        "final_train_loss": last.get("train_loss", float("nan")), "final_train_acc": last.get("train_acc", float("nan")),
        **evaluation, **timer.summary(cfg.batch_size), "wall_s": time.perf_counter() - wall0,
    }
    for cb in callbacks:
        cb.on_train_end(s, summary)
    return summary
