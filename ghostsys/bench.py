"""Timing of the norm layers against BatchNorm, layer by layer and in whole training steps:
``python -m ghostsys.bench``.

Not a test: it measures. The default run covers the layers the papers' models really run --
every norm-layer shape of SimpleNet (M=256), ResNet-56 and WRN-28-10 (M=128), read off the models
themselves, at every ghost count G in 2..64 that leaves a ghost batch of at least 4 -- and then
whole training steps (forward, backward, SGD step) of each model with BatchNorm, GhostNorm and
SeqNorm. ``--shape`` times one shape instead (the layer variants only).

Rules. Each variant runs in blocks (warm-up reps, then timed reps), the blocks of all variants of
a shape alternating over several rounds, so that slow drift of a shared machine hits all of them
alike; warm-up reps are excluded. Each figure is a median over the timed reps with its p10/p90;
ratios are medians over the median of the baseline timed in the same run at the same thread count
(``nn.BatchNorm``; for SeqNorm, ``F.group_norm`` followed by ``nn.BatchNorm``; for a model, the
same model with BatchNorm). Gradients are reset to None between reps, outside the timed region.
On CUDA the device is synchronized around every timed rep. The machine, versions, thread counts
and the load average before and after are printed with the table.

On a VM, page faults on fresh output and gradient buffers can cost as much as the normalization
itself, and whether a buffer is fresh depends on the C allocator's history rather than on the
variant: ``--steady-alloc`` keeps freed memory in the process so the table compares the kernels
(report both). ``--clock thread`` (one thread only) times the calling thread's CPU time, which
ignores time spent descheduled: use it on a shared machine.

``--autocast bf16`` times what a bf16 mixed-precision network runs: every forward under
``torch.autocast`` with bfloat16, the layers fed bfloat16 activations and gradients (what a
convolution under autocast hands them), parameters kept in float32.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghostsys.nn.models import batchnorm, build_model
from ghostsys.nn.norms import GhostBatchNorm, SeqNorm

__all__ = ["benchmark", "model_steps", "model_norm_shapes", "format_rows", "format_layer_table", "machine_info",
           "steady_allocator", "figure2_ghost_norm", "chunk_loop_batch_norm", "main"]

# The papers' models at the batch sizes the papers train them with (SimpleNet on MNIST, the others on CIFAR).
MODELS = {"simplenet": ((1, 28, 28), 256), "resnet56": ((3, 32, 32), 128), "wrn28_10": ((3, 32, 32), 128)}
GHOST_GROUPS = (2, 4, 8, 16, 32, 64)
MIN_GHOST_BATCH = 4


def figure2_ghost_norm(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """The papers' Figure 2 / A1 GhostNorm function, generalized to any rank (no affine)."""
    m, c = x.shape[:2]
    xg = x.reshape(groups, -1, c, x[0, 0].numel())
    mean = xg.mean([1, 3], keepdim=True)
    var = xg.var([1, 3], unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def chunk_loop_batch_norm(x: Tensor, groups: int, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """Ghost norm the obvious way: BatchNorm on each chunk, then torch.cat (a running-stat update per chunk)."""
    return torch.cat([F.batch_norm(c, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
                      for c in x.chunk(groups)])


def steady_allocator() -> bool:
    """Make glibc keep freed memory (no mmap for large blocks, no trimming); True if it took effect.

    On a VM a fresh 32 MB buffer can cost as much in page faults as the normalization itself, and
    whether a variant's buffers are fresh depends on what the allocator did before, not on the
    variant. With this, every variant reuses warm memory and the table compares kernels. It changes
    this process's allocator for good, so it is opt-in (--steady-alloc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, Python and torch versions and (on CUDA) the GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _time_blocks(cases: dict[str, Callable[[], None]], reset: Callable[[], None], reps: int, warmup: int,
                 rounds: int, device: torch.device, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per round, each variant runs a block of warm-up then timed reps; rounds alternate the variants.

    Blocks, not rep-by-rep interleaving: a variant's own steady state (caches, and the C allocator's
    reuse of its large buffers) is what a training loop sees, and another variant's allocations in
    between would change it (e.g. glibc trims the heap and the next rep page-faults). Several rounds
    still spread slow drift of a shared machine over all variants.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in cases}
    per_round = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, fn in cases.items():
            for i in range(warmup + n):
                reset()
                sync()
                t0 = clock()
                fn()
                sync()
                if i >= warmup:
                    times[name].append((clock() - t0) * 1e3)
    return times


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _timer(clock: str, device: torch.device, threads: tuple[int, ...]) -> Callable[[], float]:
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if clock == "thread" and (device.type != "cpu" or any(t != 1 for t in threads)):
        raise ValueError("clock='thread' measures one CPU thread: use it with device cpu and threads=(1,)")
    return time.perf_counter if clock == "wall" else time.thread_time


def _run_cases(cases: dict[str, tuple[str, Callable[[], None]]], params: list[Tensor], extra: dict,
               threads: tuple[int, ...], reps: int, warmup: int, rounds: int, device: torch.device,
               clock: str) -> list[dict]:
    """Time every case at every thread count; one row per (threads, case), ratio to its baseline case."""
    timer = _timer(clock, device, threads)

    def reset() -> None:
        for p in params:
            p.grad = None

    info = machine_info(device)
    rows: list[dict] = []
    old_threads = torch.get_num_threads()
    filters = warnings.filters[:]
    try:
        warnings.filterwarnings("ignore", message=".*ghost batches of")  # small ghost batches are the point here
        for t in threads:
            torch.set_num_threads(t)
            times = _time_blocks({k: fn for k, (_, fn) in cases.items()}, reset, reps, warmup,
                                 max(1, min(rounds, reps)), device, timer)
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, (baseline, _) in cases.items():
                rows.append({**info, "threads": t, "clock": clock, **extra, "variant": name, "baseline": baseline,
                             "reps": reps, "median_ms": med[name], "p10_ms": _quantile(times[name], 0.1),
                             "p90_ms": _quantile(times[name], 0.9), "ratio": med[name] / med[baseline]})
    finally:
        torch.set_num_threads(old_threads)
        warnings.filters[:] = filters
    return rows


def benchmark(shape: tuple[int, ...] = (128, 64, 32, 32), threads: tuple[int, ...] = (1, 2), reps: int = 20,
              warmup: int = 3, groups: tuple[int, ...] = (1, 4, 16, 64), seq: tuple[int, int] | None = (16, 8),
              device: str | torch.device = "cpu", channels_last: bool = False, seed: int = 0,
              clock: str = "wall", rounds: int = 3, seq_groups: tuple[int, ...] | None = None,
              autocast: torch.dtype | None = None) -> list[dict]:
    """Time forward+backward of every layer variant at one shape; one dict per (threads, variant).

    Variants: BatchNorm, GhostBatchNorm / chunk loop / Figure-2 (with an affine) at each G in
    `groups`, and SeqNorm(seq[0] channel groups, G) against F.group_norm + BatchNorm for G in
    `seq_groups` (default: seq[1] only), where the channel groups divide C. clock="thread" times the
    calling thread's CPU time (user + system, so page faults count): steadier on a shared machine,
    meaningful only for CPU runs with one thread. `autocast` (e.g. torch.bfloat16): inputs and
    gradients in that dtype, every forward under torch.autocast with it.
    """
    device = torch.device(device)
    _timer(clock, device, threads)  # refuse a bad clock before building anything
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(device, autocast)
    dy = torch.randn(shape, generator=gen).to(device, autocast)
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_()
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    modules: list[nn.Module] = []

    def new(mod: nn.Module) -> nn.Module:
        modules.append(mod.to(device).train())
        return mod

    def fwd_bwd(f: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with _autocast(device, autocast):
                y = f()
            y.backward(dy if y.dtype == dy.dtype else dy.to(y.dtype))  # a layer may answer float32 under autocast

        return run

    bn = new(bn_cls(c))
    cases: dict[str, tuple[str, Callable[[], None]]] = {"BatchNorm": ("BatchNorm", fwd_bwd(lambda: bn(x)))}
    for g in groups:
        gbn = new(GhostBatchNorm(c, ghost_groups=g))
        cases[f"GhostBatchNorm G={g}"] = ("BatchNorm", fwd_bwd(lambda m=gbn: m(x)))
    for g in [g for g in groups if g > 1]:
        cbn = new(bn_cls(c))
        cases[f"chunk loop G={g}"] = ("BatchNorm", fwd_bwd(lambda g=g, m=cbn: chunk_loop_batch_norm(x, g, m)))
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    for g in [g for g in groups if g > 1]:
        fbn = new(bn_cls(c))  # only for its affine parameters, so all variants do the same work
        cases[f"Figure-2 G={g}"] = ("BatchNorm", fwd_bwd(
            lambda g=g, m=fbn: figure2_ghost_norm(x, g) * m.weight.view(affine_shape) + m.bias.view(affine_shape)))
    if seq is not None and c % seq[0] == 0:
        g_c = seq[0]
        g_ms = [g for g in (seq_groups if seq_groups is not None else (seq[1],)) if shape[0] % g == 0]
        if g_ms:
            base = new(bn_cls(c))
            cases["group_norm+BatchNorm"] = ("group_norm+BatchNorm", fwd_bwd(lambda: base(F.group_norm(x, g_c))))
        for g_m in g_ms:
            sn = new(SeqNorm(c, channel_groups=g_c, ghost_groups=g_m))
            cases[f"SeqNorm G_C={g_c} G_M={g_m}"] = ("group_norm+BatchNorm", fwd_bwd(lambda m=sn: m(x)))
    params = [x] + [p for m in modules for p in m.parameters()]
    extra = {"shape": tuple(shape), "channels_last": channels_last, "autocast": _dtype_name(autocast)}
    return _run_cases(cases, params, extra, threads, reps, warmup, rounds, device, clock)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast with `dtype` on the device's type, or a context that does nothing."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "no" if dtype is None else str(dtype).removeprefix("torch.")


def model_norm_shapes(name: str, batch: int | None = None) -> list[tuple[int, ...]]:
    """The distinct input shapes of a model's norm layers, in order of first use, at batch size `batch`."""
    in_shape, default_batch = MODELS[name]
    batch = batch or default_batch
    with torch.device("meta"):  # shapes only: no weights initialized, no arithmetic done
        model = build_model(name, num_classes=10, in_shape=in_shape, norm=batchnorm).eval()
    shapes: list[tuple[int, ...]] = []

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        shape = (batch, *args[0].shape[1:])
        if shape not in shapes:
            shapes.append(shape)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(2, *in_shape, device="meta"))  # the shapes past the batch dim do not depend on it
    return shapes


def model_steps(names: tuple[str, ...] = tuple(MODELS), threads: tuple[int, ...] = (1, 2), reps: int = 3,
                warmup: int = 1, ghost_groups: int = 16, channel_groups: int = 4, device: str | torch.device = "cpu",
                channels_last: bool = False, seed: int = 0, clock: str = "wall", rounds: int = 1,
                reps_by_model: dict[str, int] | None = None, autocast: torch.dtype | None = None) -> list[dict]:
    """Time whole training steps (forward, cross-entropy, backward, SGD step) of each model with
    BatchNorm, GhostBatchNorm(ghost_groups) and SeqNorm(channel_groups, ghost_groups); same weights
    and data for all three. One dict per (model, threads, variant); ratio to the BatchNorm model."""
    device = torch.device(device)
    rows = []
    for name in names:
        in_shape, batch = MODELS[name]
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *in_shape, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        factories = {
            "BatchNorm": batchnorm,
            f"GhostBatchNorm G={ghost_groups}": lambda c, dim: GhostBatchNorm(c, ghost_groups=ghost_groups),
            f"SeqNorm G_C={channel_groups} G_M={ghost_groups}":
                lambda c, dim: SeqNorm(c, channel_groups=channel_groups, ghost_groups=ghost_groups),
        }
        cases, params = {}, []
        for variant, norm in factories.items():
            torch.manual_seed(seed)  # the same initial weights for every variant
            model = build_model(name, num_classes=10, in_shape=in_shape, norm=norm).to(device).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            params += list(model.parameters())

            def step(model=model, opt=opt) -> None:
                with _autocast(device, autocast):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()

            cases[variant] = ("BatchNorm", step)
        n = (reps_by_model or {}).get(name, reps)
        extra = {"model": name, "shape": (batch, *in_shape), "channels_last": channels_last,
                 "autocast": _dtype_name(autocast)}
        rows += _run_cases(cases, params, extra, threads, n, warmup, rounds, device, clock)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of benchmark rows, one per variant."""
    out = [f"{'threads':>7}  {'variant':<28} {'median ms':>10} {'p10':>8} {'p90':>8}  {'ratio':>6}  vs"]
    for r in rows:
        out.append(f"{r['threads']:>7}  {r['variant']:<28} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} "
                   f"{r['p90_ms']:>8.2f}  {r['ratio']:>6.2f}  {r['baseline']}")
    return "\n".join(out)


def _cell(r: dict | None, base: dict) -> str:
    """'ratio [p10-p90]' with the spread also over the baseline's median, or '-'."""
    if r is None:
        return "-"
    return f"{r['ratio']:.2f} [{r['p10_ms'] / base['median_ms']:.2f}-{r['p90_ms'] / base['median_ms']:.2f}]"


def format_layer_table(rows: list[dict], owners: dict[tuple, str] | None = None) -> str:
    """One line per (threads, shape, G): BatchNorm's ms, then each variant as ratio [p10-p90]."""
    head = (f"{'thr':>3} {'model':<22} {'shape':<20} {'G':>3} {'BN ms [p10-p90]':>22}  {'Ghost/BN':<17} "
            f"{'chunk/BN':<17} {'Fig2/BN':<17} {'Seq/(GN+BN)':<17}")
    out = [head]
    index = {(r["threads"], r["shape"], r["variant"]): r for r in rows}
    timed = []  # (threads, shape) in the order they were timed
    for r in rows:
        if (r["threads"], r["shape"]) not in timed:
            timed.append((r["threads"], r["shape"]))
    for t, shape in sorted(timed, key=lambda k: k[0]):  # stable: shapes keep their order per thread count
        bn = index[(t, shape, "BatchNorm")]
        gnbn = index.get((t, shape, "group_norm+BatchNorm"))
        gs = sorted({int(r["variant"].split("=")[-1]) for r in rows if r["threads"] == t and r["shape"] == shape
                     and r["variant"].startswith("GhostBatchNorm G=")})
        for g in gs:
            seq = next((r for (tt, ss, v), r in index.items() if tt == t and ss == shape and
                        v.startswith("SeqNorm") and v.endswith(f"G_M={g}")), None)
            bn_cell = f"{bn['median_ms']:.3f} [{bn['p10_ms']:.3f}-{bn['p90_ms']:.3f}]"
            out.append(f"{t:>3} {(owners or {}).get(shape, ''):<22} {str(shape):<20} {g:>3} {bn_cell:>22}  "
                       f"{_cell(index.get((t, shape, f'GhostBatchNorm G={g}')), bn):<17} "
                       f"{_cell(index.get((t, shape, f'chunk loop G={g}')), bn):<17} "
                       f"{_cell(index.get((t, shape, f'Figure-2 G={g}')), bn):<17} "
                       f"{_cell(seq, gnbn) if gnbn else '-':<17}")
    return "\n".join(out)


def format_model_table(rows: list[dict]) -> str:
    """One line per (model, threads, variant): step ms [p10-p90] and the ratio to the BatchNorm model."""
    out = [f"{'model':<10} {'thr':>3}  {'variant':<26} {'step ms':>10} {'p10':>10} {'p90':>10}  {'ratio':>6}  reps"]
    for r in rows:
        out.append(f"{r['model']:<10} {r['threads']:>3}  {r['variant']:<26} {r['median_ms']:>10.1f} "
                   f"{r['p10_ms']:>10.1f} {r['p90_ms']:>10.1f}  {r['ratio']:>6.3f}  {r['reps']}")
    return "\n".join(out)


def _load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: parse, benchmark, print the machine, the load and the tables."""
    p = argparse.ArgumentParser(prog="python -m ghostsys.bench", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed reps per layer variant (default: 9, 5 for inputs over 8M values; 20 with --shape)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed reps before each block (default 2, 1 for inputs over 8M values and model steps)")
    p.add_argument("--rounds", type=int, default=None, help="blocks per variant, alternating variants "
                   "(default 3; 1 for the model steps)")
    p.add_argument("--shape", default=None, help="time one input shape M,C,... instead of the models' layers")
    p.add_argument("--groups", default=None, help="ghost groups to time (default: every G in 2..64 leaving a "
                   "ghost batch >= 4; with --shape 1,4,16,64)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"models whose layers and training steps to time, or 'none' (default {','.join(MODELS)})")
    p.add_argument("--no-steps", action="store_true", help="time the models' layers only, not whole training steps")
    p.add_argument("--step-reps", default="simplenet=20,resnet56=5,wrn28_10=2",
                   help="timed training steps per model (default simplenet=20,resnet56=5,wrn28_10=2)")
    p.add_argument("--step-threads", default=None,
                   help="thread counts for the training steps (default: the largest of --threads; a WRN-28-10 "
                        "step takes 15-30 s on 2 cores, so the default run times it at one thread count)")
    p.add_argument("--step-groups", type=int, default=16, help="G_M of the GhostNorm/SeqNorm models (default 16)")
    p.add_argument("--seq-channel-groups", type=int, default=4, help="SeqNorm's G_C (default 4: divides every "
                   "norm layer's channels in the three models)")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs, gradients and models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall time (default) or the thread's CPU time (steadier on a busy machine; --threads 1 only)")
    p.add_argument("--steady-alloc", action="store_true",
                   help="keep freed memory in the process (glibc mallopt), so page faults do not blur the table")
    p.add_argument("--autocast", choices=("no", "bf16"), default="no",
                   help="time under torch.autocast with bfloat16: bf16 activations, float32 parameters (default no)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, few reps, SimpleNet steps")
    a = p.parse_args(argv)
    threads = tuple(int(t) for t in a.threads.split(","))
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    try:
        _timer(a.clock, device, threads)
    except ValueError as e:
        p.error(str(e))
    models = () if a.models == "none" else tuple(m for m in a.models.split(",") if m)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)} or 'none'")
    step_reps = {k: int(v) for k, v in (kv.split("=") for kv in a.step_reps.split(",") if kv)}
    amp = torch.bfloat16 if a.autocast == "bf16" else None
    steady = steady_allocator() if a.steady_alloc else False
    if a.steady_alloc and not steady:
        print("note: --steady-alloc had no effect (not glibc?)")
    info = machine_info(device)
    print(f"machine: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if 'gpu' in info else ''}; "
          f"python {info['python']}; torch {info['torch']}; device {info['device']}")
    print(f"command: python -m ghostsys.bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    step_threads = tuple(int(t) for t in a.step_threads.split(",")) if a.step_threads else (max(threads),)
    try:
        _timer(a.clock, device, step_threads)
    except ValueError as e:
        p.error(f"--step-threads: {e}")
    print(f"before: {_load()}; threads {a.threads} (training steps: {','.join(map(str, step_threads))}); "
          f"{a.clock} clock; {'channels_last' if a.channels_last else 'contiguous'}; "
          f"{'steady' if steady else 'default'} allocator; {'fp32' if amp is None else 'bf16 autocast'}")
    rows: list[dict] = []
    if a.quick:
        shapes, owners = [(64, 16, 8, 8)], {(64, 16, 8, 8): "quick"}
        reps, models, step_reps = 3, models[:1], {m: 2 for m in models[:1]}
    elif a.shape:
        shapes, owners = [tuple(int(s) for s in a.shape.split(","))], {}
        reps = a.reps or 20
    else:
        shapes, owners = [], {}
        for m in models:
            for s in model_norm_shapes(m):
                if s not in shapes:
                    shapes.append(s)
                owners[s] = f"{owners[s]}+{m}" if s in owners else m
        reps = a.reps
    for shape in shapes:
        if a.groups:
            groups = tuple(int(g) for g in a.groups.split(","))
        elif a.shape:
            groups = (1, 4, 16, 64)
        else:
            groups = tuple(g for g in GHOST_GROUPS if shape[0] % g == 0 and shape[0] // g >= MIN_GHOST_BATCH)
        groups = tuple(g for g in groups if shape[0] % g == 0)
        big = torch.Size(shape).numel() > 8_000_000
        n = reps or (5 if big else 9)
        warm = a.warmup if a.warmup is not None else (1 if big else 2)
        print(f"timing {shape} ({owners.get(shape, 'given')}), G {groups}, {n} reps after {warm} warm-up per block ...",
              file=sys.stderr, flush=True)
        rows += benchmark(shape, threads, n, warm, groups, (a.seq_channel_groups, 0), device, a.channels_last,
                          clock=a.clock, rounds=a.rounds or 3, seq_groups=tuple(g for g in groups if g > 1),
                          autocast=amp)
    print(f"\nLayers: forward+backward, ratio = median / median of nn.BatchNorm (SeqNorm: of F.group_norm(G_C="
          f"{a.seq_channel_groups}) + nn.BatchNorm) at the same shape and thread count; [p10-p90] over the same median")
    print(format_layer_table(rows, owners))
    if a.shape and not a.quick:
        print("\n" + format_rows(rows))
    if models and not a.no_steps and not a.shape:
        print(f"timing training steps of {', '.join(models)} ...", file=sys.stderr, flush=True)
        steps = model_steps(models, step_threads, 3, 1 if a.warmup is None else a.warmup, a.step_groups,
                            a.seq_channel_groups, device, a.channels_last, clock=a.clock, rounds=a.rounds or 1,
                            reps_by_model=step_reps, autocast=amp)
        print(f"\nTraining steps (forward, cross-entropy, backward, SGD step) at each model's batch, GhostNorm and "
              f"SeqNorm with G_M={a.step_groups}; ratio = median over the BatchNorm model's median, same thread count")
        print(format_model_table(steps))
        rows += steps
    print(f"after: {_load()}")
    return rows


if __name__ == "__main__":
    main()
