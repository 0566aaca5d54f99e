"""The independent reference against torch's own layers and optimizer, and its group bookkeeping.

Tolerances: float64 comparisons use rtol 1e-10 (the project's stated float64 tolerance: two
implementations that differ only in summation order agree to ~6e-16..4e-14 relative here), with an atol
of 1e-12 for entries whose true value is ~0 (a conv bias feeding BatchNorm has an exactly-zero
gradient, so only roundoff remains there). Negative controls must differ by > 100x that.
"""

from __future__ import annotations

import ast
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostsys.check import ghost_groups as G
from ghostsys.check import reference as R
from ghostsys.check.report import analytic, compare

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: only summation order differs (see module docstring)


def _contiguous(M: int, G: int) -> list[list[int]]:
    return [list(range(g * M // G, (g + 1) * M // G)) for g in range(G)]


def _net(norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    mk = {"bn": lambda c: nn.BatchNorm2d(c), "gn": lambda c: nn.GroupNorm(2, c)}[norm]
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), mk(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2),
                         mk(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
                         nn.BatchNorm1d(5)).double()


def _data(M: int = 32, steps: int = 1, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(M, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1, torch.randint(0, 5, (M,), generator=g))
            for _ in range(steps)]


# --- ghost groups ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_g", [1, 2, 4])
def test_every_factorization_of_gm8_gives_the_contiguous_groups(n_g):
    expected = _contiguous(32, 8)  # the single contiguous split n_g = n_fp = 1, G_layer = 8
    assert [g.indices.tolist() for g in R.ghost_group_indices(32, 1, 1, 8)] == expected
    for n_fp in [d for d in (1, 2, 4, 8) if n_g * d <= 8]:
        groups = R.ghost_group_indices(32, n_g, n_fp, 8 // (n_g * n_fp))
        assert [g.indices.tolist() for g in groups] == expected, (n_g, n_fp)


def test_group_metadata_is_rank_major_then_micro_then_layer_group():
    groups = R.ghost_group_indices(32, 2, 2, 2)
    assert [(g.ranks, g.micro, g.layer_group) for g in groups] == [
        ((0,), 0, 0), ((0,), 0, 1), ((0,), 1, 0), ((0,), 1, 1), ((1,), 0, 0), ((1,), 0, 1), ((1,), 1, 0), ((1,), 1, 1)]


def test_syncbn_subgroups_with_accumulation_are_not_contiguous():
    # n_g = 4 ranks of 8 samples, k = 2, n_fp = 2 micro-batches of 4: a group is micro i of both ranks.
    groups = R.ghost_group_indices(32, 4, 2, 1, k=2)
    assert [g.indices.tolist() for g in groups] == [
        [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15],
        [16, 17, 18, 19, 24, 25, 26, 27], [20, 21, 22, 23, 28, 29, 30, 31]]
    assert [(g.ranks, g.micro) for g in groups] == [((0, 1), 0), ((0, 1), 1), ((2, 3), 0), ((2, 3), 1)]
    # Without accumulation the merged blocks are adjacent again: contiguous halves.
    assert [g.indices.tolist() for g in R.ghost_group_indices(32, 4, 1, 1, k=2)] == _contiguous(32, 2)


@pytest.mark.parametrize("args, match", [((30, 2, 2, 2, 1), "not divisible"), ((32, 4, 1, 1, 3), "must divide"),
                                         ((32, 0, 1, 1, 1), "positive integer")])
def test_group_indices_refuse_bad_factorizations(args, match):
    with pytest.raises(ValueError, match=match):
        R.ghost_group_indices(*args)


# --- reference layers against torch's ----------------------------------------------------------


def _ref_forward(model, x, y, groups):
    ref = R.to_reference(model).train()
    with R.groups_set(ref, groups):
        out = ref(x)
    loss = R.cross_entropy(out, y)
    loss.backward()
    return out, loss, {n: p.grad for n, p in ref.named_parameters()}


def _torch_chunks(model, x, y, chunks):
    """nn.BatchNorm on each index chunk in turn (what accumulation does), loss = mean over all M."""
    m = copy.deepcopy(model).train()
    out = torch.empty(len(x), 5, dtype=x.dtype)
    for idx in chunks:
        o = m(x[idx])
        (F.cross_entropy(o, y[idx], reduction="sum") / len(x)).backward()
        out[idx] = o.detach()
    return out, {n: p.grad for n, p in m.named_parameters()}, m


@pytest.mark.parametrize("G", [1, 4])
def test_reference_equals_batchnorm_on_each_contiguous_chunk(G):
    model, (x, y) = _net(), _data()[0]
    out, loss, grads = _ref_forward(model, x, y, R.ghost_group_indices(32, 1, G, 1))
    t_out, t_grads, _ = _torch_chunks(model, x, y, [torch.tensor(c) for c in _contiguous(32, G)])
    torch.testing.assert_close(out.detach(), t_out, **TIGHT)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(t_out, y), **TIGHT)
    torch.testing.assert_close(grads, t_grads, **TIGHT)


def test_reference_equals_batchnorm_on_non_contiguous_syncbn_groups():
    model, (x, y) = _net(), _data()[0]
    groups = R.ghost_group_indices(32, 4, 2, 1, k=2)
    out, _, grads = _ref_forward(model, x, y, groups)
    t_out, t_grads, _ = _torch_chunks(model, x, y, [g.indices for g in groups])
    torch.testing.assert_close(out.detach(), t_out, **TIGHT)
    torch.testing.assert_close(grads, t_grads, **TIGHT)


def test_negative_control_full_batchnorm_vs_four_ghost_groups_differ():
    model, (x, y) = _net(), _data()[0]
    full = _ref_forward(model, x, y, None)[0].detach()
    ghost = _ref_forward(model, x, y, R.ghost_group_indices(32, 1, 4, 1))[0].detach()
    row = compare("logits", ghost, full, analytic("logits"), control=True)
    assert row.passed and row.max_rel > 1e-2, row  # ~0.5: orders of magnitude above 100 x 1e-10
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ghost, full, **TIGHT)


def test_groupnorm_and_eval_mode_match_torch():
    model, (x, y) = _net("gn"), _data()[0]
    out, _, grads = _ref_forward(model, x, y, None)
    t_out, t_grads, _ = _torch_chunks(model, x, y, [torch.arange(32)])
    torch.testing.assert_close(out.detach(), t_out, **TIGHT)
    torch.testing.assert_close(grads, t_grads, **TIGHT)
    bn = _net()
    for m in bn.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    torch.testing.assert_close(R.to_reference(bn).eval()(x), bn.eval()(x), **TIGHT)


@pytest.mark.parametrize("kind, policy", [("ghost", "mean"), ("ghost", "sequential"), ("seq", "mean"), ("seq", "sequential")])
def test_reference_matches_ghostsys_layers(kind, policy):
    # Cross-check with the layers under test (norms.py): outputs, grads, and buffers under the named policy.
    norms = pytest.importorskip("ghostsys.nn.norms")
    torch.manual_seed(0)
    kw = dict(channel_groups=2) if kind == "seq" else {}
    layer = norms.make_norm(kind, 4, ghost_groups=4, stats_policy=policy, **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    ref = R.to_reference(layer)
    assert isinstance(ref, R.RefNorm) and ref.kind == ("seq" if kind == "seq" else "batch")
    x = torch.randn(16, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    init = {n: b.clone() for n, b in layer.named_buffers()}
    out = layer(x)  # no groups set: the reference uses the layer's own 4 contiguous groups
    gx, = torch.autograd.grad((out * w).sum(), x)
    r_out = ref(x)
    r_gx, = torch.autograd.grad((r_out * w).sum(), x)
    torch.testing.assert_close(r_out, out, **TIGHT)
    torch.testing.assert_close(r_gx, gx, **TIGHT)
    pol = R.mean_of_groups if policy == "mean" else R.sequential
    torch.testing.assert_close(pol(ref.records, init, 0.1), dict(layer.named_buffers()), **TIGHT)


def test_reference_calls_no_torch_norm_or_optimizer(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the reference called code it must be independent of")
    for mod, name in [(F, "batch_norm"), (F, "group_norm"), (torch, "batch_norm"), (torch, "group_norm"),
                      (torch.optim.SGD, "step"), (F, "cross_entropy")]:
        monkeypatch.setattr(mod, name, boom)
    model = nn.Sequential(_net("gn"), nn.BatchNorm1d(5))
    R.reference_steps(model, _data(steps=2), groups=R.ghost_group_indices(32, 2, 1, 2), lr=0.1, momentum=0.9,
                      weight_decay=1e-3, k_steps=2)
    # Statically too: the only ghostsys module it imports is its own group bookkeeping, which imports
    # none; neither touches torch.optim or torch.nn.functional.
    for mod, allowed in ((R, {"ghostsys.check.ghost_groups"}), (G, set())):
        tree = ast.parse(open(mod.__file__).read())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert {m for m in mods if m.startswith("ghostsys")} == allowed, mod.__name__
        assert not any(m.startswith("torch.optim") or m == "torch.nn.functional" for m in mods), mods


# --- SGD and the whole k-step trace -----------------------------------------------------------


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_hand_written_sgd_equals_torch_optim_sgd(momentum, wd):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    ours, theirs = copy.deepcopy(lin), copy.deepcopy(lin)
    opt, state = torch.optim.SGD(theirs.parameters(), lr=0.3, momentum=momentum, weight_decay=wd), {}
    for _ in range(4):
        x = torch.randn(8, 4, dtype=torch.float64)
        for m in (ours, theirs):
            m.zero_grad()
            (m(x) ** 2).mean().backward()
        R.sgd_update_(list(ours.named_parameters()), state, 0.3, momentum, wd)
        opt.step()
    torch.testing.assert_close(dict(ours.named_parameters()), dict(theirs.named_parameters()), **TIGHT)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_trace_equals_accumulation_with_batchnorm_and_torch_sgd(momentum):
    model, batches = _net(), _data(steps=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.momentum = momentum
    trace = R.reference_steps(model, batches, groups=R.ghost_group_indices(32, 1, 2, 1), lr=0.2, momentum=0.9,
                              weight_decay=5e-4, k_steps=3)
    chunks = [torch.arange(16), torch.arange(16, 32)]
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        outs = []
        for idx in chunks:  # accumulation on m itself: BatchNorm updates its buffers once per chunk
            o = m(x[idx])
            (F.cross_entropy(o, y[idx], reduction="sum") / len(x)).backward()
            outs.append(o.detach())
        if step == 0:
            torch.testing.assert_close(trace.logits, torch.cat(outs), **TIGHT)
            torch.testing.assert_close(trace.grads, {n: p.grad for n, p in m.named_parameters()}, **TIGHT)
        opt.step()
    torch.testing.assert_close(trace.weights, dict(m.named_parameters()), **TIGHT)
    bufs = {n: b for n, b in m.state_dict().items() if n.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    torch.testing.assert_close(trace.buffers(R.sequential), bufs, **TIGHT)
    assert [o.tolist() for o in trace.order] == [list(range(32))] * 3


# --- running-statistics policies ------------------------------------------------------------


def _layer_trace(M=16, n_g=2, n_fp=2, g_layer=1, steps=2, momentum=0.1, k=1):
    """One BatchNorm2d layer's recorded moments over `steps` forwards (inputs fixed per step)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    ref = R.to_reference(bn)
    groups = R.ghost_group_indices(M, n_g, n_fp, g_layer, k)
    xs = [torch.randn(M, 3, 2, 2, dtype=torch.float64) * (1 + s) + s for s in range(steps)]
    stats = []
    for step, x in enumerate(xs):
        ref.records = []
        with R.groups_set(ref, groups):
            ref(x)
        stats += [R.GroupStat(s.spec, s.mean, s.var, s.count, step) for s in ref.records]
    init = {n: getattr(bn, n).clone() for n in ("running_mean", "running_var", "num_batches_tracked")}
    return bn, xs, groups, stats, init


def _fed(bn, xs, chunks_per_step):
    """nn.BatchNorm2d's own buffers after it is fed the given index chunks of each step, in order."""
    bn = copy.deepcopy(bn).train()
    for x, chunks in zip(xs, chunks_per_step):
        for idx in chunks:
            bn(x[idx])
    return {n: getattr(bn, n) for n in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequential_equals_batchnorm_fed_the_groups_in_order(momentum):
    bn, xs, groups, stats, init = _layer_trace(momentum=momentum)
    got = R.sequential(stats, init, momentum)
    torch.testing.assert_close(got, _fed(bn, xs, [[g.indices for g in groups]] * len(xs)), **TIGHT)
    assert int(got["num_batches_tracked"]) == len(xs) * len(groups)


def test_mean_of_groups_by_hand():
    bn, xs, groups, stats, init = _layer_trace(n_g=2, n_fp=1, g_layer=2, steps=2)
    rm, rv = init["running_mean"].clone(), init["running_var"].clone()
    for x in xs:  # one update per step (n_fp = 1): mean of group means, mean of unbiased group variances
        parts = [x[g.indices].transpose(0, 1).reshape(3, -1) for g in groups]
        rm = 0.9 * rm + 0.1 * torch.stack([p.mean(1) for p in parts]).mean(0)
        rv = 0.9 * rv + 0.1 * torch.stack([p.var(1, unbiased=True) for p in parts]).mean(0)
    got = R.mean_of_groups(stats, init, 0.1)
    torch.testing.assert_close(got, {"running_mean": rm, "running_var": rv,
                                     "num_batches_tracked": init["num_batches_tracked"] + 2}, **TIGHT)


def test_per_rank_and_ddp_broadcast_follow_the_ranks_own_groups():
    bn, xs, groups, stats, init = _layer_trace(n_g=2, n_fp=2, steps=2)
    own = {r: [g.indices for g in groups if r in g.ranks] for r in (0, 1)}
    for r in (0, 1):  # never synced: each rank's BatchNorm saw only its own micro-batches
        torch.testing.assert_close(R.per_rank(stats, init, 0.1, r), _fed(bn, xs, [own[r]] * 2), **TIGHT)
    torch.testing.assert_close(R.ddp_broadcast(stats, init, 0.1, 0), _fed(bn, xs, [own[0]] * 2), **TIGHT)
    # Rank 1 under broadcast_buffers=True: rank 0's buffers after step 0, then its own micro-batches of
    # step 1 (torch broadcasts only before the forward that follows a synced one: micro-batch 0).
    after0 = _fed(bn, xs[:1], [own[0]])
    b1 = copy.deepcopy(bn)
    for n, v in after0.items():
        getattr(b1, n).copy_(v)
    torch.testing.assert_close(R.ddp_broadcast(stats, init, 0.1, 1), _fed(b1, xs[1:], [own[1]]), **TIGHT)
    # Broadcast before every micro-batch instead: rank 0's buffers up to its micro 0 of step 1, then rank 1's micro 1.
    upto = R.sequential([s for s in stats if 0 in s.spec.ranks][:-1], init, 0.1)
    for n, v in upto.items():
        getattr(b1, n).copy_(v)
    torch.testing.assert_close(R.ddp_broadcast(stats, init, 0.1, 1, every_forward=True),
                               _fed(b1, xs[1:], [own[1][1:]]), **TIGHT)


def test_allreduce_mean_equals_mean_of_groups_but_not_sequential():
    _, _, _, stats, init = _layer_trace(n_g=2, n_fp=1, g_layer=2, steps=3)
    torch.testing.assert_close(R.allreduce_mean(stats, init, 0.1, policy=R.mean_of_groups),
                               R.mean_of_groups(stats, init, 0.1), **TIGHT)
    seq_ranks = R.allreduce_mean(stats, init, 0.1, policy=R.sequential)
    seq_all = R.sequential(stats, init, 0.1)
    # Negative control: per-rank sequential EMAs averaged are NOT one sequential EMA over all groups
    # (different update counts and geometric weights): they differ by ~0.3 relative, not by roundoff.
    row = compare("buffers", seq_ranks["running_var"], seq_all["running_var"], analytic("buffers"), control=True)
    assert row.passed and row.max_rel > 1e-2, row  # ~0.3
    assert int(seq_ranks["num_batches_tracked"]) != int(seq_all["num_batches_tracked"])


def test_trace_buffers_use_original_names_and_every_policy_runs():
    trace = R.reference_steps(_net(), _data(steps=2), groups=R.ghost_group_indices(32, 2, 2, 1), lr=0.1, k_steps=2)
    names = {n for n, _ in _net().named_buffers()}
    for policy in (R.sequential, R.mean_of_groups, partial(R.per_rank, rank=1), partial(R.ddp_broadcast, rank=1),
                   R.allreduce_mean):
        assert set(trace.buffers(policy)) == names
    assert set(trace.grads) == {n for n, _ in _net().named_parameters()}
    assert len(trace.stats) == 2 and all(len(v) == 4 for v in trace.stats[0].values())  # 4 groups per layer


# --- other evaluation orders (the tolerance draws) ----------------------------------------------


def _trace(dtype=torch.float64, rounding=None, groups=None, steps=2):
    model, batches = _net(), [(x, y, torch.arange(32)) for x, y in _data(steps=steps)]
    return R.reference_steps(model, batches, groups=groups or R.ghost_group_indices(32, 1, 2, 2), lr=0.1, momentum=0.9,
                             weight_decay=5e-4, k_steps=steps, dtype=dtype, rounding=rounding)


def _same(a, b, **tol):
    for q in ("logits", "loss", "grads", "weights"):
        torch.testing.assert_close(getattr(a, q), getattr(b, q), **tol)
    torch.testing.assert_close(a.buffers(R.mean_of_groups), b.buffers(R.mean_of_groups), **tol)


def test_a_reordered_fused_evaluation_is_the_same_mathematics():
    # Another sample order and the fused form x*scale + shift change only roundings: in float64 every
    # quantity, reported in the original sample order and group specs, agrees to summation order.
    plain = _trace()
    _same(_trace(rounding=R.Rounding(permute_seed=3, fused=True)), plain, **TIGHT)
    # A dither of a few float64 ulps moves nothing beyond roundoff either; the records keep the original groups.
    dithered = _trace(rounding=R.Rounding(permute_seed=3, fused=True, dither=4 * 2.0 ** -53, seed=1))
    _same(dithered, plain, **TIGHT)
    layer = next(iter(dithered.stats[0]))
    key = lambda st: (st.spec.indices.tolist(), st.spec.ranks, st.spec.micro, st.spec.layer_group)  # noqa: E731
    assert [key(st) for st in dithered.stats[0][layer]] == [key(st) for st in plain.stats[0][layer]]


def test_antithetic_draws_push_every_value_both_ways():
    # One layer, fused, dithered by a visible amount: the + and - draws move the output by opposite amounts.
    torch.manual_seed(0)
    x = torch.randn(16, 3, 2, 2, dtype=torch.float64) * 3 + 1
    bn = nn.BatchNorm2d(3).double()
    outs = {}
    for sign in (0, 1, -1):
        ref = R.to_reference(bn).train()
        ref.rounding = R.Rounding(fused=True, dither=1e-6, seed=5, sign=sign) if sign else R.Rounding()
        ref.noise = torch.Generator().manual_seed(5)
        with R.groups_set(ref, R.ghost_group_indices(16, 1, 1, 2)):
            outs[sign] = ref(x).detach()
    up, down = outs[1] - outs[0], outs[-1] - outs[0]
    assert up.abs().median() > 1e-7 and up.abs().max() < 1e-5  # values moved, by about the dither
    torch.testing.assert_close(up, -down, rtol=1e-3, atol=1e-11)  # the same noise, negated (to first order)
    with pytest.raises(ValueError, match="fused"):
        R.Rounding(dither=1e-3)
    with pytest.raises(ValueError, match="explicit ghost groups"):
        R.reference_steps(_net(), _data(), groups=None, lr=0.1, rounding=R.Rounding(permute_seed=1))


def test_with_groups_relabels_a_trace_to_another_factorization_of_the_same_groups():
    # n_g 1 x n_fp 1 x G_layer 4 and n_g 2 x n_fp 2 x G_layer 1 normalize the same four blocks of 8;
    # only the metadata the buffer policies read differs, so one run serves both.
    layer = _trace(groups=R.ghost_group_indices(32, 1, 1, 4))
    other_groups = R.ghost_group_indices(32, 2, 2, 1)
    direct = _trace(groups=other_groups)
    moved = layer.with_groups(other_groups)
    for policy in (R.mean_of_groups, partial(R.per_rank, rank=1), partial(R.ddp_broadcast, rank=1)):
        torch.testing.assert_close(moved.buffers(policy), direct.buffers(policy), **TIGHT)
    # ...which is a real relabelling: per forward, n_fp = 2 averages other groups than n_fp = 1.
    mean = R.mean_of_groups
    assert not torch.allclose(layer.buffers(mean)["1.running_mean"], direct.buffers(mean)["1.running_mean"])
    with pytest.raises(ValueError, match="same ghost groups"):
        layer.with_groups(R.ghost_group_indices(32, 1, 1, 2))
