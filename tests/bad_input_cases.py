"""Bad input for the entry scripts: the invalid values of EVERY config field, as data.

Read by tests/test_bad_input.py (in-process, the contract of tests/_refusal.py for each case) and by
tests/bad_input_table.py (the same cases run as a user would, for a before/after table). This file
imports nothing from ghostsys, so the table script can run it against any checkout.

Each table maps a config field to either a list of cases or, for a field that has no invalid value a
user can type, a string saying why. A case is ``(argv, fix)``: the error line must name the field's
flag (``--batch-size`` for ``batch_size``) and contain ``fix``. ``{F}`` in an argument stands for a
folder of prepared files outside the working directory (see ``FIXTURES``). To cover a new field, add
``"my_field": [(["--my-field", "<bad value>"], "<words of the fix>"), ...]`` (argparse's own refusal of a
malformed value counts: its line names the flag); tests/test_bad_input.py fails until every field of
RunConfig and CheckConfig has an entry.
"""

from __future__ import annotations

import json
from pathlib import Path

Case = tuple[list[str], str]

# Files the cases point at, written fresh into {F} for every case (never inside the working directory).
FIXTURES: dict[str, str | None] = {
    "a_file": "not a folder\n",
    "empty/": None,
    "bad.json": "{not json",
    "list.json": "[1, 2]",
    "conflict.json": json.dumps({"gradient_accumulation_steps": 3}),
    "other_run/config.json": json.dumps({"nfp": 2}),  # a run directory of another experiment
}


def write_fixtures(root: Path) -> None:
    """Create FIXTURES under `root` (a folder for names ending in '/')."""
    for name, text in FIXTURES.items():
        path = root / name
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def fill(argv: list[str], fixtures: Path) -> list[str]:
    """argv with {F} replaced by the fixtures folder."""
    return [a.replace("{F}", str(fixtures)) for a in argv]


RUN_CASES: dict[str, list[Case] | str] = {
    "mode": [(["--mode", "warp"], "choose one of"),
             (["--mode", "layer", "--norm", "batch"], "--norm ghost or seq")],
    "engine": [(["--engine", "horovod"], "choose one of")],
    "norm": [(["--norm", "layernorm"], "choose one of"),
             (["--mode", "syncbn", "--norm", "ghost"], "use --norm batch")],
    "model": [(["--model", "resnet57"], "6n+2"),
              (["--model", "wrn27_10"], "6n+4"),
              (["--model", "nosuchmodel"], "valid choices"),
              (["--model", "tv:nosuchmodel"], "list_models"),
              (["--model", "timm:nosuchmodel"], "list_models"),
              (["--model", ""], "valid choices"),
              (["--model", "tv:squeezenet1_1"], "input size")],  # builds, but cannot take 16x16 images
    "dataset": [(["--dataset", "svhn"], "choose one of")],
    "data_root": [(["--dataset", "cifar10"], "--data-root dir"),
                  (["--dataset", "cifar10", "--data-root", "/nonexistent"], "existing folder"),
                  (["--dataset", "mnist", "--data-root", "{F}/a_file"], "existing folder"),
                  (["--dataset", "cifar10", "--data-root", "{F}/empty"], "not found"),
                  (["--data-root", "{F}/empty"], "drop --data-root")],
    "batch_size": [(["--batch-size", "0"], ">= 1"),
                   (["--batch-size", "-8"], ">= 1"),
                   (["--batch-size", "100000"], "training samples"),
                   (["--batch-size", "abc"], "invalid int")],
    "nfp": [(["--nfp", "0"], ">= 1"),
            (["--nfp", "3"], "valid --nfp")],
    "ghost_groups": [(["--ghost-groups", "0"], ">= 1"),
                     (["--mode", "layer", "--ghost-groups", "5"], "valid --ghost-groups"),
                     (["--ghost-groups", "4"], "only applies to --norm ghost or seq"),
                     (["--model", "simplenet", "--mode", "layer", "--ghost-groups", "256"], "single value")],
    "channel_groups": [(["--channel-groups", "0"], ">= 1"),
                       (["--norm", "seq", "--channel-groups", "5"], "valid --channel-groups"),
                       (["--norm", "group", "--channel-groups", "3"], "valid --channel-groups"),
                       (["--channel-groups", "4"], "only applies to --norm seq or group")],
    "noise_std": [(["--norm", "noisy", "--noise-std", "-1"], ">= 0"),
                  (["--norm", "noisy", "--noise-std", "nan"], "finite"),
                  (["--norm", "noisy", "--noise-std", "inf"], "finite"),
                  (["--norm", "noisy"], "--noise-std > 0"),
                  (["--noise-std", "0.1"], "only applies to --norm noisy")],
    "sync_group_size": [(["--sync-group-size", "-1"], ">= 0"),
                        (["--mode", "syncbn", "--sync-group-size", "3"], "valid"),
                        (["--sync-group-size", "2"], "only applies to --mode syncbn")],
    "stats_policy": [(["--stats-policy", "median"], "choose one of"),
                     (["--stats-policy", "sequential"], "only applies to --norm ghost or seq")],
    "buffer_sync": [(["--buffer-sync", "never"], "choose one of")],
    "world_size": "not a flag: filled in from the launcher (RunConfig(world_size=0) is refused in tests/test_config.py)",
    "nprocs": [(["--nprocs", "-1"], ">= 0"),
               (["--nprocs", "2"], "ACCELERATE_USE_CPU=1")],
    "epochs": [(["--epochs", "0"], ">= 1"),
               (["--epochs", "-1"], ">= 1")],
    "max_steps": [(["--max-steps", "-5"], ">= 0"),
                  (["--max-steps", "1.5"], "invalid int")],
    "lr": [(["--lr", "-1"], "> 0"),
           (["--lr", "0"], "> 0"),
           (["--lr", "nan"], "finite"),
           (["--lr", "inf"], "finite"),
           (["--lr", "abc"], "invalid float")],
    "momentum": [(["--momentum", "-0.5"], "[0, 1)"),
                 (["--momentum", "1"], "[0, 1)"),
                 (["--momentum", "nan"], "finite")],
    "weight_decay": [(["--weight-decay", "-1"], ">= 0"),
                     (["--weight-decay", "nan"], "finite"),
                     (["--weight-decay", "inf"], "finite")],
    "schedule": [(["--schedule", "linear"], "choose one of")],
    "seed": [(["--seed", "-1"], "0 <="),
             (["--seed", str(2**63)], "0 <="),
             (["--seed", "x"], "invalid int")],
    "dtype": [(["--dtype", "float16"], "choose one of"),
              (["--engine", "deepspeed", "--dtype", "float64"], "--dtype float32")],
    "mixed_precision": [(["--mixed-precision", "fp8"], "choose one of"),
                        (["--mixed-precision", "fp16"], "bf16"),  # no CUDA here (and DeepSpeed fp16 refused)
                        (["--dtype", "float64", "--mixed-precision", "bf16"], "--dtype float32")],
    "augment": [(["--augment=yes"], "ignored explicit argument")],
    "zero_stage": [(["--zero-stage", "2"], "--engine deepspeed"),
                   (["--engine", "deepspeed", "--zero-stage", "3"], "choose one of 0, 1, 2"),
                   (["--engine", "deepspeed", "--zero-stage", "-1"], "choose one of 0, 1, 2")],
    "deepspeed_config": [(["--engine", "deepspeed", "--deepspeed-config", "{F}/missing.json"], "existing"),
                         (["--engine", "deepspeed", "--deepspeed-config", "{F}/bad.json"], "not valid JSON"),
                         (["--engine", "deepspeed", "--deepspeed-config", "{F}/list.json"], "JSON object"),
                         (["--engine", "deepspeed", "--nfp", "2", "--deepspeed-config", "{F}/conflict.json"],
                          "gradient_accumulation_steps"),
                         (["--deepspeed-config", "{F}/conflict.json"], "--engine deepspeed")],
    "device": [(["--device", "tpu"], "choose auto, cpu or cuda"),
               (["--device", "cuda:x"], "choose auto, cpu or cuda")],  # `--device cuda` on a CPU machine: below
    "eval_every": [(["--eval-every", "-3"], ">= 0")],
    "checkpoint_every": [(["--checkpoint-every", "-1"], ">= 0")],
    "keep_checkpoints": [(["--keep-checkpoints", "0"], ">= 1"),
                         (["--keep-checkpoints", "-1"], ">= 1")],
    "out": [(["--out", "{F}/a_file"], "is a file"),
            (["--out", "{F}/a_file/run"], "is a file"),
            (["--out", "{F}/other_run"], "different configuration")],
    "progress": [(["--progress=no"], "ignored explicit argument")],
    "collective_timeout": [(["--collective-timeout", "0"], "> 0"),
                           (["--collective-timeout", "-1"], "> 0"),
                           (["--collective-timeout", "nan"], "finite"),
                           (["--collective-timeout", "inf"], "finite")],
    "preset": [(["--preset", "cifar11"], "choose one of")],
    "eval_split": [(["--eval-split", "train"], "choose one of"),
                   (["--eval-split", "test"], "use --eval-split val")],  # synthetic has no test split
    "cutout": [(["--cutout", "-1"], ">= 0"),
               (["--cutout", "8"], "add --augment")],
    "grad_clip": [(["--grad-clip", "-1"], ">= 0"),
                  (["--grad-clip", "nan"], "finite")],
    "num_workers": [(["--num-workers", "-2"], ">= -1")],
    "landscape_lrs": [(["--landscape-lrs", "0.1,abc"], "not a positive step size"),
                      (["--landscape-lrs", "-0.1"], "not a positive step size"),
                      (["--landscape-lrs", ","], "holds no step size"),
                      (["--engine", "deepspeed", "--zero-stage", "1", "--landscape-lrs", "0.1"], "--zero-stage 0")],
    "landscape_every": [(["--landscape-every", "0"], ">= 1")],
}

# Only invalid where CUDA is missing (the table script and the tests add it there).
NO_CUDA_CASES: dict[str, list[Case]] = {"device": [(["--device", "cuda"], "--device cpu")]}

# Not tied to one field: argparse's own refusals; the line must name the offending argument.
GENERAL_CASES: list[tuple[list[str], str]] = [
    (["--no-such-flag"], "--no-such-flag"),
    (["--lr"], "--lr"),
    (["extra-positional"], "extra-positional"),
]

CHECK_CASES: dict[str, list[Case] | str] = {
    "model": [(["--model", "nosuchmodel"], "valid choices"),
              (["--model", "resnet57"], "6n+2")],
    "norm": [(["--norm", "ghost"], "choose one of batch, seq")],
    "channel_groups": [(["--channel-groups", "0"], ">= 1"),
                       (["--norm", "seq", "--channel-groups", "5"], "valid --channel-groups")],
    "batch_size": [(["--batch-size", "0"], ">= 1"),
                   (["--batch-size", "100000"], "training samples")],
    "target_gm": [(["--target-gm", "1"], ">= 2"),
                  (["--target-gm", "3"], "no factorization")],
    "steps": [(["--steps", "0"], ">= 1")],
    "seed": [(["--seed", "-1"], "0 <=")],
    "dtype": [(["--dtype", "float16"], "choose one of"),
              (["--dtype", "bf16-autocast", "--engine", "deepspeed"], "--engine accelerate")],
    "engine": [(["--engine", "horovod"], "choose one of")],
    "zero_stage": [(["--zero-stage", "3"], "choose one of 0, 1, 2"),
                   (["--zero-stage", "1"], "--engine deepspeed")],
    "sync_group_size": [(["--sync-group-size", "-1"], ">= 0"),
                        (["--sync-group-size", "3"], "valid")],
    "modes": [(["--modes", "warp"], "choose from"),
              (["--modes", "syncbn"], "no factorization")],
    "lr": [(["--lr", "nan"], "finite"), (["--lr", "-1"], "> 0")],
    "momentum": [(["--momentum", "1"], "[0, 1)")],
    "weight_decay": [(["--weight-decay", "-1"], ">= 0")],
    "inject": [(["--inject", "bogus"], "choose one of"),
               (["--inject", "interleaved"], "launch 2")],
    "out": [(["--out", "{F}/a_file"], "is a file")],
}

# The 19 bad inputs of issue 7 (part 2), as a user typed them.
ISSUE_EXAMPLES: list[list[str]] = [
    ["--lr", "-1"], ["--momentum", "-0.5"], ["--weight-decay", "-1"], ["--model", "resnet57"],
    ["--model", "tv:nosuchmodel"], ["--model", "nosuchmodel"], ["--norm", "seq", "--channel-groups", "5"],
    ["--batch-size", "100000"], ["--device", "tpu"],
    ["--lr", "nan"], ["--max-steps", "-5"], ["--seed", "-1"], ["--eval-every", "-3"], ["--checkpoint-every", "-1"],
    ["--keep-checkpoints", "0"], ["--collective-timeout", "0"],
    ["--dataset", "cifar10", "--data-root", "/nonexistent"], ["--dataset", "cifar10"],
    ["--dataset", "mnist", "--data-root", "{F}/empty"],
]


def run_combinations(cuda_available: bool = False) -> list[list[str]]:
    """Every bad launch/run.py argv above, each once, issue examples first."""
    seen: list[list[str]] = []
    table = [c for cases in RUN_CASES.values() if not isinstance(cases, str) for c in cases]
    extra = [] if cuda_available else [c for cases in NO_CUDA_CASES.values() for c in cases]
    for argv in [*ISSUE_EXAMPLES, *(a for a, _ in table + extra + GENERAL_CASES)]:
        if argv not in seen:
            seen.append(argv)
    return seen
