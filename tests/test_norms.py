"""ghostsys.nn.norms against independent references: the papers' Figure 2 / A1 GhostNorm function
(generalized to any rank), nn.BatchNorm, F.group_norm, the papers' worked example (section 2.2) and
hand-computed running-statistics policies.

Tolerances. float64: 1e-10 (relative and absolute): the implementations differ from the reference
only in summation order over at most a few thousand O(1) terms (observed <= 1e-14), so 1e-10 leaves
room without hiding a wrong formula (a wrong one is off by 1e-3 or more). float32: 5e-5 absolute and
relative, where the same reordering was observed to cost <= 5e-6 (gradients: sums of products with
cancellation); still ~1000x below what the negative controls show. Where the code under test and
the reference run the very same kernel on the same data we demand bit equality (rtol=atol=0), and
say so.
"""

from __future__ import annotations

import copy
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostsys.nn import _ghost_kernels
from ghostsys.nn import convert, replace_batchnorm
from ghostsys.nn.norms import GhostBatchNorm, NoisyBatchNorm, SeqNorm, make_norm

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=5e-5, atol=5e-5)}
EXACT = dict(rtol=0.0, atol=0.0)
IMPLS = ("loop", "loop-rows", "loop-twopass", "vectorized")


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    """The kernel under test. The loop implementation switches strategy by layout and size; on the
    small test shapes "loop" mostly takes its per-group native forward and (NCHW) fused backward,
    so two variants force the others: "loop-rows" its row-moments forward (NCHW, normally from 64
    spatial positions) and "loop-twopass" its reductions + two-pass backward (normally channels_last)."""
    if request.param == "loop-rows":
        monkeypatch.setattr(_ghost_kernels, "_ROW_MOMENTS_MIN_SPATIAL", 1)
        monkeypatch.setattr(_ghost_kernels, "_ROW_CHUNK_BYTES", 64)  # several chunks even on tiny inputs
        return "loop"
    if request.param == "loop-twopass":
        monkeypatch.setattr(_ghost_kernels, "_FUSED_BACKWARD", False)
        return "loop"
    return request.param


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests make thousands of tiny kernel calls (gradcheck alone, hundreds); on a busy 2-core
    machine OpenMP's spin-waiting makes each tiny parallel region cost milliseconds (the file took
    45 s instead of 10). Nothing here depends on the thread count; the benchmark covers 2 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- independent references ------------------------------------------------------------------------

def ref_ghost_norm(x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The papers' Figure 2 / A1 function for any rank: stats over dims (1, 3) of (G, M/G, C, -1)."""
    m, c = x.shape[:2]
    xg = x.reshape(groups, m // groups, c, -1)
    mean = xg.mean([1, 3], keepdim=True)
    var = xg.var([1, 3], unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def affine(y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return y * w.view(shape) + b.view(shape)


def ref_group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group channel means and UNBIASED variances, (G, C), in float64."""
    xg = x.detach().double().reshape(groups, x.shape[0] // groups, x.shape[1], -1).transpose(1, 2).flatten(2)
    return xg.mean(-1), xg.var(-1, unbiased=True)


def randomize(m: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random affine and running statistics, so that nothing passes by starting from identities."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(m, name, None)
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5 + (1.0 if name == "weight" else 0.0))
        if getattr(m, "running_var", None) is not None:
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return m


def make_input(shape, fmt: str, dtype, gen) -> torch.Tensor:
    # Offset and scale per call so that normalization really does something.
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1.5)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif fmt == "noncontiguous":  # every other element of a wider tensor along the last dim
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=dtype) * 3 + 1.5
        x = wide[..., ::2]
        assert not x.is_contiguous()
    return x


CASES = [(2, "contiguous"), (2, "noncontiguous"), (3, "contiguous"), (3, "noncontiguous"),
         (4, "contiguous"), (4, "channels_last"), (4, "noncontiguous"),
         (5, "contiguous"), (5, "channels_last_3d"), (5, "noncontiguous")]


def random_shape(rank: int, gen: torch.Generator) -> tuple[int, int, tuple[int, ...]]:
    groups = [2, 3, 4][int(torch.randint(3, (1,), generator=gen))]
    per = int(torch.randint(4, 7, (1,), generator=gen))
    c = int(torch.randint(2, 6, (1,), generator=gen))
    spatial = tuple(int(s) for s in torch.randint(1, 5, (rank - 2,), generator=gen))
    return groups, groups * per, (c, *spatial)


# --- GhostBatchNorm vs Figure 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank,fmt", CASES)
def test_ghost_matches_figure2_outputs_and_grads(rank, fmt, dtype, impl):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rank}{fmt}{dtype}{impl}".encode()))  # stable per case
    groups, m, (c, *spatial) = random_shape(rank, gen)
    x = make_input((m, c, *spatial), fmt, dtype, gen).requires_grad_()
    layer = randomize(GhostBatchNorm(c, ghost_groups=groups, impl=impl, dtype=dtype), gen)
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    if fmt in ("channels_last", "channels_last_3d"):  # as the next channels_last layer would send it
        dy = dy.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    gx, gw, gb = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)

    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    yr = affine(ref_ghost_norm(xr, groups), w, b)
    rx, rw, rb = torch.autograd.grad(yr, [xr, w, b], dy)
    for got, want in ((y, yr), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    if fmt in ("channels_last", "channels_last_3d"):  # the output keeps the input's memory format
        mf = torch.channels_last if fmt == "channels_last" else torch.channels_last_3d
        assert y.is_contiguous(memory_format=mf)
        if impl == "loop":  # like BatchNorm's; the vectorized path leaves gradient layout to autograd
            assert gx.is_contiguous(memory_format=mf)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_auto_paths_at_production_thresholds(fmt):
    # No monkeypatching: large enough that "auto" takes the loop with its production switches
    # (NCHW: row moments + fused backward; channels_last: native forward + two-pass backward).
    gen = torch.Generator().manual_seed(15)
    x = make_input((16, 8, 8, 8), fmt, torch.float64, gen).requires_grad_()
    layer = randomize(GhostBatchNorm(8, ghost_groups=2, dtype=torch.float64), gen)
    assert x[:8].numel() >= _ghost_kernels._LOOP_MIN_GROUP_NUMEL and 8 * 8 >= _ghost_kernels._ROW_MOMENTS_MIN_SPATIAL
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    yr = affine(ref_ghost_norm(xr, 2), w, b)
    want = torch.autograd.grad(yr, [xr, w, b], dy)
    torch.testing.assert_close(y, yr, **TOL[torch.float64])
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt, **TOL[torch.float64])


@pytest.mark.parametrize("shape,fmt", [((8, 3), "contiguous"), ((8, 2, 3), "contiguous"),
                                       ((8, 3, 2, 2), "channels_last"), ((4, 2, 2, 1, 2), "contiguous")])
def test_gradcheck_float64(shape, fmt, impl):
    gen = torch.Generator().manual_seed(1)
    x = make_input(shape, fmt, torch.float64, gen).requires_grad_()
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()
    groups = 2
    ghost_batch_norm = _ghost_kernels.ghost_batch_norm
    assert torch.autograd.gradcheck(lambda x, w, b: ghost_batch_norm(x, groups, w, b, 1e-5, None, impl), (x, w, b))
    # Also without affine parameters (weight=None: the kernel's own identity scale).
    assert torch.autograd.gradcheck(lambda x: ghost_batch_norm(x, groups, None, None, 1e-5, None, impl), (x,))
    if impl == "vectorized":  # documented as twice differentiable (the loop is once_differentiable)
        assert torch.autograd.gradgradcheck(lambda x, w: ghost_batch_norm(x, groups, w, None, 1e-5, None, impl),
                                            (x, w))


def test_gradcheck_seqnorm_float64():
    gen = torch.Generator().manual_seed(2)
    layer = randomize(SeqNorm(4, channel_groups=2, ghost_groups=2, dtype=torch.float64), gen)
    x = make_input((8, 4, 2, 2), "contiguous", torch.float64, gen).requires_grad_()
    layer.track_running_stats = False  # gradcheck calls forward many times; keep buffers out of it
    assert torch.autograd.gradcheck(layer, (x,))


def test_papers_worked_example():
    # Section 2.2 of both papers: X as an (8, 1, 1) tensor; values printed to 1 or 2 decimals.
    x = torch.tensor([35, 39, 30, 4, 38, 26, 27, 19], dtype=torch.float64).view(8, 1, 1)
    decimals = [1, 1, 1, 1, 1, 1, 2, 1]
    printed_bn = [0.7, 1.1, 0.3, -2.2, 1.0, -0.1, -0.02, -0.8]
    printed_ghost = [0.6, 0.9, 0.2, -1.7, 1.5, -0.2, -0.07, -1.2]
    for groups, printed in ((1, printed_bn), (2, printed_ghost)):
        with torch.no_grad():
            y = GhostBatchNorm(1, ghost_groups=groups, dtype=torch.float64)(x).flatten()
        rounded = torch.tensor([round(float(v), d) for v, d in zip(y, decimals)], dtype=torch.float64)
        # Rounded to the printed precision they must match the print exactly (1e-12: float repr only).
        torch.testing.assert_close(rounded, torch.tensor(printed, dtype=torch.float64), rtol=0, atol=1e-12)
    # The paper's point, and a negative control: BatchNorm keeps 39 > 38, GhostNorm(2) flips them.
    bn = GhostBatchNorm(1, ghost_groups=1, dtype=torch.float64)(x).flatten()
    gh = GhostBatchNorm(1, ghost_groups=2, dtype=torch.float64)(x).flatten()
    assert bn[1] > bn[4] and gh[1] < gh[4]


def test_negative_control_ghost_differs_from_batchnorm(impl):
    gen = torch.Generator().manual_seed(3)
    x = make_input((32, 4, 3, 3), "contiguous", torch.float32, gen)
    y4 = GhostBatchNorm(4, ghost_groups=4, impl=impl)(x)
    y1 = nn.BatchNorm2d(4)(x)
    diff = (y4 - y1).abs().max().item()
    assert diff > 1000 * TOL[torch.float32]["atol"], diff  # ~0.1-1 observed: the checks above can fail


# --- one group is BatchNorm; running statistics policies -----------------------------------------------

@pytest.mark.parametrize("policy", ["mean", "sequential"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (8, 3)), (nn.BatchNorm1d, (8, 3, 5)),
                                          (nn.BatchNorm2d, (8, 3, 4, 4)), (nn.BatchNorm3d, (8, 3, 2, 3, 2))])
def test_one_group_is_batchnorm(bn_cls, shape, momentum, policy):
    gen = torch.Generator().manual_seed(4)
    bn = randomize(bn_cls(3, momentum=momentum), gen)
    gbn = GhostBatchNorm(3, ghost_groups=1, momentum=momentum, stats_policy=policy)
    gbn.load_state_dict(bn.state_dict())  # state dicts interchange (strict)
    for step in range(3):
        x = make_input(shape, "contiguous", torch.float32, gen)
        outs = []
        for layer in (bn, gbn):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            outs.append((y, *torch.autograd.grad(y.square().sum(), [xi, layer.weight, layer.bias])))
        # Same F.batch_norm call on the same data and buffers: bit-identical, not merely close.
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, **EXACT)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, name), getattr(bn, name), **EXACT)
    assert int(gbn.num_batches_tracked) == 3
    bn.eval(), gbn.eval()
    x = make_input(shape, "contiguous", torch.float32, gen)
    torch.testing.assert_close(gbn(x), bn(x), **EXACT)
    # ghost_batch_size = M is the same layer.
    gbs = GhostBatchNorm(3, ghost_batch_size=shape[0])
    gbs.load_state_dict(gbn.state_dict())
    torch.testing.assert_close(gbs.train()(x), bn.train()(x), **EXACT)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequential_policy_is_batchnorm_over_chunks(momentum, impl):
    gen = torch.Generator().manual_seed(5)
    groups = 4
    bn = randomize(nn.BatchNorm2d(3, momentum=momentum), gen)
    gbn = GhostBatchNorm(3, ghost_groups=groups, momentum=momentum, stats_policy="sequential", impl=impl)
    gbn.load_state_dict(bn.state_dict())
    for step in range(2):
        x = make_input((16, 3, 3, 3), "contiguous", torch.float32, gen)
        xb, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        yb = torch.cat([bn(chunk) for chunk in xb.chunk(groups)])  # gradient accumulation's forwards
        yg = gbn(xg)
        dy = torch.randn(yb.shape, generator=gen)
        want = torch.autograd.grad(yb, [xb, bn.weight, bn.bias], dy)
        got = torch.autograd.grad(yg, [xg, gbn.weight, gbn.bias], dy)
        torch.testing.assert_close(yg, yb, **TOL[torch.float32])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float32])
    # The loop hands the real buffers to the same native kernel with the same factor per group:
    # bit-identical. The vectorized path does the EMA itself: equal up to rounding.
    tol = EXACT if impl == "loop" else TOL[torch.float32]
    torch.testing.assert_close(gbn.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(gbn.running_var, bn.running_var, **tol)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 2 * groups


@pytest.mark.parametrize("momentum", [0.3, None])
def test_mean_policy_is_ema_of_mean_group_moments(momentum, impl):
    gen = torch.Generator().manual_seed(6)
    groups = 4
    gbn = randomize(GhostBatchNorm(3, ghost_groups=groups, momentum=momentum, impl=impl), gen)
    rm, rv = gbn.running_mean.double().clone(), gbn.running_var.double().clone()
    n0 = int(gbn.num_batches_tracked)
    for step in range(3):  # both layouts: the loop takes different forward paths for them
        x = make_input((16, 3, 2, 3), ("contiguous", "channels_last")[step % 2], torch.float32, gen)
        gbn(x)
        means, variances = ref_group_moments(x, groups)
        f = 1.0 / (n0 + step + 1) if momentum is None else momentum
        rm = (1 - f) * rm + f * means.mean(0)
        rv = (1 - f) * rv + f * variances.mean(0)
    torch.testing.assert_close(gbn.running_mean.double(), rm, **TOL[torch.float32])
    torch.testing.assert_close(gbn.running_var.double(), rv, **TOL[torch.float32])
    assert int(gbn.num_batches_tracked) == n0 + 3
    # Negative control: the sequential policy ends somewhere else on the same data.
    seq = GhostBatchNorm(3, ghost_groups=groups, momentum=0.3, stats_policy="sequential", impl=impl)
    mean = GhostBatchNorm(3, ghost_groups=groups, momentum=0.3, impl=impl)
    x = make_input((16, 3, 2, 3), "contiguous", torch.float32, gen)
    seq(x), mean(x)
    assert (seq.running_mean - mean.running_mean).abs().max() > 1e-2


def test_eval_uses_running_stats_and_never_ghosts():
    gen = torch.Generator().manual_seed(7)
    gbn = randomize(GhostBatchNorm(3, ghost_groups=4), gen).eval()
    bn = nn.BatchNorm2d(3).eval()
    bn.load_state_dict(gbn.state_dict())
    x = make_input((5, 3, 2, 2), "channels_last", torch.float32, gen)  # M=5: not divisible by 4, no error
    before = {k: v.clone() for k, v in gbn.state_dict().items()}
    y = gbn(x)
    torch.testing.assert_close(y, bn(x), **EXACT)  # the same F.batch_norm eval call
    assert y.is_contiguous(memory_format=torch.channels_last)
    for k, v in gbn.state_dict().items():
        torch.testing.assert_close(v, before[k], **EXACT)  # eval leaves the buffers alone
    # Untracked: eval normalizes over the whole batch, as BatchNorm does.
    free = randomize(GhostBatchNorm(3, ghost_groups=4, track_running_stats=False), gen).eval()
    want = F.batch_norm(x, None, None, free.weight, free.bias, True, 0.0, free.eps)
    torch.testing.assert_close(free(x), want, **EXACT)


def test_ghost_batch_size_and_no_running_stats(impl):
    gen = torch.Generator().manual_seed(8)
    x = make_input((12, 3, 4), "contiguous", torch.float64, gen)
    a = GhostBatchNorm(3, ghost_batch_size=4, impl=impl, dtype=torch.float64, track_running_stats=False)
    assert a.running_mean is None
    torch.testing.assert_close(a(x), ref_ghost_norm(x, 3), **TOL[torch.float64])
    b = GhostBatchNorm(3, ghost_groups=3, affine=False, impl=impl, dtype=torch.float64)
    torch.testing.assert_close(b(x), ref_ghost_norm(x, 3), **TOL[torch.float64])


# --- SeqNorm, NoisyBatchNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,fmt", [(2, "contiguous"), (3, "contiguous"), (4, "channels_last"),
                                      (4, "noncontiguous"), (5, "channels_last_3d")])
def test_seqnorm_is_groupnorm_then_ghost_then_one_affine(rank, fmt, impl):
    gen = torch.Generator().manual_seed(9 + rank)
    c, g_c, g_m = 6, 3, 2
    shape = (8, c) + (3,) * (rank - 2)
    x = make_input(shape, fmt, torch.float64, gen).requires_grad_()
    layer = randomize(SeqNorm(c, channel_groups=g_c, ghost_groups=g_m, impl=impl, dtype=torch.float64), gen)
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    yr = affine(ref_ghost_norm(F.group_norm(xr, g_c, eps=1e-5), g_m), w, b)
    want = torch.autograd.grad(yr, [xr, w, b], dy)
    torch.testing.assert_close(y, yr, **TOL[torch.float64])
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt, **TOL[torch.float64])
    # Its running statistics are GhostBatchNorm's ("mean" policy) of the GroupNorm output.
    ghost = GhostBatchNorm(c, ghost_groups=g_m, dtype=torch.float64)
    fresh = SeqNorm(c, channel_groups=g_c, ghost_groups=g_m, impl=impl, dtype=torch.float64)
    fresh(x.detach()), ghost(F.group_norm(x.detach(), g_c, eps=1e-5))
    torch.testing.assert_close(fresh.running_mean, ghost.running_mean, **TOL[torch.float64])
    torch.testing.assert_close(fresh.running_var, ghost.running_var, **TOL[torch.float64])
    # Negative control: without the GroupNorm step the output is different.
    assert (y - affine(ref_ghost_norm(x.detach(), g_m), w, b)).abs().max() > 1e-2


def test_seqnorm_eval_and_errors():
    gen = torch.Generator().manual_seed(10)
    layer = randomize(SeqNorm(4, channel_groups=2, ghost_groups=2), gen).eval()
    x = make_input((3, 4, 2, 2), "contiguous", torch.float32, gen)
    want = F.batch_norm(F.group_norm(x, 2), layer.running_mean, layer.running_var, layer.weight, layer.bias,
                        False, 0.0, 1e-5)
    torch.testing.assert_close(layer(x), want, **EXACT)  # same two calls: identical
    with pytest.raises(ValueError, match="divisible by channel_groups"):
        SeqNorm(6, channel_groups=4, ghost_groups=2)


def test_noisy_batchnorm():
    gen = torch.Generator().manual_seed(11)
    bn = randomize(nn.BatchNorm2d(4), gen)
    noisy = NoisyBatchNorm(4, noise_std=0.1)
    noisy.load_state_dict(bn.state_dict())
    x = make_input((64, 4, 16, 16), "contiguous", torch.float32, gen) / 3  # per-channel std ~1
    # Eval: exactly BatchNorm's eval (no noise).
    torch.testing.assert_close(noisy.eval()(x), bn.eval()(x), **EXACT)
    # Train with noise_std=0: exactly BatchNorm (the same call).
    quiet = NoisyBatchNorm(4, noise_std=0.0)
    quiet.load_state_dict(bn.state_dict())
    torch.testing.assert_close(quiet.train()(x), bn.train()(x), **EXACT)
    # Train with noise, on an identity affine: BN(x + n) - BN(x) ~ n / sqrt(var_x + s^2) plus a small
    # rescaling term, so with var_x ~= 1 its std is sqrt(s^2/(1+s^2) + (1/sqrt(1+s^2) - 1)^2) ~ 0.0996
    # for s = 0.1. 1M values: the sample std's error is ~0.1%; 3% also absorbs var_x != 1.
    plain = NoisyBatchNorm(4, noise_std=0.1, affine=False, track_running_stats=False).train()
    torch.manual_seed(0)
    diff = plain(x) - F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    s = 0.1
    expected = math.sqrt(s**2 / (1 + s**2) + (1 / math.sqrt(1 + s**2) - 1) ** 2)
    torch.testing.assert_close(diff.std().item(), expected, rtol=0.03, atol=0)
    assert abs(diff.mean().item()) < 1e-3  # zero-mean noise; its sample mean is ~1e-4
    # Negative control: a 3x larger noise gives a clearly larger spread.
    louder = NoisyBatchNorm(4, noise_std=0.3, affine=False, track_running_stats=False).train()
    assert (louder(x) - F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)).std() > 2.5 * expected
    # Any rank, and channels_last is kept.
    for shape in ((16, 4), (16, 4, 3), (4, 4, 2, 2, 2)):
        assert NoisyBatchNorm(4, noise_std=0.1)(torch.randn(shape)).shape == shape
    xc = x[:8].contiguous(memory_format=torch.channels_last)
    assert NoisyBatchNorm(4, noise_std=0.1)(xc).is_contiguous(memory_format=torch.channels_last)


# --- make_norm, replace_batchnorm, convert --------------------------------------------------------------

def test_make_norm_every_kind():
    x = torch.randn(8, 4, 3, 3)
    built = {
        "batch": make_norm("batch", 4, dim=2),
        "ghost": make_norm("ghost", 4, ghost_groups=2),
        "seq": make_norm("seq", 4, channel_groups=2, ghost_batch_size=4),
        "group": make_norm("group", 4, channel_groups=2, momentum=0.3),  # momentum: meaningless, dropped
        "noisy": make_norm("noisy", 4, noise_std=0.01),
        "none": make_norm("none", 4),
    }
    types = {"batch": nn.BatchNorm2d, "ghost": GhostBatchNorm, "seq": SeqNorm, "group": nn.GroupNorm,
             "noisy": NoisyBatchNorm, "none": nn.Identity}
    for kind, layer in built.items():
        assert type(layer) is types[kind], kind
        assert layer(x).shape == x.shape
    assert type(make_norm("batch", 4, dim=1)) is nn.BatchNorm1d
    assert type(make_norm("batch", 4, dim=3, eps=1e-3)) is nn.BatchNorm3d
    assert built["seq"].channel_groups == 2 and built["seq"].ghost_batch_size == 4
    g = built["group"]
    torch.testing.assert_close(g(x), F.group_norm(x, 2, g.weight, g.bias), **EXACT)  # the same call
    torch.testing.assert_close(built["none"](x), x, **EXACT)


@pytest.mark.parametrize("kind,kw,match", [
    ("bogus", {}, "batch, ghost, seq, group, noisy, none"),
    ("seq", {"ghost_groups": 2}, "channel_groups"),
    ("group", {}, "channel_groups"),
    ("noisy", {}, "noise_std"),
    ("ghost", {}, "ghost_groups or ghost_batch_size"),
    ("batch", {"ghost_groups": 2}, "does not take ghost_groups"),
])
def test_make_norm_errors(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        make_norm(kind, 4, **kw)
    with pytest.raises(ValueError, match="dim"):
        make_norm("batch", 4, dim=4)


def test_replace_batchnorm_recursive_shared_and_sync():
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(3)), shared)
    seen = []
    out = replace_batchnorm(model, lambda bn: seen.append(type(bn)) or nn.Identity())
    assert out is model and sorted(t.__name__ for t in seen) == ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"]
    assert model[1] is model[3]  # one shared replacement for one shared BatchNorm
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(replace_batchnorm(nn.BatchNorm3d(2), lambda bn: nn.Identity()), nn.Identity)


@pytest.fixture(scope="module")
def resnet18():
    from ghostsys._compat import import_torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-torch shim's RuntimeWarning is expected here
        tv = import_torchvision()
    torch.manual_seed(12)
    model = tv.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(12)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize(m, gen)
            m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.mark.parametrize("kind,kw", [("ghost", {"ghost_groups": 2}), ("noisy", {"noise_std": 0.5}),
                                     ("seq", {"channel_groups": 8, "ghost_groups": 2})])
def test_convert_resnet18(resnet18, kind, kw):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules())
    with torch.no_grad():
        want = resnet18(x)
    model = convert(copy.deepcopy(resnet18), kind, **kw)
    cls = {"ghost": GhostBatchNorm, "noisy": NoisyBatchNorm, "seq": SeqNorm}[kind]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(type(m) is cls for m in model.modules()) == n_bn == 20
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        got = model(x)
    if kind == "seq":  # a different function in eval too (GroupNorm first): only check it runs
        assert got.shape == want.shape and torch.isfinite(got).all()
        return
    # Eval of the new layers is the same F.batch_norm call on the copied buffers: identical outputs.
    torch.testing.assert_close(got, want, **EXACT)
    new_bn1 = model.bn1
    assert new_bn1.eps == resnet18.bn1.eps and new_bn1.momentum == resnet18.bn1.momentum
    assert int(new_bn1.num_batches_tracked) == 7


def test_convert_keeps_dtype_mode_and_overrides():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.2), nn.BatchNorm1d(4, affine=False))
    model = model.double().train()
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    model[1].bias.requires_grad_(False)
    out = convert(model, "group", channel_groups=2, eps=1e-3)
    assert type(out[1]) is nn.GroupNorm and out[1].eps == 1e-3 and out[1].weight.dtype == torch.float64
    torch.testing.assert_close(out[1].weight, torch.full((4,), 2.0, dtype=torch.float64), **EXACT)
    assert not out[1].bias.requires_grad and out[1].training
    assert out[2].weight is None  # affine=False carried over
    ghost = convert(nn.Sequential(nn.BatchNorm1d(4, momentum=None)), "ghost", ghost_groups=2, stats_policy="sequential")
    assert ghost[0].momentum is None and ghost[0].stats_policy == "sequential"
    # An untracked BatchNorm stays untracked, so eval still normalizes over the batch, as before.
    free = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(6, 4, 2, 2)
    want = free(x)
    noisy = convert(free, "noisy", noise_std=0.1)
    assert noisy[0].running_mean is None
    torch.testing.assert_close(noisy(x), want, **EXACT)  # the same F.batch_norm call


# --- bad input ------------------------------------------------------------------------------------------

def test_single_value_slice_raises():
    layer = GhostBatchNorm(3, ghost_groups=8)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(8, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm(3, ghost_batch_size=1)(torch.randn(4, 3, 1, 1))


def test_small_ghost_batch_warns_once_per_instance():
    layer = GhostBatchNorm(3, ghost_groups=4)
    with pytest.warns(UserWarning, match="ghost batches of 2") as record:
        layer(torch.randn(8, 3))
        layer(torch.randn(8, 3))
    assert len([w for w in record if "ghost batches" in str(w.message)]) == 1
    # With spatial dims one sample per group is legal (unsynced BatchNorm, one sample per device),
    # still warned, and still normalized correctly.
    x = torch.randn(4, 3, 2, 2)
    with pytest.warns(UserWarning, match="ghost batches of 1"):
        y = GhostBatchNorm(3, ghost_groups=4)(x)
    torch.testing.assert_close(y, ref_ghost_norm(x, 4), **TOL[torch.float32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 or more per group: silent
        GhostBatchNorm(3, ghost_groups=2)(torch.randn(8, 3))


def test_non_divisible_batch_error_names_m_and_choices():
    with pytest.raises(ValueError) as err:
        GhostBatchNorm(3, ghost_groups=4)(torch.randn(10, 3))
    msg = str(err.value)
    assert "M=10" in msg and "ghost_groups=4" in msg and "[1, 2, 5, 10]" in msg
    with pytest.raises(ValueError) as err:
        GhostBatchNorm(3, ghost_batch_size=4)(torch.randn(12, 3, 2)[:6])
    msg = str(err.value)
    assert "M=6" in msg and "ghost_batch_size=4" in msg and "[1, 2, 3, 6]" in msg


@pytest.mark.parametrize("kw", [{}, {"ghost_groups": 2, "ghost_batch_size": 4}, {"ghost_groups": 0},
                                {"ghost_batch_size": 2.5}, {"ghost_groups": 2, "stats_policy": "last"},
                                {"ghost_groups": 2, "impl": "cuda"}])
def test_constructor_errors(kw):
    with pytest.raises(ValueError):
        GhostBatchNorm(3, **kw)


def test_batchnorm_constructor_positions_and_bias():
    # BatchNorm's positions (num_features, eps, momentum, affine, track_running_stats, device, dtype, *, bias);
    # the ghost arguments are keyword-only, so an old positional GhostBatchNorm(C, G) fails loudly.
    layer = GhostBatchNorm(4, 1e-3, None, True, False, "cpu", torch.float64, bias=False, ghost_groups=2)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, None, True, False)
    assert layer.weight.dtype == torch.float64 and layer.bias is None and layer.running_mean is None
    assert [n for n, _ in SeqNorm(4, channel_groups=2, ghost_groups=1, bias=False).named_parameters()] == ["weight"]
    assert NoisyBatchNorm(4, 1e-3, noise_std=0.1, bias=False).bias is None
    with pytest.raises(ValueError, match="exactly one of ghost_groups"):
        GhostBatchNorm(4, 2)  # eps=2 and no ghost argument
    with pytest.raises(TypeError):
        NoisyBatchNorm(4, 0.1)  # noise_std is keyword-only and required
    with pytest.raises(ValueError, match="eps must be positive"):  # BatchNorm's check, also with ghost groups
        GhostBatchNorm(4, 0.0, ghost_groups=2)(torch.randn(8, 4))


def test_wrong_rank_or_channels_raises():
    with pytest.raises(ValueError, match="2 to 5 dims"):
        GhostBatchNorm(3, ghost_groups=1)(torch.randn(3))
    with pytest.raises(ValueError, match="channels"):
        GhostBatchNorm(3, ghost_groups=1)(torch.randn(4, 5))


def test_odd_gradient_layouts(impl):
    # Autograd may hand the layer an expanded (stride-0) or differently laid out gradient.
    gen = torch.Generator().manual_seed(14)
    x = make_input((8, 3, 4, 4), "channels_last", torch.float64, gen).requires_grad_()
    layer = randomize(GhostBatchNorm(3, ghost_groups=2, impl=impl, dtype=torch.float64), gen)
    xr = x.detach().clone().requires_grad_()
    yr = affine(ref_ghost_norm(xr, 2), layer.weight.detach(), layer.bias.detach())
    for dy in (torch.randn(1, 3, 1, 4, generator=gen, dtype=torch.float64).expand(8, 3, 4, 4),
               torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)):  # contiguous vs channels_last x
        got, = torch.autograd.grad(layer(x), x, dy)
        want, = torch.autograd.grad(yr, xr, dy, retain_graph=True)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
