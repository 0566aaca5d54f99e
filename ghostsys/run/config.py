"""The one run configuration: typed, frozen, validated up front, printed at start, saved as JSON.

The factorization that makes every GhostNorm mechanism the same experiment (DESIGN §2):
``M = n_g × n_fp × micro`` and ``G_M = (n_g / k) · n_fp · G_layer`` where ``k`` is the number of
consecutive ranks that share statistics (1 unless ``mode == "syncbn"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ghostsys.run.rules import (ConfigError, Rule, blank_or, check_fields, device, existing, integer, kind, number,
                                one_of, optional, output_dir)

MODES = ("layer", "accumulate", "unsynced", "syncbn")
ENGINES = ("accelerate", "deepspeed")
NORMS = ("batch", "ghost", "seq", "group", "noisy", "none")
DATASETS = ("synthetic", "digits", "mnist", "cifar10", "cifar100", "imagenet")
SCHEDULES = ("constant", "onecycle", "warmup_cosine", "nvidia_cosine")
STATS_POLICIES = ("mean", "sequential")
BUFFER_SYNCS = ("engine", "allreduce")
DTYPES = ("float32", "float64")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
EVAL_SPLITS = ("val", "test")
_WITH_TEST_SPLIT = ("digits", "mnist", "cifar10", "cifar100")

# Fields that say where and how loudly a run goes, not what it computes: left out of the run's
# identity so the same experiment maps to the same directory (and resumes) whatever they are.
_NON_IDENTITY = ("out", "progress", "checkpoint_every", "nprocs", "keep_checkpoints", "collective_timeout",
                 "preset", "num_workers")


# Models whose norm layers see (M, C) features, where a one-sample ghost batch is a single value.
_FEATURE_MODELS = ("simplenet",)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; ``validate()`` refuses any combination that cannot run."""

    mode: str = "accumulate"
    """GhostNorm mechanism: layer (explicit GhostNorm), accumulate (BatchNorm over n_fp passes),
    unsynced (data parallel, per-rank BatchNorm), syncbn (BatchNorm synced over k ranks)."""
    engine: str = "accelerate"
    """Training engine: accelerate (DDP under Accelerate) or deepspeed."""
    norm: str = ""
    """Normalization layer: batch, ghost, seq, group, noisy, none; empty = ghost for mode layer, else batch."""
    model: str = "cnn"
    """Model name: cnn, simplenet, resnet56, wrn28_10, tv:<torchvision name> or timm:<timm name>."""
    dataset: str = "synthetic"
    """Data set: synthetic (seeded, embedded default), digits (scikit-learn's 8x8 digits, offline), mnist,
    cifar10, cifar100, imagenet."""
    data_root: str | None = None
    """Local folder holding the data set files (never downloaded)."""
    batch_size: int = 256
    """Global mini-batch M, whatever the factorization."""
    nfp: int = 1
    """n_fp: forward passes (micro-batches) per optimizer step on each process."""
    ghost_groups: int = 1
    """G_layer: ghost groups inside each explicit GhostNorm/SeqNorm layer, per micro-batch."""
    channel_groups: int = 1
    """G_C: channel groups of SeqNorm and GroupNorm."""
    noise_std: float = 0.0
    """Std of the Gaussian noise that NoisyBatchNorm adds before normalizing."""
    sync_group_size: int = 0
    """k: consecutive ranks that share BatchNorm statistics in mode syncbn; 0 = all ranks."""
    stats_policy: str = "mean"
    """Running-statistics policy of explicit ghost layers: mean (one EMA update per forward) or
    sequential (one per ghost group, as BatchNorm under accumulation)."""
    buffer_sync: str = "engine"
    """Running statistics across ranks: engine (as the engine leaves them: DDP broadcasts rank 0's,
    DeepSpeed lets ranks drift) or allreduce (mean over ranks after every step)."""
    world_size: int = 1
    """n_g: processes the launcher started (filled in from the launcher, not chosen)."""
    nprocs: int = 0
    """Processes the user expects; a launch with another world size is refused. 0 = don't check."""
    epochs: int = 1
    """Epochs over the training set."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    lr: float = 0.05
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    schedule: str = "constant"
    """Learning-rate schedule: constant, onecycle (the papers' super-convergence shape), warmup_cosine
    (peak/4 -> peak over 5 epochs, then cosine), nvidia_cosine (0 -> peak over 8 epochs, then cosine)."""
    seed: int = 0
    """Seed for weights, data order, augmentation and noise."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 or float64."""
    mixed_precision: str = "no"
    """Mixed precision: no, bf16 or fp16 (CUDA only), applied through the engine's own mechanism
    (Accelerate's autocast; DeepSpeed's bf16/fp16 mode); must agree with `accelerate launch --mixed_precision`."""
    augment: bool = False
    """Flips and pad-and-crop (plus Cutout with --cutout), seeded per (seed, epoch, sample) so every mode sees the same."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON config merged under ghostsys' own keys (conflicts are refused)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    eval_every: int = 0
    """Evaluate every this many steps (0 = at the end of each epoch)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    out: str = ""
    """Run directory; empty = runs/<name derived from the config>, so the same command resumes."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    collective_timeout: float = 300.0
    """Seconds a collective may wait for a peer before the job fails (a dead rank never hangs the job)."""

    # --- the papers' experiments: presets, evaluation protocol, clipping, input pipeline, landscape probe ---
    preset: str = ""
    """Preset the other fields were filled from (launch/run.py --preset NAME; --preset list shows them); explicit
    flags win. Recorded only: the resolved fields decide the run."""
    eval_split: str = "val"
    """val: hold out a stratified 10% of the training set and evaluate on it; test: train on the whole training
    set and evaluate on the test split (digits, mnist, cifar10, cifar100)."""
    cutout: int = 0
    """Side in pixels of the Cutout square (DeVries & Taylor) applied with --augment; 0 = no Cutout."""
    grad_clip: float = 0.0
    """Clip the global L2 norm of each step's gradient to this value before the update; 0 = no clipping."""
    num_workers: int = -1
    """DataLoader worker processes that load and augment batches; -1 = auto (workers for file-backed data sets,
    none for in-memory tensors, which are sliced in place); 0 = in-process. Never changes results."""
    landscape_lrs: str = ""
    """Loss-landscape probe (Santurkar et al.): comma-separated step sizes eta; before the update the loss at
    theta - eta*g is measured on the step's batch. x0.5,x1 = multiples of the current lr. Empty = off."""
    landscape_every: int = 1
    """Run the loss-landscape probe every this many steps (with --landscape-lrs)."""

    # --- derived quantities -------------------------------------------------------------------
    @property
    def resolved_norm(self) -> str:
        """The norm layer actually used (the mode's default when --norm was not given)."""
        return self.norm or ("ghost" if self.mode == "layer" else "batch")

    @property
    def sync_k(self) -> int:
        """Consecutive ranks whose samples share statistics (1 unless syncbn)."""
        if self.mode != "syncbn":
            return 1
        return self.sync_group_size or self.world_size

    @property
    def per_process_batch(self) -> int:
        """M / n_g: samples each process sees per step."""
        return self.batch_size // self.world_size

    @property
    def micro_batch(self) -> int:
        """M / (n_g · n_fp): samples per forward pass."""
        return self.batch_size // (self.world_size * self.nfp)

    @property
    def layer_groups(self) -> int:
        """G_layer actually in effect (1 for layers without ghost groups)."""
        return self.ghost_groups if self.resolved_norm in ("ghost", "seq") else 1

    @property
    def ghost_batch(self) -> int:
        """Samples per ghost group: M / G_M."""
        return self.batch_size // self.effective_gm

    @property
    def effective_gm(self) -> int:
        """G_M = (n_g / k) · n_fp · G_layer."""
        return (self.world_size // self.sync_k) * self.nfp * self.layer_groups

    @property
    def factorization(self) -> str:
        """Human-readable G_M factorization, e.g. 'G_M=8 = n_g 2 x n_fp 2 x G_layer 2'."""
        ng = f"(n_g {self.world_size} / k {self.sync_k})" if self.sync_k > 1 else f"n_g {self.world_size}"
        return f"G_M={self.effective_gm} = {ng} x n_fp {self.nfp} x G_layer {self.layer_groups}"

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise ConfigError naming the fix for any field or combination that cannot run; return self.

        Each field first meets its own rule (RULES); then the combinations. What needs the data or the
        model (the training-set size, the model's name and channel counts) is checked when
        ``ghostsys.run.prepare`` opens them, still before anything is written.
        """
        check_fields(self, RULES)
        if self.nprocs and self.nprocs != self.world_size:
            raise ConfigError(
                f"--nprocs {self.nprocs} was asked for but the launcher started {self.world_size} process(es). "
                "On CPU, `accelerate launch --cpu --num_processes N` starts ONE process: use "
                "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...`")
        M, ng, nfp = self.batch_size, self.world_size, self.nfp
        if M % ng:
            raise ConfigError(f"--batch-size M={M} is not divisible by the {ng} launched processes; "
                              f"use an M that is a multiple of {ng} (e.g. {M - M % ng or ng}) or launch one of {_divisors(M)} processes")
        if (M // ng) % nfp:
            raise ConfigError(f"--nfp {nfp} does not divide the per-process batch M/n_g = {M // ng}; "
                              f"valid --nfp: {_divisors(M // ng)}")
        norm = self.resolved_norm
        if self.mode == "layer" and norm not in ("ghost", "seq"):
            raise ConfigError(f"--mode layer needs an explicit ghost layer: --norm ghost or seq (got --norm {norm})")
        # A flag the chosen layer ignores is refused rather than silently dropped.
        for flag, value, default, layers in (("--ghost-groups", self.ghost_groups, 1, ("ghost", "seq")),
                                             ("--stats-policy", self.stats_policy, "mean", ("ghost", "seq")),
                                             ("--channel-groups", self.channel_groups, 1, ("seq", "group")),
                                             ("--noise-std", self.noise_std, 0.0, ("noisy",))):
            if value != default and norm not in layers:
                raise ConfigError(f"{flag} {value} only applies to --norm {' or '.join(layers)} (got --norm {norm}); "
                                  f"drop {flag} or choose one of those layers")
        if self.micro_batch % self.layer_groups:
            raise ConfigError(f"--ghost-groups {self.ghost_groups} does not divide the micro-batch M/(n_g n_fp) = {self.micro_batch}; "
                              f"valid --ghost-groups: {_divisors(self.micro_batch)}")
        if self.model in _FEATURE_MODELS and norm in ("batch", "ghost", "seq", "noisy") and self.ghost_batch == 1:
            raise ConfigError(f"--ghost-groups/--nfp/--batch-size give a ghost batch of M/G_M = 1 sample: on {self.model}'s "
                              f"(M, C) features that normalizes a single value per slice (undefined); use G_M <= {M // 2} "
                              "(the papers use >= 4 samples per ghost batch)")
        if self.mode == "syncbn":
            if norm != "batch":
                raise ConfigError(f"--mode syncbn syncs BatchNorm statistics; it cannot be combined with --norm {norm} (use --norm batch)")
            k = self.sync_group_size or ng
            if ng % k:
                raise ConfigError(f"--sync-group-size {k} does not divide the {ng} launched processes; valid: {_divisors(ng)}")
        elif self.sync_group_size:
            raise ConfigError("--sync-group-size only applies to --mode syncbn; drop it or use --mode syncbn")
        if norm == "noisy" and self.noise_std <= 0:
            raise ConfigError("--norm noisy needs --noise-std > 0 (the papers tune 3e-5 ... 0.1; best 3e-4)")
        if self.engine == "deepspeed" and self.dtype == "float64":
            raise ConfigError("--engine deepspeed trains float32 only (it cannot all-reduce float64 gradients and keeps "
                              "float32 master weights); use --dtype float32, or --engine accelerate for float64")
        if self.engine != "deepspeed" and (self.zero_stage or self.deepspeed_config):
            raise ConfigError("--zero-stage/--deepspeed-config need --engine deepspeed; add it or drop them")
        if self.data_root is not None and self.dataset == "synthetic":
            raise ConfigError("--data-root applies to mnist, cifar10, cifar100 and imagenet; --dataset synthetic is "
                              "generated (drop --data-root, or name the --dataset it holds)")
        self._validate_mixed_precision()
        if self.buffer_sync == "allreduce" and self.mode == "syncbn":
            warnings.warn("--buffer-sync allreduce with syncbn: synced ranks already hold equal buffers", stacklevel=2)
        self._validate_papers()
        return self

    def _validate_mixed_precision(self) -> None:
        # Device-dependent rules (fp16 needs CUDA) and the launcher's own setting are checked in
        # ghostsys.run.train.resolve, where the device and the environment are known.
        if self.mixed_precision != "no" and self.dtype != "float32":
            raise ConfigError(f"--mixed-precision {self.mixed_precision} computes in low precision over float32 weights; "
                              f"use --dtype float32 with it (got --dtype {self.dtype}), or --mixed-precision no")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ConfigError("--mixed-precision fp16 needs a CUDA device (neither engine runs fp16 on CPU); "
                              "use --mixed-precision bf16 on CPU")
        if self.mixed_precision == "fp16" and self.engine == "deepspeed":
            raise ConfigError("--engine deepspeed --mixed-precision fp16 is not supported: ghostsys does not checkpoint "
                              "DeepSpeed's dynamic loss scaler; use --mixed-precision bf16, or --engine accelerate for fp16")

    def _validate_papers(self) -> None:
        """Combinations of the fields added for the papers' experiments (each field alone: RULES)."""
        if self.eval_split == "test" and self.dataset not in _WITH_TEST_SPLIT:
            raise ConfigError(f"--eval-split test needs a data set with a test split ({', '.join(_WITH_TEST_SPLIT)}); "
                              f"{self.dataset} has train and val only: use --eval-split val")
        if self.cutout and not self.augment:
            raise ConfigError(f"--cutout {self.cutout} is applied by the augmentation: add --augment (or use --cutout 0)")
        if self.landscape_lrs and self.engine == "deepspeed" and self.zero_stage > 0:
            raise ConfigError(f"--landscape-lrs needs the full synced gradient in each parameter's .grad, which ZeRO stage "
                              f"{self.zero_stage} partitions away; use --zero-stage 0 or --engine accelerate")

    def landscape_steps(self) -> list[tuple[float, bool]]:
        """The probe's step sizes as (value, relative): relative ones ('x0.5') multiply the current lr."""
        try:
            return parse_step_sizes(self.landscape_lrs)
        except ValueError as err:
            raise ConfigError(f"--landscape-lrs {self.landscape_lrs!r} {err}") from None

    def mode_warnings(self) -> list[str]:
        """Legal but probably unintended combinations, said once at start."""
        out = []
        if self.mode == "syncbn" and self.world_size == 1:
            out.append("--mode syncbn on one process is plain BatchNorm (G_M = n_fp x G_layer)")
        if self.mode == "unsynced" and self.world_size == 1:
            out.append("--mode unsynced on one process: BatchNorm over each micro-batch (G_M = n_fp)")
        if self.mode == "accumulate" and self.nfp == 1:
            out.append("--mode accumulate with --nfp 1 is plain BatchNorm over the whole per-process batch")
        if self.resolved_norm in ("ghost", "seq", "batch", "noisy") and self.ghost_batch < 4:
            out.append(f"ghost batch M/G_M = {self.ghost_batch} < 4 samples: the papers never go below 4 "
                       "(2 collapses (M, C) activations to +-1)")
        return out

    # --- identity and persistence ------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that decide the results (everything but output place and verbosity)."""
        ident = {k: v for k, v in self.to_dict().items() if k not in _NON_IDENTITY}
        ident["norm"] = self.resolved_norm  # --norm left to the mode's default is the same experiment as naming it
        if ident["mixed_precision"] == "no":  # full precision keeps the names runs had before the field existed
            del ident["mixed_precision"]
        return ident

    def run_name(self) -> str:
        """A readable, deterministic directory name: the same experiment gets the same name."""
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return (f"{self.mode}-{self.engine}-{self.model.replace(':', '_')}-{self.resolved_norm}-{self.dataset}"
                f"-M{self.batch_size}-gm{self.effective_gm}-ng{self.world_size}-nfp{self.nfp}-s{self.seed}"
                f"{'' if self.mixed_precision == 'no' else '-' + self.mixed_precision}-{digest}")

    def run_dir(self) -> Path:
        """Where this run's results go."""
        return Path(self.out) if self.out else Path("runs") / self.run_name()

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (no derived values)."""
        return dataclasses.asdict(self)

    def resolved(self) -> dict[str, Any]:
        """Fields plus the derived factorization: what config.json holds."""
        d = self.to_dict()
        d.update(norm=self.resolved_norm, effective_gm=self.effective_gm, micro_batch=self.micro_batch,
                 ghost_batch=self.ghost_batch, sync_k=self.sync_k, layer_groups=self.layer_groups,
                 factorization=self.factorization)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a dict (e.g. config.json), ignoring derived keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def pretty(self) -> str:
        """Multi-line summary printed at start."""
        lines = [f"ghostsys run: mode={self.mode} engine={self.engine} norm={self.resolved_norm} model={self.model} "
                 f"dataset={self.dataset}",
                 f"  M={self.batch_size} micro={self.micro_batch} ghost batch={self.ghost_batch}  {self.factorization}"]
        rest = {k: v for k, v in self.to_dict().items()
                if k not in ("mode", "engine", "norm", "model", "dataset", "batch_size")}
        lines.append("  " + " ".join(f"{k}={v}" for k, v in rest.items()))
        return "\n".join(lines)


_count, _switch = integer(1), kind(bool)
RULES: dict[str, Rule] = {  # one rule per RunConfig field (tests/test_bad_input.py insists); combinations: validate()
    "mode": one_of(*MODES),
    "engine": one_of(*ENGINES),
    "norm": blank_or(one_of(*NORMS)),
    "model": kind(str),  # names are checked when the model is built (ghostsys.run.prepare)
    "dataset": one_of(*DATASETS),
    "data_root": optional(existing("folder", True, "pass the folder that holds the data set files")),
    "batch_size": _count,
    "nfp": _count,
    "ghost_groups": _count,
    "channel_groups": _count,
    "noise_std": number(ge=0),
    "sync_group_size": integer(0),
    "stats_policy": one_of(*STATS_POLICIES),
    "buffer_sync": one_of(*BUFFER_SYNCS),
    "world_size": _count,
    "nprocs": integer(0),
    "epochs": _count,
    "max_steps": integer(0),
    "lr": number(gt=0),
    "momentum": number(ge=0, lt=1),
    "weight_decay": number(ge=0),
    "schedule": one_of(*SCHEDULES),
    "seed": integer(0, 2**63 - 1, "2**63 - 1"),  # torch generators take 64 bits; results load as int64
    "dtype": one_of(*DTYPES),
    "mixed_precision": one_of(*MIXED_PRECISIONS),
    "augment": _switch,
    "zero_stage": one_of(0, 1, 2),  # ZeRO 3 partitions parameters: see engines._ZERO3_WHY
    "deepspeed_config": optional(existing("file", False, "pass a DeepSpeed JSON file or drop the flag")),
    "device": device,
    "eval_every": integer(0),
    "checkpoint_every": integer(0),
    "keep_checkpoints": _count,
    "out": output_dir,
    "progress": _switch,
    "collective_timeout": number(gt=0, le=1e9),
    "preset": blank_or(lambda v: _preset_problem(v)),
    "eval_split": one_of(*EVAL_SPLITS),
    "cutout": integer(0),
    "grad_clip": number(ge=0),
    "num_workers": integer(-1),
    "landscape_lrs": lambda v: _landscape_problem(v),
    "landscape_every": _count,
}


def _preset_problem(name: Any) -> str | None:
    from ghostsys.run.presets import PRESETS  # presets build RunConfigs: imported when needed

    return None if name in PRESETS else f"is unknown; choose one of {', '.join(PRESETS)} (--preset list shows them)"


def _landscape_problem(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    try:
        parse_step_sizes(v)
    except ValueError as err:
        return str(err)
    return None


def parse_step_sizes(text: str) -> list[tuple[float, bool]]:
    """'0.1,x0.5' -> [(0.1, False), (0.5, True)]: relative ('x') entries multiply the current lr; ValueError says why not."""
    steps = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        rel = raw[:1] in ("x", "X")
        try:
            value = float(raw[1:] if rel else raw)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"has the entry {raw!r}, not a positive step size; give numbers such as 0.1,0.2,0.4 "
                             "or multiples of the current lr such as x0.5,x1,x2")
        steps.append((value, rel))
    if text.strip() and not steps:
        raise ValueError("holds no step size; e.g. 0.1,0.2,0.4")
    return steps


def field_docs(cls: type | None = None) -> dict[str, str]:
    """Each field's docstring (the attribute string below it) of a config dataclass, for --help texts."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls or RunConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())  # type: ignore[union-attr]
    return docs
