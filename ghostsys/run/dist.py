"""Process-group plumbing: rank, world, device, subgroups and ``(sum, count)`` reductions.

This is the only module in ghostsys that reads launcher environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` through ``env://``,
``ACCELERATE_USE_CPU`` and ``ACCELERATE_MIXED_PRECISION``). Layers never read them: they are handed a process group explicitly.

Group convention: ``group=None`` everywhere means the default (WORLD) group, as in
``torch.distributed``. Every helper is a no-op, or the identity, when no process group is
initialized or the group has one member, so single-process code needs no special cases.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.profiler import record_function

# The profiler attributes the collectives issued inside this range to the buffer sync (a no-op
# costing ~1 us when no profiler is active); ghostsys.profile.collectives knows the name.
BUFFER_SYNC_RANGE = "ghostsys:buffer_sync"

_TRUE = {"1", "true", "yes", "y", "on", "t"}  # what accelerate's str_to_bool accepts as true
# The collective timeout init() gave the default group. new_group() does not inherit it (it
# falls back to torch's 30 min default), so consecutive_subgroups() passes it on explicitly.
_timeout: timedelta | None = None
# Set once this process has been in a process group (its own or an engine's): see exit_if_joined().
_joined = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run: rank, world size, local rank, backend and device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: single process, no process group
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that writes results and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def launched_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun / accelerate launch / deepspeed; (0, 1, 0) if unset."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local


def expected_world() -> int:
    """The world size a run will have: the joined group's, else the launcher's (callable before init)."""
    return world_size() if is_initialized() else launched_world()[1]


def launched_rank() -> int:
    """This process's global rank as its launcher set it; 0 when not launched (or the env is malformed)."""
    try:
        return launched_world()[0]
    except ValueError:
        return 0


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    # An explicit argument wins over ACCELERATE_USE_CPU; the env var only steers the automatic choice.
    if device is None:
        want_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE
        if want_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: ProcessGroup | None = None) -> int:
    """Size of ``group`` (default WORLD); 1 when no process group is initialized."""
    return dist.get_world_size(group) if is_initialized() else 1


def init(timeout_s: float = 120.0, device: str | None = None) -> DistInfo:
    """Join (or describe an already joined) process group and pick this rank's device."""
    rank, world, local = launched_world()
    dev = _pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    global _joined, _timeout
    if is_initialized():
        _joined = True
        # Accelerate / DeepSpeed got here first: describe their group; its timeout is theirs.
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), dev)
    if world == 1:
        return DistInfo(0, 1, local, None, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # The timeout bounds every collective: a dead or stuck peer makes the others raise (gloo) or
    # be torn down by the NCCL watchdog, instead of hanging the job until the scheduler kills it.
    _timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=_timeout,
        device_id=dev if dev.type == "cuda" else None,
    )
    _joined = True
    return DistInfo(rank, world, local, backend, dev)


def init_single_process_group() -> None:
    """A 1-rank group for a lone process that an engine (DeepSpeed) insists on, with no port or launcher.

    An in-process store needs no env vars; DeepSpeed also asserts LOCAL_RANK is set, 0 for a lone process.
    """
    global _joined
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)
    _joined = True
    os.environ["LOCAL_RANK"] = "0"


def shutdown() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    # Exiting with a live gloo group aborts a fraction of otherwise successful runs.
    if is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """True once this process has been in a process group (ghostsys' own or an engine's), even after shutdown()."""
    return _joined or is_initialized()


def exit_if_joined(code: int | str | None) -> None:
    """Exit with ``code`` without finalizing the interpreter if this process has been in a process group; else return.

    Why: a gloo worker thread drops its reference to a finished collective a moment after the caller's
    wait() returns. When that release is the tensors' last reference and the moment falls inside Python's
    finalization (a loaded machine deschedules the worker for that long), the release needs the GIL, and a
    finalizing interpreter ends any thread that asks for it by a forced unwind; the unwind hits a noexcept
    destructor: "terminate called without an active exception", SIGABRT, after a run that succeeded.
    (Core dump: ProcessGroupGloo::runLoop > ~AsyncBroadcastWork > TensorImpl::decref_pyobject > take_gil >
    pthread_exit > std::terminate; 7 of 84 launches of tests/engine_worker.py, four at a time on 2 cores.)
    destroy_process_group() does not join gloo's threads (only the backend's destructor does, once nothing
    references it, and engines keep references), so the certain way out is not to finalize: destroy the
    groups, run the atexit handlers, flush, os._exit. ghostsys.run.cli.exit_process calls this.
    """
    if not joined():
        return
    shutdown()
    atexit._run_exitfuncs()  # what a normal exit runs first: logging.shutdown, multiprocessing's joins, ...
    if code is not None and not isinstance(code, int):  # sys.exit("message"): the message, exit 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code or 0)


def all_reduce_sum_(t: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum ``t`` in place over ``group``; returns ``t`` (unchanged at world size 1)."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on at least one (one 1-element all-reduce)."""
    if world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _comm_device(group: ProcessGroup | None) -> torch.device:
    # NCCL only moves CUDA tensors; everything else here goes through gloo on the CPU.
    if is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_count(
    total: Tensor | float, count: int | Tensor, group: ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """All-reduced (sum of ``total``, sum of ``count``) over ``group`` in one collective; the caller divides."""
    t = total if isinstance(total, Tensor) else torch.tensor(float(total), dtype=torch.float64, device=_comm_device(group))
    c = count if isinstance(count, Tensor) else torch.tensor(int(count), dtype=torch.int64, device=t.device)
    # One float64 buffer: float32 sums gain precision, and integer counts stay exact up to 2**53.
    packed = torch.cat([t.detach().reshape(-1).double(), c.detach().reshape(-1).to(t.device, torch.float64)])
    all_reduce_sum_(packed, group)
    n = t.numel()
    out_t = packed[:n].reshape(t.shape).to(t.dtype)
    out_c = packed[n:].reshape(c.shape)
    out_c = out_c.round().to(c.dtype) if not c.is_floating_point() else out_c.to(c.dtype)
    return out_t, out_c.to(c.device)


def global_mean(total: Tensor | float, count: int | Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Global mean from per-rank (sum, count): sum of sums over sum of counts, never a mean of means."""
    s, n = sum_count(total, count, group)
    return s / n


def consecutive_subgroups(group_size: int) -> ProcessGroup | None:
    """This rank's group among blocks of ``group_size`` consecutive ranks; None means use WORLD.

    Collective: every rank must call it, in the same order relative to other group creations,
    because ``new_group`` must be called by all ranks for every block. Returns None when the
    world has one process or ``group_size`` equals the world size (the default group is that
    block). ``group_size == 1`` gives singleton groups, i.e. no synchronization. The groups get
    the collective timeout given to :func:`init` (torch's default if another library initialized).
    """
    world = world_size()
    valid = [k for k in range(1, world + 1) if world % k == 0]
    if group_size not in valid:
        raise ValueError(f"group_size={group_size} does not divide world size {world}; valid choices: {valid}")
    if world == 1 or group_size == world:
        return None
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        g = dist.new_group(list(range(start, start + group_size)), timeout=_timeout)
        if start <= rank < start + group_size:
            mine = g
    return mine


def _unflatten_into(flat: Tensor, bufs: list[Tensor]) -> None:
    offset = 0
    for b in bufs:
        b.detach().copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def all_reduce_buffers_mean_(module: nn.Module, group: ProcessGroup | None = None) -> None:
    """Average every floating buffer of ``module`` over ``group`` in place; integer buffers must agree.

    Floating buffers (running_mean, running_var) are flattened and summed in one all-reduce per
    dtype, then divided by the group size. Integer buffers (num_batches_tracked) are not averaged:
    one all-reduce first checks they are equal on every rank and raises ValueError otherwise
    (on every rank, with nothing changed), because such ranks have run different numbers of updates.
    """
    n = world_size(group)
    if n == 1:
        return
    with record_function(BUFFER_SYNC_RANGE):
        _all_reduce_buffers_mean(module, n, group)


def _all_reduce_buffers_mean(module: nn.Module, n: int, group: ProcessGroup | None) -> None:
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    ints: list[tuple[str, Tensor]] = []
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            by_dtype.setdefault((buf.dtype, buf.device), []).append(buf)
        else:
            ints.append((name, buf))
    if ints:
        vals = torch.cat([b.detach().reshape(-1).to(_comm_device(group), torch.int64) for _, b in ints])
        both = torch.cat([vals, -vals])  # one MAX gives the max and (negated) the min of every value
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        hi, lo = both[: vals.numel()], -both[vals.numel() :]
        offset = 0
        for name, b in ints:
            k = b.numel()
            if not torch.equal(hi[offset : offset + k], lo[offset : offset + k]):
                lo_k, hi_k = lo[offset : offset + k].tolist(), hi[offset : offset + k].tolist()
                raise ValueError(f"integer buffer {name!r} differs across ranks (min {lo_k}, max {hi_k})")
            offset += k
    for bufs in by_dtype.values():  # after the check: a ValueError above leaves every buffer as it was
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        all_reduce_sum_(flat, group).div_(n)
        _unflatten_into(flat, bufs)


def broadcast_buffers_(module: nn.Module, src: int = 0, group: ProcessGroup | None = None) -> None:
    """Overwrite every buffer of ``module`` with global rank ``src``'s copy (what DDP's broadcast_buffers does)."""
    if world_size(group) == 1:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault((buf.dtype, buf.device), []).append(buf)
    with record_function(BUFFER_SYNC_RANGE):
        for bufs in by_dtype.values():  # one flattened broadcast per dtype, not one per buffer
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            dist.broadcast(flat, src=src, group=group)
            _unflatten_into(flat, bufs)


def all_reduce_max_(t: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Element-wise maximum of ``t`` over ``group`` in place (e.g. the slowest rank's time); returns ``t``."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` at world size 1."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank (picklable objects; identity at world size 1)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(message: str | None) -> str | None:
    """Collective: each rank's error (None = fine) in, the lowest failing rank's out, on every rank.

    Lets every rank give up together when any one cannot go on (a data file one node lacks),
    instead of leaving the others waiting in the next collective until the timeout.
    """
    if world_size() == 1:
        return message
    every: list[str | None] = [None] * world_size()
    dist.all_gather_object(every, message)
    failed = [(r, m) for r, m in enumerate(every) if m is not None]
    if not failed:
        return None
    rank, first = failed[0]
    return first if rank == 0 else f"{first} (on rank {rank})"


def barrier() -> None:
    """Wait for every rank of the default group (no-op at world size 1)."""
    if world_size() > 1:
        dist.barrier()


def requested_world() -> int | None:
    """Processes a parent `accelerate launch` was asked for, when it started this one without a world.

    `accelerate launch --cpu --num_processes N` starts ONE plain process and sets no WORLD_SIZE, so
    nothing in the environment says N; the launcher's command line does. None when not applicable.
    """
    if "WORLD_SIZE" in os.environ:
        return None
    try:
        import psutil

        cmd = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, no permission, parent gone: nothing to say
        return None
    if "launch" not in cmd or not any(os.path.basename(c) == "accelerate" for c in cmd[:3]):
        return None
    for i, arg in enumerate(cmd):
        value = cmd[i + 1] if arg in ("--num_processes", "--num-processes") and i + 1 < len(cmd) else None
        if arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def launcher_mixed_precision() -> str | None:
    """The mixed precision `accelerate launch` exported (ACCELERATE_MIXED_PRECISION: no, bf16, fp16, ...); None if unset.

    Accelerate trains under it whenever the script does not name its own, so a run must either agree
    with it or refuse (ghostsys.run.train.resolve refuses a contradiction).
    """
    raw = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return raw or None


def under_launcher() -> bool:
    """True when a launcher started this process: torchrun / deepspeed / multi-process accelerate set
    WORLD_SIZE, and every `accelerate launch` (one process included) sets ACCELERATE_MIXED_PRECISION."""
    return "WORLD_SIZE" in os.environ or launcher_mixed_precision() is not None


def local_world_size(world: int = 1) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, else
    `world` (a single-node guess); what shares this node's CPUs among the ranks' data-loading workers."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = _env_int(name, 0)
        if value > 0:
            return value
    return max(1, world)
