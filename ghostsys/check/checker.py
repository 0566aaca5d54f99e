"""Equivalence checker: every mode and factorization of a target G_M against one independent reference.

For each factorization (n_g = the launched processes, n_fp, G_layer, SyncBN block k) the real
training machinery (config -> model -> mode -> engine -> ``train.train_step``) runs k SGD steps,
and its first-step logits and loss, first-step gradients, weights after k steps and every rank's
running statistics are compared with ``ghostsys.check.reference``: a single-process model built from
plain tensor ops that normalizes explicit ghost-group index lists (DESIGN §2-§3). float64 is held to
the analytic 1e-10; below float64 each tolerance is derived in the run from the reference's own
divergence in that precision (``ghostsys.check.tolerance``, once per distinct set of ghost groups).
Negative controls (full BatchNorm, G_M = 1, against the target G_M; ``ghostsys.check.controls``)
must differ, so the checker can never pass by comparing a thing with itself.
"""

from __future__ import annotations

import time
from functools import partial
from dataclasses import dataclass, replace
from typing import Any

import torch

from ghostsys.run import dist
from ghostsys.check import reference as ref
from ghostsys.check import tolerance as tl
from ghostsys.run.config import MODES, RULES, ConfigError, RunConfig
from ghostsys.run.rules import blank_or, check_fields, integer, kind, one_of, output_dir
from ghostsys.run.data import fetch
from ghostsys.nn.models import build_model
from ghostsys.run.modes import norm_factory
from ghostsys.check.controls import buffer_facts, control_rows
from ghostsys.check.report import Row, Tolerance, compare
from ghostsys.run.train import Setup, build, micro_batches, train_step

INJECTIONS = ("", "interleaved", "no-nfp-scaling", "wrong-rank-buffers")
CHECKED_PRECISIONS = ("float64", "float32", "bf16-autocast", "tf32")


@dataclass(frozen=True)
class CheckConfig:
    """What the checker compares: one model, batch, seed and target G_M over every allowed factorization."""

    model: str = "cnn"
    """Model: cnn, simplenet, resnet56, wrn28_10, tv:<torchvision name> or timm:<timm name>."""
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
    """float64 (analytic tolerance 1e-10 relative), float32 (tolerances derived in the run from the reference's
    own float32-vs-float64 divergence), bf16-autocast (training with --mixed-precision bf16 on float32 weights,
    Accelerate only; derived likewise, the reference under the same autocast), tf32 (CUDA only, derived
    likewise), or auto: float64, except float32 under DeepSpeed (which cannot train float64)."""
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
        if self.inject in ("interleaved", "wrong-rank-buffers") and world == 1:
            # Both are data-parallel faults: on one process the strided order IS the contiguous one and there is
            # no other rank's buffers, so the "faulty" run is the correct one and exit 4 would blame the precision.
            raise ConfigError(f"--inject {self.inject} is a data-parallel fault that does not exist on 1 process; launch "
                              "2 (torchrun --nproc_per_node 2 launch/check.py ...), or use --inject no-nfp-scaling")
        c = replace(self, dtype=("float32" if self.engine == "deepspeed" else "float64") if self.dtype == "auto" else self.dtype)
        if c.dtype == "bf16-autocast" and c.engine == "deepspeed":
            # DeepSpeed's bf16 runs on CPU but is not autocast (bf16 weights, activations, buffers and loss over
            # float32 masters): the reference's draws do not bound it, so its verdicts would mean nothing.
            raise ConfigError("--dtype bf16-autocast checks autocast over float32 weights, which DeepSpeed's bf16 mode "
                              "is not (bf16 weights and buffers, float32 masters; no reference for it yet): use "
                              "--engine accelerate for bf16, or --dtype float32 with --engine deepspeed")
        if c.dtype == "tf32" and not torch.cuda.is_available():
            raise ConfigError("--dtype tf32 exists on CUDA GPUs only (CPU float32 matmuls are IEEE); use --dtype float32")
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
    "target_gm": integer(2), "steps": integer(1), "seed": RULES["seed"], "dtype": one_of("auto", *CHECKED_PRECISIONS),
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
                     weight_decay=c.weight_decay, seed=c.seed, dtype=tl.run_dtype(c.dtype),
                     mixed_precision=tl.precision(c.dtype).mixed_precision, zero_stage=c.zero_stage,
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


def reference_inputs(c: CheckConfig, cfg: RunConfig, s: Setup) -> tuple[torch.nn.Module, list[tuple]]:
    """The initial model (built as the engine's was: same seed, so same weights) and the k global batches."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=s.meta["num_classes"], in_shape=tuple(s.meta["input_shape"]),
                        norm=norm_factory(cfg))
    batches = []
    for step in range(c.steps):
        idx = s.order.global_batch(step)
        x, y = fetch(s.train_set, idx)
        batches.append((x.double(), y, idx))
    return model, batches


def reference(c: CheckConfig, model: torch.nn.Module, batches: list[tuple], groups: list[ref.GroupSpec]) -> ref.RefTrace:
    """The float64 reference over explicit ghost groups, k steps."""
    return ref.reference_steps(model, batches, groups=groups, lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay, k_steps=c.steps, dtype=torch.float64)


def _norm_signature(model: torch.nn.Module) -> tuple:
    """What the reference takes from the norm layers besides their groups (eps, momentum, channel groups)."""
    return tuple((n, float(m.eps), m.momentum, getattr(m, "channel_groups", 0))
                 for n, m in model.named_modules() if hasattr(m, "running_mean"))


def expected_policy(cfg: RunConfig, rank: int) -> tuple[Any, str]:
    """The buffer policy rank `rank` must end with under this variant's settings, and its name."""
    per_rank_policy = ref.sequential if (cfg.layer_groups == 1 or cfg.stats_policy == "sequential") else ref.mean_of_groups
    pname = "sequential" if per_rank_policy is ref.sequential else "mean"
    if cfg.world_size == 1:
        return per_rank_policy, pname
    if cfg.buffer_sync == "allreduce":
        return partial(ref.allreduce_mean, policy=per_rank_policy), f"allreduce-mean of per-rank {pname}"
    if cfg.engine == "accelerate":  # DDP broadcast_buffers=True
        return partial(ref.ddp_broadcast, rank=rank, policy=per_rank_policy), f"ddp-broadcast(rank {rank}) of {pname}"
    return partial(ref.per_rank, rank=rank, policy=per_rank_policy), f"per-rank {pname} (never synced)"


@dataclass
class Result:
    """One variant's run: its config, what it produced, its reference, and the tolerances it was held to."""

    variant: Variant
    cfg: RunConfig
    got: Observed
    trace: ref.RefTrace
    derivation: tl.Derivation
    buffer_tols: list[Tolerance]  # per rank
    inputs: tuple[torch.nn.Module, list[tuple]]  # the reference's initial model and batches


def check_variant(c: CheckConfig, v: Variant, info: dist.DistInfo, p: tl.Precision,
                  derivations: dict) -> tuple[list[Row], Result]:
    """Run one variant and compare it with its reference; rows for forward, grads, weights, buffers.

    Below float64 the tolerances come from `derivations` (one per distinct set of ghost groups,
    derived the first time a variant needs it).
    """
    cfg = run_config(c, v, info.world_size)
    s = build(cfg, info)
    with p.context(info.device, autocast=False):  # the engine autocasts itself (cfg.mixed_precision)
        got = observe(c, s)
    groups = ref.ghost_group_indices(c.batch_size, info.world_size, v.nfp, v.g_layer, v.k)
    model, batches = reference_inputs(c, cfg, s)
    # Factorizations with the same ghost groups (and norm layers) are ONE computation of the reference:
    # run it (and its draws below float64) once, relabel the group metadata for the others.
    key = (tl.partition(groups), _norm_signature(model))
    if key not in derivations:
        trace = reference(c, model, batches, groups)
        derivations[key] = tl.derive(p, model, batches, groups, trace, lr=c.lr, momentum=c.momentum,
                                     weight_decay=c.weight_decay, k_steps=c.steps, device=info.device,
                                     name=f"ghost groups of {v.label(info.world_size)}")
    d = derivations[key]
    trace = d.exact.with_groups(groups)
    model, batches = d.inputs
    meta = dict(mode=v.mode, engine=c.engine, factorization=v.label(info.world_size))
    # One tag for every row of the variant: its layer policy (ghost layers only) and buffer handling.
    pol = (f"stats {v.stats_policy}, " if cfg.layer_groups > 1 else "") + f"buffers {v.buffer_sync}"
    rows = [compare("logits", got.logits, trace.logits, d.tolerance("logits"), policy=pol, **meta),
            compare("loss", got.loss, trace.loss, d.tolerance("loss", terms=c.batch_size), policy=pol, **meta)]
    if got.grads is not None:
        rows.append(compare("grads", got.grads, trace.grads, d.tolerance("grads"), policy=pol, **meta))
    rows.append(compare("weights", got.weights, trace.weights, d.tolerance("weights"), policy=pol,
                        note=f"after {c.steps} steps", **meta))
    buffer_tols = []
    for rank, bufs in enumerate(got.buffers):
        policy, pname = expected_policy(cfg, rank)
        tol = d.tolerance("buffers", lambda tr, policy=policy: tr.with_groups(groups).buffers(policy),
                          label=f"buffers, {v.label(info.world_size)}: {pname}")
        buffer_tols.append(tol)
        rows.append(compare(f"buffers rank {rank}", bufs, trace.buffers(policy), tol, quantity="buffers",
                            section="buffers", policy=pol, note=f"expected: {pname}", **meta))
    return rows, Result(v, cfg, got, trace, d, buffer_tols, (model, batches))


def run_checks(c: CheckConfig, info: dist.DistInfo,
               progress: Any = print) -> tuple[list[Row], list[dict], list[tl.Derivation]]:
    """All variants, their comparisons, the running-statistics facts and the controls; rows, timings, derivations."""
    todo = variants(c, info.world_size)
    p = tl.precision(c.dtype)
    rows: list[Row] = []
    results: list[Result] = []
    derivations: dict = {}
    for v in todo:
        label = f"{v.mode:<10} {v.label(info.world_size)}  stats={v.stats_policy} buffer-sync={v.buffer_sync}"
        if info.is_main:
            progress(f"checking {label}")
        vrows, result = check_variant(c, v, info, p, derivations)
        rows += vrows
        results.append(result)
    rows += control_rows(c, results[0])
    rows += buffer_facts(c, results, info.world_size)
    timings = [{"variant": f"{r.variant.mode} {r.variant.label(info.world_size)} stats={r.variant.stats_policy} "
                           f"buffer-sync={r.variant.buffer_sync}", "seconds": round(r.got.seconds, 3)} for r in results]
    timings += [{"variant": f"tolerance derivation ({d.name})", "seconds": round(d.seconds, 3)}
                for d in derivations.values() if d.precision.derived]
    return rows, timings, list(derivations.values())


def check(c: CheckConfig) -> int:
    """Run the checker on the launched processes; print the report on rank 0; return the exit code."""
    c.validate(dist.expected_world())  # before any process group: every rank refuses alike
    info = dist.init(device="cpu" if not torch.cuda.is_available() else None)
    try:
        return check_on(c, info)
    finally:
        dist.shutdown()


def check_on(c: CheckConfig, info: dist.DistInfo) -> int:
    """check() inside an existing launch (several checks may share one): run, print and write on rank 0."""
    import dataclasses

    from ghostsys.check.report import exit_code, render, summary, write_rows
    from ghostsys.run.rundir import RunDir, environment

    c = c.validate(info.world_size)
    if info.is_main:
        print(f"ghostsys check: model={c.model} norm={c.norm} M={c.batch_size} target G_M={c.target_gm} "
              f"k={c.steps} steps dtype={c.dtype} engine={c.engine} n_g={info.world_size}", flush=True)
    t0 = time.perf_counter()
    rows, timings, derivations = run_checks(c, info, progress=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    code = exit_code(rows, injected=bool(c.inject))
    if info.is_main:
        out = RunDir(c.out or f"runs/check-{c.engine}-ng{info.world_size}-{c.norm}-{c.dtype}"
                     + (f"-inject-{c.inject}" if c.inject else ""))
        out.write_config(dataclasses.asdict(c) | {"world_size": info.world_size})
        out.write_env(environment() | {"device": str(info.device)})
        write_rows(rows, out.path)
        tols = [t for d in derivations for t in d.tolerances()]
        print(render(rows, tols, timings, code, inject=c.inject, precision=c.dtype, notes=tl.notes(tl.precision(c.dtype))), flush=True)
        out.write_summary(summary(rows) | {
            "seconds": round(wall, 2), "exit_code": code, "timings": timings, "world_size": info.world_size,
            "engine": c.engine, "precision": c.dtype, "safety_factor": tl.SAFETY_FACTOR,
            "dither_ulps": tl.DITHER_ULPS, "hard_controls": tl.precision(c.dtype).hard_controls,
            "tolerances": [dataclasses.asdict(t) for t in tols]})
        print(f"rows in {out.path} ({wall:.1f} s)", flush=True)
    return code
