"""Tolerances below float64, derived in the run from the reference's own divergence across precisions.

For a precision P (float32; bf16 autocast; TF32) the checker cannot know in advance how far P's
rounding moves each quantity: it depends on the model, the data, the ghost groups and the number of
steps k (errors compound along the trajectory, and a value that sits within rounding of a ReLU or
max-pool decision makes the gradient jump when rounding pushes it across). So it measures it, on
THIS model, data, groups and k:

1. The independent reference runs once in float64 (the comparison target, as for float64 checks)
   and three times in P from the same initial weights and batches, each a different but equally
   valid evaluation of the same mathematics (:class:`reference.Rounding`): as written; and an
   antithetic pair in another sample order (every reduction over samples sums differently) and the
   fused normalization form ``x * scale + shift`` that native/cuDNN kernels use, with every group's
   moments and every normalized value pushed by ``DITHER_ULPS`` units of roundoff where such a
   kernel rounds -- random signs in one draw, the same signs negated in the other.
2. Per quantity (logits, loss, grads after the first step; weights and buffers after k steps; the
   buffers under the policy each row expects) the *divergence* is the largest norm-wise relative
   difference of a draw from the float64 run -- the same measure the rows use.
3. ``tol = SAFETY_FACTOR × max(divergence, floor)``; the floor is P's unit roundoff (no computation
   in P lands closer to the exact value than the rounding of its own result), ceil(log2 n) of them
   for a scalar that is a reduction of n terms (the loss: pairwise summation's bound).

Why the code under test should land within that. It is another evaluation of the same function in
P, and its error has two parts. (a) Where the quantity depends smoothly on the roundings, the error
is the same linear response to roundings of the same size: it differs from a draw's by the ratio of
the two algorithms' error constants, and the pushed draws sit at the top of those (2 u at every
normalized value is about the worst case of a fused multiply-add there). Under a Gaussian model of
accumulated roundoff, an evaluation whose error constant is twice a draw's exceeds 3× the largest
of three draws with probability ~3% for a 10-entry max-norm and ~1e-4 for 1000 entries (the
rows compare 320..270k entries; the scalar loss has its floor). (b) Where it jumps -- rounding
pushed a value across a ReLU/max-pool decision -- the jump is a property of the trajectory, not of
the algorithm, and only a draw that crosses the same decision reproduces it: the antithetic pair
pushes every value within 2 u of a decision across it in one of its two draws, whichever way the
code under test's own rounding went. A kernel whose rounding at a decision exceeds that push can
flip a value no draw flipped; that is the residual risk, and such a row fails loudly (err/tol in
the hundreds), never silently.

Why it stays meaningful: the negative control (full BatchNorm vs the target G_M, first step) must
still differ by more than 100× the derived tolerance, and a fault injection that no row catches
makes the check say so and exit 4. Weights and buffers after many steps of a chaotic float32
trajectory may diverge so far that their controls cannot differ by 100×: those are reported as
resolution statements ("differs by only N× its tolerance", "cannot tell apart at this precision"),
never as a pass that means something.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ghostsys.check import reference as ref
from ghostsys.check.report import F64_TOL, F64_WHY, Tolerance, errors

TensorLike = Union[Tensor, Mapping[str, Tensor]]

# The factor between the largest measured divergence and the tolerance (see the module docstring, (a)).
# Bounded from both sides: below by the ratio of error constants of valid evaluations in the smooth
# regime; above by the control, which needs CONTROL_FACTOR × SAFETY_FACTOR × divergence to stay below
# what a change of G_M does -- for resnet20 in float32 a single decision flipped in the first step moves
# the gradients by ~1e-3 against ~0.45 for G_M = 1 vs 4, so a factor above ~4 would make the control
# unreachable there however right the code is.
SAFETY_FACTOR = 3.0
DITHER_ULPS = 2.0  # how far the antithetic draws push, in units of roundoff of the precision


@dataclass(frozen=True)
class Precision:
    """A precision the code under test runs in, as the reference reproduces it.

    ``dtype`` holds parameters and activations; ``autocast`` (if set) is the lower-precision compute
    dtype of matmuls and convolutions under ``torch.autocast``; ``tf32`` rounds CUDA matmul/conv
    inputs to 10 mantissa bits. ``analytic`` is a fixed tolerance from analysis (float64 only):
    then nothing is derived.
    """

    name: str
    dtype: torch.dtype
    unit_roundoff: float
    autocast: torch.dtype | None = None
    tf32: bool = False
    analytic: float | None = None
    why: str = ""

    @property
    def derived(self) -> bool:
        """True when tolerances are measured in the run (everything but float64)."""
        return self.analytic is None

    def check_device(self, device: torch.device | str | None) -> None:
        """Raise ValueError when this precision cannot exist on `device` (TF32 is a CUDA feature)."""
        if self.tf32 and torch.device(device or "cpu").type != "cuda":
            raise ValueError(f"{self.name} exists on CUDA GPUs only (on CPU, float32 matmuls are IEEE); "
                             "use float32 here")

    @contextlib.contextmanager
    def context(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the enclosed code in this precision: autocast, and the TF32 switches set (and restored)."""
        dev = torch.device(device or "cpu")
        with contextlib.ExitStack() as stack:
            if dev.type == "cuda":  # float32 means IEEE float32 on a GPU too: TF32 only when asked for
                saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

                def restore() -> None:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

                stack.callback(restore)
            if self.autocast is not None:
                stack.enter_context(torch.autocast(dev.type, dtype=self.autocast))
            yield


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("float64", torch.float64, 2.0 ** -53, analytic=F64_TOL, why=F64_WHY),
    Precision("float32", torch.float32, 2.0 ** -24, why="IEEE float32 throughout"),
    Precision("bf16-autocast", torch.float32, 2.0 ** -8, autocast=torch.bfloat16,
              why="float32 weights; matmuls and convolutions in bfloat16 under torch.autocast"),
    Precision("tf32", torch.float32, 2.0 ** -11, tf32=True,
              why="float32, CUDA matmuls/convolutions with TF32 inputs (10 mantissa bits)"),
)}


def precision(name: str) -> Precision:
    """The Precision called `name` (KeyError naming the known ones)."""
    if name not in PRECISIONS:
        raise KeyError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def run_dtype(name: str) -> str:
    """The RunConfig dtype a precision trains in (tf32 and bf16 autocast keep float32 weights)."""
    return str(precision(name).dtype).removeprefix("torch.")


def draws(p: Precision) -> dict[str, ref.Rounding]:
    """The evaluations of the reference at precision `p` whose divergences set its tolerances."""
    d = DITHER_ULPS * p.unit_roundoff
    return {"as written": ref.Rounding(),
            f"reordered, fused, +{DITHER_ULPS:g}u": ref.Rounding(permute_seed=1, fused=True, dither=d, seed=2, sign=+1),
            f"reordered, fused, -{DITHER_ULPS:g}u": ref.Rounding(permute_seed=1, fused=True, dither=d, seed=2, sign=-1)}


@dataclass
class Derivation:
    """The reference in float64 and in a precision's draws, over one set of ghost groups; tolerances on demand."""

    precision: Precision
    exact: ref.RefTrace
    runs: dict[str, ref.RefTrace] = field(default_factory=dict)  # draw label -> trace at `precision`
    name: str = ""  # which ghost groups, for the report
    inputs: tuple = ()  # the initial model and batches every run started from
    seconds: float = 0.0
    cache: dict[str, Tolerance] = field(default_factory=dict)

    def tolerance(self, quantity: str, pick: Callable[[ref.RefTrace], TensorLike] | None = None,
                  label: str = "", terms: int = 1) -> Tolerance:
        """The tolerance of `quantity`; `pick(trace)` selects it from a trace (default: the attribute).

        `terms`: a scalar that is a reduction of this many terms (the loss: a mean over M) gets the
        floor of that reduction's rounding, ceil(log2(terms)) units of roundoff (pairwise summation);
        anything else the rounding of its own value, one unit.
        """
        label = label or quantity
        if label in self.cache:
            return self.cache[label]
        p = self.precision
        if not p.derived:
            t = Tolerance(quantity, p.name, float(p.analytic), "analytic", label=label, why=p.why)
        else:
            pick = pick or (lambda tr: getattr(tr, quantity))
            target = pick(self.exact)
            divs = tuple((k, float(errors(pick(run), target)[1])) for k, run in self.runs.items())
            div = max(v for _, v in divs)
            if math.isnan(div) or math.isinf(div):
                raise RuntimeError(f"the {p.name} reference itself diverged ({quantity}: {divs}); "
                                   "no tolerance can be derived (NaN/inf or mismatched counters)")
            ulps = max(1, math.ceil(math.log2(terms))) if terms > 1 else 1
            floor = ulps * p.unit_roundoff
            low = div < floor
            what = (f"{ulps} unit roundoff{'s' if ulps > 1 else ''} of {p.name} ({floor:.1e}; every draw diverged less)"
                    if low else f"the largest divergence of {len(divs)} {p.name} reference runs from float64")
            t = Tolerance(quantity, p.name, SAFETY_FACTOR * max(div, floor), "floor" if low else "derived",
                          div, SAFETY_FACTOR, divs, label, f"{SAFETY_FACTOR:g} x {what}")
        self.cache[label] = t
        return t

    def tolerances(self) -> list[Tolerance]:
        """Every tolerance handed out so far, in order."""
        return list(self.cache.values())


def derive(p: Precision, model: nn.Module, batches: Sequence[tuple], groups: list[ref.GroupSpec], exact: ref.RefTrace,
           *, lr: float, momentum: float, weight_decay: float, k_steps: int,
           device: torch.device | str | None = None, name: str = "") -> Derivation:
    """Run the reference's draws at precision `p` (none for float64) beside the float64 trace `exact`."""
    import time

    t0 = time.perf_counter()
    d = Derivation(p, exact, name=name, inputs=(model, batches))
    if p.derived:
        p.check_device(device)
        for label, rounding in draws(p).items():
            with p.context(device):
                d.runs[label] = ref.reference_steps(model, batches, groups=groups, lr=lr, momentum=momentum,
                                                    weight_decay=weight_decay, k_steps=k_steps, dtype=p.dtype,
                                                    device=device, rounding=rounding)
    d.seconds = time.perf_counter() - t0
    return d


def partition(groups: Sequence[ref.GroupSpec]) -> tuple[tuple[int, ...], ...]:
    """The ghost groups as a set of index sets: factorizations with equal partitions share one derivation."""
    return tuple(sorted(tuple(g.indices.tolist()) for g in groups))
