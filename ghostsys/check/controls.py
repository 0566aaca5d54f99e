"""What must differ, measured: the negative controls and the running-statistics statements of a check.

The controls compare full BatchNorm (G_M = 1) with the target G_M in the float64 reference: the
first-step logits and gradients must differ by > 100x their tolerance, or the checker could pass by
comparing a thing with itself (at bf16, where 100x is out of reach for any tolerance, they are
resolution statements, and at least one must still differ by more than its tolerance). The weights
and buffers after k steps get the same control as a *resolution* statement: below float64 a long,
chaotic trajectory can make the tolerance so wide that even a change of G_M hides in it, and the
report then says so in words rather than pretending.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ghostsys.check import reference as ref
from ghostsys.check.report import Row, Tolerance, compare

if TYPE_CHECKING:  # the checker imports this module; these names are only annotations here
    from ghostsys.check.checker import CheckConfig, Result

_PER_STEP = partial(ref.mean_of_groups, per="step")  # one EMA update per step: G_M = 1 and G_M = 8 count alike


def control_rows(c: "CheckConfig", first: "Result") -> list[Row]:
    """Negative controls: full BatchNorm (G_M = 1) against the target G_M (the first variant's groups)."""
    model, batches = first.inputs
    full = ref.reference_steps(model, batches, groups=ref.ghost_group_indices(c.batch_size, 1, 1, 1), lr=c.lr,
                               momentum=c.momentum, weight_decay=c.weight_decay, k_steps=c.steps)
    target, d = first.trace, first.derivation
    meta = dict(mode="control", engine="reference", factorization=f"G_M=1 vs G_M={c.target_gm}")
    after = f"after {c.steps} steps; a resolution statement below float64"
    # Where no tolerance can stay CONTROL_FACTOR below a change of G_M (bf16), the first step is a
    # resolution statement too: stated with its margin, never passed off as a clear control.
    hard = d.precision.hard_controls
    first_step = {} if hard else dict(resolution=True, note=f"a resolution statement at {d.precision.name}")
    return [compare("logits", full.logits, target.logits, d.tolerance("logits"), control=True, **first_step, **meta),
            compare("grads", full.grads, target.grads, d.tolerance("grads"), control=True, **first_step, **meta),
            compare("weights", full.weights, target.weights, d.tolerance("weights"), control=True, resolution=True,
                    note=after, **meta),
            compare("buffers", full.buffers(_PER_STEP), target.buffers(_PER_STEP),
                    d.tolerance("buffers", lambda tr: tr.buffers(_PER_STEP),
                                label="buffers: mean of all groups, once per step"),
                    control=True, resolution=True, note=f"policy: mean of groups once per step; {after}", **meta)]


def _find(results: list["Result"], **want: Any) -> "Result | None":
    for r in results:
        if all(getattr(r.variant, k) == v for k, v in want.items()):
            return r
    return None


def _two_runs(a: Tolerance, b: Tolerance | None = None) -> Tolerance:
    """Tolerance for comparing two runs at this precision with each other: each may be off by its own."""
    t = a if b is None or a.tol >= b.tol else b
    return t.widened(2, "both sides are runs at this precision")


def buffer_facts(c: "CheckConfig", results: list["Result"], world: int) -> list[Row]:
    """The running-statistics section: plain-word statements, each backed by a measured comparison.

    A statement that says two things AGREE is a normal row (error within tolerance); one that says
    they DIFFER must differ by > 100x tolerance: failing either fails the check, except that below
    float64 a difference this precision cannot resolve is reported as such ("cannot tell apart").
    """
    rows: list[Row] = []
    meta = dict(engine=c.engine, quantity="buffers")

    def fact(text: str, got: dict, expected: dict, r: "Result", agree: bool, tol: Tolerance) -> None:
        row = compare(text, got, expected, tol, mode=r.variant.mode, control=not agree, resolution=True,
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
                 seq.got.buffers[0], acc.got.buffers[0], seq, True, _two_runs(seq.buffer_tols[0], acc.buffer_tols[0]))
        if mean and acc:
            fact("the `mean` layer policy does NOT give accumulation's running statistics (one EMA step per "
                 "forward instead of one per group)", mean.got.buffers[0], acc.got.buffers[0], mean, False,
                 _two_runs(mean.buffer_tols[0], acc.buffer_tols[0]))
        return rows
    engine_run = _find(results, g_layer=1, k=1, buffer_sync="engine")
    if engine_run is not None:
        everything = engine_run.trace.buffers(ref.sequential)
        if c.engine == "accelerate":
            fact("DDP (broadcast_buffers=True) keeps only rank 0's ghost groups in rank 0's buffers: they "
                 "differ from BatchNorm's EMA over all ranks' groups", engine_run.got.buffers[0], everything,
                 engine_run, False, engine_run.buffer_tols[0])
        else:
            fact("DeepSpeed never syncs buffers: rank 0's and rank 1's running statistics drift apart",
                 engine_run.got.buffers[0], engine_run.got.buffers[1], engine_run, False,
                 _two_runs(engine_run.buffer_tols[0], engine_run.buffer_tols[1]))
    ar = _find(results, mode="layer", stats_policy="mean", buffer_sync="allreduce")
    if ar is not None:
        fact("--buffer-sync allreduce makes data parallel equal the single-process `mean` policy over all G_M groups",
             ar.got.buffers[0], ar.trace.buffers(ref.mean_of_groups), ar, True, ar.buffer_tols[0])
    return rows
