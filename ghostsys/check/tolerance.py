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
3. ``tol = SAFETY_FACTOR × max(divergence, floor)``; the floor is the unit roundoff of the dtype the
   value is held in (no computation lands closer to the exact value than the rounding of its own
   result: float32 for everything in a float32 check; under bf16 autocast the logits are bfloat16,
   the loss -- autocast runs cross-entropy in float32 --, gradients, weights and buffers float32),
   ceil(log2 n) of them for a scalar that is a reduction of n terms (the loss: pairwise summation's bound).

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

bf16 autocast (``--dtype bf16-autocast``: float32 weights, matmuls and convolutions in bfloat16, what
``RunConfig(mixed_precision="bf16")`` trains with) is derived exactly so: the reference's draws run
under the same ``torch.autocast`` (its norm layers compute their moments in float32 and hand back
bfloat16, as torch's own kernels do there), the dither is 2 units of bfloat16 roundoff -- on the
moments too: a kernel that computes them with plain ops on the bf16 activations (``x.mean()`` hands
back bf16) rounds them there, and is as valid an evaluation under autocast -- and the factor is the
same 3. Why the factor carries over: (a) is a statement about ratios of error constants, not about
their size, so it holds at any precision; and (b) changes character for the better: with a unit
roundoff 2^16 times float32's, 0.4-0.7 % of the normalized values (what ReLU and max-pool decide on)
sit within the 2 u push of zero -- measured at the first step, M = 32: 2006 of 458752 in cnn, 180 of
25984 in simplenet, 9959 of 1.5M in resnet20 --, so a step flips hundreds to thousands of decisions,
each by a small amount, and their sum behaves like (a)'s statistical error, which the antithetic pair,
pushing every one of them one way and then the other, measures directly. The upper bound from the
control does not bind: at bf16 no tolerance can stay 100× below a change of G_M (see
:attr:`Precision.control_reach`), so the first-step control becomes a resolution statement that
must still differ by more than its tolerance, and a larger factor would only hide more faults.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ghostsys.check import reference as ref
from ghostsys.check.report import CONTROL_FACTOR, F64_TOL, F64_WHY, Tolerance, errors

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
    then nothing is derived. ``mixed_precision`` is the ``RunConfig.mixed_precision`` that trains in
    this precision: its engine applies the autocast itself.
    """

    name: str
    dtype: torch.dtype
    unit_roundoff: float
    autocast: torch.dtype | None = None
    tf32: bool = False
    analytic: float | None = None
    why: str = ""
    mixed_precision: str = "no"

    @property
    def derived(self) -> bool:
        """True when tolerances are measured in the run (everything but float64)."""
        return self.analytic is None

    @property
    def control_reach(self) -> float:
        """The smallest relative difference the logits control can pass at: CONTROL_FACTOR × SAFETY_FACTOR × u.

        The logits' derived tolerance is at least SAFETY_FACTOR unit roundoffs of this precision (their dtype
        under autocast), and a control must differ by CONTROL_FACTOR tolerances. At 1 or above (bf16: 100 × 3
        × 2^-8 = 1.17) that takes outputs differing by more than their own size -- no change of G_M does that.
        """
        return CONTROL_FACTOR * SAFETY_FACTOR * self.unit_roundoff if self.derived else 0.0

    @property
    def hard_controls(self) -> bool:
        """True when the first-step control can differ by CONTROL_FACTOR tolerances (control_reach < 1)."""
        return self.control_reach < 1.0

    def check_device(self, device: torch.device | str | None) -> None:
        """Raise ValueError when this precision cannot exist on `device` (TF32 is a CUDA feature)."""
        if self.tf32 and torch.device(device or "cpu").type != "cuda":
            raise ValueError(f"{self.name} exists on CUDA GPUs only (on CPU, float32 matmuls are IEEE); "
                             "use float32 here")

    @contextlib.contextmanager
    def context(self, device: torch.device | str | None = None, *, autocast: bool = True) -> Iterator[None]:
        """Run the enclosed code in this precision: autocast, and the TF32 switches set (and restored).

        ``autocast=False``: the TF32 switches only, for training whose engine autocasts itself
        (``mixed_precision`` in its RunConfig) -- autocast is then applied once, by the engine.
        """
        dev = torch.device(device or "cpu")
        with contextlib.ExitStack() as stack:
            if dev.type == "cuda":  # float32 means IEEE float32 on a GPU too: TF32 only when asked for
                saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

                def restore() -> None:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

                stack.callback(restore)
            if self.autocast is not None and autocast:
                stack.enter_context(torch.autocast(dev.type, dtype=self.autocast))
            yield


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("float64", torch.float64, 2.0 ** -53, analytic=F64_TOL, why=F64_WHY),
    Precision("float32", torch.float32, 2.0 ** -24, why="IEEE float32 throughout"),
    Precision("bf16-autocast", torch.float32, 2.0 ** -8, autocast=torch.bfloat16, mixed_precision="bf16",
              why="float32 weights; matmuls and convolutions in bfloat16 under torch.autocast"),
    Precision("tf32", torch.float32, 2.0 ** -11, tf32=True,
              why="float32, CUDA matmuls/convolutions with TF32 inputs (10 mantissa bits)"),
)}


def notes(p: Precision) -> list[str]:
    """What a report must say about the precision itself: where no control can be a clear one (bf16), why."""
    if p.hard_controls:
        return []
    return [f"at {p.name} the first-step controls cannot be held to {CONTROL_FACTOR:g}x their tolerance: the logits' "
            f"is at least {SAFETY_FACTOR:g} x the unit roundoff {p.unit_roundoff:.1e}, so that would take a relative "
            f"difference of {p.control_reach:.2f}, more than any change of G_M makes (and the gradients' tolerance is "
            "wider still). They are stated with their margin below; the check passes only if one of them still "
            "differs by more than its tolerance, and a fault smaller than a row's tolerance passes unseen"]


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
            held = _held_dtype(pick(next(iter(self.runs.values()))))
            floor = ulps * _roundoff(held)
            low = div < floor
            what = (f"{ulps} unit roundoff{'s' if ulps > 1 else ''} of {str(held).removeprefix('torch.')} "
                    f"({floor:.1e}; every draw diverged less)"
                    if low else f"the largest divergence of {len(divs)} {p.name} reference runs from float64")
            t = Tolerance(quantity, p.name, SAFETY_FACTOR * max(div, floor), "floor" if low else "derived",
                          div, SAFETY_FACTOR, divs, label, f"{SAFETY_FACTOR:g} x {what}")
        self.cache[label] = t
        return t

    def tolerances(self) -> list[Tolerance]:
        """Every tolerance handed out so far, in order."""
        return list(self.cache.values())


def _held_dtype(x: TensorLike) -> torch.dtype:
    """The coarsest floating dtype among x's tensors (float32 when there is none)."""
    ts = list(x.values()) if isinstance(x, Mapping) else [x]
    fl = [t.dtype for t in ts if torch.is_tensor(t) and t.is_floating_point()]
    return max(fl, key=_roundoff, default=torch.float32)


def _roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of a floating dtype (half its machine epsilon): 2^-24 for float32, 2^-8 for bfloat16."""
    return torch.finfo(dtype).eps / 2


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
