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


def dequantize_as(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`dequantize` written straight into `dtype`: one pass over W and no float32 copy of it."""
    return torch.mul(q, scale[:, None], out=torch.empty(q.shape, dtype=dtype, device=q.device))


def quantization_error(W: Tensor, q: Tensor, scale: Tensor) -> float:
    """max |W - dequantize(q, scale)| relative to the largest scale: at most 0.5 for round-to-nearest."""
    return ((W.float() - dequantize(q, scale)).abs().amax() / scale.amax()).item()


# ----------------------------------------------------------------------------------------------
# the int8 matmul: y = x @ (q * scale).T, differentiable in x only (q is frozen)


def int8_grad_input(grad_y: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """dL/dx of y = x @ (q * scale).T: (dL/dy * scale) @ q, (..., out) -> (..., in). Written differently from the
    forward's dequantization on purpose, so a compiler cannot share one float W between forward and backward."""
    return (grad_y * scale.to(grad_y.dtype)) @ q.to(grad_y.dtype)


class Int8Matmul(torch.autograd.Function):
    """y = x @ (q * scale).T. Forward makes W in x's dtype as a temporary; backward needs only q and scale, so no
    float W stays alive between forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize_as(q, scale, x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, scale = ctx.saved_tensors
        return int8_grad_input(grad_y, q, scale), None, None


@torch.library.custom_op("loraprune::int8_linear", mutates_args=())
def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """Int8Matmul as a custom op: one opaque node to torch.compile, recomputed by an activation checkpoint."""
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


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (..., in) @ (q * scale).T -> (..., out), with dL/dx only."""
    # Two paths, because torch.compile does not recompute an autograd.Function inside a checkpointed block (it
    # saves its outputs) but does recompute a custom op, while the Function is faster eager and in compiled
    # inference (bench/RESULTS.md, int8 memory and speed).
    if torch.compiler.is_compiling() and torch.is_grad_enabled():
        return int8_linear(x, q, scale)
    return Int8Matmul.apply(x, q, scale)
