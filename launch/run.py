#!/usr/bin/env python
"""Train one ghostsys run.

    accelerate launch launch/run.py --mode accumulate --nfp 8
    torchrun --nproc_per_node 2 launch/run.py --mode unsynced --nfp 2 --nprocs 2
    deepspeed --num_gpus 2 launch/run.py --engine deepspeed --mode unsynced --nprocs 2
    python launch/run.py --preset mnist-simplenet --data-root DIR     # a setup of the papers (--preset list)

Parse -> config (preset filled in, explicit flags win) -> ghostsys.run.train.train -> results in --out
(default runs/<name>). Bad input: one `error: ...` line naming the flag and the fix, exit 2, nothing written.
"""

import sys

from ghostsys.run import presets
from ghostsys.run.cli import build_parser, config_from_args, exit_process, guarded
from ghostsys.run.train import train


def callbacks(cfg) -> list:
    """The instruments the config asks for (the loss-landscape probe)."""
    if not cfg.landscape_lrs:
        return []
    from ghostsys.study.landscape import LandscapeProbe

    return [LandscapeProbe(cfg.landscape_steps(), every=cfg.landscape_every)]


def parse(argv: list[str]):
    """argv -> the run config with its preset filled in (flags given explicitly win); not yet validated."""
    parser = build_parser("launch/run.py", __doc__.split("\n\n")[0])
    cfg, _ = config_from_args(parser, argv)
    if cfg.preset == "list":
        return cfg
    return presets.apply(cfg, presets.explicit_fields(parser, argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def run() -> None:
        cfg = parse(argv)
        if cfg.preset == "list":
            print(presets.describe(), end="")
            return
        train(cfg, callbacks=callbacks(cfg))

    return guarded(run)


if __name__ == "__main__":
    exit_process(main)
