"""What a run checks and opens before it writes anything: the resolved config, the data, the bare model.

Every user-fixable problem found here is a ConfigError that names the flag and the fix. ``resolve``
runs before any process group exists; ``open_data_and_model`` runs on every rank inside ``agreed``,
which makes a refusal on any rank a refusal on all of them before the first collective.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from ghostsys.nn.models import build_model
from ghostsys.run import dist
from ghostsys.run.config import ConfigError, RunConfig
from ghostsys.run.data import BatchOrder, fetch, load_dataset
from ghostsys.run.modes import norm_factory
from ghostsys.run.rules import output_dir


def resolve(cfg: RunConfig, world_size: int) -> RunConfig:
    """Fill in the launched world size and check all the config alone decides; ConfigError names the fix.

    Runs before any process group exists, so every rank refuses the same input the same way and none
    waits for another. A parent `accelerate launch --num_processes N` that started fewer processes
    counts as --nprocs N.
    """
    cfg = cfg.replace(world_size=world_size, nprocs=cfg.nprocs or dist.requested_world() or 0).validate()
    if problem := output_dir(str(cfg.run_dir())):  # the default runs/<name> too
        raise ConfigError(f"--out {cfg.run_dir()} {problem}")
    if cfg.device.startswith("cuda"):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= have:
            raise ConfigError(f"--device {cfg.device}: this machine has {have} CUDA device(s) visible to torch "
                              f"{torch.__version__}; use --device cpu or auto" + (f", or cuda:0..{have - 1}" if have else ""))
    # A launcher's mixed precision (`accelerate launch --mixed_precision X`) that differs from --mixed-precision
    # is refused rather than adopted: the run's identity (its directory, resume) comes from the script's own
    # flags, and Accelerate would otherwise train under X while config.json said something else.
    launched = dist.launcher_mixed_precision()
    if launched is not None and launched != cfg.mixed_precision:
        raise ConfigError(f"the launcher asks for mixed precision {launched} (accelerate launch --mixed_precision "
                          f"{launched}) but the run says --mixed-precision {cfg.mixed_precision}; pass "
                          f"--mixed-precision {launched} to the script, or launch with --mixed_precision {cfg.mixed_precision}")
    if cfg.mixed_precision == "fp16" and (cfg.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("--mixed-precision fp16 needs a CUDA device (this run would be on the CPU); "
                          "use --mixed-precision bf16")
    if cfg.engine == "deepspeed":  # refuse a contradicting DeepSpeed JSON before anything is written
        from ghostsys.run.engines import validate_ds_config

        try:
            validate_ds_config(load_ds_config(cfg), cfg.micro_batch, cfg.nfp, cfg.world_size, cfg.zero_stage,
                               cfg.grad_clip, cfg.mixed_precision)
        except ValueError as err:
            raise ConfigError(f"{err}; fix --deepspeed-config {cfg.deepspeed_config} or drop the keys") from None
    return cfg


T = TypeVar("T")


def agreed(fn: Callable[[], T]) -> T:
    """fn() on every rank; a ConfigError on any rank is raised on all of them, so no rank waits for one that gave up.

    Collective: every rank calls it, and it must come before any other collective that a failing
    rank would skip.
    """
    try:
        out, mine = fn(), None
    except ConfigError as err:
        out, mine = None, str(err)
    first = dist.first_error(mine)
    if first is not None:
        raise ConfigError(first)
    return out  # type: ignore[return-value]


def open_data_and_model(cfg: RunConfig) -> tuple[Any, Any, dict, BatchOrder, nn.Module]:
    """The data sets, the batch order and the seeded bare model; ConfigError naming the flag if the input can't give them."""
    try:
        # eval_split test: the papers' §3.1 protocol, train on the whole training set and evaluate on the test set.
        train_set, val_set, meta = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, eval_split=cfg.eval_split,
                                                val_fraction=0.0 if cfg.eval_split == "test" else 0.1)
    except (OSError, ValueError) as err:  # missing or unreadable files under --data-root
        where = f" --data-root {cfg.data_root}" if cfg.data_root else ""
        raise ConfigError(f"--dataset {cfg.dataset}{where}: {err}") from None
    if cfg.batch_size > len(train_set):
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(train_set)} training samples of "
                          f"{cfg.dataset}; use at most {len(train_set)}")
    order = BatchOrder(len(train_set), cfg.batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    counts: list[int] = []
    refused: list[ValueError] = []
    make = norm_factory(cfg)

    def norm(num_features: int, dim: int) -> nn.Module:
        counts.append(num_features)
        try:
            return make(num_features, dim)
        except ValueError as err:  # e.g. channels not divisible by G_C: go on, to name every layer's count
            refused.append(err)
            return nn.Identity()

    try:
        model = build_model(cfg.model, num_classes=meta["num_classes"], in_shape=tuple(meta["input_shape"]), norm=norm)
    except ValueError as err:  # an unknown name, a depth that is not 6n+2, ...
        why = str(err)  # build_model's messages may already name the flag
        raise ConfigError(why if why.startswith("--model") else f"--model {cfg.model}: {why}") from None
    if refused and cfg.resolved_norm in ("seq", "group") and any(c % cfg.channel_groups for c in counts):
        raise ConfigError(f"--channel-groups {cfg.channel_groups} does not divide the channel counts of {cfg.model}'s "
                          f"norm layers ({', '.join(map(str, sorted(set(counts))))}); valid --channel-groups: "
                          f"{[d for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts)]}")
    if refused:
        raise refused[0]
    _probe(model, train_set, cfg, meta)
    return train_set, val_set, meta, order, model


def _probe(model: nn.Module, train_set: Any, cfg: RunConfig, meta: dict) -> None:
    """One eval-mode forward of two training samples, so a model that cannot take the data is refused now.

    Eval mode touches no buffer, and the forked RNG leaves every random number of the run as it was.
    """
    x, _ = fetch(train_set, torch.arange(min(2, len(train_set))))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError, AssertionError) as err:  # what shape mismatches raise (ViT asserts its size)
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--model {cfg.model} cannot take --dataset {cfg.dataset} input of shape "
                          f"{list(meta['input_shape'])} ({why}); choose a model for that input size") from None
    finally:
        model.train()


def load_ds_config(cfg: RunConfig) -> dict | None:
    """The user's DeepSpeed JSON (None without --deepspeed-config); ConfigError if it is not a JSON object."""
    if not cfg.deepspeed_config:
        return None
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--deepspeed-config {path} cannot be read ({err}); pass a DeepSpeed JSON file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed-config {path} is not valid JSON ({err}); fix the file or drop the flag") from None
    if not isinstance(user, dict) or not isinstance(user.get("zero_optimization", {}), dict):
        raise ConfigError(f"--deepspeed-config {path} must hold a JSON object whose zero_optimization, if any, is "
                          "an object (a DeepSpeed config); fix the file or drop the flag")
    return user
