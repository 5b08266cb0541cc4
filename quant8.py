"""A hand-written int8 store for the frozen LLaMA weights: the paper's "8-bit W0" (Table 2, Table 4).

Weight-only, symmetric, one scale per output channel (as gpt-fast's int8): W ~ q * scale[:, None] with q int8 in
[-127, 127]. Activations and the LoRA adapters stay in bf16/fp32; only the seven block projections are stored in
int8. The token embedding, the output head and the norms stay in the float dtype: the embedding is a lookup (no
matmul to save), the head's errors land directly on the logits, and norms are tiny.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llama import LoRALinear, Transformer

# ----------------------------------------------------------------------------------------------
# the quantizer


def quantize(W: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) float -> q (out, in) int8 in [-127, 127], scale (out,) float32, with scale = max|W_row| / 127
    and q = round-half-to-even(W / scale). A zero row gets scale 1 (q = 0), so nothing divides by zero.
    The error is at most scale / 2 per element: see `quantization_error`."""
    Wf = W.float()
    amax = Wf.abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # (out,)
    q = torch.round(Wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q (out, in) int8, scale (out,) -> W (out, in) in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantization_error(W: Tensor, q: Tensor, scale: Tensor) -> float:
    """max |W - dequantize(q, scale)| relative to the largest scale: at most 0.5 for round-to-nearest."""
    return ((W.float() - dequantize(q, scale)).abs().amax() / scale.amax()).item()


# ----------------------------------------------------------------------------------------------
# the int8 linear


class Int8Matmul(torch.autograd.Function):
    """y = x @ (q * scale).T with q int8 (out, in) and scale (out,). Forward makes W in x's dtype as a temporary
    (`dequantize_as`) and drops it after the matmul; backward gives dL/dx only (q is frozen, `int8_grad_input`),
    which needs nothing W-sized saved: autograd keeping a bf16 W per layer alive until backward would undo the
    memory saving."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize_as(q, scale, x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, scale = ctx.saved_tensors
        return int8_grad_input(grad_y, q, scale), None, None


def int8_grad_input(grad_y: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """dL/dx of y = x @ (q * scale).T: (dL/dy * scale) @ q, (..., out) -> (..., in). Deliberately not the forward's
    dequantization: when they matched, the compiler merged the two and saved every layer's bf16 W (24.9 GiB peak at
    7B instead of 8.2)."""
    return (grad_y * scale.to(grad_y.dtype)) @ q.to(grad_y.dtype)


@torch.library.custom_op("loraprune::int8_linear", mutates_args=())
def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """Int8Matmul as a custom op, for compiled training: torch.compile keeps it one opaque node, which an activation
    checkpoint recomputes like any other op. (torch 2.11 does not recompute what an autograd.Function computes inside
    a checkpointed compiled block: it saved every int8 matmul's output, 12.9 GiB peak at 7B instead of 8.3;
    bench/memory_peak.py.) Elsewhere Int8Matmul is used: eager, it skips the op's dispatch, and compiled without
    grad Inductor sees into it (7B forward 1.12x bf16 against 1.52x through this op)."""
    return F.linear(x, dequantize_as(q, scale, x.dtype))  # (..., in) -> (..., out)


@int8_linear.register_fake
def _(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


def _int8_linear_setup(ctx, inputs, output):
    _, q, scale = inputs
    ctx.save_for_backward(q, scale)


def _int8_linear_backward(ctx, grad_y: Tensor):
    q, scale = ctx.saved_tensors
    return int8_grad_input(grad_y, q, scale), None, None


int8_linear.register_autograd(_int8_linear_backward, setup_context=_int8_linear_setup)


def dequantize_as(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale[:, None] computed in float32 and written straight into `dtype`: one pass over W, no float32 copy
    (compiled, Inductor turns it into one pointwise kernel too)."""
    return torch.mul(q, scale[:, None], out=torch.empty(q.shape, dtype=dtype, device=q.device))


class Int8LoRALinear(LoRALinear):
    """A LoRALinear whose frozen W is stored as int8 `weight` + float32 `scales` (gpt-fast's names)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))

    def base(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and torch.is_grad_enabled():
            return int8_linear(x, self.weight, self.scales)  # recomputed under activation checkpointing
        return Int8Matmul.apply(x, self.weight, self.scales)

    def dense_weight(self, rows: slice = slice(None)) -> Tensor:
        """Dequantized W[rows] in float32: the criterion calls this a slice of rows at a time."""
        return dequantize(self.weight[rows], self.scales[rows])

    def merged_weight(self, dtype: Optional[torch.dtype] = torch.bfloat16) -> Tensor:
        """W + s * B @ A: a float weight (bf16 unless asked otherwise); re-quantize it with `quantize` if wanted."""
        return super().merged_weight(dtype)

    def merge(self):
        raise ValueError("merging LoRA into an int8 weight would need a re-quantization; use "
                         "loraprune.slice_model (float result) and quant8.quantize_model if int8 is wanted")


# ----------------------------------------------------------------------------------------------
# whole models


def _swap_linears(module: nn.Module, make) -> None:
    """gpt-fast's walk: replace every LoRALinear child (recursively) by make(old)."""
    for name, child in module.named_children():
        if isinstance(child, LoRALinear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def convert_to_int8(model: Transformer) -> Transformer:
    """Swap the block projections for empty Int8LoRALinear (on the model's device, e.g. meta) before loading."""
    def make(old: LoRALinear) -> Int8LoRALinear:
        with torch.device(old.weight.device):  # on meta: no memory until the checkpoint's tensors are assigned
            return Int8LoRALinear(old.in_features, old.out_features)
    _swap_linears(model, make)
    return model


@torch.no_grad()
def quantize_model(model: Transformer) -> Transformer:
    """Quantize a loaded float model in place (LoRA merged first, if any). Prints nothing; returns the model."""
    def make(old: LoRALinear) -> Int8LoRALinear:
        new = Int8LoRALinear(old.in_features, old.out_features).to(old.weight.device)
        q, scale = quantize(old.merged_weight(torch.float32))  # not bf16: its rounding adds up to 1/4 step
        new.weight = nn.Parameter(q, requires_grad=False)
        new.scales = scale
        return new
    _swap_linears(model, make)
    return model
