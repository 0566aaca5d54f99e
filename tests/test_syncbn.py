"""ghostsys SyncBatchNorm on real gloo ranks equals BatchNorm over each group's gathered batch.

Every rank builds the same seeded global batch and keeps its contiguous block (DESIGN §2). The
reference is plain ``nn.BatchNorm{1,2,3}d`` in this process, run on the gathered batch of each
group of consecutive ranks, with loss = sum over ranks of each rank's weighted-sum loss; so the
input gradient of rank r must be block r of the reference's, and per-rank weight/bias gradients
must sum to the reference's.

Tolerances, relative to each tensor's largest magnitude (values that are differences of O(scale)
terms cannot be held to a per-element relative bound):
- float64: 1e-12. Both sides compute the same quantities with sums reordered (rank-local sums
  plus an all-reduce versus one sum over the gathered batch); reordering sums of n <= 200 terms
  moves results by at most ~n·2^-53 ~ 2e-14, and normalization amplifies that by the input's
  mean/std ratio (~1.5 here). Observed: <= 2e-15.
- float32: 1e-5, the same bound with 2^-24 ~ 6e-8 per operation (~n·eps ~ 1e-5 worst case,
  ~log2(n)·eps ~ 5e-7 for pairwise summation). Observed: <= 2e-7. Real bugs are far larger:
  biased/unbiased variance mixed up is 1/(n-1) >= 5e-3, a mean of means with uneven ranks ~1e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from tests._mp import run_ranks
from ghostsys.run import dist as gdist
from ghostsys.nn.syncbn import SyncBatchNorm, convert_sync

C = 3
STEPS = 2  # two updates, so running stats check the momentum / cumulative-average recursion
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# name -> (global shape, dtype, channels_last, momentum, group_size, per-rank sample counts or None)
CASES_2 = {
    "2d_f64": ((8, C, 5, 4), torch.float64, False, 0.1, 2, None),
    "2d_f64_cl_cma": ((8, C, 5, 4), torch.float64, True, None, 2, None),
    "1d_f64": ((16, C), torch.float64, False, 0.1, 2, None),
    "3d_f64": ((4, C, 3, 4, 2), torch.float64, False, 0.3, 2, None),
    "2d_f64_uneven": ((8, C, 5, 4), torch.float64, False, 0.1, 2, (3, 5)),
    "2d_f64_empty_rank": ((8, C, 5, 4), torch.float64, False, 0.1, 2, (0, 8)),  # still joins collectives
    "2d_f32": ((8, C, 5, 4), torch.float32, False, 0.1, 2, None),
    "2d_f32_cl": ((8, C, 5, 4), torch.float32, True, 0.1, 2, None),
    "1d_f32": ((16, C), torch.float32, False, 0.1, 2, None),
}
CASES_4 = {
    "pairs_2d_f64": ((16, C, 4, 3), torch.float64, False, 0.1, 2, None),  # GhostNorm G=2
    "pairs_1d_f32": ((32, C), torch.float32, False, 0.1, 2, None),
    "world_2d_f64_cl": ((16, C, 4, 3), torch.float64, True, 0.1, 4, None),  # full BatchNorm
    "single_2d_f64": ((16, C, 4, 3), torch.float64, False, 0.1, 1, None),  # unsynced, G=4
}


def _counts(case: tuple, world: int) -> list[int]:
    shape, *_, sizes = case
    return list(sizes) if sizes else [shape[0] // world] * world


def _data(case: tuple, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch and loss weights for ``step``, plus initial weight and bias (same on every rank)."""
    shape, dtype = case[0], case[1]
    g = torch.Generator().manual_seed(1234 + step)
    # Non-zero mean and non-unit scale, so a one-pass E[x^2]-E[x]^2 or a missing sync would show.
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(dtype)
    lw = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    g0 = torch.Generator().manual_seed(99)
    weight = (1.0 + 0.5 * torch.randn(shape[1], generator=g0, dtype=torch.float64)).to(dtype)
    bias = (0.5 * torch.randn(shape[1], generator=g0, dtype=torch.float64)).to(dtype)
    return x, lw, weight, bias


def _cl_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _prep(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=_cl_format(x))
    return x.requires_grad_()


def _run_case(rank: int, world: int, case: tuple) -> dict:
    shape, dtype, cl, momentum, group_size, _ = case
    counts = _counts(case, world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    group = gdist.consecutive_subgroups(group_size)  # collective: every rank runs the same cases in order
    bn = SyncBatchNorm(shape[1], momentum=momentum, process_group=group, dtype=dtype)
    out: dict = {"y": [], "dx": [], "dw": [], "db": []}
    for step in range(STEPS):
        x_all, lw_all, w0, b0 = _data(case, step)
        if step == 0:
            with torch.no_grad():
                bn.weight.copy_(w0)
                bn.bias.copy_(b0)
        x = _prep(x_all[lo:hi].clone(), cl)
        y = bn(x)
        (y * lw_all[lo:hi]).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dw"].append(bn.weight.grad.clone())
        out["db"].append(bn.bias.grad.clone())
        bn.weight.grad = bn.bias.grad = None
        if step == 0 and hi > lo:
            out["y_is_cl"] = not cl or y.is_contiguous(memory_format=_cl_format(y))
            # Negative control: what an unsynchronized rank computes on its own block.
            out["y_unsynced"] = nn.functional.batch_norm(x.detach(), None, None, w0, b0, training=True)
    out.update(rm=bn.running_mean.clone(), rv=bn.running_var.clone(), nbt=int(bn.num_batches_tracked))
    bn.eval()
    out["y_eval"] = bn(_data(case, 0)[0][lo:hi]).detach()
    return out


def _ddp_model() -> nn.Module:
    torch.manual_seed(7)
    # No conv bias before a BatchNorm: its gradient is exactly zero, which no relative check can judge.
    return nn.Sequential(
        nn.Conv2d(2, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, 2, 1, bias=False), nn.BatchNorm2d(2)
    ).double()


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)


def _ddp_step(rank: int, world: int) -> dict:
    """One DDP step on CPU with converted layers: DDP must accept them and average the gradients."""
    model = convert_sync(_ddp_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    x_all, lw_all = _ddp_data()
    n = x_all.shape[0] // world
    (ddp(x_all[rank * n : (rank + 1) * n]) * lw_all[rank * n : (rank + 1) * n]).sum().backward()
    return {"grads": [p.grad for p in model.parameters()], "buffers": [b.clone() for b in model.buffers()]}


def _worker(rank: int, world: int, cases: dict, with_ddp: bool = False) -> dict:
    out = {name: _run_case(rank, world, case) for name, case in cases.items()}
    if with_ddp:
        out["ddp"] = _ddp_step(rank, world)
    return out


def _ref_bn(ndim: int, momentum: float | None, dtype: torch.dtype) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    return cls(C, momentum=momentum, dtype=dtype)


def _reference(case: tuple, world: int, group_size: int) -> list[dict]:
    """Per group of ``group_size`` consecutive ranks: plain BatchNorm on that group's gathered batch."""
    shape, dtype, _, momentum, _, _ = case
    counts = _counts(case, world)
    refs = []
    for start in range(0, world, group_size):
        lo, hi = sum(counts[:start]), sum(counts[: start + group_size])
        bn = _ref_bn(len(shape), momentum, dtype)
        ref: dict = {"lo": lo, "y": [], "dx": [], "dw": [], "db": []}
        for step in range(STEPS):
            x_all, lw_all, w0, b0 = _data(case, step)
            if step == 0:
                with torch.no_grad():
                    bn.weight.copy_(w0)
                    bn.bias.copy_(b0)
            x = x_all[lo:hi].clone().requires_grad_()
            y = bn(x)
            (y * lw_all[lo:hi]).sum().backward()
            ref["y"].append(y.detach())
            ref["dx"].append(x.grad)
            ref["dw"].append(bn.weight.grad.clone())
            ref["db"].append(bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
        ref.update(rm=bn.running_mean.clone(), rv=bn.running_var.clone(), nbt=int(bn.num_batches_tracked))
        bn.eval()
        ref["y_eval"] = bn(_data(case, 0)[0][lo:hi]).detach()
        refs.append(ref)
    return refs


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    r = RTOL[dtype]
    assert_close(actual, expected, rtol=r, atol=r * float(expected.abs().max()))


def _check(case: tuple, results: list[dict], world: int) -> None:
    dtype, group_size = case[1], case[4]
    counts = _counts(case, world)
    for g, ref in enumerate(_reference(case, world, group_size)):
        ranks = range(g * group_size, (g + 1) * group_size)
        for step in range(STEPS):
            for key in ("y", "dx"):
                got = torch.cat([results[r][key][step] for r in ranks])
                _close(got, ref[key][step], dtype)
            for key in ("dw", "db"):  # per-rank local sums; DDP would sum (then average) them
                _close(sum(results[r][key][step] for r in ranks), ref[key][step], dtype)
        _close(torch.cat([results[r]["y_eval"] for r in ranks]), ref["y_eval"], dtype)
        for r in ranks:
            _close(results[r]["rm"], ref["rm"], dtype)
            _close(results[r]["rv"], ref["rv"], dtype)
            assert results[r]["nbt"] == ref["nbt"] == STEPS
            assert results[r].get("y_is_cl", True), "channels_last input should give channels_last output"
    assert sum(counts) == case[0][0]


def _assert_clearly_differs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Far beyond any tolerance above: a checker comparing a thing with itself would fail here.
    assert (actual - expected).abs().max() > 1e-2
    with pytest.raises(AssertionError):
        _close(actual, expected, actual.dtype)


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_worker, 2, CASES_2, True)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(_worker, 4, CASES_4)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks_equal_batchnorm_on_gathered_batch(world2: list[dict], name: str) -> None:
    _check(CASES_2[name], [r[name] for r in world2], 2)


@pytest.mark.dist
def test_two_ranks_unsynced_negative_control(world2: list[dict]) -> None:
    case = CASES_2["2d_f64"]
    unsynced = torch.cat([r["2d_f64"]["y_unsynced"] for r in world2])
    _assert_clearly_differs(unsynced, _reference(case, 2, 2)[0]["y"][0])


@pytest.mark.dist
def test_ddp_on_cpu_averages_gradients_of_synced_layers(world2: list[dict]) -> None:
    # DDP averages parameter gradients over ranks: the reference loss is the mean of the ranks' losses.
    model = _ddp_model()
    x_all, lw_all = _ddp_data()
    ((model(x_all) * lw_all).sum() / len(world2)).backward()
    for r in world2:
        for got, p in zip(r["ddp"]["grads"], model.parameters()):
            _close(got, p.grad, torch.float64)
        for got, b in zip(r["ddp"]["buffers"], model.buffers()):
            _close(got.double(), b.double(), torch.float64)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks_subgroups_equal_ghostnorm(world4: list[dict], name: str) -> None:
    _check(CASES_4[name], [r[name] for r in world4], 4)


@pytest.mark.dist
def test_four_ranks_pairs_differ_from_full_batchnorm(world4: list[dict]) -> None:
    # G_M = 2 (pairs) must not equal G_M = 1 (all four ranks): the subgroup really is a subgroup.
    case = CASES_4["pairs_2d_f64"]
    pairs = torch.cat([r["pairs_2d_f64"]["y"][0] for r in world4])
    _assert_clearly_differs(pairs, _reference(case, 4, 4)[0]["y"][0])


@pytest.fixture(params=["no_group", "group_of_one"])
def world1(request: pytest.FixtureRequest):
    if request.param == "group_of_one":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield request.param
    finally:
        gdist.shutdown()


@pytest.mark.parametrize("channels_last", [False, True])
def test_world_one_equals_batchnorm_exactly(world1: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(C, momentum=None)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = SyncBatchNorm(C, momentum=None)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for _ in range(2):
        x = torch.randn(6, C, 4, 5) * 3 + 1
        lw = torch.randn_like(x)
        xr, xo = _prep(x.clone(), channels_last), _prep(x.clone(), channels_last)
        yr, yo = ref(xr), ours(xo)
        (yr * lw).sum().backward()
        (yo * lw).sum().backward()
        # Same F.batch_norm call on the same data: bit-identical, hence zero tolerance.
        assert_close(yo, yr, rtol=0, atol=0)
        assert_close(xo.grad, xr.grad, rtol=0, atol=0)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert_close(a, b, rtol=0, atol=0, msg=name)
    assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=0)
    ours.eval(), ref.eval()
    assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_convert_sync_replaces_batchnorm_and_keeps_eval_outputs() -> None:
    torch.manual_seed(0)
    already = nn.SyncBatchNorm(8)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, affine=False), already),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None),
    ).double()
    model.train()
    for _ in range(3):  # non-trivial running stats and num_batches_tracked
        model(torch.randn(7, 3, 6, 6, dtype=torch.float64))
    model.eval()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    keys, params = list(model.state_dict()), list(model.parameters())

    group = object()  # stands in for a ProcessGroup: convert_sync only stores it
    out = convert_sync(model, process_group=group)  # type: ignore[arg-type]
    assert out is model
    converted = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert len(converted) == 3 and all(m.process_group is group for m in converted)
    assert model[3][2] is already  # already synchronizing: left alone
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(not m.training for m in converted) and converted[0].running_mean.dtype == torch.float64
    assert_close(model(x), expected, rtol=0, atol=0)  # eval: same F.batch_norm on the same buffers

    root = convert_sync(nn.BatchNorm1d(5))
    assert isinstance(root, SyncBatchNorm) and root.training
