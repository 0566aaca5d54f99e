"""The ghost batch-norm kernels added for speed ("rows", "cols", "chunks", "fused") against the same independent
references as tests/test_norms.py: the papers' Figure 2 / A1 function, hand-computed running
statistics and nn.BatchNorm over chunks.

Tolerances are test_norms.TOL, derived there: float64 1e-10 (the kernels differ from the reference
only in summation order; a wrong formula is off by 1e-3 or more), float32 5e-5 (reordering observed
<= 5e-6). Where a kernel and the reference run the very same native kernel on the same data we
demand bit equality and say so. Each check has a negative control that must fail it.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostsys.nn import _ghost_kernels, _ghost_moments, fused
from ghostsys.nn.norms import GhostBatchNorm, SeqNorm
from tests.test_norms import EXACT, TOL, affine, make_input, randomize, ref_ghost_norm, ref_group_moments

NEW = ("rows", "cols", "chunks", "fused")
COLUMN = ("cols", "fused")  # the kernels that read (M, C) / channels_last memory natively
# The layouts each kernel reads natively; anything else is first made dense in one of them.
SHAPES = {
    "rows": [((12, 3, 5), "contiguous"), ((8, 4, 3, 2), "contiguous"), ((8, 4, 3, 2), "noncontiguous"),
             ((8, 3, 2, 2, 3), "contiguous")],
    "cols": [((12, 5), "contiguous"), ((12, 5), "noncontiguous"), ((8, 4, 3, 2), "channels_last"),
             ((8, 3, 2, 2, 3), "channels_last_3d"), ((12, 5, 1), "contiguous"), ((8, 4, 1, 1), "contiguous")],
    "chunks": [((12, 5), "contiguous"), ((8, 4, 3, 2), "contiguous"), ((8, 4, 3, 2), "channels_last"),
               ((8, 3, 2, 2, 3), "channels_last_3d")],
}
# The fused kernel takes what cols takes, and channel counts around its tile width (16 floats / 8 doubles) and
# groups longer than its tile-row limit (32 rows), where it switches to whole-row passes with blocked sums.
SHAPES["fused"] = SHAPES["cols"] + [((8, 37), "contiguous"), ((8, 16), "contiguous"), ((264, 19), "contiguous"),
                                    ((8, 21, 5, 3), "channels_last")]
# ... and NCHW-like memory as it is (its planar kernel): rows of 16 floats / 8 doubles and ragged tails.
SHAPES["fused"] += [((8, 4, 3, 2), "contiguous"), ((8, 4, 3, 2), "noncontiguous"), ((12, 3, 5), "contiguous"),
                    ((8, 3, 2, 2, 3), "contiguous"), ((8, 2, 4, 4), "contiguous"), ((8, 3, 5, 7), "contiguous")]
CASES = [(impl, shape, fmt) for impl, cases in SHAPES.items() for shape, fmt in cases]
pytestmark = pytest.mark.filterwarnings("ignore:.*ghost batches of")  # tiny ghost batches are fine for numerics


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny kernel calls (gradcheck): one thread avoids OpenMP spin-waits on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _memory_format(fmt: str):
    return {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}.get(fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl,shape,fmt", CASES)
def test_matches_figure2_outputs_and_grads(impl, shape, fmt, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{impl}{shape}{fmt}{dtype}".encode()))
    groups = 4 if shape[0] % 4 == 0 else 2
    x = make_input(shape, fmt, dtype, gen).requires_grad_()
    layer = randomize(GhostBatchNorm(shape[1], ghost_groups=groups, impl=impl, dtype=dtype), gen)
    y = layer(x)
    mf = _memory_format(fmt)
    dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    if mf is not None:  # as the next channels_last layer would send it
        dy = dy.contiguous(memory_format=mf)
    gx, gw, gb = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    yr = affine(ref_ghost_norm(xr, groups), w, b)
    want = torch.autograd.grad(yr, [xr, w, b], dy)
    for got, wnt in ((y, yr), (gx, want[0]), (gw, want[1]), (gb, want[2])):
        torch.testing.assert_close(got, wnt, **TOL[dtype])
    if mf is not None:  # output and input gradient keep the input's memory format
        assert y.is_contiguous(memory_format=mf) and gx.is_contiguous(memory_format=mf)
    # Negative control: the same check against the reference with half the groups fails clearly.
    assert (y - affine(ref_ghost_norm(x.detach(), groups // 2), w, b)).abs().max() > 1000 * TOL[dtype]["atol"]


@pytest.mark.parametrize("impl,shape,fmt", [("rows", (8, 3, 2, 2), "contiguous"), ("rows", (8, 2, 3), "contiguous"),
                                            ("cols", (8, 3), "contiguous"), ("cols", (8, 3, 2, 2), "channels_last"),
                                            ("chunks", (8, 3, 2, 2), "channels_last"), ("fused", (8, 3), "contiguous"),
                                            ("fused", (8, 3, 2, 2), "channels_last"),
                                            ("fused", (136, 3), "contiguous"), ("fused", (8, 3, 2, 2), "contiguous")])
def test_gradcheck_float64(impl, shape, fmt):
    gen = torch.Generator().manual_seed(1)
    x = make_input(shape, fmt, torch.float64, gen).requires_grad_()
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()
    gbn = _ghost_kernels.ghost_batch_norm
    assert torch.autograd.gradcheck(lambda x, w, b: gbn(x, 2, w, b, 1e-5, None, impl), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: gbn(x, 2, None, None, 1e-5, None, impl), (x,))  # no affine
    assert torch.autograd.gradcheck(lambda x, w: gbn(x, 2, w, None, 1e-5, None, impl), (x, w))  # weight only


def test_rows_in_chunks(monkeypatch):
    # Row moments taken over many small chunks (the production chunk is 16 MiB: one chunk here).
    monkeypatch.setattr(_ghost_moments, "_ROWS_CHUNK_BYTES", 64)
    gen = torch.Generator().manual_seed(2)
    x = make_input((8, 3, 4, 4), "contiguous", torch.float64, gen).requires_grad_()
    y = _ghost_kernels.ghost_batch_norm(x, 4, None, None, 1e-5, None, "rows")
    torch.testing.assert_close(y, ref_ghost_norm(x.detach(), 4), **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda x: _ghost_kernels.ghost_batch_norm(x, 4, None, None, 1e-5, None, "rows"),
                                    (x,))


@pytest.mark.parametrize("impl,fmt", [("rows", "contiguous"), ("cols", "channels_last"), ("chunks", "contiguous"),
                                      ("fused", "channels_last"), ("fused", "contiguous")])
def test_output_takes_inplace_ops(impl, fmt):
    # An in-place ReLU right after the norm (every model here does it) needs an output that is not a
    # view made inside the kernel; the gradient must still be right.
    gen = torch.Generator().manual_seed(3)
    x = make_input((8, 3, 2, 2), fmt, torch.float64, gen).requires_grad_()
    y = F.relu(_ghost_kernels.ghost_batch_norm(x, 2, None, None, 1e-5, None, impl), inplace=True)
    got, = torch.autograd.grad(y.sum(), x)
    xr = x.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.relu(ref_ghost_norm(xr, 2)).sum(), xr)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("impl", NEW)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_mean_policy_running_stats(impl, momentum):
    gen = torch.Generator().manual_seed(4)
    groups = 4
    fmt = "channels_last" if impl in COLUMN else "contiguous"
    gbn = randomize(GhostBatchNorm(3, ghost_groups=groups, momentum=momentum, impl=impl), gen)
    rm, rv = gbn.running_mean.double().clone(), gbn.running_var.double().clone()
    n0 = int(gbn.num_batches_tracked)
    for step in range(3):
        x = make_input((16, 3, 2, 3), fmt, torch.float32, gen)
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
    seq(x)
    assert (seq.running_mean - rm.float()).abs().max() > 1e-2


@pytest.mark.parametrize("impl", NEW)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequential_policy_is_batchnorm_over_chunks(impl, momentum):
    gen = torch.Generator().manual_seed(5)
    groups = 4
    fmt = "channels_last" if impl in COLUMN else "contiguous"
    bn = randomize(nn.BatchNorm2d(3, momentum=momentum), gen)
    gbn = GhostBatchNorm(3, ghost_groups=groups, momentum=momentum, stats_policy="sequential", impl=impl)
    gbn.load_state_dict(bn.state_dict())
    for step in range(2):
        x = make_input((16, 3, 3, 3), fmt, torch.float32, gen)
        xb, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        yb = torch.cat([bn(chunk) for chunk in xb.chunk(groups)])  # gradient accumulation's forwards
        yg = gbn(xg)
        dy = torch.randn(yb.shape, generator=gen)
        want = torch.autograd.grad(yb, [xb, bn.weight, bn.bias], dy)
        got = torch.autograd.grad(yg, [xg, gbn.weight, gbn.bias], dy)
        torch.testing.assert_close(yg, yb, **TOL[torch.float32])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float32])
    # "chunks" IS BatchNorm over the chunks (same calls, same buffers): bit-identical. The others
    # update from their own moments: equal up to rounding.
    tol = EXACT if impl == "chunks" else TOL[torch.float32]
    torch.testing.assert_close(gbn.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(gbn.running_var, bn.running_var, **tol)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 2 * groups
    # Negative control: one BatchNorm over the whole batch ends elsewhere.
    whole = nn.BatchNorm2d(3, momentum=momentum)
    whole(x)
    assert (whole.running_var - bn.running_var).abs().max() > 1e-2


def test_float32_as_accurate_as_batchnorm_far_from_zero():
    # Activations whose mean is 100 standard deviations from 0 cost every float32 formula about
    # log2(100) bits. BatchNorm rounds once at that magnitude (x - mean; x * scale + shift); the new
    # kernels round at most twice there (also sum(dy * x) - mean * sum(dy) in "rows", and the b*x + k
    # form of dx), so we state a bound of 8x the drift of nn.BatchNorm over the same chunks from the
    # float64 reference, measured in this run (a factor 2 for each extra rounding, twice).
    gen = torch.Generator().manual_seed(6)
    groups = 4
    x64 = torch.randn(32, 6, 8, 8, generator=gen, dtype=torch.float64) + 100.0
    dy64 = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    xr = x64.clone().requires_grad_()
    want_y = ref_ghost_norm(xr, groups)
    want_dx, = torch.autograd.grad(want_y, xr, dy64)

    def drift(fn, fmt):
        x = x64.float().contiguous(memory_format=fmt).requires_grad_()
        y = fn(x)
        dx, = torch.autograd.grad(y, x, dy64.float().contiguous(memory_format=fmt))
        return (y.double() - want_y).abs().max().item(), (dx.double() - want_dx).abs().max().item()

    bn = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
    base = drift(lambda x: torch.cat([bn(c) for c in x.chunk(groups)]), torch.contiguous_format)
    assert base[0] > 0 and base[1] > 0  # float32 really does drift here: the comparison means something
    for impl, fmt in (("rows", torch.contiguous_format), ("cols", torch.channels_last),
                      ("chunks", torch.contiguous_format), ("fused", torch.channels_last),
                      ("fused", torch.contiguous_format)):
        got = drift(lambda x: _ghost_kernels.ghost_batch_norm(x, groups, None, None, 1e-5, None, impl), fmt)
        assert got[0] <= 8 * base[0] and got[1] <= 8 * base[1], (impl, got, base)
    # Negative control: the naive one-pass variance E[x^2] - E[x]^2 in float32 breaks the bound.
    xf = x64.float().view(groups, -1, 6, 64)
    mean = xf.mean((1, 3), keepdim=True)
    var = (xf.square().mean((1, 3), keepdim=True) - mean.square()).clamp_min(0)
    naive = ((xf - mean) / torch.sqrt(var + 1e-5)).view(x64.shape)
    assert (naive.double() - want_y).abs().max() > 8 * base[0]


@pytest.mark.skipif(not fused.available(), reason="the fused kernel could not be built here (no compiler)")
def test_fused_long_group_moments_far_from_zero():
    # Groups longer than the tile limit take the statistics block by block (64 rows), merging the blocks' means
    # and centred sums of squares in double. 3 full blocks and a ragged one, 100 standard deviations from zero.
    # Bounds in float32, with u its unit roundoff and k = 64 rows a block: a block's sum rounds by <= k*u*sum|x|,
    # so each mean is off by <= k*u*max|x| (the double merge and the float64 reference add ~1e-16: nothing at this
    # scale); the centred squares are all >= 0, so their float sum is off by <= k*u relatively, and centring on a
    # mean off by d adds d^2 per row. (float64 is held to 1e-10 of the reference by the tests above.)
    dtype = torch.float32
    gen = torch.Generator().manual_seed(7)
    groups, n, k, u = 2, 64 * 3 + 5, 64, torch.finfo(dtype).eps / 2
    x64 = torch.randn(groups * n, 11, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, 11) + 100.0
    _, mean, var = torch.ops.ghostsys.ghost_cols(x64.to(dtype), groups, None, None, None, None, 0.0, 1e-5)
    want_var, want_mean = torch.var_mean(x64.view(groups, n, 11), dim=1)  # unbiased, as the kernel's var
    mean_tol = (k + 2) * u * x64.abs().max().item()
    var_tol = (k + 4) * u * want_var + mean_tol**2 * n / (n - 1)
    assert ((mean.double() - want_mean).abs() <= mean_tol).all()
    assert ((var.double() - want_var).abs() <= var_tol).all()
    # Negative control: the one-pass E[x^2] - E[x]^2 at this dtype breaks the variance bound.
    xd = x64.to(dtype).view(groups, n, 11)
    naive = (xd.square().mean(1) - xd.mean(1).square()) * n / (n - 1)
    assert ((naive.double() - want_var).abs() > var_tol).any()


@pytest.mark.parametrize("x,policy,want", [
    (torch.zeros(8, 4, 3, 3), "mean", "fused"),
    (torch.zeros(8, 4, 5), "mean", "fused"),
    (torch.zeros(128, 16, 32, 33), "mean", "rows"),  # NCHW beyond ResNet-56's largest layer
    (torch.zeros(8, 4), "mean", "fused"),
    (torch.zeros(8, 4, 1, 1), "mean", "fused"),
    (torch.zeros(8, 4, 3, 3).contiguous(memory_format=torch.channels_last), "mean", "fused"),
    (torch.zeros(8, 4, 3, 3), "sequential", "chunks"),
    (torch.zeros(256, 512), "mean", "fused"),
    (torch.zeros(128, 64, 16, 16).contiguous(memory_format=torch.channels_last), "mean", "fused"),
    (torch.zeros(8, 4, 3, 3, dtype=torch.bfloat16), "mean", "vectorized"),
])
def test_auto_dispatch(x, policy, want):
    stats = _ghost_kernels.Sequential(torch.zeros(4), torch.ones(4), [0.1] * 2) if policy == "sequential" else None
    assert _ghost_kernels.choose_impl(x, 2, stats) == want


# Without the fused kernel (no compiler), "auto" goes back to the ATen kernels chosen as before it existed.
@pytest.mark.parametrize("x,want", [
    (torch.zeros(8, 4), "cols"),
    (torch.zeros(8, 4, 3, 3), "rows"),
    (torch.zeros(8, 4, 3, 3).contiguous(memory_format=torch.channels_last), "cols"),
    (torch.zeros(256, 512), "chunks"),  # ghost groups of more than 16384 values
    (torch.zeros(128, 64, 16, 16).contiguous(memory_format=torch.channels_last), "loop"),
])
def test_auto_dispatch_without_the_fused_kernel(x, want, monkeypatch):
    monkeypatch.setattr(fused, "_state", {"ok": False, "error": "no compiler"})
    assert _ghost_kernels.choose_impl(x, 2, None) == want


def test_auto_keeps_off_fused_for_what_it_does_not_take():
    x = torch.zeros(8, 4)
    w64 = torch.ones(4, dtype=torch.float64)
    assert _ghost_kernels.choose_impl(x, 2, None, weight=w64) == "cols"  # a float64 weight on a float32 input
    strided = torch.ones(8)[::2]
    assert _ghost_kernels.choose_impl(x, 2, None, bias=strided) == "cols"
    with pytest.raises(ValueError, match="impl='fused' needs"):
        _ghost_kernels.ghost_batch_norm(x, 2, w64, None, 1e-5, None, "fused")


def test_fused_is_differentiable_once_and_says_so():
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = _ghost_kernels.ghost_batch_norm(x, 2, None, None, 1e-5, None, "fused")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    # Negative control: the twice-differentiable kernel gives a second derivative.
    yv = _ghost_kernels.ghost_batch_norm(x, 2, None, None, 1e-5, None, "vectorized")
    gx, = torch.autograd.grad((yv ** 3).sum(), x, create_graph=True)
    assert gx.requires_grad


def test_seqnorm_on_new_paths_matches_reference():
    gen = torch.Generator().manual_seed(7)
    for impl, fmt in (("rows", "contiguous"), ("cols", "channels_last"), ("chunks", "contiguous"),
                      ("fused", "channels_last")):
        layer = randomize(SeqNorm(6, channel_groups=3, ghost_groups=2, impl=impl, dtype=torch.float64), gen)
        x = make_input((8, 6, 3, 3), fmt, torch.float64, gen)
        want = affine(ref_ghost_norm(F.group_norm(x, 3, eps=1e-5), 2), layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), want, **TOL[torch.float64])


def test_torch_compile_traces_auto_through_the_aten_kernel():
    # The compiled kernel is opaque to torch.compile; under it "auto" takes the ATen "cols" formulation.
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(8, 16), GhostBatchNorm(16, ghost_groups=4), nn.ReLU(), nn.Linear(16, 2)).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    want_y = model(x)
    want_g, = torch.autograd.grad(want_y.sum(), model[0].weight)
    torch._dynamo.reset()
    y = torch.compile(model, backend="aot_eager")(x)
    got_g, = torch.autograd.grad(y.sum(), model[0].weight)
    torch.testing.assert_close(y, want_y, **TOL[torch.float64])
    torch.testing.assert_close(got_g, want_g, **TOL[torch.float64])
    # Negative control: the same weights with the norm over the whole batch (no ghost groups) give something else.
    whole = F.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps)
    assert (model[3](F.relu(whole)) - y).abs().max() > 1e-3
