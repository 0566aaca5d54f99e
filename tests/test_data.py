"""Data: synthetic default, the mode-independent batch order, augmentation, and the file readers."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from ghostsys.run.data import BatchOrder, augment, fetch, load_dataset, synthetic
from ghostsys.run.datasets import read_idx, stratified_split


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_shaped():
    a_tr, a_va = synthetic(n_train=256, n_val=64, seed=3)
    b_tr, b_va = synthetic(n_train=256, n_val=64, seed=3)
    c_tr, _ = synthetic(n_train=256, n_val=64, seed=4)
    assert a_tr.x.shape == (256, 3, 16, 16) and a_tr.x.dtype == torch.float32 and a_tr.y.dtype == torch.int64
    assert torch.equal(a_tr.x, b_tr.x) and torch.equal(a_tr.y, b_tr.y) and torch.equal(a_va.x, b_va.x)
    assert not torch.allclose(a_tr.x, c_tr.x)
    assert torch.bincount(a_tr.y).tolist() == [26] * 6 + [25] * 4  # balanced classes
    # The global RNG plays no part.
    torch.manual_seed(123)
    d_tr, _ = synthetic(n_train=256, n_val=64, seed=3)
    assert torch.equal(a_tr.x, d_tr.x)


def test_synthetic_val_does_not_depend_on_train_size_and_is_normalized():
    _, va1 = synthetic(n_train=512, n_val=128, seed=0)
    tr2, va2 = synthetic(n_train=1024, n_val=128, seed=0)
    # Only the normalization by train statistics differs: standardized, the samples are the same.
    z = lambda v: (v - v.mean(dim=(0, 2, 3), keepdim=True)) / v.std(dim=(0, 2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(z(va1.x), z(va2.x), atol=1e-4)
    mean = tr2.x.mean(dim=(0, 2, 3))
    std = tr2.x.transpose(0, 1).reshape(3, -1).std(1)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-4)


def test_synthetic_is_learnable_nearest_class_mean():
    tr, va = synthetic(seed=0)
    means = torch.stack([tr.x[tr.y == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(va.x.flatten(1), means).argmin(1)
    acc = (pred == va.y).float().mean().item()
    assert acc > 0.8, acc  # chance is 0.1


# --- batch order -------------------------------------------------------------------------------


def _groups(order: BatchOrder, step: int, ng: int, nfp: int, g_layer: int = 1) -> list[list[int]]:
    return [g.tolist() for g in order.ghost_groups(step, ng, nfp, g_layer)]


def test_every_factorization_of_gm_gives_the_same_ghost_groups():
    order = BatchOrder(1000, 64, seed=7)
    for step in (0, 5, order.steps_per_epoch + 2):
        ref = _groups(order, step, 1, 4)
        for ng, nfp, g_layer in [(2, 2, 1), (4, 1, 1), (1, 1, 4), (2, 1, 2), (1, 2, 2)]:
            assert _groups(order, step, ng, nfp, g_layer) == ref, (ng, nfp, g_layer)
        # The groups are the contiguous blocks of the global batch.
        assert ref == [order.global_batch(step)[k * 16:(k + 1) * 16].tolist() for k in range(4)]


def test_local_micro_batches_are_rank_major_contiguous_blocks():
    order = BatchOrder(100, 24, seed=0)
    g = order.global_batch(3).tolist()
    mb = order.local_micro_batches(3, rank=1, world_size=2, nfp=3)
    assert [m.tolist() for m in mb] == [g[12:16], g[16:20], g[20:24]]


def test_batch_order_epochs_and_independence_from_global_rng():
    order = BatchOrder(100, 10, seed=1)
    assert order.steps_per_epoch == 10
    epoch0 = torch.cat([order.global_batch(s) for s in range(10)])
    epoch1 = torch.cat([order.global_batch(s) for s in range(10, 20)])
    assert sorted(epoch0.tolist()) == list(range(100)) == sorted(epoch1.tolist())  # each epoch a permutation
    assert not torch.equal(epoch0, epoch1)
    torch.manual_seed(999)
    torch.rand(10)
    again = BatchOrder(100, 10, seed=1)
    assert torch.equal(again.global_batch(13), order.global_batch(13))
    assert not torch.equal(BatchOrder(100, 10, seed=2).global_batch(0), order.global_batch(0))


def test_drop_last():
    assert BatchOrder(105, 10, seed=0).steps_per_epoch == 10
    keep = BatchOrder(105, 10, seed=0, drop_last=False)
    assert keep.steps_per_epoch == 11
    batches = [keep.global_batch(s) for s in range(11)]
    assert all(len(b) == 10 for b in batches)
    assert set(torch.cat(batches).tolist()) == set(range(105))


def test_interleaved_order_differs_negative_control():
    order = BatchOrder(1000, 64, seed=7)
    contiguous = {frozenset(g) for g in _groups(order, 0, 2, 1)}
    strided = {frozenset(m.tolist()) for r in range(2) for m in order.interleaved_micro_batches(0, r, 2, 1)}
    assert set().union(*contiguous) == set().union(*strided)  # same samples ...
    assert contiguous.isdisjoint(strided)  # ... in different ghost groups
    assert order.interleaved_micro_batches(0, 1, 2, 1)[0].tolist() == order.global_batch(0)[1::2].tolist()


def test_indivisible_factorization_error_names_the_fix():
    order = BatchOrder(1000, 24, seed=0)
    with pytest.raises(ValueError) as e:
        order.local_micro_batches(0, 0, world_size=2, nfp=5)
    msg = str(e.value)
    assert "M=24" in msg and "n_g" in msg and "n_fp" in msg and "[1, 2, 3, 4, 6, 12]" in msg
    with pytest.raises(ValueError, match=r"valid n_g are \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        order.local_micro_batches(0, 0, world_size=5, nfp=1)


# --- augmentation ------------------------------------------------------------------------------


def test_augment_depends_only_on_seed_epoch_and_index():
    x = torch.randn(32, 3, 16, 16)
    idx = torch.arange(100, 132)
    full = augment(x, idx, epoch=2, seed=5, cutout=6)
    perm = torch.randperm(32)[:11]  # a different batch composition and order
    part = augment(x[perm], idx[perm], epoch=2, seed=5, cutout=6)
    assert torch.equal(part, full[perm])
    assert not torch.equal(augment(x, idx, epoch=3, seed=5, cutout=6), full)
    assert not torch.equal(augment(x, idx, epoch=2, seed=6, cutout=6), full)
    assert torch.equal(x, x.clone()) and not torch.equal(full, x)  # input untouched


def test_augment_components():
    x = torch.randn(64, 2, 8, 8)
    idx = torch.arange(64)
    flipped = augment(x, idx, 0, 0, flip=True, crop_pad=0)
    is_flip = [torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x)]
    assert all(is_flip[i] or torch.equal(flipped[i], x[i]) for i in range(64))
    assert 16 < sum(is_flip) < 48  # about half
    cropped = augment(x, idx, 0, 0, flip=False, crop_pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):  # every output is an 8x8 window of the padded image
        assert any(torch.equal(cropped[i], padded[i, :, t:t + 8, l:l + 8]) for t in range(5) for l in range(5))
    ones = torch.ones(64, 1, 8, 8)
    holes = (augment(ones, idx, 0, 0, flip=False, crop_pad=0, cutout=4) == 0).sum(dim=(1, 2, 3))
    assert holes.min() >= 4 and holes.max() == 16  # 4x4 squares, clipped at the border


# --- readers on tiny files in the real formats -------------------------------------------------


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    raw = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def test_read_idx_and_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x_tr, y_tr = _mnist_arrays(100, 0)
    x_te, y_te = _mnist_arrays(20, 1)
    _write_idx(raw / "train-images-idx3-ubyte.gz", x_tr, gz=True)  # gz for train, plain for test
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y_tr, gz=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", x_te, gz=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", y_te, gz=False)
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte.gz"), x_tr)
    train, val, meta = load_dataset("mnist", tmp_path, seed=0, val_fraction=0.1)
    assert meta["num_classes"] == 10 and meta["input_shape"] == [1, 28, 28]
    assert len(train) == 90 and len(val) == 10 and torch.bincount(val.y).tolist() == [1] * 10
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std().item() - 1) < 1e-3
    # Values map back to the file's images: the split keeps image and label together.
    mean, std = meta["mean"][0], meta["std"][0]
    pixels = np.round((val.x[:, 0].numpy() * std + mean) * 255).astype(np.uint8)
    matches = [int(np.flatnonzero((x_tr == p).all(axis=(1, 2)))[0]) for p in pixels]
    assert [int(y_tr[m]) for m in matches] == val.y.tolist()
    _, test, _ = load_dataset("mnist", tmp_path, seed=0, eval_split="test")
    assert len(test) == 20 and test.y.tolist() == y_te.tolist()


def _cifar_batch(n: int, key: str, num_classes: int, seed: int, bytes_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    d = {"batch_label": "tiny", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         key: [int(v) for v in np.arange(n) % num_classes], "filenames": [f"img{i}.png" for i in range(n)]}
    return {k.encode(): v for k, v in d.items()} if bytes_keys else d


def test_cifar10_reader_and_stratified_split(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = _cifar_batch(20, "labels", 10, i, bytes_keys=i == 1)  # tolerate both key styles
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = _cifar_batch(10, "labels", 10, 9)
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    train, val, meta = load_dataset("cifar10", tmp_path, seed=0)
    assert meta["num_classes"] == 10 and meta["input_shape"] == [3, 32, 32] and len(meta["mean"]) == 3
    assert len(train) == 90 and len(val) == 10 and torch.bincount(val.y).tolist() == [1] * 10
    train2, val2, _ = load_dataset("cifar10", tmp_path, seed=0)
    assert torch.equal(val.x, val2.x)
    _, val3, _ = load_dataset("cifar10", tmp_path, seed=1)
    assert not torch.equal(val.x, val3.x)
    # Row-major CHW pixels: sample 0 of the test batch, channel 1, row 2, column 3.
    _, t, m = load_dataset("cifar10", tmp_path, seed=0, eval_split="test")
    expected = test["data"][0, 1 * 1024 + 2 * 32 + 3] / 255.0
    assert abs(t.x[0, 1, 2, 3].item() * m["std"][1] + m["mean"][1] - expected) < 1e-5


def test_cifar100_reader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(_cifar_batch(200, "fine_labels", 100, 0), protocol=2))
    (folder / "test").write_bytes(pickle.dumps(_cifar_batch(100, "fine_labels", 100, 1), protocol=2))
    train, val, meta = load_dataset("cifar100", tmp_path, seed=0, val_fraction=0.1)
    assert meta["num_classes"] == 100 and len(train) == 180 and len(val) == 20
    assert torch.bincount(val.y, minlength=100).max() == 1  # 20 different classes, one sample each


def test_stratified_split_keeps_proportions():
    y = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    tr, va = stratified_split(y, 0.1, seed=0)
    assert torch.bincount(y[va]).tolist() == [50, 30, 20]
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 1000
    assert torch.equal(va, stratified_split(y, 0.1, seed=0)[1])
    assert not torch.equal(va, stratified_split(y, 0.1, seed=1)[1])


@pytest.mark.filterwarnings("ignore:torchvision's C\\+\\+ extension")
def test_image_folder_reader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", ["n01", "n02", "n03"]), ("val", ["n01", "n03"])):  # val lacks a class
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
                img.save(tmp_path / split / c / f"{c}_{i}.JPEG" if i == 0 else tmp_path / split / c / f"{c}_{i}.png")
    train, val, meta = load_dataset("imagenet", tmp_path, seed=0, image_size=16)
    assert meta["num_classes"] == 3 and meta["input_shape"] == [3, 16, 16] and len(train) == 6
    x, y = fetch(val, torch.tensor([0, 3]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 2]  # n03 keeps the train index 2, although val has only two classes


@pytest.mark.filterwarnings("ignore:torchvision's C\\+\\+ extension")
def test_flat_imagenet_val_folder_is_explained(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n01" / "a.JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")  # the official flat layout
    with pytest.raises(FileNotFoundError, match=r"val/<class>/\*.*--data-root"):
        load_dataset("imagenet", tmp_path, seed=0, image_size=8)


def test_fetch_in_memory():
    tr, _ = synthetic(n_train=64, n_val=8)
    idx = torch.tensor([5, 1, 60])
    x, y = fetch(tr, idx)
    assert torch.equal(x, tr.x[idx]) and torch.equal(y, tr.y[idx])


@pytest.mark.parametrize("name, expected", [("mnist", "train-images-idx3-ubyte"),
                                            ("cifar10", "cifar-10-batches-py"),
                                            ("cifar100", "cifar-100-python"),
                                            ("imagenet", "train")])
def test_missing_files_name_the_flag(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, tmp_path / "nowhere", seed=0)
    assert "--data-root" in str(e.value) and expected in str(e.value) and "nowhere" in str(e.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="synthetic, digits, mnist, cifar10, cifar100, imagenet"):
        load_dataset("svhn", None)
