"""The input pipeline and the digits data set: same samples, same ranks, same micro-batches, whatever feeds them.

The DataLoader path (batch sampler + worker processes) must deliver exactly the in-process path's
micro-batches for every factorization n_g x n_fp, from any (resumed) step; the worker count must not
change results (it is not part of a run's identity), and a killed run resumes to the same result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ghostsys.run.config import RunConfig
from ghostsys.run.data import BatchOrder, load_dataset
from ghostsys.run.datasets import InMemoryDataset
from ghostsys.run.feed import Feed, MicroBatchSampler, load_micro
from ghostsys.run.train import Callback, train

AUG = {"cutout": 2}


def _feed(ds, order, rank, ng, nfp, workers, stop=100):
    return Feed(order=order, train_set=ds, val_set=ds, rank=rank, world_size=ng, nfp=nfp, seed=7, aug=AUG,
                device=torch.device("cpu"), dtype=torch.float32, stop_step=stop, num_workers=workers)


def _factorizations(M: int) -> list[tuple[int, int]]:
    return [(ng, nfp) for ng in range(1, M + 1) if M % ng == 0 for nfp in range(1, M // ng + 1) if (M // ng) % nfp == 0]


def test_loader_yields_the_in_process_micro_batches_for_every_factorization():
    # Labels are the sample indices, so y says exactly which samples arrived; x is augmented (flip, crop, Cutout).
    n, M = 40, 8
    ds = InMemoryDataset(torch.randn(n, 1, 6, 6), torch.arange(n))
    order = BatchOrder(n, M, seed=3)
    start, stop = 3, 7  # a resumed start, across the epoch boundary (5 steps per epoch)
    facts = _factorizations(M)
    assert len(facts) == 10
    for ng, nfp in facts:
        for rank in range(ng):
            loader = _feed(ds, order, rank, ng, nfp, workers=1, stop=stop)
            assert loader.uses_loader and loader.workers == 1
            for step in range(start, stop):
                got = loader.train_batches(step)
                expect = order.local_micro_batches(step, rank, ng, nfp)
                assert [y.tolist() for _, y in got] == [e.tolist() for e in expect], (ng, nfp, rank, step)
                epoch = step // order.steps_per_epoch
                for (x, _), idx in zip(got, expect):  # the in-process path, bit for bit
                    assert torch.equal(x, load_micro(ds, idx, epoch, 7, AUG)[0]), (ng, nfp, rank, step)
            loader.close()


def test_the_sampler_starts_at_the_resumed_step():
    order = BatchOrder(40, 8, seed=0)
    full = list(MicroBatchSampler(order, 1, 2, 2, 0, 6))
    assert len(full) == 12 and full[6:] == list(MicroBatchSampler(order, 1, 2, 2, 3, 6))
    assert [i for _, i in full[0]] == order.local_micro_batches(0, 1, 2, 2)[0].tolist()
    assert {e for b in full[10:] for e, _ in b} == {1}  # step 5 is epoch 1: the epoch travels with the keys


@pytest.mark.filterwarnings("ignore:torchvision's C\\+\\+ extension")
def test_lazy_image_folders_go_through_workers_unchanged(tmp_path):
    """The real-format path: JPEG files decoded in worker processes give the in-process tensors."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4 if split == "train" else 1):
                Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.JPEG")
    tr, va, _ = load_dataset("imagenet", tmp_path, image_size=8)
    order = BatchOrder(len(tr), 4, seed=1)
    for rank in range(2):
        feed = _feed(tr, order, rank, 2, 2, workers=2, stop=3)
        assert feed.workers == 2 and _feed(tr, order, rank, 2, 2, workers=-1).workers >= 1  # auto: file-backed
        for step in range(3):
            for (x, y), idx in zip(feed.train_batches(step), order.local_micro_batches(step, rank, 2, 2)):
                ref_x, ref_y = load_micro(tr, idx, step // order.steps_per_epoch, 7, AUG)
                assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
        feed.close()
    evaluation = Feed(order=order, train_set=tr, val_set=va, rank=0, world_size=1, nfp=1, seed=7, aug=AUG,
                      device=torch.device("cpu"), dtype=torch.float32, stop_step=3, num_workers=2)
    x, y = next(iter(evaluation.eval_batches(0, len(va))))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 2]


def test_in_memory_data_stays_in_process_by_default():
    ds = InMemoryDataset(torch.randn(16, 1, 4, 4), torch.arange(16))
    assert not _feed(ds, BatchOrder(16, 4, 0), 0, 1, 1, workers=-1).uses_loader  # zero-copy slicing, no DataLoader
    assert _feed(ds, BatchOrder(16, 4, 0), 0, 1, 1, workers=2).uses_loader


# --- whole runs: the worker count changes nothing, resume included ---------------------------------

# SimpleNet keeps it cheap (the CNN's evaluation alone costs ~30 GFLOP); the synthetic images are still 3x16x16, so
# flips, crops and Cutout apply before the flatten.
RUN = dict(model="simplenet", batch_size=32, max_steps=6, nfp=2, norm="noisy", noise_std=0.1, augment=True, cutout=4,
           eval_every=3, checkpoint_every=2, progress=False)


def _losses(d) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def _final_model(d) -> dict:
    ckpts = sorted((d / "checkpoints").glob("step_*"))
    return torch.load(ckpts[-1] / "rank0.pt", weights_only=True)["engine"]["model"]


class _Kill(Callback):
    """Dies at the start of step `at` (after the checkpoint of step `at`), as a preempted job would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_start(self, s, step):
        if step == self.at:
            raise KeyboardInterrupt("killed")


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("workers")
    out = {}
    for w in (0, 2):
        cfg = RunConfig(**RUN, num_workers=w, out=str(base / f"w{w}"))
        train(cfg)
        out[w] = base / f"w{w}"
    killed = RunConfig(**RUN, num_workers=2, out=str(base / "killed"))
    with pytest.raises(KeyboardInterrupt):
        train(killed, callbacks=[_Kill(4)])
    summary = train(killed)  # the same command again: resumes at step 4, the loader's sampler starts there
    out["resumed"], out["resumed_from"] = base / "killed", summary["resumed_from"]
    return out


def test_num_workers_is_not_part_of_the_identity_and_changes_nothing(worker_runs):
    assert RunConfig(num_workers=2).identity() == RunConfig().identity()
    assert RunConfig(num_workers=2).run_name() == RunConfig(num_workers=0).run_name()
    a, b = worker_runs[0], worker_runs[2]
    assert _losses(a) == _losses(b) and len(_losses(a)) == 6
    ma, mb = _final_model(a), _final_model(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # weights and BN buffers, bit for bit
    assert json.loads((a / "summary.json").read_text())["eval_acc"] == json.loads((b / "summary.json").read_text())["eval_acc"]


def test_a_killed_run_with_workers_resumes_to_the_same_result(worker_runs):
    assert worker_runs["resumed_from"] == 4
    assert _losses(worker_runs["resumed"]) == _losses(worker_runs[2])
    ma, mb = _final_model(worker_runs["resumed"]), _final_model(worker_runs[2])
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_negative_control_a_loader_that_draws_from_the_global_rng_changes_results(tmp_path, monkeypatch, worker_runs):
    """Why the feed hands the DataLoader its own generator: the default one shifts NoisyBatchNorm's noise."""
    import ghostsys.run.feed as feed

    real = feed.DataLoader
    monkeypatch.setattr(feed, "DataLoader", lambda *a, **kw: real(*a, **{**kw, "generator": None}))
    train(RunConfig(**RUN, num_workers=2, out=str(tmp_path / "global")))
    # The loader's base-seed draw comes before step 0's forward, so every noise draw after it shifts.
    assert _losses(tmp_path / "global")[0] != _losses(worker_runs[2])[0]


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_is_stratified_seeded_and_normalized_by_train():
    from sklearn.datasets import load_digits

    raw = load_digits()
    tr, va, meta = load_dataset("digits", seed=0)
    tr1, va1, _ = load_dataset("digits", seed=1)
    _, te, _ = load_dataset("digits", seed=0, eval_split="test")
    _, te1, _ = load_dataset("digits", seed=1, eval_split="test")
    full, te_full, _ = load_dataset("digits", seed=0, val_fraction=0.0, eval_split="test")
    assert meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert (len(tr), len(va), len(te), len(full)) == (1294, 144, 359, 1438)  # 1797 = 1438 + round(20%); 10% of 1438 held out
    counts = np.bincount(raw.target, minlength=10)
    for split, frac in ((te.y, 0.2), (va.y, 0.1 * 0.8)):
        assert np.abs(np.bincount(split.numpy(), minlength=10) - counts * frac).max() <= 1.5  # stratified
    m1 = load_dataset("digits", seed=1)[2]
    raw_te = lambda x, m: torch.round((x * m["std"][0] + m["mean"][0]) * 16)  # noqa: E731  (pixels 0..16)
    assert torch.equal(te.y, te1.y) and torch.equal(raw_te(te.x, meta), raw_te(te1.x, m1))  # test split fixed
    assert torch.equal(te.y, te_full.y)
    assert not torch.equal(va.y, va1.y) and torch.equal(va.x, load_dataset("digits", seed=0)[1].x)  # val seeded
    assert abs(tr.x.mean().item()) < 1e-5 and abs(tr.x.std().item() - 1) < 1e-3  # by train statistics
    # Every sample maps back to scikit-learn's image with its label (the split keeps image and label together).
    pixels = np.round((va.x[:, 0].numpy() * meta["std"][0] + meta["mean"][0]) * 16).astype(np.int64)
    images = raw.images.astype(np.int64)
    for img, label in zip(pixels[:20], va.y[:20].tolist()):
        matches = np.flatnonzero((images == img).all(axis=(1, 2)))
        assert len(matches) >= 1 and label in raw.target[matches]


def test_digits_runs_offline_end_to_end(tmp_path, capsys):
    from launch.run import main

    out = tmp_path / "r"
    assert main(["--dataset", "digits", "--model", "simplenet", "--eval-split", "test", "--max-steps", "10",
                 "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_samples"] == 359 and s["eval_split"] == "test" and s["eval_acc"] > 0.5
