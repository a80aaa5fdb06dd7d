"""Float32 matrix products at the processor's rate: oneDNN's where it agrees with torch's, torch's otherwise.

On a CPU, torch's float32 `linear` is Intel MKL's. On AMD processors MKL takes a code path that reaches
about half of what the processor does: on the 2-core AMD EPYC (Zen 5) of the README's tables, 100-217
GFLOP/s against 222-456 for oneDNN's product on the same shapes (`python -m benchmarks.bench_explorer`
measures both on the logit lens's unembedding). torch ships oneDNN too, and `torch.compile`'s CPU backend
calls its product as `torch.ops.mkldnn._linear_pointwise`; that operator is private, so it is used only
after it has answered a fixed product as torch's `linear` does (DEFAULTS.product_check_tolerance), and
never where it is missing or fails that check. A model's own products (`route_products`: a TransformerBridge's
`nn.Linear` and `Conv1D` modules) go there only where the model's check also runs faster that way: on an
Intel Xeon, where MKL is tuned for the processor, the bridge's pass took 1.2x-1.5x as long on oneDNN.
Where autograd needs the gradient of the input only (the weight and bias need none: edge attribution's and
attribution patching's backward passes through the fast engine), the product runs on oneDNN with a backward
that is oneDNN's product with the transposed weight (`_InputGradient`); where the weight or bias needs a
gradient (training), torch's product computes it.

`prepare(weight)` keeps beside a weight that is used again and again (the fast engine's) a copy in oneDNN's
own blocked layout, which `linear` then reads instead of the weight itself: oneDNN otherwise lays the weight
out again inside every product. Measured here (GPT-2's MLP, QKV and unembedding shapes, 12 layers' weights
in turn): 1.5x the rate at 17 rows, 1.2x at 100-300, 1.1x at 1,000. The copy costs the weight's memory again.
Once the weight has changed in place (its version counter moved) or been given other storage (`.data = ...`),
`linear` reads the weight as it is and drops the copy.

`logsumexp` is torch's over the last axis of such products' logits, at the processor's rate whatever
their spread (below).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from core.config import DEFAULTS

# oneDNN keeps each product it has prepared (one per shape, with its buffers) in two caches of 1,024: with
# exact patching's many shapes, the peak memory of a 32-token pair rose from 0.3 GB (torch's products) to
# 1.1 GB above the model; with 16, 0.3 GB at the same speed. Read when oneDNN first runs, so set here,
# where a caller has not set them.
if "DNNL_PRIMITIVE_CACHE_CAPACITY" not in os.environ:  # oneDNN's older name for the same setting
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(DEFAULTS.onednn_cached_products))
os.environ.setdefault("LRU_CACHE_CAPACITY", "1")  # torch's own cache of oneDNN objects


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {  # what `linear` can apply to its product, as torch computes it
    "none": lambda x: x,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),  # GPT-2's GELU
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
}
_ONEDNN_ACTIVATIONS = {"none": ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none"), "relu": ("relu", "")}  # oneDNN's name, algorithm


def linear(
    x: Float[Tensor, "... d_in"],
    weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None = None,
    activation: str = "none",
) -> Float[Tensor, "... d_out"]:
    """`ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))`, float32 rounding aside (the
    sums run in another order). On oneDNN the activation is applied to each block of the product while it
    is in cache (torch's tanh GELU, a pass of its own, took 1.5 ms of a 8.5 ms [880 x 768] x [768 x 3072]
    product here; fused, 0.4 ms)."""
    if not _use_onednn(x, weight, bias, activation):
        return ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))
    weight = weight if weight.is_contiguous() or weight.T.is_contiguous() else weight.contiguous()  # [in, out] weights as their .T: no copy
    bias = None if bias is None else bias.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:  # autograd sees the product; the activation is torch's, after it
        return ACTIVATIONS[activation](_InputGradient.apply(x, weight, bias))
    return _product(x, weight, bias, activation)


def _product(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return _onednn_linear(rows, _prepared_copy(weight), bias, activation).reshape(*x.shape[:-1], weight.shape[0])


_PREPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight (this tensor object) -> (its version and storage when prepared, oneDNN's copy)


def prepare(weight: Float[Tensor, "d_out d_in"]) -> Float[Tensor, "d_out d_in"]:
    """`weight` itself, from now on read by `linear` from a copy in oneDNN's blocked layout (module docstring)
    where oneDNN's product is used for it and its prepared product answers as the plain one does
    (`prepared_agrees`); else nothing is kept. The copy is this tensor object's: a view taken again (`w.T`,
    `w[a:b]`) is another object and reads the weight as it is, so a caller keeps the views it prepared. A
    weight that `linear` must copy first (neither it nor its transpose contiguous) is not prepared."""
    if (
        weight.dim() == 2
        and weight.shape[0]
        and not weight.is_inference()  # its version is not kept
        and (weight.is_contiguous() or weight.T.is_contiguous())
        and _use_onednn(weight[:1], weight, None)
        and prepared_agrees()
    ):
        with torch.no_grad():
            _PREPARED[weight] = (weight._version, weight.data_ptr(), _reorder(weight))
    return weight


def row_blocks(weight: Float[Tensor, "d_out d_in"], bias: Float[Tensor, " d_out"], size: int) -> list[tuple[int, Tensor, Tensor]]:
    """(first row, weight rows, bias rows) of each `size` rows of `weight` (an unembedding: a block of tokens),
    views of a contiguous weight (so each block's rows are contiguous)."""
    return [(start, weight[start : start + size], bias[start : start + size]) for start in range(0, weight.shape[0], size)]


def prepared(weight: Tensor) -> bool:
    """Whether `linear` reads `weight` from a prepared copy (`prepare`)."""
    return _prepared_copy(weight) is not weight


def _prepared_copy(weight: Tensor) -> Tensor:
    """`weight`'s prepared copy if it has one and the weight has neither changed in place (a view shares its
    base's version counter) nor been given other storage since, else `weight`."""
    kept = _PREPARED.get(weight)
    if kept is None:
        return weight
    if kept[:2] != (weight._version, weight.data_ptr()):
        _PREPARED.pop(weight, None)
        return weight
    return kept[2]


def _reorder(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), DEFAULTS.prepared_rows)


class _InputGradient(torch.autograd.Function):
    """x W^T + b on oneDNN, differentiable in x only (the weight and bias need no gradient: `_use_onednn`):
    d/dx is the incoming gradient times W, oneDNN's product with W^T, a view (no copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return _product(grad, weight.T, None), None, None


_EXP_FLOOR = math.log(torch.finfo(torch.float32).tiny) + 1  # about -86.3: its exp (3e-38) is a normal float32


def logsumexp(logits: Float[Tensor, "... vocab"], maxes: Float[Tensor, "..."] | None = None) -> Float[Tensor, "..."]:
    """`torch.logsumexp(logits, -1)` for finite logits, computed as torch does (max, exp of the differences,
    sum, log, plus max), except that a difference below _EXP_FLOOR is taken at it. Its exp would be a
    float32 subnormal, which this processor computes about 14x slower (a random model's lens logits
    spread over 240: 12 us against 0.9 us a row of 2,048 tokens); such terms, at most 3e-38 each, cannot
    move a sum that holds the max's own 1. `maxes`: the logits' maxima where the caller has them."""
    maxes = logits.amax(-1) if maxes is None else maxes
    shifted = torch.sub(logits, maxes[..., None]).clamp_(min=_EXP_FLOOR)
    return shifted.exp_().sum(-1).log_().add_(maxes)


def route_products(model: torch.nn.Module, check: Callable[[], Tensor], timed: bool = True) -> bool:
    """Every `torch.nn.Linear` and transformers `Conv1D` inside `model` (a TransformerBridge's forward pass
    runs its products there) computes through `linear`. Kept only if `check()`, e.g. the logits of a fixed
    prompt, answers as it did before to DEFAULTS.routed_model_tolerance of its largest value and, where
    `timed`, runs faster routed than not (`_routing_pays`); else (or if it raises) every module is put back.
    Returns whether the products were routed. A model whose weights are not all CPU float32 is left as it is."""
    from transformers.pytorch_utils import Conv1D

    if not onednn_agrees() or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return False
    forwards = {torch.nn.Linear: _linear_forward, Conv1D: _conv1d_forward}  # exactly these classes: a subclass may compute otherwise
    modules = [module for module in model.modules() if type(module) in forwards and "forward" not in vars(module)]
    if not modules:  # nothing left to route (routed already, or no such module)
        return routed(model)

    def route() -> None:
        for module in modules:
            module.forward = functools.partial(forwards[type(module)], module)  # a partial pickles, a bound method would not

    def unroute() -> None:
        for module in modules:
            vars(module).pop("forward", None)

    try:
        with torch.no_grad():
            before = check()
            route()
            after = check()
            agrees = after.shape == before.shape and (after - before).abs().max() <= DEFAULTS.routed_model_tolerance * before.abs().max()
            if agrees and (not timed or _routing_pays(check, route, unroute)):
                route()
                return True
    except Exception:  # noqa: BLE001  (the model keeps torch's products; its own error shows where it is used)
        pass
    unroute()
    return False


def _routing_pays(check: Callable[[], Tensor], route: Callable[[], None], unroute: Callable[[], None]) -> bool:
    """Whether `check()` runs at least DEFAULTS.routing_gain times as fast routed as on torch's own products:
    the medians of DEFAULTS.routing_timings runs each, the two taking turns (which goes first alternates).
    oneDNN's product is about twice MKL's rate on AMD processors; on an Intel Xeon (2026-11-28, README
    "Issue 17's targets on both machines") the bridge's GPT-2-shaped pass took 1.2x-1.5x as long routed. Where
    the two are close (a tiny model, whose products cost little either way) torch's stays, the reference
    product. Leaves the model unrouted."""
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for turn in range(DEFAULTS.routing_timings):
            for routed_now in (turn % 2 == 1, turn % 2 == 0):
                route() if routed_now else unroute()
                start = time.perf_counter()
                check()
                times[routed_now].append(time.perf_counter() - start)
    finally:
        unroute()
    return statistics.median(times[True]) * DEFAULTS.routing_gain <= statistics.median(times[False])


def routed(model: torch.nn.Module) -> bool:
    """Whether route_products routed `model`'s products."""
    return any(getattr(vars(module).get("forward"), "func", None) in (_linear_forward, _conv1d_forward) for module in model.modules())


def _linear_forward(self: torch.nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias)


def _conv1d_forward(self, x: Tensor) -> Tensor:  # transformers' Conv1D holds its weight as [in, out]
    return linear(x, self.weight.T, self.bias)


def _onednn_linear(rows: Float[Tensor, "row d_in"], weight: Tensor, bias: Tensor | None, activation: str = "none") -> Float[Tensor, "row d_out"]:
    name, algorithm = _ONEDNN_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, name, [], algorithm)


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors[1:]))  # a weight or bias that needs its gradient
        and onednn_agrees()
        and (activation == "none" or onednn_agrees(activation))
    )


@functools.cache
def onednn_agrees(activation: str = "none") -> bool:
    """Whether oneDNN's product is here and answers a fixed product (odd shapes, a bias, values from -10 to
    10), followed by `activation`, as torch does."""
    return _answers_alike(
        lambda x, weight, bias: ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias)),
        lambda x, weight, bias: _onednn_linear(x, weight, bias, activation),
    )


def _answers_alike(theirs: Callable[[Tensor, Tensor, Tensor], Tensor], ours: Callable[[Tensor, Tensor, Tensor], Tensor]) -> bool:
    """Whether `ours(x, weight, bias)` equals `theirs` on a fixed product (odd shapes, products of about -10 to
    10: GELU's curve, both tails included) to DEFAULTS.product_check_tolerance of its largest value; False where
    `ours` is missing or raises (no such operator, or not for this build)."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu") for shape in ((37, 200), (301, 200), (301,)))
        x = x / 4
        with torch.no_grad():
            expected, found = theirs(x, weight, bias), ours(x, weight, bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    scale = expected.abs().max().item()
    return found.shape == expected.shape and bool(((found - expected).abs().max() <= DEFAULTS.product_check_tolerance * scale).item())


@functools.cache
def prepared_agrees() -> bool:
    """Whether oneDNN can prepare a weight (`prepare`) and its prepared product answers a fixed product (rows
    other than the ones it is prepared for) as its product on the weight as it is does."""
    return onednn_agrees() and _answers_alike(_onednn_linear, lambda x, weight, bias: _onednn_linear(x, _reorder(weight), bias))
