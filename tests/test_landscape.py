"""The loss-landscape probe: right values (against an independent functional reference), training untouched.

Bit-identity is the claim: with the probe on, every training loss, every final weight and buffer
(num_batches_tracked included) and the optimizer state equal the run without it, exactly; a naive
probe that does not restore state must break that (negative control).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ghostsys.run import dist
from ghostsys.run.config import ConfigError, RunConfig
from ghostsys.run.train import Callback, build, train, train_step
from ghostsys.study.landscape import LandscapeProbe, probe_losses
from tests._launch import metrics

# NoisyBatchNorm draws from the global RNG (and is a BatchNorm: running stats, num_batches_tracked); n_fp = 2
# puts two micro-batches in every probed step; momentum and weight decay give the optimizer state.
RUN = dict(model="simplenet", batch_size=32, max_steps=5, nfp=2, norm="noisy", noise_std=0.1, momentum=0.9,
           weight_decay=5e-4, eval_every=5, progress=False, checkpoint_every=5)


class _NaiveProbe(Callback):
    """A probe that forgets to restore state: one training-mode forward on the step's batch."""

    def before_update(self, s, step, batches):
        with torch.no_grad():
            s.engine.unwrapped(batches[0][0])


def _state(d):
    st = torch.load(next((d / "checkpoints").glob("step_*")) / "rank0.pt", weights_only=True)
    return st["engine"]["model"], st["engine"]["optimizer"], st["rng"]


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    off = RunConfig(**RUN, out=str(base / "off"))
    on = RunConfig(**RUN, landscape_lrs="0.1,x2,0.8", out=str(base / "on"))
    train(off)
    train(on, callbacks=[LandscapeProbe(on.landscape_steps(), every=1)])
    train(RunConfig(**RUN, out=str(base / "naive")), callbacks=[_NaiveProbe()])
    return base


def test_probe_on_and_off_are_bit_identical(probe_runs):
    off, on = metrics(probe_runs / "off"), metrics(probe_runs / "on")
    assert [m["train_loss"] for m in off] == [m["train_loss"] for m in on]
    assert off[-1]["eval_acc"] == on[-1]["eval_acc"] and off[-1]["eval_loss"] == on[-1]["eval_loss"]
    (m_off, o_off, rng_off), (m_on, o_on, rng_on) = _state(probe_runs / "off"), _state(probe_runs / "on")
    assert m_off.keys() == m_on.keys() and any("num_batches_tracked" in k for k in m_off)
    assert all(torch.equal(m_off[k], m_on[k]) for k in m_off)  # weights and running statistics
    bufs = lambda o: [v["momentum_buffer"] for _, v in sorted(o["state"].items())]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(bufs(o_off), bufs(o_on), strict=True))
    assert torch.equal(rng_off, rng_on)  # the CPU RNG stream ends where it would have
    assert all({"landscape_min", "landscape_max", "landscape_lrs"} <= m.keys() for m in on)
    assert on[0]["landscape_lrs"] == pytest.approx([0.1, 2 * RUN.get("lr", 0.05), 0.8])  # x2 = twice the current lr
    assert all(m["landscape_min"] <= m["landscape_max"] for m in on)


def test_negative_control_a_naive_probe_disturbs_training(probe_runs):
    naive, off = metrics(probe_runs / "naive"), metrics(probe_runs / "off")
    assert [m["train_loss"] for m in naive][1:] != [m["train_loss"] for m in off][1:]


def test_probe_values_match_an_independent_functional_reference():
    """At the first step: loss(theta - eta g) via torch.func.functional_call on a deep copy, against the probe."""
    cfg = RunConfig(model="simplenet", batch_size=32, nfp=2, mode="layer", norm="ghost", ghost_groups=2,
                    dtype="float64", progress=False, max_steps=1).replace(world_size=1).validate()
    info = dist.init(device="cpu")
    try:
        s = build(cfg, info)
        etas = [0.05, 0.4, 3.0]
        got = {}

        def hook(batches):
            model = s.engine.unwrapped
            ref_model = copy.deepcopy(model)  # independent: never touched by the probe
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            ref = []
            for eta in etas:
                moved = {k: p.detach() - eta * grads[k] for k, p in ref_model.named_parameters()}
                total = sum(F.cross_entropy(torch.func.functional_call(ref_model, moved, (x,)), y, reduction="sum")
                            for x, y in batches)
                ref.append(total.item() / sum(len(y) for _, y in batches))
            got["ref"], got["probe"] = torch.tensor(ref, dtype=torch.float64), probe_losses(model, batches, etas)
            got["control"] = probe_losses(model, batches, [2 * e for e in etas])

        train_step(s, 0, before_update=hook)
    finally:
        dist.shutdown()
    # float64, same operations in the same order but for the final float64 sum over micro-batches: ~1e-15.
    torch.testing.assert_close(got["probe"], got["ref"], rtol=1e-12, atol=0)
    assert (got["control"] - got["ref"]).abs().min() > 1e-3  # a different step size is visibly different


def test_probe_refuses_zero_1_and_2_and_bad_step_sizes():
    with pytest.raises(ConfigError, match="--zero-stage 0 or --engine accelerate"):
        RunConfig(engine="deepspeed", zero_stage=1, landscape_lrs="0.1").validate()
    with pytest.raises(ConfigError, match="'abc', not a positive step size"):
        RunConfig(landscape_lrs="0.1,abc").validate()
    assert RunConfig(landscape_lrs="0.1, x2").landscape_steps() == [(0.1, False), (2.0, True)]


def _ghost_model(seed: int = 0):
    from ghostsys.nn.models import build_model, batchnorm

    torch.manual_seed(seed)
    return build_model("simplenet", num_classes=10, in_shape=(12,), norm=batchnorm).double()


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)


ETAS = [0.1, 0.4, 1.6]


def _dp_worker(rank: int, world: int):
    """Rank r: its contiguous half through DDP (unsynced BatchNorm, G_M = 2), then the probe on the plain module."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _ghost_model()
    ddp = DDP(model)
    x, y = _global_batch()
    xr, yr = x.view(world, -1, 12)[rank], y.view(world, -1)[rank]
    F.cross_entropy(ddp(xr), yr).backward()  # DDP averages the gradient over ranks
    before = [b.clone() for b in model.buffers()]
    losses = probe_losses(model, [(xr, yr)], ETAS)
    untouched = all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    return losses, untouched


@pytest.mark.dist
def test_data_parallel_probe_is_the_global_mean_over_ranks():
    """Two unsynced ranks (G_M = 2) against one process accumulating the same two halves (G_M = 2)."""
    from tests._mp import run_ranks

    results = run_ranks(_dp_worker, 2)
    model = _ghost_model()
    x, y = _global_batch()
    halves = list(zip(x.view(2, -1, 12), y.view(2, -1)))
    for xh, yh in halves:
        (F.cross_entropy(model(xh), yh) / 2).backward()
    ref = probe_losses(model, halves, ETAS)
    # float64; the ranks' gradient is DDP's all-reduced mean, the reference sums two halves / 2, and the losses
    # come through one (sum, count) all-reduce: summation order only, ~1e-16 relative per operation.
    for losses, untouched in results:
        torch.testing.assert_close(losses, ref, rtol=1e-12, atol=0)
        assert untouched
    full = _ghost_model()  # negative control: full BatchNorm (G_M = 1) on the same samples is another landscape
    F.cross_entropy(full(x), y).backward()
    assert (probe_losses(full, [(x, y)], ETAS) - ref).abs().max() > 1e-3
