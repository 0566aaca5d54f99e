"""A small real reproduction of the papers on this CPU: ``python -m ghostsys.study.reproduce``.

Data: scikit-learn's 8x8 digits (real, offline; 1797 images: a fixed stratified 359-image test split,
the rest for training, of which a seeded 10% is the validation hold-out while tuning). Model: the
papers' SimpleNet (64 -> 512 -> 300 -> 10, norm after each hidden layer). Optimization as the papers'
MNIST experiment ([B] App. B.1): plain SGD at lr 0.4, no momentum, no weight decay, constant lr;
global batch M = 256 (so ghost batches M/G_M >= 4 need G_M <= 64). With 1437 training images an
epoch is only 5 steps: 30 epochs = 150 updates, long enough for every norm to reach ~100% training
accuracy (BatchNorm within ~20 steps, no normalization within ~100) and for test accuracy to settle.

Protocol, as the papers':
1. tune SeqNorm on the validation split by the sequential strategy (ghostsys.study.tuning): stage 1
   GhostNorm over G_M in {2, 4, ..., 64}, stage 2 SeqNorm over G_C in {1, 2, 4} (G_C must divide both
   hidden widths 512 and 300) at the G_M stage 1 picks;
2. train every norm on the whole training split and report test accuracy, mean +- std over seeds:
   BatchNorm, GhostNorm at G_M 4 ... 64 (ghost batches 64 ... 4), SeqNorm at the tuned (G_C, G_M),
   GroupNorm at the tuned G_C, no normalization;
3. the loss-landscape probe ([B] App. B.2: step sizes 0.1 ... 0.8 along the gradient, every step) for
   BatchNorm, GhostNorm (G_M 32: 8 samples per ghost batch) and no normalization, on the first
   ``--probe-seeds`` seeds; the band is max - min of those losses. (The probe leaves training
   bit-identical, so probed and unprobed seeds pool in the accuracy table.)

Every stage is a sweep table (CSV, ghostsys.study.sweep) written under ``--out``, and each row runs
in this process through ghostsys.run.train.train with its results in ``<out>/<table>/<row_id>/``, so
the same tables also run elsewhere (``launch/sweep.py run``, SLURM) and a rerun skips finished runs.
Writes ``<out>/summary.md`` (the tables below) and ``<out>/landscape.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ghostsys.run.config import RunConfig
from ghostsys.study import tuning
from ghostsys.study.sweep import make_row, read_table, write_table

BASE = {"dataset": "digits", "model": "simplenet", "batch_size": 256, "epochs": 30, "lr": 0.4, "momentum": 0.0,
        "weight_decay": 0.0, "schedule": "constant", "progress": False}
PROBE_LRS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
STAGE1_GM = (2, 4, 8, 16, 32, 64)
STAGE2_GC = (1, 2, 4)
FINAL_GM = (4, 8, 16, 32, 64)
LANDSCAPE_GM = 32  # 8 samples per ghost batch, as the papers' best MNIST GhostNorm (G_M 64 of M 512)


def run_table(table: Path, results: Path, log: Any = print) -> None:
    """Run every row of `table` in this process (skipping finished ones); results in results/<row_id>/."""
    from ghostsys.run.presets import apply as apply_preset
    from ghostsys.run.train import train
    from ghostsys.study.landscape import LandscapeProbe

    rows = read_table(table)
    for i, row in enumerate(rows, 1):
        flags = tuning.typed_flags(row)
        cfg = apply_preset(RunConfig(**flags), set(flags)).replace(out=str(results / row["row_id"]))
        probes = [LandscapeProbe(cfg.landscape_steps(), every=cfg.landscape_every)] if cfg.landscape_lrs else []
        t0 = time.perf_counter()
        summary = _quiet(lambda: train(cfg, callbacks=probes))
        log(f"[{table.stem} {i}/{len(rows)}] {row['row_id']}: {summary.get('eval_split', 'val')} acc "
            f"{summary['eval_acc']:.4f} ({time.perf_counter() - t0:.1f} s)")


def _quiet(fn: Any) -> Any:
    """Run fn with the loop's per-run banner silenced (this script prints one line per run)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _rows(variants: Sequence[tuple[str, dict]], seeds: Sequence[int]) -> list[dict]:
    return [make_row({**BASE, **flags, "seed": s}, name=f"{name}-s{s}") for name, flags in variants for s in seeds]


def final_variants(gm: int, gc: int, probe: bool) -> list[tuple[str, dict]]:
    """The test-protocol runs: every norm; with `probe`, the landscape probe on BatchNorm, GhostNorm and none."""
    test = {"eval_split": "test"}
    lp = {"landscape_lrs": PROBE_LRS, "landscape_every": 1} if probe else {}
    v = [("batch", {**test, **lp, "mode": "accumulate", "norm": "batch"})]
    v += [(f"ghost-gm{g}", {**test, **(lp if g == LANDSCAPE_GM else {}), "mode": "layer", "norm": "ghost",
                            "ghost_groups": g}) for g in FINAL_GM]
    v += [(f"seq-gc{gc}-gm{gm}", {**test, "mode": "layer", "norm": "seq", "channel_groups": gc, "ghost_groups": gm}),
          (f"group-gc{gc}", {**test, "mode": "accumulate", "norm": "group", "channel_groups": gc}),
          ("none", {**test, **lp, "mode": "accumulate", "norm": "none"})]
    return v


def _label(rec: dict) -> str:
    norm = rec["norm"]
    if norm == "ghost":
        return f"GhostNorm (G_M={rec['effective_gm']}, {rec['ghost_batch']}/group)"
    if norm == "seq":
        return f"SeqNorm (G_C={rec['channel_groups']}, G_M={rec['effective_gm']})"
    if norm == "group":
        return f"GroupNorm (G_C={rec['channel_groups']})"
    return {"batch": "BatchNorm (G_M=1)", "none": "no normalization"}[norm]


def accuracy_table(results: Path) -> Any:
    """Test accuracy per norm: n, mean and std (ddof=1) over seeds, in percent."""
    from ghostsys.study.results import load

    df = load([results])
    df = df[df["status"] == "complete"].copy()
    from scipy.stats import ttest_rel

    df["label"] = [_label(r) for r in df.to_dict("records")]
    df["acc"] = 100 * df["eval_acc"].astype(float)
    df["_order"] = df["norm"].map({"batch": 0, "ghost": 1, "seq": 2, "group": 3, "none": 4})
    df = df.sort_values(["_order", "effective_gm"], kind="stable")
    out = df.groupby("label", sort=False)["acc"].agg(n="size", mean="mean", std="std").reset_index()
    # Paired by seed against BatchNorm: a seed fixes the initial weights and the batch order for every norm.
    per_seed = df.pivot_table(index="seed", columns="label", values="acc")
    bn = _label({"norm": "batch"})
    diff, pval = [], []
    for label in out["label"]:
        both = per_seed[[bn, label]].dropna() if bn in per_seed and label != bn else None
        ok = both is not None and len(both) >= 2 and (both[label] - both[bn]).std() > 0
        diff.append((both[label] - both[bn]).mean() if both is not None else math.nan)
        pval.append(ttest_rel(both[label], both[bn]).pvalue if ok else math.nan)
    return out.assign(diff_vs_bn=diff, paired_p=pval)


def band_table(results: Path) -> tuple[Any, Any]:
    """Loss-landscape bands per probed norm: per-step median over seeds, and the mean band by thirds of training."""
    from ghostsys.study.results import load, load_metrics

    runs = load([results])
    m = load_metrics([results])
    m = m[m["landscape_min"].notna()] if "landscape_min" in m else m.iloc[0:0]
    labels = {r["run_dir"]: _label(r) for r in runs.to_dict("records")}
    m = m.assign(label=m["run_dir"].map(labels), band=m["landscape_max"] - m["landscape_min"])
    per_step = m.groupby(["label", "step"])[["landscape_min", "landscape_max", "band"]].median().reset_index()
    steps = int(m["step"].max()) if len(m) else 0
    m["phase"] = ["early" if s <= steps / 3 else "middle" if s <= 2 * steps / 3 else "late" for s in m["step"]]
    phases = m.pivot_table(index="label", columns="phase", values="band", aggfunc="mean")
    return per_step, phases.reindex(columns=[c for c in ("early", "middle", "late") if c in phases.columns])


def plot_bands(per_step: Any, path: Path) -> None:
    """The papers' Fig. 2 for this run: per norm, the band between min and max probe loss over steps (log scale)."""
    from ghostsys.study.plots import landscape_bands

    landscape_bands(per_step, path, label="label", title="digits, SimpleNet, M=256")


def main(argv: Sequence[str] | None = None) -> int:
    """Tune, train, summarize; prints the tables and writes summary.md."""
    p = argparse.ArgumentParser(prog="python -m ghostsys.study.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reproduce", help="where tables, runs and the summary go (default: runs/reproduce)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per configuration of the test table (default: 10)")
    p.add_argument("--tune-seeds", type=int, default=5, help="seeds per tuning candidate (default: 5)")
    p.add_argument("--probe-seeds", type=int, default=5, help="of those, seeds that run the landscape probe (default: 5)")
    p.add_argument("--well-within", type=float, default=0.5, help="stage 1 'performs well' in accuracy points (default 0.5)")
    p.add_argument("--tie-within", type=float, default=0.0, help="ties in accuracy points (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)")
    args = p.parse_args(argv)
    if args.seeds < 2 or args.tune_seeds < 2:
        print("error: --seeds and --tune-seeds must be >= 2 (a spread needs two runs)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()

    s1 = write_table(_rows([(f"ghost-gm{g}", {"mode": "layer", "norm": "ghost", "ghost_groups": g}) for g in STAGE1_GM],
                           range(args.tune_seeds)), out / "tables" / "stage1.csv")
    run_table(s1, out / "stage1")
    stats1 = tuning.candidate_stats(tuning.table_results(s1, out / "stage1"))
    pick_gm = tuning.select_gm(stats1, args.well_within, args.tie_within)
    s2 = write_table(_rows([(f"seq-gc{gc}-gm{pick_gm.value}", {"mode": "layer", "norm": "seq", "channel_groups": gc,
                                                               "ghost_groups": pick_gm.value}) for gc in STAGE2_GC],
                           range(args.tune_seeds)), out / "tables" / "stage2.csv")
    run_table(s2, out / "stage2")
    stats2 = tuning.candidate_stats(tuning.table_results(s2, out / "stage2"))
    pick_gc = tuning.select_best(stats2, "gc", args.tie_within)

    # The probe never changes a run's results (tests/test_landscape.py), so probed and unprobed seeds pool.
    seeds = range(args.seeds)
    final = write_table(_rows(final_variants(pick_gm.value, pick_gc.value, True), seeds[:args.probe_seeds])
                        + _rows(final_variants(pick_gm.value, pick_gc.value, False), seeds[args.probe_seeds:]),
                        out / "tables" / "test.csv")
    run_table(final, out / "test")
    acc = accuracy_table(out / "test")
    per_step, phases = band_table(out / "test")
    plot_bands(per_step, out / "landscape.png")

    lines = [
        "# digits / SimpleNet reproduction (python -m ghostsys.study.reproduce)", "",
        f"Tuning (validation split, {args.tune_seeds} seeds): stage 1 {pick_gm.reason}; "
        f"stage 2 at G_M {pick_gm.value}: {pick_gc.reason}.", "",
        "Stage 1 (GhostNorm, validation accuracy %):", "", _plain(stats1.drop(columns=["candidate", "gc"])), "",
        "Stage 2 (SeqNorm, validation accuracy %):", "", _plain(stats2.drop(columns=["candidate"])), "",
        f"Test accuracy % ({args.seeds} seeds, mean and sample std; test split of 359 images: 1 image = 0.28 points; "
        "diff_vs_bn and paired_p: the mean per-seed difference to BatchNorm and its paired t-test p-value):", "",
        _plain(acc.assign(paired_p=acc["paired_p"].map(lambda v: f"{v:.3f}"))), "",
        f"Loss-landscape band (max - min of the loss at eta 0.1 ... 0.8 along -g; mean over steps and the "
        f"{min(args.probe_seeds, args.seeds)} probed seeds; thirds of the {BASE['epochs'] * 5} steps):", "",
        _plain(phases.reset_index(), 3), "",
        f"wall time {time.perf_counter() - t0:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def _plain(df: Any, digits: int = 2) -> str:
    """A fixed-width table (no tabulate dependency)."""
    return df.to_string(index=False, float_format=lambda v: f"{v:.{digits}f}" if math.isfinite(v) else str(v))


if __name__ == "__main__":
    sys.exit(main())
