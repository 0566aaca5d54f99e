"""Equivalence checker: every mode and factorization of a target G_M against one independent reference.

For each factorization (n_g = the launched processes, n_fp, G_layer, SyncBN block k) the real
training machinery (config -> model -> mode -> engine -> ``train.train_step``) runs k SGD steps,
and its first-step logits and loss, first-step gradients, weights after k steps and every rank's
running statistics are compared with ``ghostsys.check.reference``: a single-process model built from
plain tensor ops that normalizes explicit ghost-group index lists (DESIGN §2-§3). A negative
control (full BatchNorm, G_M = 1, against the target G_M) must differ, so the checker can never
pass by comparing a thing with itself.
"""

from __future__ import annotations

import time
from functools import partial
from dataclasses import dataclass, replace
from typing import Any

import torch

from ghostsys.run import dist
from ghostsys.check import reference as ref
from ghostsys.run.config import MODES, RULES, ConfigError, RunConfig
from ghostsys.run.rules import blank_or, check_fields, integer, kind, one_of, output_dir
from ghostsys.run.data import fetch
from ghostsys.nn.models import build_model
from ghostsys.run.modes import norm_factory
from ghostsys.check.report import Row, compare
from ghostsys.run.train import Setup, build, micro_batches, train_step

INJECTIONS = ("", "interleaved", "no-nfp-scaling", "wrong-rank-buffers")


@dataclass(frozen=True)
class CheckConfig:
    """What the checker compares: one model, batch, seed and target G_M over every allowed factorization."""

    model: str = "cnn"
    """Model: cnn, simplenet, resnet56, wrn28_10, or tv:<torchvision name>."""
    norm: str = "batch"
    """batch (BatchNorm/GhostNorm modes) or seq (SeqNorm in place of BatchNorm; its ghost part factorizes)."""
    channel_groups: int = 4
    """G_C of SeqNorm."""
    batch_size: int = 32
    """Global mini-batch M."""
    target_gm: int = 8
    """The G_M every factorization must reproduce."""
    steps: int = 3
    """Optimizer steps k before weights and buffers are compared."""
    seed: int = 0
    """Seed for weights and data."""
    dtype: str = "auto"
    """float64 (tolerance 1e-10 relative), float32 (summation-order tolerances), or auto: float64, except
    float32 under DeepSpeed (which cannot train float64)."""
    engine: str = "accelerate"
    """Engine under test: accelerate or deepspeed."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (gradients are compared at stage 0 only: ZeRO 1/2 partition them)."""
    sync_group_size: int = 0
    """Only check SyncBN over blocks of this many ranks (0 = every divisor of the world size)."""
    modes: str = ""
    """Comma-separated subset of layer,accumulate,unsynced,syncbn to run (empty = all)."""
    lr: float = 0.1
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    inject: str = ""
    """Fault injection (must make the check FAIL): interleaved, no-nfp-scaling, wrong-rank-buffers."""
    out: str = ""
    """Results directory (empty = runs/check-<engine>-ng<n>-<norm>-<dtype>)."""

    def validate(self, world: int) -> "CheckConfig":
        """Raise ConfigError naming the fix for any field or combination that cannot run on `world` processes;
        return the config with dtype resolved. Model names and channel counts are checked when built."""
        check_fields(self, CHECK_RULES)
        if self.zero_stage and self.engine != "deepspeed":
            raise ConfigError(f"--zero-stage {self.zero_stage} needs --engine deepspeed; add it or drop --zero-stage")
        if self.sync_group_size and world % self.sync_group_size:
            raise ConfigError(f"--sync-group-size {self.sync_group_size} does not divide the {world} launched "
                              f"process(es); valid: {[k for k in range(1, world + 1) if world % k == 0]}")
        c = replace(self, dtype=("float32" if self.engine == "deepspeed" else "float64") if self.dtype == "auto" else self.dtype)
        if not variants(c, world):
            asked = f" in --modes {c.modes}" if c.modes else ""
            raise ConfigError(f"no factorization of --target-gm {c.target_gm} with --batch-size {c.batch_size} on {world} "
                              f"process(es){asked}; choose a --target-gm that the world size divides and that divides "
                              "--batch-size" + (", or other --modes" if c.modes else ""))
        return c


def _modes(v: object) -> str | None:
    unknown = [m for m in str(v).split(",") if m and m not in MODES]
    return f"names unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}, comma-separated" if unknown else None


CHECK_RULES = {  # one per CheckConfig field; the shared ones as launch/run.py checks them
    "model": kind(str), "norm": one_of("batch", "seq"), "channel_groups": integer(1), "batch_size": integer(1),
    "target_gm": integer(2), "steps": integer(1), "seed": RULES["seed"], "dtype": one_of("auto", "float64", "float32"),
    "engine": RULES["engine"], "zero_stage": RULES["zero_stage"], "sync_group_size": integer(0), "modes": _modes,
    "lr": RULES["lr"], "momentum": RULES["momentum"], "weight_decay": RULES["weight_decay"],
    "inject": blank_or(one_of(*INJECTIONS[1:])), "out": output_dir,
}


@dataclass(frozen=True)
class Variant:
    """One factorization of G_M plus the running-statistics settings it runs with."""

    mode: str
    nfp: int
    g_layer: int
    k: int
    stats_policy: str = "mean"
    buffer_sync: str = "engine"

    def label(self, world: int) -> str:
        """e.g. 'G_M=8 = n_g 2 x n_fp 2 x G_layer 2'."""
        ng = f"(n_g {world} / k {self.k})" if self.k > 1 else f"n_g {world}"
        return f"G_M={(world // self.k) * self.nfp * self.g_layer} = {ng} x n_fp {self.nfp} x G_layer {self.g_layer}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def variants(c: CheckConfig, world: int) -> list[Variant]:
    """Every factorization of c.target_gm the launched world allows, with the policies worth showing."""
    out: list[Variant] = []
    for k in ([c.sync_group_size] if c.sync_group_size else _divisors(world)):
        if world % k:  # refused by CheckConfig.validate; no variant here either
            continue
        blocks = world // k
        if c.target_gm % blocks:
            continue
        for nfp in _divisors(c.target_gm // blocks):
            g = c.target_gm // blocks // nfp
            if c.batch_size % (world * nfp * g):
                continue
            if k > 1:
                if g == 1 and c.norm == "batch":  # SyncBN syncs BatchNorm, not ghost layers
                    out.append(Variant("syncbn", nfp, 1, k))
                continue
            if g > 1 or c.norm == "seq":
                mode = "layer" if g > 1 else ("unsynced" if world > 1 else "accumulate")
                out += [Variant(mode, nfp, g, 1, "mean"), Variant(mode, nfp, g, 1, "sequential")]
                if world > 1 and nfp == 1:
                    out.append(Variant(mode, nfp, g, 1, "mean", "allreduce"))
            else:
                mode = "unsynced" if world > 1 else "accumulate"
                out.append(Variant(mode, nfp, 1, 1))
                if world > 1:
                    out.append(Variant(mode, nfp, 1, 1, buffer_sync="allreduce"))
    wanted = {m for m in c.modes.split(",") if m}
    return [v for v in out if not wanted or v.mode in wanted]


def run_config(c: CheckConfig, v: Variant, world: int) -> RunConfig:
    """The training RunConfig of one variant."""
    norm = "seq" if c.norm == "seq" else ("ghost" if v.g_layer > 1 else "batch")
    return RunConfig(mode=v.mode, engine=c.engine, norm=norm, model=c.model, batch_size=c.batch_size, nfp=v.nfp,
                     ghost_groups=v.g_layer, channel_groups=c.channel_groups if norm == "seq" else 1,
                     sync_group_size=v.k if v.mode == "syncbn" else 0, stats_policy=v.stats_policy,
                     buffer_sync=v.buffer_sync, world_size=world, max_steps=c.steps, lr=c.lr, momentum=c.momentum,
                     weight_decay=c.weight_decay, seed=c.seed, dtype=c.dtype, zero_stage=c.zero_stage,
                     progress=False).validate()


@dataclass
class Observed:
    """What one variant produced (gathered on every rank)."""

    logits: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor] | None
    weights: dict[str, torch.Tensor]
    buffers: list[dict[str, torch.Tensor]]  # per rank
    seconds: float


def _norm_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (= the global batch order for per-rank blocks)."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def observe(c: CheckConfig, s: Setup) -> Observed:
    """Run c.steps real training steps of a built Setup, recording what the checker compares."""
    t0, world, engine = time.perf_counter(), s.info.world_size, s.engine
    parts: list[torch.Tensor] = []
    grads: dict[str, torch.Tensor] | None = None
    loss = torch.zeros(())
    if c.inject == "no-nfp-scaling":  # deliberately wrong: the step's gradient becomes n_fp x the mean
        real_backward = engine.backward
        engine.backward = lambda l: real_backward(l * s.cfg.nfp)  # type: ignore[method-assign]

    def keep_grads(_batches: list) -> None:
        nonlocal grads
        got = {n: p.grad.detach().cpu().clone() for n, p in engine.unwrapped.named_parameters() if p.grad is not None}
        grads = got or None  # ZeRO 1/2 keep gradients in their own partitions, not in .grad

    for step in range(c.steps):
        batches = micro_batches(s, step)
        if c.inject == "interleaved":  # deliberately wrong: DistributedSampler's strided order
            idx = s.order.interleaved_micro_batches(step, s.info.rank, world, s.cfg.nfp)
            batches = [(x.to(s.info.device, s.dtype), y.to(s.info.device)) for x, y in (fetch(s.train_set, i) for i in idx)]
        first = step == 0
        total = train_step(s, step, batches=batches, on_logits=parts.append if first else None,
                           before_update=keep_grads if first else None)
        if first:
            loss = total[0] / total[2]
    logits = _gather(torch.cat(parts), world).cpu()
    weights = {n: p.detach().cpu().clone() for n, p in engine.unwrapped.named_parameters()}
    mine = _norm_buffers(engine.unwrapped)
    buffers = [mine]
    if world > 1:
        buffers = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(buffers, mine)
    if c.inject == "wrong-rank-buffers" and world > 1:  # deliberately wrong: report rank 1's as rank 0's
        buffers[0] = buffers[1]
    return Observed(logits, loss.cpu(), grads, weights, buffers, time.perf_counter() - t0)


def _reference(c: CheckConfig, cfg: RunConfig, s: Setup, groups: list[ref.GroupSpec]) -> ref.RefTrace:
    """The independent reference for one variant: same initial weights, same global batches, explicit groups."""
    torch.manual_seed(cfg.seed)  # the same initial weights the engine started from (built the same way)
    model = build_model(cfg.model, num_classes=s.meta["num_classes"], in_shape=tuple(s.meta["input_shape"]),
                        norm=norm_factory(cfg))
    batches = []
    for step in range(c.steps):
        idx = s.order.global_batch(step)
        x, y = fetch(s.train_set, idx)
        batches.append((x.double(), y, idx))
    trace = ref.reference_steps(model, batches, groups=groups, lr=c.lr, momentum=c.momentum,
                                weight_decay=c.weight_decay, k_steps=c.steps, dtype=torch.float64)
    trace.inputs = (model, batches)  # type: ignore[attr-defined]  # kept to rebuild the control cheaply
    return trace


def _reference_from(c: CheckConfig, cfg: RunConfig, trace: ref.RefTrace, groups: list[ref.GroupSpec]) -> ref.RefTrace:
    """Another reference over the same initial model and batches, with other ghost groups."""
    model, batches = trace.inputs  # type: ignore[attr-defined]
    return ref.reference_steps(model, batches, groups=groups, lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay, k_steps=1, dtype=torch.float64)


def _expected_buffers(trace: ref.RefTrace, cfg: RunConfig, rank: int) -> tuple[dict, str]:
    """The buffers rank `rank` must end with, and the policy's name, under this variant's settings."""
    per_rank_policy = ref.sequential if (cfg.layer_groups == 1 or cfg.stats_policy == "sequential") else ref.mean_of_groups
    pname = "sequential" if per_rank_policy is ref.sequential else "mean"
    if cfg.world_size == 1:
        return trace.buffers(per_rank_policy), pname
    if cfg.buffer_sync == "allreduce":
        return trace.buffers(partial(ref.allreduce_mean, policy=per_rank_policy)), f"allreduce-mean of per-rank {pname}"
    if cfg.engine == "accelerate":  # DDP broadcast_buffers=True
        return (trace.buffers(partial(ref.ddp_broadcast, rank=rank, policy=per_rank_policy)),
            f"ddp-broadcast(rank {rank}) of {pname}")
    return trace.buffers(partial(ref.per_rank, rank=rank, policy=per_rank_policy)), f"per-rank {pname} (never synced)"


def check_variant(c: CheckConfig, v: Variant, info: dist.DistInfo) -> tuple[list[Row], Observed, ref.RefTrace]:
    """Run one variant and compare it with its reference; rows for forward, grads, weights, buffers."""
    cfg = run_config(c, v, info.world_size)
    s = build(cfg, info)
    got = observe(c, s)
    groups = ref.ghost_group_indices(c.batch_size, info.world_size, v.nfp, v.g_layer, v.k)
    trace = _reference(c, cfg, s, groups)
    meta = dict(mode=v.mode, engine=c.engine, factorization=v.label(info.world_size))
    # One tag for every row of the variant: its layer policy (ghost layers only) and buffer handling.
    pol = (f"stats {v.stats_policy}, " if cfg.layer_groups > 1 else "") + f"buffers {v.buffer_sync}"
    rows = [compare("logits", got.logits, trace.logits, c.dtype, policy=pol, **meta),
            compare("loss", got.loss, trace.loss, c.dtype, policy=pol, **meta)]
    if got.grads is not None:
        rows.append(compare("grads", got.grads, trace.grads, c.dtype, policy=pol, **meta))
    rows.append(compare("weights", got.weights, trace.weights, c.dtype, policy=pol, note=f"after {c.steps} steps", **meta))
    for rank, bufs in enumerate(got.buffers):
        expected, pname = _expected_buffers(trace, cfg, rank)
        rows.append(compare(f"buffers rank {rank}", bufs, expected, c.dtype, quantity="buffers", section="buffers",
                            policy=pol, note=f"expected: {pname}", **meta))
    return rows, got, trace


def control_rows(c: CheckConfig, trace_target: ref.RefTrace, cfg: RunConfig) -> list[Row]:
    """Negative control: full BatchNorm (G_M = 1) against the target G_M; it must differ clearly."""
    full = _reference_from(c, cfg, trace_target, ref.ghost_group_indices(c.batch_size, 1, 1, 1))
    meta = dict(mode="control", engine="reference", factorization=f"G_M=1 vs G_M={c.target_gm}")
    return [compare("logits", full.logits, trace_target.logits, c.dtype, control=True, **meta),
            compare("grads", full.grads, trace_target.grads, c.dtype, control=True, **meta)]


@dataclass
class Result:
    """One variant's run: its config, what it produced and its reference."""

    variant: Variant
    cfg: RunConfig
    got: Observed
    trace: ref.RefTrace


def _find(results: list[Result], **want: Any) -> Result | None:
    for r in results:
        if all(getattr(r.variant, k) == v for k, v in want.items()):
            return r
    return None


def buffer_facts(c: CheckConfig, results: list[Result], world: int) -> list[Row]:
    """The running-statistics section: plain-word statements, each backed by a measured comparison.

    A statement that says two things AGREE is a normal row (error within tolerance); one that says
    they DIFFER is a control row (must differ by > 100x tolerance). Either failing fails the check.
    """
    rows: list[Row] = []
    meta = dict(engine=c.engine, quantity="buffers")

    def fact(text: str, got: dict, expected: dict, r: Result, agree: bool) -> None:
        row = compare(text, got, expected, c.dtype, mode=r.variant.mode, control=not agree,
                      factorization=r.variant.label(world), note=text, **meta)
        row.section = "facts"  # reported in words, below the table; still counted by exit_code
        row.policy = "must agree" if agree else "must differ (> 100x tol)"
        rows.append(row)

    if world == 1:
        seq = _find(results, stats_policy="sequential", mode="layer", nfp=1)
        mean = _find(results, stats_policy="mean", mode="layer", nfp=1)
        acc = _find(results, mode="accumulate", g_layer=1)
        if seq and acc:
            fact("the `sequential` layer policy gives the running statistics of BatchNorm under accumulation",
                 seq.got.buffers[0], acc.got.buffers[0], seq, agree=True)
        if mean and acc:
            fact("the `mean` layer policy does NOT give accumulation's running statistics (one EMA step per "
                 "forward instead of one per group)", mean.got.buffers[0], acc.got.buffers[0], mean, agree=False)
        return rows
    engine_run = _find(results, g_layer=1, k=1, buffer_sync="engine")
    if engine_run is not None:
        everything = engine_run.trace.buffers(ref.sequential)
        if c.engine == "accelerate":
            fact("DDP (broadcast_buffers=True) keeps only rank 0's ghost groups in rank 0's buffers: they "
                 "differ from BatchNorm's EMA over all ranks' groups", engine_run.got.buffers[0], everything,
                 engine_run, agree=False)
        else:
            fact("DeepSpeed never syncs buffers: rank 0's and rank 1's running statistics drift apart",
                 engine_run.got.buffers[0], engine_run.got.buffers[1], engine_run, agree=False)
    ar = _find(results, mode="layer", stats_policy="mean", buffer_sync="allreduce")
    if ar is not None:
        fact("--buffer-sync allreduce makes data parallel equal the single-process `mean` policy over all G_M groups",
             ar.got.buffers[0], ar.trace.buffers(ref.mean_of_groups), ar, agree=True)
    return rows


def run_checks(c: CheckConfig, info: dist.DistInfo, progress: Any = print) -> tuple[list[Row], list[dict]]:
    """All variants, their comparisons, the running-statistics facts and the control; rows and timings."""
    todo = variants(c, info.world_size)
    rows: list[Row] = []
    results: list[Result] = []
    for v in todo:
        label = f"{v.mode:<10} {v.label(info.world_size)}  stats={v.stats_policy} buffer-sync={v.buffer_sync}"
        if info.is_main:
            progress(f"checking {label}")
        vrows, got, trace = check_variant(c, v, info)
        rows += vrows
        results.append(Result(v, run_config(c, v, info.world_size), got, trace))
    first = results[0]
    rows += control_rows(c, first.trace, first.cfg)
    rows += buffer_facts(c, results, info.world_size)
    timings = [{"variant": f"{r.variant.mode} {r.variant.label(info.world_size)} stats={r.variant.stats_policy} "
                           f"buffer-sync={r.variant.buffer_sync}", "seconds": round(r.got.seconds, 3)} for r in results]
    return rows, timings


def check(c: CheckConfig) -> int:
    """Run the checker on the launched processes; print the report on rank 0; return the exit code."""
    import dataclasses

    from ghostsys.check.report import exit_code, markdown_table, summary, tolerance_table, write_rows
    from ghostsys.run.rundir import RunDir, environment

    c = c.validate(dist.expected_world())  # before any process group: every rank refuses alike
    info = dist.init(device="cpu" if not torch.cuda.is_available() else None)
    try:
        if info.is_main:
            print(f"ghostsys check: model={c.model} norm={c.norm} M={c.batch_size} target G_M={c.target_gm} "
                  f"k={c.steps} steps dtype={c.dtype} engine={c.engine} n_g={info.world_size}", flush=True)
        t0 = time.perf_counter()
        rows, timings = run_checks(c, info, progress=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t0
        code = exit_code(rows)
        if info.is_main:
            out = RunDir(c.out or f"runs/check-{c.engine}-ng{info.world_size}-{c.norm}-{c.dtype}"
                         + (f"-inject-{c.inject}" if c.inject else ""))
            out.write_config(dataclasses.asdict(c) | {"world_size": info.world_size})
            out.write_env(environment() | {"device": str(info.device)})
            write_rows(rows, out.path)
            facts = [r for r in rows if r.section == "facts"]
            print("\n## Comparisons\n\n" + markdown_table([r for r in rows if r.section != "facts"]), flush=True)
            print("\n## Running statistics, in words\n", flush=True)
            for r in facts:
                verdict = "holds" if r.passed else "DOES NOT HOLD"
                print(f"- {r.quantity}: measured max rel. difference {r.max_rel:.2e}, {r.policy}, tol {r.tol:.0e} "
                      f"-> {verdict}", flush=True)
            print("\n## Tolerances\n\n" + tolerance_table(), flush=True)
            print("\n## Time per variant (s)\n\n" + "\n".join(f"- {t['variant']}: {t['seconds']}" for t in timings), flush=True)
            out.write_summary(summary(rows) | {"seconds": round(wall, 2), "exit_code": code, "timings": timings,
                                               "world_size": info.world_size, "engine": c.engine})
            print(f"\n{'PASS' if code == 0 else 'FAIL'}: {len(rows)} comparisons in {wall:.1f} s; rows in {out.path}",
                  flush=True)
        return code
    finally:
        dist.shutdown()
