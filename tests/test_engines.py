"""Engine adapters vs an independent single-process reference, through the real launchers (CPU, gloo).

Each launch runs tests/engine_worker.py on every rank: a 2-layer MLP (no BatchNorm), SGD with momentum
and weight decay, StepLR, 3 steps; rank r trains on block r of a seeded global batch of M=16, split into
nfp in {1, 2} micro-batches. The reference takes plain SGD steps, written out here, on the mean loss over
all 16 samples. Because StepLR halves the lr every step, a scheduler stepped twice per optimizer step
(Accelerate's prepared scheduler on 2 processes) would also fail the comparison.

Process start-up (torch + deepspeed imports) dominates, so each launch runs a whole grid of checks.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from ghostsys.run.engines import make_engine, validate_ds_config
from ghostsys.run.launchers import port_clash
from tests import engine_worker as W
from tests._launch import ROOT, launcher_cmd

LAUNCH_TIMEOUT_S = 300  # generous: 2 shared CPU cores; a hung gloo rank is what this guards against

# float64: the distributed runs add the same per-sample gradient terms in another order (per micro-batch
# means, /nfp, summed over ranks, /world) than one mean over 16; each reordering costs a few ulp (~1e-16)
# and 3 steps of this small, well-conditioned MLP amplify that by far less than 1e4 (measured: ~1e-16), so
# 1e-10 keeps a wide margin yet sits ~1e9 below the effect of a wrong 1/nfp scaling (checked below).
# float32 (DeepSpeed, which cannot train float64): the engine rounds every op to float32 while the
# reference runs float64 from the same float32 start, so the gap is accumulated float32 rounding: a few
# eps32 (6e-8) per op over 3 steps on weights of size ~0.3, measured ~3e-8 absolute; atol 1e-6 / rtol 1e-5
# leave a ~30x margin for other reduction orders and still sit ~1e4 below the wrong-scaling effect.
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}
CLEARLY_WRONG = 1e-3  # relative distance the negative control must at least reach (measured: ~0.13)

# launcher -> (processes, engines run in each process). tests/_launch.py holds the exact commands; note
# `accelerate launch --cpu --num_processes 2` starts ONE process, so it uses --multi_gpu + ACCELERATE_USE_CPU.
LAUNCHES = {"python": (1, ["accelerate", "deepspeed"]), "torchrun": (2, ["accelerate", "deepspeed"]),
            "accelerate": (2, ["accelerate"]), "deepspeed": (2, ["deepspeed"])}


def launch_test(fn):
    """Mark a test that needs the launches: several processes (dist), tens of seconds (slow)."""
    return pytest.mark.dist(pytest.mark.slow(fn))


def _start(name: str, tmp_path_factory) -> tuple[subprocess.Popen, str, Path]:
    nprocs, engines = LAUNCHES[name]
    out = tmp_path_factory.mktemp(name)
    cmd, extra_env = launcher_cmd(name, nprocs, str(Path(W.__file__)))
    cmd += ["--engine", *engines, "--out", str(out)]
    # A fresh extensions dir: a DeepSpeed JIT op build (minutes) must not hide in a warm cache.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra_env,
           "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions"))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own process group: a timeout kills the ranks too
    return proc, " ".join(cmd), out


def _finish(proc: subprocess.Popen, cmd: str, out: Path) -> tuple[int, str, Path]:
    try:
        log = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0] + f"\n[killed after {LAUNCH_TIMEOUT_S} s]"
    return proc.returncode, f"{cmd}\n{log[-8000:]}", out


@pytest.fixture(scope="module")
def all_launches(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Start every launch at once (their launcher start-ups are serial, so 2 cores overlap them); collect all.

    Concurrent launches can race for a rendezvous port; such a launch (only) is rerun once, alone."""
    started = {name: _start(name, tmp_path_factory) for name in LAUNCHES}
    done = {name: _finish(*args) for name, args in started.items()}
    for name, (rc, log, _) in list(done.items()):
        if rc != 0 and port_clash(log):
            done[name] = _finish(*_start(name, tmp_path_factory))
    return done


@pytest.fixture(params=sorted(LAUNCHES))
def launched(request, all_launches) -> tuple[int, list[str], list[dict]]:
    """One launch's (world, engines, per-rank JSON results); fails with the launch's log if it failed."""
    world, engines = LAUNCHES[request.param]
    rc, log, out = all_launches[request.param]
    assert rc == 0, f"launch exited {rc}:\n{log}"
    return world, engines, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@functools.cache
def reference(dname: str, grad_scale: float = 1.0) -> torch.Tensor:
    """Plain SGD (momentum, wd, lr halved each step) on the full-batch mean loss, float64, one process."""
    dtype = getattr(torch, dname)
    model = W.build_model(dtype).double()  # the engines' start, float32-rounded where they run float32
    params, bufs = list(model.parameters()), [None] * len(list(model.parameters()))
    for step in range(W.STEPS):
        x, y = (t.double() for t in W.global_batch(step, dtype))
        grads = torch.autograd.grad(W.loss_fn(model(x), y), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = grad_scale * g + W.WD * p
                bufs[i] = d if bufs[i] is None else W.MOMENTUM * bufs[i] + d
                p -= W.LR * W.GAMMA**step * bufs[i]
    return torch.cat([p.detach().reshape(-1) for p in params])


def _runs(ranks: list[dict], kind: str):
    for r in ranks:
        for key, flat in r["results"].items():
            if key.endswith("/" + kind):
                yield r["rank"], key, key.split("/")[1], torch.tensor(flat, dtype=torch.float64)


@launch_test
def test_launch_started_every_rank_on_gloo(launched):
    world, engines, ranks = launched
    assert sorted(r["rank"] for r in ranks) == list(range(world))
    # Alone, only the DeepSpeed adapter makes a (1-rank gloo) group; two ranks must talk over gloo.
    assert all(r["world"] == world and r["backend"] in ({"gloo"} if world > 1 else {"gloo", None}) for r in ranks)
    expected = {f"{n}/{W.GRID[n][0]}/zero{z}/nfp{k}/train" for n in engines for z in W.GRID[n][1] for k in W.NFPS}
    assert expected <= set(ranks[0]["results"])


@launch_test
def test_final_weights_match_reference_on_every_rank(launched):
    _, _, ranks = launched
    checked = 0
    for rank, key, dname, got in _runs(ranks, "train"):
        assert_close(got, reference(dname), **TOL[dname], msg=lambda m: f"rank {rank} {key}: {m}")
        checked += 1
    assert checked >= 2


@launch_test
def test_ranks_hold_identical_weights(launched):
    # Every rank applies the same all-reduced update (DDP) or all-gathers the same partitions (ZeRO).
    _, _, ranks = launched
    for key, flat in ranks[0]["results"].items():
        for other in ranks[1:]:  # (contract messages are strings: equal too)
            assert other["results"][key] == flat, key


@launch_test
def test_checkpoint_round_trip_continues_identically(launched):
    # Same arithmetic in the same order after restoring weights, momentum, lr and schedule: exact equality.
    _, _, ranks = launched
    for rank, key, dname, got in _runs(ranks, "resumed"):
        uninterrupted = next(r for r in ranks if r["rank"] == rank)["results"][key.replace("resumed", "train")]
        assert_close(got, torch.tensor(uninterrupted, dtype=torch.float64), rtol=0, atol=0)
        assert_close(got, reference(dname), **TOL[dname])


@launch_test
def test_negative_control_unscaled_adapter_differs_clearly(launched):
    # The adapter without 1/nfp must miss the reference by far more than TOL, and match a reference with
    # its gradient scaled by nfp: the comparison detects exactly the bug it should, not noise.
    _, _, ranks = launched
    for rank, key, dname, got in _runs(ranks, "unscaled"):
        ref = reference(dname)
        assert ((got - ref).norm() / ref.norm()).item() > CLEARLY_WRONG, key
        assert_close(got, reference(dname, grad_scale=max(W.NFPS)), **TOL[dname])


@launch_test
def test_step_before_the_last_micro_batch_raises(launched):
    _, engines, ranks = launched
    for r in ranks:
        for name in engines:
            assert "step() after 1 backward() calls, expected nfp=2" in r["results"][f"{name}/contract"]


def test_deepspeed_refuses_float64_up_front():
    # Refused before any process group or deepspeed import, so this runs in the test process.
    model = W.build_model(torch.float64)
    with pytest.raises(ValueError, match="DeepSpeed cannot train float64"):
        make_engine("deepspeed", model, torch.optim.SGD(model.parameters(), lr=0.1), None, nfp=1, micro_batch=16,
                    world_size=1, zero_stage=1)


def test_validate_ds_config_names_every_conflict():
    user = {"gradient_accumulation_steps": 4, "train_batch_size": 64, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "Adam"}}
    with pytest.raises(ValueError) as err:
        validate_ds_config(user, micro_batch=4, nfp=2, world_size=2, zero_stage=2)
    msg = str(err.value)
    for part in ("gradient_accumulation_steps=4 (ghostsys needs 2)", "train_batch_size=64 (ghostsys needs 16)",
                 "zero_optimization.stage=1 (ghostsys needs 2)", "ghostsys builds the optimizer itself"):
        assert part in msg
    assert "train_micro_batch_size_per_gpu" not in msg  # not set by the user: no conflict to report


def test_validate_ds_config_merges_consistent_user_config():
    user = {"gradient_clipping": 1.0, "train_batch_size": "auto", "zero_optimization": {"overlap_comm": True}}
    cfg = validate_ds_config(user, micro_batch=4, nfp=2, world_size=2, zero_stage=2)
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    geometry = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"])
    assert geometry == (4, 2, 16)
    assert "fp16" not in cfg and "bf16" not in cfg and cfg["wall_clock_breakdown"] is False
    # This DeepSpeed defaults gradient_clipping to 1.0; unset, ghostsys must turn it off.
    assert validate_ds_config(None, micro_batch=4, nfp=2, world_size=2, zero_stage=0)["gradient_clipping"] == 0.0


def test_zero3_and_unknown_engine_refused():
    with pytest.raises(ValueError, match="stage 3 partitions the parameters"):
        validate_ds_config(None, micro_batch=4, nfp=1, world_size=1, zero_stage=3)
    model = W.build_model(torch.float64)
    with pytest.raises(ValueError, match="unknown engine 'horovod'"):
        make_engine("horovod", model, torch.optim.SGD(model.parameters(), lr=0.1), None, nfp=1, micro_batch=16,
                    world_size=1)
