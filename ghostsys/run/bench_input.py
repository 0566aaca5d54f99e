"""Input-pipeline throughput: ``python -m ghostsys.run.bench_input`` (a benchmark, not a test).

Writes a real-format ImageNet-style fixture (JPEG files of random sizes in ``train/<wnid>/`` and
``val/<wnid>/``), then measures images/s of the training feed (ghostsys.run.feed.Feed: decode,
resize, center-crop, normalize, augment, collate) in process and through the DataLoader with 1, 2,
... worker processes; also the in-memory path (digits tensors) in process vs with workers, to show
why in-memory tensors are sliced in place by default. Each variant runs in rounds that alternate
with the others (a shared machine's drift hits all alike); the first ``--warmup`` steps of every
round (worker start-up, first decodes) are excluded; reported: median images/s over rounds and the
min-max spread, and the CPU time per image of the main process plus its workers (psutil; what the
pipeline costs whatever the load). Records the machine, its load (``os.getloadavg``) and versions with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ghostsys.run.data import BatchOrder, load_dataset
from ghostsys.run.feed import Feed


def write_imagenet_fixture(root: Path, classes: int = 8, per_class: int = 50, val_per_class: int = 5,
                           sizes: tuple[int, int] = (64, 256), seed: int = 0) -> Path:
    """JPEG files (random sizes and content, quality 90) in root/train/<wnid>/ and root/val/<wnid>/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(sizes[0], sizes[1] + 1, size=2)
                # Smooth colour fields plus noise: compresses like a photo, not like white noise.
                base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((int(w), int(h)), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (int(h), int(w), 3))
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def _feed(train_set, val_set, batch: int, workers: int, augment: bool) -> Feed:
    order = BatchOrder(len(train_set), batch, seed=0)
    return Feed(order=order, train_set=train_set, val_set=val_set, rank=0, world_size=1, nfp=1, seed=0,
                aug={"cutout": 0} if augment else None, device=torch.device("cpu"), dtype=torch.float32,
                stop_step=10**9, num_workers=workers)


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its live children (the loader's workers)."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def images_per_s(train_set, val_set, *, batch: int, workers: int, steps: int, warmup: int,
                 augment: bool) -> tuple[float, float]:
    """(images/s, CPU ms per image over main + workers) of `steps` timed steps after `warmup` untimed ones."""
    feed = _feed(train_set, val_set, batch, workers, augment)
    for step in range(warmup):
        feed.train_batches(step)
    c0, t0 = _cpu_s(), time.perf_counter()
    for step in range(warmup, warmup + steps):
        feed.train_batches(step)
    dt = time.perf_counter() - t0
    # Workers run ahead by the prefetch depth: their CPU time here includes decoding a few later batches,
    # an overestimate of at most prefetch/steps.
    cpu = _cpu_s() - c0
    feed.close()
    return batch * steps / dt, 1e3 * cpu / (batch * steps)


def run(label: str, train_set, val_set, workers: list[int], *, batch: int, steps: int, warmup: int, rounds: int,
        augment: bool) -> list[dict]:
    """Rounds of every worker count, alternating; one result row per worker count."""
    got: dict[int, list[float]] = {w: [] for w in workers}
    cpu: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            rate, ms = images_per_s(train_set, val_set, batch=batch, workers=w, steps=steps, warmup=warmup, augment=augment)
            got[w].append(rate)
            cpu[w].append(ms)
    base = statistics.median(got[workers[0]])
    return [{"data": label, "workers": w, "images_per_s": statistics.median(v), "min": min(v), "max": max(v),
             "vs_in_process": statistics.median(v) / base, "cpu_ms_per_image": statistics.median(cpu[w]),
             "rounds": len(v)} for w, v in got.items()]


def main(argv: list[str] | None = None) -> int:
    """Print the table (markdown) with machine, load and versions."""
    p = argparse.ArgumentParser(prog="python -m ghostsys.run.bench_input", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="training JPEGs in the fixture (default 400)")
    p.add_argument("--image-size", type=int, default=224, help="crop size the folder reader produces (default 224)")
    p.add_argument("--batch", type=int, default=32, help="global batch M (default 32)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--workers", default="0,1,2", help="worker counts to compare, first = baseline (default 0,1,2)")
    p.add_argument("--root", help="fixture folder (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # the decode work is what is compared; one compute thread per process
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        classes = 8
        write_imagenet_fixture(root, classes=classes, per_class=max(1, args.images // classes))
        tr, va, _ = load_dataset("imagenet", root, image_size=args.image_size)
        rows = run(f"ImageNet folder, {len(tr)} JPEG 64-256 px -> {args.image_size} px, augment", tr, va, workers,
                   batch=args.batch, steps=args.steps, warmup=args.warmup, rounds=args.rounds, augment=True)
    dtr, dva, _ = load_dataset("digits")
    rows += run("digits in memory (1437 x 1x8x8), augment", dtr, dva, workers, batch=256, steps=50, warmup=5,
                rounds=args.rounds, augment=True)
    load1 = os.getloadavg()
    import PIL

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
          f"(usable {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}); torch {torch.__version__}, "
          f"Pillow {PIL.__version__}, Python {platform.python_version()}")
    print(f"load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; M = {args.batch} (folder), 256 (digits); "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-up")
    print("\n| data | workers | images/s (median) | min-max | vs in-process | CPU ms/image (main + workers) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['workers']} | {r['images_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | "
              f"{r['vs_in_process']:.2f}x | {r['cpu_ms_per_image']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
