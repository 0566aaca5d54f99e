"""ghostsys.run.dist: launcher env parsing, (sum, count) reductions, subgroups, buffer policies, dead peers.

Reductions here add a handful of small integers or dyadic values that float64 represents exactly,
so the expected values are compared with zero tolerance unless a division says otherwise.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ghostsys.run import dist as gdist
from tests._mp import run_ranks

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launched_world_defaults_and_parsing(clean_env: pytest.MonkeyPatch) -> None:
    assert gdist.launched_world() == (0, 1, 0)
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert gdist.launched_world() == (5, 8, 1)


@pytest.mark.parametrize(("rank", "world", "match"), [("2", "2", "inconsistent"), ("x", "2", "RANK='x'")])
def test_launched_world_rejects_bad_env(clean_env: pytest.MonkeyPatch, rank: str, world: str, match: str) -> None:
    clean_env.setenv("RANK", rank)
    clean_env.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match=match):
        gdist.launched_world()


def test_single_process_is_a_no_op_world(clean_env: pytest.MonkeyPatch) -> None:
    info = gdist.init(device="cpu")
    assert info == gdist.DistInfo(0, 1, 0, None, torch.device("cpu")) and info.is_main
    assert not gdist.is_initialized()  # world 1 creates no process group
    t = torch.tensor([1.0, 2.0])
    assert gdist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    s, n = gdist.sum_count(3.0, 4)
    assert (s.item(), n.item()) == (3.0, 4) and n.dtype == torch.int64
    assert gdist.consecutive_subgroups(1) is None
    with pytest.raises(ValueError, match=r"valid choices: \[1\]"):
        gdist.consecutive_subgroups(2)
    assert gdist.broadcast_object({"a": 1}) == {"a": 1}
    gdist.barrier()
    gdist.shutdown()
    gdist.shutdown()  # safe twice


def test_device_choice_honours_accelerate_use_cpu(clean_env: pytest.MonkeyPatch) -> None:
    # Pretend CUDA exists to exercise the choice without a GPU; _pick_device only inspects it.
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    assert gdist._pick_device(None, 3) == torch.device("cuda", 3)
    assert gdist._pick_device("cpu", 3) == torch.device("cpu")
    assert gdist._pick_device("cuda:1", 3) == torch.device("cuda", 1)
    clean_env.setenv("ACCELERATE_USE_CPU", "1")
    assert gdist._pick_device(None, 3) == torch.device("cpu")


def _collectives(rank: int, world: int) -> dict:
    out: dict = {}
    again = gdist.init()  # already initialized by the helper: describe, don't re-init
    out["info"] = (again.rank, again.world_size, again.backend, again.is_main)
    # Ranks hold different counts; the global mean is sum of sums over sum of counts.
    total, count = torch.tensor([1.0, 10.0]) * (rank + 1), torch.tensor([rank + 1, 2 * rank + 1])
    s, n = gdist.sum_count(total, count)
    out["sum_count"] = (s, n)
    out["global_mean"] = gdist.global_mean(float(rank + 1), rank + 1)
    # Rank 0 holds 1 sample of value 0, rank 1 holds 3 samples of value 4: the mean is 3, while
    # a mean of the two ranks' means would be 2.
    values = torch.zeros(1) if rank == 0 else torch.full((3,), 4.0)
    out["uneven_mean"] = gdist.global_mean(values.sum(), values.numel())
    with pytest.raises(ValueError, match=r"valid choices: \[1, 2\]") as err:
        gdist.consecutive_subgroups(3)
    out["subgroup_error"] = str(err.value)
    out["subgroup_world"] = gdist.consecutive_subgroups(2)
    single = gdist.consecutive_subgroups(1)
    out["subgroup_single_size"] = torch.distributed.get_world_size(single)

    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
        bn.running_var.fill_(4.0 * rank)
        bn.num_batches_tracked.fill_(7)
    gdist.all_reduce_buffers_mean_(bn)
    out["buffers"] = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    bn.num_batches_tracked.fill_(rank)  # ranks that ran different numbers of updates
    bn.running_var.fill_(float(rank))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        gdist.all_reduce_buffers_mean_(bn)
    out["var_after_error"] = bn.running_var.clone()  # untouched: the check runs before any averaging

    bn.running_mean.fill_(float(rank))
    gdist.broadcast_buffers_(bn, src=1)
    out["broadcast_buffers"] = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    out["object"] = gdist.broadcast_object({"from": rank}, src=0)
    gdist.barrier()
    return out


@pytest.mark.dist
def test_collectives_on_two_ranks() -> None:
    r0, r1 = run_ranks(_collectives, 2)
    for rank, out in enumerate((r0, r1)):
        assert out["info"] == (rank, 2, "gloo", rank == 0)
        s, n = out["sum_count"]
        assert_close(s, torch.tensor([3.0, 30.0]), rtol=0, atol=0)
        assert_close(n, torch.tensor([3, 4]), rtol=0, atol=0)  # integer counts stay integers
        assert_close(out["global_mean"], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=0)  # python floats
        assert_close(out["uneven_mean"], torch.tensor(3.0), rtol=0, atol=0)  # not 2.0, the mean of means
        assert "group_size=3 does not divide world size 2" in out["subgroup_error"]
        assert out["subgroup_world"] is None and out["subgroup_single_size"] == 1
        mean, var, nbt = out["buffers"]
        assert_close(mean, torch.tensor([1.5, 3.0, 4.5]), rtol=0, atol=0)  # (x + 2x) / 2, exact in binary
        assert_close(var, torch.tensor([2.0] * 3), rtol=0, atol=0)
        assert nbt == 7  # integer buffers are checked, never averaged
        assert_close(out["var_after_error"], torch.full((3,), float(rank)), rtol=0, atol=0)
        assert_close(out["broadcast_buffers"][0], torch.ones(3), rtol=0, atol=0)
        assert out["broadcast_buffers"][1] == 1
        assert out["object"] == {"from": 0}


def _peer_dies(rank: int, world: int) -> str:
    t = torch.ones(2)
    gdist.all_reduce_sum_(t)  # both ranks are connected and past init
    if rank == 1:
        os._exit(0)  # a crash without cleanup; exit code 0 so the helper doesn't cancel rank 0
    try:
        gdist.all_reduce_sum_(t)
    except RuntimeError as err:  # gloo raises DistBackendError, a RuntimeError
        return f"raised: {err}"
    return "returned"


def _peer_stalls(rank: int, world: int, flag: str) -> str:
    pair = gdist.consecutive_subgroups(2)  # {0, 1} and {2, 3}: they must inherit init's timeout
    gdist.all_reduce_sum_(torch.ones(2))
    if rank == 1:  # alive but never joins its pair's next collective: only the timeout can end it
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "stalled"
    try:
        gdist.all_reduce_sum_(torch.ones(2), group=pair)
        result = "returned"
    except RuntimeError as err:
        result = f"raised: {err}"
    if rank == 0:
        open(flag, "w").close()
    return result


@pytest.mark.dist
def test_dead_peer_makes_collective_raise() -> None:
    # helper timeout_s only guards the suite; the assertion is on the exception, not the time.
    r0, r1 = run_ranks(_peer_dies, 2, collective_timeout_s=5.0, timeout_s=60.0)
    assert r0.startswith("raised:"), r0
    assert r1 is None


@pytest.mark.dist
def test_stalled_peer_hits_collective_timeout_in_subgroup(tmp_path) -> None:
    # Without the inherited timeout the subgroup would wait torch's 30 min default, and the
    # helper's 60 s guard would fail the test with TimeoutError instead.
    r0, r1, r2, r3 = run_ranks(_peer_stalls, 4, str(tmp_path / "flag"), collective_timeout_s=3.0, timeout_s=60.0)
    assert r0.startswith("raised:") and "imed out" in r0, r0  # gloo: "Timed out waiting ..."
    assert r1 == "stalled"
    assert r2 == r3 == "returned"  # the other pair is unaffected (negative control)
