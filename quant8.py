"""Weight-only int8 for the frozen LLaMA projections: the paper's "8-bit W0" (Table 2, Table 4).

Symmetric, one scale per output channel (as gpt-fast's int8): W ~ q * scale[:, None], q int8 in [-127, 127].
Pure functions on tensors; llama.LoRALinear holds q (`weight`) and scale (`scales`) and calls `int8_matmul`.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

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
# the int8 matmul: y = x @ (q * scale).T, differentiable in x only (q is frozen)


def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """y = x @ (q * scale).T computed as (x @ q.T) * scale, (..., in) -> (..., out): q in x's float dtype is exact
    (|q| <= 127 needs 7 bits, bf16 has 8), and the scale, one per output row, multiplies y after the matmul in
    float32 (or in x's dtype if wider). The only float W is the cast of q, a temporary."""
    y = F.linear(x, q.to(x.dtype)) * scale  # (..., out); bf16 * float32 computes in float32
    # no .to() where it would do nothing: torch 2.11 on CUDA compiled Int8Matmul whose forward ended in a no-op
    # .to() (float32 x) with a zero gradient for its output, so dL/dx = 0 (tests/gpu_checks.py found it)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_grad_input(grad_y: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """dL/dx of int8_linear: (dL/dy * scale) @ q, (..., out) -> (..., in). q is cast through its transpose on
    purpose: compiled, that is another op than the forward's cast, which a compiler then cannot merge with it into
    one float W kept alive from forward to backward (tests/test_quant8.py)."""
    return (grad_y * scale).to(grad_y.dtype) @ q.t().to(grad_y.dtype).t()


class Int8Matmul(torch.autograd.Function):
    """int8_linear, saving only q and scale for backward (autograd through int8_linear itself would keep the cast
    of q, a float W per layer, from forward to backward). Compiled, its forward and backward are traced as plain
    ops, which Inductor fuses with their neighbours."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return int8_linear(x, q, scale)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, scale = ctx.saved_tensors
        return int8_grad_input(grad_y, q, scale), None, None


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (..., in) @ (q * scale).T -> (..., out), with dL/dx only."""
    return Int8Matmul.apply(x, q, scale)
