"""File readers for the real data sets, from a local root only (machines may be offline).

MNIST (idx-ubyte, gz or not) and CIFAR-10/100 (python pickle batches) are parsed here rather than
through torchvision: its readers md5-check whole files and would refuse the small files our tests
write in the same formats. ImageNet-style folders go through torchvision's ImageFolder and stay
lazy. Nothing here ever downloads; a missing file raises FileNotFoundError naming `--data-root`.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DATA_ROOT_HINT = "pass the directory that holds it with --data-root DIR (nothing is downloaded)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InMemoryDataset:
    """A data set held as two tensors: `.x` (float32, N×C×H×W or N×F) and `.y` (int64, N)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y.long()
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def fetch(dataset: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather samples `idx` as a batch `(x, y)` from an in-memory or lazy (per-item) data set."""
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        return dataset.x[idx], dataset.y[idx]  # one tensor index instead of N Python calls
    items = [dataset[i] for i in idx.tolist()]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items], dtype=torch.long)


def _missing(what: str, where: Sequence[Path]) -> FileNotFoundError:
    places = " or ".join(str(p) for p in where)
    return FileNotFoundError(f"{what} not found: expected it at {places}; {DATA_ROOT_HINT}.")


# --- MNIST -------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (the MNIST format; gzip-compressed if the name ends in .gz)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


def _find_file(dirs: Sequence[Path], name: str, what: str) -> Path:
    for d in dirs:
        for candidate in (d / name, d / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise _missing(f"{what} file {name}[.gz]", [d / name for d in dirs])


def read_mnist(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST from `<root>/MNIST/raw` (torchvision's layout) or `<root>` itself: uint8 images, labels."""
    root = Path(root)
    dirs = [root / "MNIST" / "raw", root]
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_file(dirs, f"{stem}-images-idx3-ubyte", "MNIST"))
        labels = read_idx(_find_file(dirs, f"{stem}-labels-idx1-ubyte", "MNIST"))
        if len(images) != len(labels):
            raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
        out[split] = (images[:, None, :, :], labels.astype(np.int64))  # add the channel axis
    return out


# --- CIFAR -------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")  # the files are Python 2 pickles
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def read_cifar(root: str | Path, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) under `root`."""
    if num_classes == 10:
        folder, label_key = Path(root) / "cifar-10-batches-py", "labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    elif num_classes == 100:
        folder, label_key = Path(root) / "cifar-100-python", "fine_labels"
        files = {"train": ["train"], "test": ["test"]}
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    out = {}
    for split, names in files.items():
        xs, ys = [], []
        for name in names:
            if not (folder / name).is_file():
                raise _missing(f"CIFAR-{num_classes} batch '{name}'", [folder / name])
            d = _unpickle(folder / name)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are CHW
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


# --- scikit-learn's 8x8 digits ------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
# The digits' test split is the same for every run seed, as MNIST's and CIFAR's official test sets are:
# seed-to-seed spread then measures training, not which 360 images were held out.
DIGITS_TEST_SEED = 0
DIGITS_SCALE = 16.0  # pixel values are integers 0..16 (4x4 blocks of 32x32 bitmaps counted)


def read_digits(test_fraction: float = DIGITS_TEST_FRACTION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's UCI handwritten digits (1797 images, 8x8, values 0..16, ships inside the package, so
    offline): uint8 images (N, 1, 8, 8) and labels, split into train / test stratified with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, test = stratified_split(torch.from_numpy(y), test_fraction, DIGITS_TEST_SEED)
    tr, te = train.numpy(), test.numpy()
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


# --- splits and normalization ----------------------------------------------------------------


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split keeping class proportions: round(N·fraction) validation samples, shared out by class size.

    Each class gets floor(n_c·fraction); the few left over go to the classes with the largest
    remainders (ties in seeded random order), so tiny data sets still get a stratified hold-out.
    With 5000 per class and 0.1 this is exactly the papers' 45k/5k CIFAR split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)  # sorted, so the draw order is fixed
    quota = counts.double() * val_fraction
    n_val = quota.floor().long()
    left = int(round(len(labels) * val_fraction)) - int(n_val.sum())
    if left > 0:
        tiebreak = torch.rand(len(classes), generator=g, dtype=torch.float64) * 1e-9
        n_val[torch.argsort(quota - quota.floor() + tiebreak, descending=True)[:left]] += 1
    train, val = [], []
    for c, k in zip(classes.tolist(), n_val.tolist()):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[:k])
        train.append(members[k:])
    # Sorted back into file order: the batch order, not the split, is what shuffles.
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of N×C×... data (float64 accumulation)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(1), flat.std(1)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, as float32."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x.double() - mean.view(shape)) / std.view(shape)).float()


def tensor_splits(
    arrays: dict[str, tuple[np.ndarray, np.ndarray]], *, seed: int, val_fraction: float, eval_split: str,
    scale: float = 255.0,
) -> tuple[InMemoryDataset, InMemoryDataset, dict[str, Any]]:
    """Train / eval data sets from raw integer arrays (max value `scale`): stratified split, normalized by train
    statistics. `val_fraction` 0 with eval_split 'test' trains on the whole training split."""
    x_all = torch.from_numpy(np.ascontiguousarray(arrays["train"][0]))
    y_all = torch.from_numpy(np.ascontiguousarray(arrays["train"][1]))
    tr_idx, val_idx = stratified_split(y_all, val_fraction, seed)
    if eval_split == "val":
        if len(val_idx) == 0:
            raise ValueError("val_fraction leaves no validation samples; use eval_split='test' or a larger fraction")
        x_eval, y_eval = x_all[val_idx], y_all[val_idx]
    elif eval_split == "test":
        x_eval = torch.from_numpy(np.ascontiguousarray(arrays["test"][0]))
        y_eval = torch.from_numpy(np.ascontiguousarray(arrays["test"][1]))
    else:
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    x_tr = x_all[tr_idx].float() / scale
    mean, std = channel_stats(x_tr)
    train = InMemoryDataset(normalize(x_tr, mean, std), y_all[tr_idx])
    evaluation = InMemoryDataset(normalize(x_eval.float() / scale, mean, std), y_eval)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    return train, evaluation, stats


# --- ImageNet-style folders --------------------------------------------------------------------


def image_folders(root: str | Path, image_size: int) -> tuple[Any, Any]:
    """Lazy train / val ImageFolders under `<root>` (or `<root>/imagenet`), deterministic resize + center crop.

    Random augmentation is left to `ghostsys.run.data.augment` so that it stays mode-independent.
    Validation uses the train folder's class indices, so a class missing from val cannot shift them.
    """
    from ghostsys._compat import import_torchvision

    tv = import_torchvision()
    root = Path(root)
    base = next((b for b in (root, root / "imagenet") if (b / "train").is_dir()), None)
    if base is None:
        raise _missing("ImageNet-style folder train/<class>/*", [root / "train", root / "imagenet" / "train"])
    if not (base / "val").is_dir():
        raise _missing("ImageNet-style folder val/<class>/* (val images sorted into class folders)", [base / "val"])
    t = tv.transforms
    transform = t.Compose([
        t.Resize(int(round(image_size * 256 / 224))),  # the usual 256→224 ratio
        t.CenterCrop(image_size),
        t.ToTensor(),
        t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = tv.datasets.folder
    try:
        train = tv.datasets.ImageFolder(str(base / "train"), transform=transform)
        val = tv.datasets.ImageFolder(str(base / "val"), transform=transform, allow_empty=True)
    except FileNotFoundError as err:  # e.g. the official flat val/ folder: images must sit in class folders
        raise FileNotFoundError(f"{str(err).rstrip('.')}. Expected {base}/train/<class>/* and {base}/val/<class>/*; "
                                f"{DATA_ROOT_HINT}.") from None
    # Re-index val with train's classes (a plain ImageFolder, so it still pickles for DataLoader workers).
    val.samples = folder.make_dataset(str(base / "val"), train.class_to_idx, extensions=folder.IMG_EXTENSIONS,
                                      allow_empty=True)
    val.imgs, val.targets = val.samples, [label for _, label in val.samples]
    val.classes, val.class_to_idx = train.classes, train.class_to_idx
    if len(val) == 0:
        raise _missing("validation images in class folders val/<class>/*", [base / "val"])
    return train, val
