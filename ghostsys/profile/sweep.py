"""Profile sweeps: modes x engines x world sizes x n_fp x precision, each run through its real launcher.

``launch/profile.py`` started by hand (no launcher in the environment) is the sweep's driver: it
expands the flags into one :class:`Spec` per run, validates every one before anything is written,
then starts ``accelerate launch`` / ``deepspeed`` / ``torchrun`` with ``launch/profile.py`` and that
run's single-valued flags as a subprocess, one after the other, under a progress bar. Started under a
launcher, ``launch/profile.py`` profiles exactly one spec (:func:`profile_one`). Afterwards the
driver (``ghostsys.profile.driver``) computes scaling efficiency, throughput(n) / (n x throughput(1)), against the one-process run
of the same mode, engine, precision and factorization request:

- ``strong``: the same global batch M at every n (each process gets M/n);
- ``weak``: the same per-process batch (M grows to n x M);
- ``base``: the one-process run both are measured against (efficiency 1 by definition).

Each run is a run directory ``<out>/<row_id>/`` (config.json, env.json, metrics.jsonl, summary.json
carrying the profile row, profile_ranks.jsonl), so ``ghostsys.study.load(out)`` reads profile rows
like any training run; ``<out>/profile.csv`` holds the same rows for a quick look.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ghostsys.run.config import ENGINES, MIXED_PRECISIONS, MODES, ConfigError, RunConfig

SCALINGS = ("strong", "weak")
PROFILE_LAUNCHERS = ("auto", "torchrun", "accelerate", "deepspeed")
# A step counts as evaluated only at the very end: keeps evaluation out of the timed and profiled steps.
_NO_EVAL = 10**9


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{flag} {text!r} is not a comma-separated list of integers (e.g. 1,2,4)") from None
    if any(v < 1 for v in vals):
        raise ConfigError(f"--{flag} {text!r}: every value must be >= 1")
    return vals


def _words(text: str, flag: str, valid: tuple[str, ...] | Any) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in valid]
    if bad or not vals:
        raise ConfigError(f"--{flag} {text!r}: {', '.join(bad) or 'empty'} not among {', '.join(valid)}")
    return list(dict.fromkeys(vals))


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile: a model, batch and factorization request over modes x engines x world sizes."""

    modes: str = "layer,accumulate,unsynced,syncbn"
    """Comma-separated modes to profile: layer, accumulate, unsynced, syncbn."""
    engines: str = "accelerate"
    """Comma-separated engines: accelerate, deepspeed."""
    world_sizes: str = "1,2"
    """Comma-separated process counts n_g (on CPU each process gets --threads-per-process threads)."""
    nfps: str = ""
    """Comma-separated n_fp values swept for mode accumulate (empty = 4); other modes run n_fp 1."""
    ghost_groups: int = 0
    """G_layer of mode layer (0 = 4)."""
    target_gm: int = 0
    """Instead of --nfps/--ghost-groups: every mode reaches this G_M at every world size (layer through
    G_layer, accumulate/unsynced through n_fp, syncbn through n_fp over all ranks)."""
    mixed_precision: str = "no"
    """Comma-separated mixed precisions to profile: no, bf16, fp16 (fp16 needs CUDA)."""
    scaling: str = "strong,weak"
    """Which scalings to run at n > 1: strong (same global batch M), weak (same per-process batch)."""
    steps: int = 12
    """Timed steps per run (after the warm-up)."""
    warmup: int = 3
    """Warm-up steps excluded from every figure."""
    profiled_steps: int = 3
    """Steps traced with torch.profiler for the collectives' share, kept apart from the timed ones (0 = none)."""
    batch_size: int = 256
    """Global mini-batch M of the one-process run (strong: every run; weak: M x n at n processes)."""
    model: str = "cnn"
    """Model: cnn, simplenet, resnet56, wrn28_10, or tv:<torchvision name>."""
    dataset: str = "synthetic"
    """Data set: synthetic, mnist, cifar10, cifar100, imagenet."""
    data_root: str | None = None
    """Local folder holding the data set files."""
    dtype: str = "float32"
    """Parameter dtype: float32 or float64."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2 (engine deepspeed)."""
    seed: int = 0
    """Seed for weights and data order."""
    lr: float = 0.05
    """Learning rate (constant)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    threads_per_process: int = 1
    """torch intra-op threads per process (0 = torch's default); stated on every row."""
    launcher: str = "auto"
    """Launcher for every run: auto (accelerate launch for accelerate, deepspeed for deepspeed), torchrun,
    accelerate or deepspeed."""
    out: str = ""
    """Results folder: one run directory per profiled run (empty = runs/profile)."""
    progress: bool = True
    """Show a progress bar over the sweep."""
    collective_timeout: float = 300.0
    """Seconds a collective may wait for a peer before the run fails."""

    def validate(self) -> "ProfileConfig":
        """Raise ConfigError naming the fix for any flag that cannot run; return self."""
        _words(self.modes, "modes", MODES)
        _words(self.engines, "engines", ENGINES)
        _words(self.mixed_precision, "mixed-precision", MIXED_PRECISIONS)
        _words(self.scaling, "scaling", SCALINGS)
        _ints(self.world_sizes, "world-sizes")
        if self.nfps:
            _ints(self.nfps, "nfps")
        if self.target_gm < 0 or self.ghost_groups < 0:
            raise ConfigError("--target-gm and --ghost-groups must be >= 0")
        if self.target_gm and (self.nfps or self.ghost_groups):
            raise ConfigError("--target-gm derives n_fp and G_layer itself; drop --nfps/--ghost-groups, or drop --target-gm")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1 (got {self.steps})")
        if self.warmup < 1:
            raise ConfigError(f"--warmup must be >= 1 (got {self.warmup}): the first steps pay one-off costs")
        if self.profiled_steps < 0:
            raise ConfigError(f"--profiled-steps must be >= 0 (got {self.profiled_steps})")
        if self.threads_per_process < 0:
            raise ConfigError(f"--threads-per-process must be >= 0 (got {self.threads_per_process})")
        if self.launcher not in PROFILE_LAUNCHERS:
            raise ConfigError(f"--launcher {self.launcher!r} is unknown; choose one of {', '.join(PROFILE_LAUNCHERS)}")
        return self

    @property
    def out_dir(self) -> Path:
        """The results folder."""
        return Path(self.out or "runs/profile")

    @property
    def total_steps(self) -> int:
        """Steps of every run: warm-up + timed + profiled + the tail step that evaluates and checkpoints."""
        return self.warmup + self.steps + self.profiled_steps + 1


@dataclass(frozen=True)
class Spec:
    """One profiled run: its training config, launcher, scaling label and the request it answers."""

    row_id: str
    run: RunConfig
    launcher: str
    scaling: str  # base | strong | weak
    group: tuple  # runs of one group are compared across world sizes
    argv: tuple[str, ...]  # launch/profile.py's flags that select exactly this run

    @property
    def world_size(self) -> int:
        """n_g."""
        return self.run.world_size


def _factorization(p: ProfileConfig, mode: str, n: int, nfp_req: int) -> tuple[int, int]:
    """(n_fp, G_layer) of a mode at n processes."""
    if p.target_gm:
        g = p.target_gm
        if mode == "syncbn":
            return g, 1
        if g % n:
            raise ConfigError(f"--target-gm {g} is not reachable by mode {mode} on {n} processes (G_M is a multiple of "
                              f"n_g = {n}); pick a --target-gm divisible by every --world-sizes value")
        return (1, g // n) if mode == "layer" else (g // n, 1)
    if mode == "layer":
        return 1, p.ghost_groups or 4
    return (nfp_req, 1) if mode == "accumulate" else (1, 1)


def _launcher(p: ProfileConfig, engine: str) -> str:
    if p.launcher != "auto":
        return p.launcher
    return "deepspeed" if engine == "deepspeed" else "accelerate"


def _argv(p: ProfileConfig) -> tuple[str, ...]:
    out: list[str] = []
    for f in fields(p):
        v = getattr(p, f.name)
        if v == f.default or f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        out += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return tuple(out)


def expand(p: ProfileConfig) -> list[Spec]:
    """Every run the flags ask for, each validated as a RunConfig at its world size (ConfigError names the run)."""
    p.validate()
    specs: list[Spec] = []
    nfp_list = _ints(p.nfps, "nfps") if p.nfps else [4]
    for engine in _words(p.engines, "engines", ENGINES):
        for mp in _words(p.mixed_precision, "mixed-precision", MIXED_PRECISIONS):
            for mode in _words(p.modes, "modes", MODES):
                for nfp_req in (nfp_list if mode == "accumulate" and not p.target_gm else [1]):
                    for n in _ints(p.world_sizes, "world-sizes"):
                        for scaling in (["base"] if n == 1 else _words(p.scaling, "scaling", SCALINGS)):
                            specs.append(_spec(p, engine, mp, mode, nfp_req, n, scaling))
    return list({s.row_id: s for s in specs}.values())


def _spec(p: ProfileConfig, engine: str, mp: str, mode: str, nfp_req: int, n: int, scaling: str) -> Spec:
    nfp, g = _factorization(p, mode, n, nfp_req)
    batch = p.batch_size * n if scaling == "weak" else p.batch_size
    cfg = RunConfig(mode=mode, engine=engine, model=p.model, dataset=p.dataset, data_root=p.data_root, batch_size=batch,
                    nfp=nfp, ghost_groups=g, world_size=n, nprocs=n, epochs=p.total_steps, max_steps=p.total_steps,
                    lr=p.lr, seed=p.seed, dtype=p.dtype, mixed_precision=mp,
                    zero_stage=p.zero_stage if engine == "deepspeed" else 0, device=p.device, eval_every=_NO_EVAL,
                    progress=False, collective_timeout=p.collective_timeout)
    where = f"mode {mode}, engine {engine}, {n} process(es), {scaling} scaling, mixed precision {mp}"
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    what = {"run": cfg.identity(), "phases": [p.warmup, p.steps, p.profiled_steps], "threads": p.threads_per_process,
            "launcher": _launcher(p, engine)}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    row_id = f"{mode}-{engine}-n{n}-{scaling}-M{batch}-nfp{nfp}-g{g}-{mp}-{digest}"
    cfg = cfg.replace(out=str(p.out_dir / row_id))
    one = dataclasses.replace(p, modes=mode, engines=engine, mixed_precision=mp, world_sizes=str(n),
                              scaling=scaling if scaling != "base" else p.scaling.split(",")[0],
                              nfps=str(nfp_req) if p.nfps else "")
    group = (engine, mp, mode, nfp_req, p.target_gm)
    return Spec(row_id, cfg, _launcher(p, engine), scaling, group, _argv(one))


def meta(spec: Spec, p: ProfileConfig) -> dict[str, Any]:
    """The settings every profile row carries besides its run config."""
    return {"row_id": spec.row_id, "scaling": spec.scaling, "launcher": spec.launcher, "warmup_steps": p.warmup,
            "profiled_steps_requested": p.profiled_steps, "per_process_batch": spec.run.per_process_batch,
            "micro_batch": spec.run.micro_batch, "mixed_precision": spec.run.mixed_precision}


def profile_one(p: ProfileConfig, world_size: int) -> dict[str, Any]:
    """Profile the one spec the flags select at the launched world size (run under a launcher)."""
    import torch

    from ghostsys.profile.callback import ProfileCallback
    from ghostsys.run.train import train

    mine = [s for s in expand(p) if s.world_size == world_size]
    if len(mine) != 1:
        listed = "; ".join(s.row_id for s in mine[:6]) or "none"
        raise ConfigError(f"under a launcher, launch/profile.py profiles ONE run at the launched {world_size} "
                          f"process(es), but the flags select {len(mine)} ({listed}); pass single values to "
                          "--modes/--engines/--world-sizes/--nfps/--mixed-precision/--scaling, or run it without a "
                          "launcher to sweep")
    spec = mine[0]
    if p.threads_per_process:
        torch.set_num_threads(p.threads_per_process)
    cb = ProfileCallback(p.warmup, p.steps, p.profiled_steps, meta=meta(spec, p))
    return train(spec.run, callbacks=[cb])
