"""Tolerances below float64, derived in the run: the draws, the factor, the floor, and the precisions.

Everything here runs the real reference on a tiny conv-BN net (CPU, a second or two): the numbers
checked are relations the derivation must satisfy (tol = factor x the largest draw, the floor,
bf16 coarser than float32 by its unit roundoff), never values observed once.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ghostsys.check import reference as R
from ghostsys.check import tolerance as T


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))


def _derive(name: str, steps: int = 2):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g),
                torch.arange(16)) for _ in range(steps)]
    model, groups = _net(), R.ghost_group_indices(16, 1, 2, 2)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, k_steps=steps)
    exact = R.reference_steps(model, batches, groups=groups, **kw)
    return T.derive(T.precision(name), model, batches, groups, exact, **kw), exact


@pytest.fixture(scope="module")
def f32():
    return _derive("float32")


def test_float64_keeps_its_analytic_tolerance_and_derives_nothing():
    d, _ = _derive("float64", steps=1)
    assert d.runs == {}
    t = d.tolerance("grads")
    assert (t.tol, t.source) == (1e-10, "analytic") and math.isnan(t.divergence)


def test_tolerance_is_the_factor_times_the_largest_draw(f32):
    d, exact = f32
    assert list(d.runs) == list(T.draws(T.PRECISIONS["float32"]))  # as written + the antithetic pair
    assert all(run.logits.dtype == torch.float32 for run in d.runs.values())
    for q in ("logits", "grads", "weights"):
        t = d.tolerance(q)
        divs = dict(t.draws)
        assert set(divs) == set(d.runs) and t.divergence == max(divs.values()) > 0
        assert t.factor == T.SAFETY_FACTOR and t.tol == pytest.approx(T.SAFETY_FACTOR * max(t.divergence, 2.0 ** -24))
        assert t.source in ("derived", "floor") and t.precision == "float32"
    # Buffers under any policy, picked from every draw the same way as from the float64 run.
    t = d.tolerance("buffers", lambda tr: tr.buffers(R.mean_of_groups), label="buffers: mean")
    assert t.label == "buffers: mean" and t.divergence > 0 and d.tolerance("buffers", label="buffers: mean") is t
    assert [x.label for x in d.tolerances()] == ["logits", "grads", "weights", "buffers: mean"]


def test_a_divergence_below_roundoff_gets_the_roundoff_floor(f32):
    d, _ = f32
    zero = d.tolerance("logits", lambda tr: torch.zeros(3), label="nothing moves")
    assert zero.divergence == 0 and zero.source == "floor" and zero.tol == T.SAFETY_FACTOR * 2.0 ** -24
    # A scalar reduction of M terms (the loss) gets the pairwise-summation floor of ceil(log2 M) roundoffs.
    loss = d.tolerance("loss", lambda tr: torch.zeros(()), label="a mean of 16", terms=16)
    assert loss.tol == T.SAFETY_FACTOR * 4 * 2.0 ** -24 and "4 unit roundoffs" in loss.why


def test_bf16_autocast_is_a_precision_of_the_reference_not_a_table():
    d, exact = _derive("bf16-autocast", steps=1)
    f, _ = _derive("float32", steps=1)
    # Same model, data, groups: bfloat16's 8-bit significand moves the logits ~2^16 times further.
    bf, fl = d.tolerance("logits"), f.tolerance("logits")
    assert bf.precision == "bf16-autocast" and bf.tol > 100 * fl.tol and bf.tol < 1
    assert all(w.dtype == torch.float32 for w in d.runs["as written"].weights.values())  # autocast: float32 weights


def test_bf16_autocast_floors_follow_the_dtype_each_value_is_held_in():
    d, _ = _derive("bf16-autocast", steps=1)
    run = d.runs["as written"]
    assert run.logits.dtype == torch.bfloat16 and run.loss.dtype == torch.float32  # autocast: cross-entropy in float32
    zero = d.tolerance("loss", lambda tr: torch.zeros_like(tr.loss), label="a float32 mean of 16", terms=16)
    assert zero.source == "floor" and zero.tol == T.SAFETY_FACTOR * 4 * 2.0 ** -24 and "of float32" in zero.why
    flat = d.tolerance("logits", lambda tr: torch.zeros_like(tr.logits), label="bf16 logits")
    assert flat.tol == T.SAFETY_FACTOR * 2.0 ** -8 and "of bfloat16" in flat.why


def test_controls_are_hard_where_100x_is_reachable_and_autocast_is_applied_once():
    f32, bf16 = T.precision("float32"), T.precision("bf16-autocast")
    assert f32.hard_controls and T.precision("float64").hard_controls and T.precision("tf32").hard_controls
    assert not bf16.hard_controls and bf16.control_reach == pytest.approx(100 * 3 * 2.0 ** -8)
    assert T.notes(f32) == [] and "1.17" in T.notes(bf16)[0]
    assert bf16.mixed_precision == "bf16" and f32.mixed_precision == "no"
    with bf16.context("cpu"):
        assert torch.is_autocast_enabled("cpu")
    with bf16.context("cpu", autocast=False):  # the engine's own autocast is the only one
        assert not torch.is_autocast_enabled("cpu")


def test_tf32_exists_on_cuda_only():
    p = T.precision("tf32")
    with pytest.raises(ValueError, match="CUDA"):
        p.check_device("cpu")
    with pytest.raises(KeyError, match="known"):
        T.precision("float16")
    assert T.run_dtype("tf32") == T.run_dtype("bf16-autocast") == "float32"
    # The float32 precision switches TF32 off on a GPU and restores the switch; on CPU it is a no-op.
    with T.precision("float32").context("cpu"):
        assert not torch.is_autocast_enabled()
