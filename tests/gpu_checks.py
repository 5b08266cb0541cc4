"""What needs a CUDA device to be tested: exact_kernel.gradient_sums (criterion 'exact') against Eq. 3 by hand, the
probes that call it (eager and in compiled blocks) against W.grad, and compiled int8 matmuls against eager. Run it on a
GPU (`python -m pytest tests/gpu_checks.py`); tests/test_gpu_checks.py runs it on the CPU under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported), bf16 aside. Not collected with the rest: outside those two it has
nothing to run."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

import exact_kernel  # noqa: E402  (after the interpreter is chosen)
import llama  # noqa: E402
import quant8  # noqa: E402
import variants  # noqa: E402
from conftest import loss_and_grads  # noqa: E402
from test_variants import assert_exact_sums, exact_model, float_twin, per_micro_batch_eq3  # noqa: E402


def eq3_sums_by_hand(G, W, scales, A, B, scaling, square):
    """Row sums, then column sums, of (G ⊙ M)^2 (or |G ⊙ M|) in float64, M = W * scales + s * B @ A."""
    G = G.double()
    M = W.double() * (1 if scales is None else scales.double()[:, None])
    M = M if A is None else M + scaling * B.double() @ A.double()
    I = (G * M).square() if square else (G * M).abs()
    return torch.cat([I.sum(1), I.sum(0)])


# (tokens, out, in, r): edges that are not multiples of any tile, several tiles, no LoRA
SHAPES = [(37, 50, 70, 8), (64, 96, 64, 0), (130, 33, 200, 16)]
DTYPES = [torch.float32] + ([] if INTERPRETED else [torch.bfloat16])


# (tile, rows, cols): one tile a program, several (a walk whose last tiles lie past W), the default tiles; each side
# alone
TILINGS = [([16, 32, 4, 1], True, True), ([8, 16, 4, 3], True, False), ([8, 16, 4, 3], False, True),
           (None, True, True), (None, True, False), (None, False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"{t[0] or 'default-tile'}-{'rows' * t[1]}{'cols' * t[2]}")
@pytest.mark.parametrize("square", [True, False], ids=["square", "abs"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_equals_eq3_by_hand(shape, int8, square, tiling, dtype):
    """Row and column sums as asked (a side not asked stays zero) against Eq. 3 in float64."""
    N, out_features, in_features, r = shape
    tile, rows, cols = tiling
    g = torch.Generator().manual_seed(N + r)
    x, dy = (torch.randn(2, N, n, generator=g).to(DEVICE, dtype) for n in (in_features, out_features))  # 2N tokens
    W, scales = torch.randn(out_features, in_features, generator=g), None
    W, scales = quant8.quantize(W) if int8 else (W.to(dtype), None)
    A, B = (torch.randn(r, in_features, generator=g), torch.randn(out_features, r, generator=g)) if r else (None, None)
    W, scales, A, B = (t if t is None else t.to(DEVICE) for t in (W, scales, A, B))
    got = exact_kernel.gradient_sums(x, dy, W, scales, A, B, 2.0, square, tile, rows, cols)
    G = dy.flatten(0, 1).T @ x.flatten(0, 1)  # dL/dW in the activations' dtype, as the kernel reads it
    want = eq3_sums_by_hand(G, W, scales, A, B, 2.0, square)
    assert got.dtype == torch.float32 and want.abs().min() > 0
    want[:out_features] *= rows
    want[out_features:] *= cols
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("int8, checkpoint, compiled, both", [(False, False, False, False), (True, True, False, False),
                                                              (False, True, True, False), (True, True, True, False),
                                                              (False, True, True, True)],
                         ids=["float", "int8-checkpointing", "float-checkpointing-compiled",
                              "int8-checkpointing-compiled", "float-checkpointing-compiled-both-sides"])
def test_probes_through_the_kernel_equal_eq3_from_w_grad(int8, checkpoint, compiled, both):
    """variants.ExactSums on the device, where its probes' backward calls the kernel: two micro-batches a step for two
    steps equal Eq. 3 from W.grad of a float twin, per micro-batch added; compiled blocks with no graph break."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = exact_model(int8).to(DEVICE)
    twin = float_twin(model)
    model.checkpoint_activations = checkpoint
    criterion = variants.ExactSums(model, [1])
    for lin in criterion.linears.values():
        lin.probe.by_rows = None if both else lin.probe.by_rows  # None: both sides (bench_scale's `both`)
    if compiled:
        llama.compile_blocks(model)
    counters.clear()
    for step in range(2):
        seeds = [10 * step + 1, 10 * step + 2]
        for seed in seeds:
            loss_and_grads(model, seed=seed)
        assert_exact_sums(criterion, per_micro_batch_eq3(twin, [1], seeds), [1], both)
        model.zero_grad(set_to_none=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_int8_matmul_gives_eager_dx(dtype):
    """quant8.Int8Matmul compiled on the device: y and dL/dx as eager computes them. (torch 2.11 on CUDA gave dL/dx = 0
    in float32 while its forward ended in a .to() that did nothing.)"""
    torch._dynamo.reset()
    q, scale = quant8.quantize(torch.randn(48, 32, generator=torch.Generator().manual_seed(0)))
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    x = torch.randn(2, 16, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 16, 48, dtype=dtype, device=DEVICE)
    results = []
    for fn in (quant8.int8_matmul, torch.compile(quant8.int8_matmul)):
        x.grad = None
        y = fn(x, q, scale)
        y.backward(dy)
        results.append((y.detach(), x.grad))
    (y0, dx0), (y1, dx1) = results
    assert dx0.abs().max() > 0
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
    torch._dynamo.reset()
