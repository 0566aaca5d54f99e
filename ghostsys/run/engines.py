"""Engine adapters: HuggingFace Accelerate and DeepSpeed behind one small interface.

The training loop drives every engine the same way, once per optimizer step::

    for i, micro in enumerate(micro_batches):          # nfp micro-batches of this rank's block
        with engine.micro_context(is_last=i == nfp - 1):
            engine.backward(loss_fn(engine.model(micro)))   # loss = mean over the micro-batch
    engine.step()

and the step's gradient is the mean over the whole global batch M = micro_batch * nfp * world_size
(the loss convention of DESIGN.md §2-§3). Each adapter meets that contract its engine's way:

- Accelerate: we accumulate ourselves: ``no_sync`` on all but the last micro-batch, ``backward(loss / nfp)``,
  DDP averages over ranks. Neither the scheduler (``AcceleratedScheduler`` steps ``num_processes`` times
  per step) nor any dataloader (its sharding interleaves ranks; ghostsys feeds contiguous blocks) is prepared.
- DeepSpeed: ``gradient_accumulation_steps = nfp`` divides each loss by nfp, its reduction averages ranks.
  It wants ``engine.step()`` after every micro-batch and updates only at the accumulation boundary, so
  ``backward`` takes the inner steps and ``step`` asserts it lands on the boundary. DeepSpeed never syncs
  buffers (running statistics drift per rank; ``broadcast_buffers`` has no effect there): use
  ``ghostsys.run.dist.all_reduce_buffers_mean_`` where the buffer policy asks for agreement.

Mixed precision (``mixed_precision`` = no | bf16 | fp16) goes through each engine's own mechanism:
Accelerate's ``mixed_precision`` (autocast around the model's forward, float32 weights; fp16 adds its
GradScaler), DeepSpeed's ``bf16``/``fp16`` config (low-precision weights and activations, float32 master
weights in the optimizer). DeepSpeed casts parameters but not buffers nor inputs: ghostsys sets
``data_types.buffer_dtype`` to the same dtype (a BatchNorm with bf16 weights and float32 running
statistics does not run) and ``input_dtype`` tells the loop to feed bf16 batches.

Neither adapter reads launcher environment variables: world size comes in as an argument and the
default process group, when world > 1, is already initialized by the caller (``ghostsys.run.dist.init``);
both engines adopt it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, ContextManager

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ghostsys.run import dist as gdist

__all__ = ["Engine", "AccelerateEngine", "DeepSpeedEngine", "ENGINES", "make_engine", "validate_ds_config"]


class Engine(ABC):
    """One training engine seen through the loop's contract: micro_context, backward x nfp, step x 1."""

    name: ClassVar[str]
    input_dtype: torch.dtype | None = None  # dtype the batches must have (None: the model's own dtype)
    model: nn.Module  # the engine's wrapper: call forward on this
    unwrapped: nn.Module  # the plain module: state, eval, buffers
    device: torch.device  # where the loop must put its batches

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, nfp: int,
                 micro_batch: int, world_size: int, zero_stage: int = 0, broadcast_buffers: bool = True,
                 ds_config: dict | None = None, grad_clip: float = 0.0, mixed_precision: str = "no") -> None:
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        if nfp < 1 or micro_batch < 1 or world_size < 1:
            raise ValueError(f"nfp, micro_batch and world_size must be >= 1, got {nfp}, {micro_batch}, {world_size}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {grad_clip}")
        self.nfp, self.micro_batch, self.world_size = nfp, micro_batch, world_size
        self.grad_clip = grad_clip
        self.scheduler = scheduler
        self._backwards = 0  # micro-batches since the last step, to check the loop keeps the contract

    @abstractmethod
    def micro_context(self, is_last: bool) -> ContextManager:
        """Context for one micro-batch's forward+backward; skips the gradient all-reduce unless is_last."""

    @abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Backward of a micro-batch-mean loss, scaled so the step's gradient is the mean over M."""

    @abstractmethod
    def step(self) -> None:
        """Optimizer step, lr-scheduler step and zeroed gradients; call once after the nfp-th backward."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Model, optimizer and scheduler state as tensors and plain python (torch.load weights_only=True)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned, so training continues exactly as if never interrupted."""

    def _count_backward(self) -> None:
        self._backwards += 1
        if self._backwards > self.nfp:
            raise RuntimeError(f"{self.name}: backward() called {self._backwards} times in one step, nfp={self.nfp}")

    def _check_step(self) -> None:
        if self._backwards != self.nfp:
            raise RuntimeError(f"{self.name}: step() after {self._backwards} backward() calls, expected nfp={self.nfp}")
        self._backwards = 0


class AccelerateEngine(Engine):
    """HuggingFace Accelerate: DDP over the adopted process group, our own accumulation."""

    name = "accelerate"

    def __init__(self, model, optimizer, scheduler, *, nfp, micro_batch, world_size, zero_stage=0,
                 broadcast_buffers=True, ds_config=None, grad_clip=0.0, mixed_precision="no"):
        super().__init__(model, optimizer, scheduler, nfp=nfp, micro_batch=micro_batch, world_size=world_size,
                         grad_clip=grad_clip, mixed_precision=mixed_precision)
        if zero_stage or ds_config:
            raise ValueError("zero_stage and ds_config are DeepSpeed options; the accelerate engine takes neither")
        from accelerate import Accelerator, DistributedDataParallelKwargs

        ddp = DistributedDataParallelKwargs(broadcast_buffers=broadcast_buffers)
        cpu = not torch.cuda.is_available()
        if mixed_precision == "fp16" and cpu:  # Accelerate would silently train float32 instead
            raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 on CPU")
        from accelerate.state import AcceleratorState

        shared = AcceleratorState._shared_state
        if shared and shared.get("_mixed_precision") != mixed_precision:
            # Accelerate keeps one precision per process and refuses another; engines built one after the
            # other in one process (the checker, tests, benchmarks) may differ. The process group
            # (PartialState) is kept; only the precision-bearing AcceleratorState starts over.
            AcceleratorState._reset_state()
        # Named explicitly, so ACCELERATE_MIXED_PRECISION from the launcher can never apply unrecorded.
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[ddp])
        if self.accelerator.num_processes != world_size:
            raise ValueError(f"accelerate sees {self.accelerator.num_processes} processes, world_size={world_size}")
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # prepare() moves the module in place and at most wraps it in DDP, so the module we were given is the
        # plain one (accelerator.unwrap_model would also import deepspeed, seconds per process, to rule it out).
        if not (self.model is model or getattr(self.model, "module", None) is model):
            raise RuntimeError(f"accelerate wrapped the model unexpectedly: {type(self.model).__name__}")
        self.unwrapped = model
        self.device = self.accelerator.device

    def micro_context(self, is_last: bool) -> ContextManager:
        """DDP's no_sync on all but the last micro-batch (a no-op outside DDP)."""
        return contextlib.nullcontext() if is_last else self.accelerator.no_sync(self.model)

    def backward(self, loss: Tensor) -> None:
        """Backward of loss / nfp: the nfp micro-means sum to the rank's mean; DDP averages ranks."""
        self._count_backward()
        self.accelerator.backward(loss / self.nfp)

    def step(self) -> None:
        """Clip (if asked), optimizer step, one scheduler step (unprepared, so exactly one), zero grads."""
        self._check_step()
        if self.grad_clip:  # after the last backward DDP has synced the grads: every rank clips alike
            if self.accelerator.scaler is not None:  # fp16: clip the true gradients, not the loss-scaled ones
                self.accelerator.unscale_gradients()
            torch.nn.utils.clip_grad_norm_(self.unwrapped.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Model, optimizer and scheduler state; identical on every rank (plain DDP, nothing partitioned)."""
        scaler = self.accelerator.scaler  # fp16's loss scale and growth tracker; None otherwise
        return {"engine": self.name, "model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore model, then optimizer (it carries lr), then scheduler."""
        _check_engine(state, self.name)
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])


_ZERO3_WHY = ("ZeRO stage 3 partitions the parameters themselves: between forwards the module holds only "
              "placeholders, so `unwrapped` state, evaluation and the BatchNorm buffer policies ghostsys "
              "studies would all need gathered-parameter contexts; ghostsys supports ZeRO stages 0, 1 and 2")


def validate_ds_config(user_cfg: dict | None, micro_batch: int, nfp: int, world_size: int, zero_stage: int,
                       grad_clip: float = 0.0, mixed_precision: str = "no") -> dict:
    """Merge a user DeepSpeed config with the batch geometry and precision ghostsys needs; ValueError on any contradiction."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage} is not supported: {_ZERO3_WHY}")
    needed = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": nfp,
              "train_batch_size": micro_batch * nfp * world_size, "zero_optimization.stage": zero_stage,
              "bf16.enabled": mixed_precision == "bf16", "fp16.enabled": mixed_precision == "fp16"}
    if grad_clip:  # ghostsys' --grad-clip is DeepSpeed's own global-norm clipping
        needed["gradient_clipping"] = grad_clip
    user = dict(user_cfg or {})
    conflicts = []
    for dotted, value in needed.items():
        head, _, leaf = dotted.partition(".")
        have = user.get(head, {}).get(leaf) if leaf else user.get(head)
        if have is not None and have != "auto" and have != value:
            how = "; precision is set by --mixed-precision" if head in ("bf16", "fp16") else ""
            conflicts.append(f"{dotted}={have!r} (ghostsys needs {value!r}{how})")
    for owned in ("optimizer", "scheduler"):  # ghostsys passes its own; DeepSpeed would build a second one
        if owned in user:
            conflicts.append(f"{owned}=... (ghostsys builds the {owned} itself; remove the section)")
    if conflicts:
        raise ValueError(f"DeepSpeed config contradicts the run (micro_batch={micro_batch}, nfp={nfp}, "
                         f"world_size={world_size}, M={micro_batch * nfp * world_size}, zero_stage={zero_stage}): "
                         + "; ".join(conflicts))
    # Defaults a user may override: quiet logs, no timers, our client SGD allowed under ZeRO, and no
    # clipping: this DeepSpeed defaults gradient_clipping to 1.0, which an unset key would silently apply.
    cfg = {"steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, **user}
    cfg.update({k: v for k, v in needed.items() if "." not in k})
    cfg["zero_optimization"] = {**user.get("zero_optimization", {}), "stage": zero_stage}
    if mixed_precision != "no":  # (a user's {"enabled": false} sections stay as they are; true ones conflicted above)
        cfg[mixed_precision] = {**user.get(mixed_precision, {}), "enabled": True}
        # Buffers in the weights' dtype: BatchNorm refuses bf16 weights with float32 running statistics.
        cfg["data_types"] = {"buffer_dtype": mixed_precision, **user.get("data_types", {})}
    return cfg


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0/1/2 with a client torch optimizer; DeepSpeed does the accumulation."""

    name = "deepspeed"

    def __init__(self, model, optimizer, scheduler, *, nfp, micro_batch, world_size, zero_stage=0,
                 broadcast_buffers=True, ds_config=None, grad_clip=0.0, mixed_precision="no"):
        super().__init__(model, optimizer, scheduler, nfp=nfp, micro_batch=micro_batch, world_size=world_size,
                         grad_clip=grad_clip, mixed_precision=mixed_precision)
        if mixed_precision == "fp16":
            raise ValueError("DeepSpeed fp16 is not supported: ghostsys does not checkpoint its dynamic loss scaler; use bf16")
        cfg = validate_ds_config(ds_config, micro_batch, nfp, world_size, zero_stage, grad_clip, mixed_precision)
        if any(p.dtype == torch.float64 for p in model.parameters()):
            # Refuse up front rather than fail or lose precision later: ZeRO-0's gradient all-reduce buckets
            # only the accelerator's supported dtypes (no float64, CPU and CUDA alike) and asserts deep in the
            # first backward; ZeRO-1/2 keep float32 master weights, silently rounding every update.
            raise ValueError("DeepSpeed cannot train float64 parameters (ZeRO-0 cannot all-reduce float64 gradients; "
                             "ZeRO-1/2 update float32 master weights): use float32, or the accelerate engine")
        if world_size == 1 and not tdist.is_initialized():
            gdist.init_single_process_group()  # DeepSpeed needs a process group even alone
        if tdist.get_world_size() != world_size:
            raise ValueError(f"process group has {tdist.get_world_size()} ranks, world_size={world_size}")
        import deepspeed

        if not torch.cuda.is_available():
            _skip_cpu_shm_comm_build(deepspeed)

        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=cfg)
        self.unwrapped = self.model.module
        self.device = self.model.device
        self.zero_stage = zero_stage
        # DeepSpeed casts the weights, not the batches: the loop must feed them in the weights' dtype.
        self.input_dtype = torch.bfloat16 if mixed_precision == "bf16" else None

    def micro_context(self, is_last: bool) -> ContextManager:
        """Nothing to enter: DeepSpeed reduces at the boundary itself (ZeRO-2 every micro-batch, by design)."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        """DeepSpeed backward (divides by nfp itself); non-final micro-batches take DeepSpeed's inner step here."""
        self._count_backward()
        self.model.backward(loss)
        if self._backwards < self.nfp:
            if self.model.is_gradient_accumulation_boundary():
                raise RuntimeError("deepspeed reached its accumulation boundary before the loop's step ended")
            self.model.step()  # advances DeepSpeed's micro-step counter; no update off the boundary

    def step(self) -> None:
        """DeepSpeed's boundary step: reduce, optimizer step, scheduler step, zero grads."""
        self._check_step()
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed is not at its accumulation boundary where the loop ends the step")
        self.model.step()

    def state_dict(self) -> dict:
        """Model, optimizer, scheduler and step counters. Under ZeRO 1/2 the optimizer part is THIS rank's
        partition (its fp32 master slice and the base optimizer's state over it): save one file per rank and
        load it back on the same rank of a run with the same world size."""
        if self.model.fp16_enabled():  # the dynamic loss scaler's state is not covered
            raise NotImplementedError("state_dict covers float32 and bf16 DeepSpeed training only")
        zero = self.optimizer if self.zero_stage or self.model.bfloat16_enabled() else None
        if zero is None:
            optim = self.optimizer.state_dict()
        else:  # ZeRO 1/2, or ZeRO 0 under bf16: a base optimizer over float32 master weights
            optim = {"base": zero.optimizer.state_dict(), "rank": tdist.get_rank(), "world_size": self.world_size,
                     "fp32_partitions": [p.detach().clone() for p in _fp32_masters(zero)]}
        return {"engine": self.name, "zero_stage": self.zero_stage, "model": self.unwrapped.state_dict(),
                "optimizer": optim, "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "counters": {"global_steps": self.model.global_steps, "global_samples": self.model.global_samples}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned; under ZeRO 1/2 the state must come from this rank, same world size."""
        _check_engine(state, self.name)
        if state["zero_stage"] != self.zero_stage:
            raise ValueError(f"checkpoint is ZeRO stage {state['zero_stage']}, engine is stage {self.zero_stage}")
        self.unwrapped.load_state_dict(state["model"])
        zero = self.optimizer if self.zero_stage or self.model.bfloat16_enabled() else None
        optim = state["optimizer"]
        if zero is None:
            self.optimizer.load_state_dict(optim)
        else:
            where = (optim["rank"], optim["world_size"])
            if where != (tdist.get_rank(), self.world_size):
                raise ValueError(f"ZeRO optimizer state of rank {where[0]}/{where[1]} loaded on rank "
                                 f"{tdist.get_rank()}/{self.world_size}: load each rank's own file")
            # The master partition is the source of truth for the next update, not the module copy.
            for mine, saved in zip(_fp32_masters(zero), optim["fp32_partitions"], strict=True):
                mine.data.copy_(saved)
            zero.optimizer.load_state_dict(optim["base"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.model.global_steps = state["counters"]["global_steps"]
        self.model.global_samples = state["counters"]["global_samples"]


def _fp32_masters(zero_optimizer) -> list[Tensor]:
    # The float32 master weights the next update starts from, named differently per DeepSpeed wrapper:
    # ZeRO 1/2 (DeepSpeedZeroOptimizer) and BF16_Optimizer keep this rank's flat partitions; ZeRO 0
    # under bf16 with a client torch optimizer gets FP16_UnfusedOptimizer (whole tensors per group;
    # its loss scale is the static 1.0 of bf16, nothing to save).
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero_optimizer, attr):
            return list(getattr(zero_optimizer, attr))
    if hasattr(zero_optimizer, "fp32_groups"):
        return [p for group in zero_optimizer.fp32_groups for p in group]
    raise RuntimeError(f"unknown DeepSpeed optimizer {type(zero_optimizer).__name__}: no float32 master partitions")


def _skip_cpu_shm_comm_build(deepspeed_module) -> None:
    # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op at start-up (minutes on
    # a small machine, once per fresh cache). Only inference_all_reduce uses it, and that falls back to
    # torch.distributed without it; training all-reduces always go through the gloo process group.
    # DeepSpeed keeps its op-compatibility table as a module dict precisely so that edits persist.
    table = deepspeed_module.ops.__compatible_ops__
    if "deepspeed_shm_comm" in table:
        table["deepspeed_shm_comm"] = False


def _check_engine(state: dict, name: str) -> None:
    if state.get("engine") != name:
        raise ValueError(f"state_dict was written by engine {state.get('engine')!r}, loading into {name!r}")


ENGINES: dict[str, type[Engine]] = {"accelerate": AccelerateEngine, "deepspeed": DeepSpeedEngine}


def make_engine(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, nfp: int,
                micro_batch: int, world_size: int, zero_stage: int = 0, broadcast_buffers: bool = True,
                ds_config: dict | None = None, grad_clip: float = 0.0, mixed_precision: str = "no") -> Engine:
    """Build the named engine around a plain model, its torch optimizer and (optional) lr scheduler;
    `grad_clip` > 0 clips the global gradient norm before every update."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name](model, optimizer, scheduler, nfp=nfp, micro_batch=micro_batch, world_size=world_size,
                         zero_stage=zero_stage, broadcast_buffers=broadcast_buffers, ds_config=ds_config,
                         grad_clip=grad_clip, mixed_precision=mixed_precision)
