#!/usr/bin/env python
"""Profile the modes: throughput, step time, memory, NVML and the collectives' share, across device counts.

    python launch/profile.py --modes unsynced,syncbn --world-sizes 1,2 --steps 12 --out runs/profile
    python launch/profile.py --modes accumulate --nfps 1,2,4,8 --world-sizes 1 --mixed-precision no,bf16
    torchrun --nproc_per_node 2 launch/profile.py --modes syncbn --world-sizes 2 --scaling strong

Started by hand it sweeps: every mode x engine x world size x n_fp x precision runs through its real
launcher (accelerate launch / deepspeed / torchrun) as a subprocess, then scaling efficiency is added
and a table printed. Started under a launcher it profiles the one run its flags select. Each run is a
run directory under --out that ghostsys.study.load() reads; --out/profile.csv holds the main columns.
"""

import os
import sys

if __name__ == "profile":
    # Every launch/ script runs with launch/ as sys.path[0], so anything importing the standard library's
    # `profile` (cProfile does; torch._dynamo and deepspeed import cProfile) lands on this file. Stand in
    # for it: put the real module in sys.modules, which is what the import statement then returns.
    import importlib.machinery
    import importlib.util

    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec(
        "profile", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    _stdlib_profile = importlib.util.module_from_spec(_spec)
    sys.modules["profile"] = _stdlib_profile
    _spec.loader.exec_module(_stdlib_profile)
else:
    # Run as a script, drop this folder from sys.path for the same reason (nothing here imports a sibling).
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)

    from ghostsys.profile.sweep import ProfileConfig
    from ghostsys.run.cli import build_parser, config_from_args, exit_process, guarded

    def main(argv: list[str] | None = None) -> int:
        """Entry point: returns the process exit code."""
        p, _ = config_from_args(build_parser("launch/profile.py", __doc__, ProfileConfig), argv, ProfileConfig)
        code = 0

        def go() -> None:
            nonlocal code
            from ghostsys.run import dist

            if dist.under_launcher():
                from ghostsys.profile.sweep import profile_one

                profile_one(p, dist.launched_world()[1])
            else:
                from ghostsys.profile.driver import run_sweep

                code = run_sweep(p.validate(), __file__)

        return guarded(go) or code

    if __name__ == "__main__":
        exit_process(main)
