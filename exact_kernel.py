"""Criterion 'exact' (variants.ExactProbe) on CUDA: Eq. 3's row or column sums in one Triton pass over dL/dW.

variants.gradient_sums forms G = dy^T x a block of rows at a time, merges M = W + s * B @ A in float32 beside it (one
more matmul and a float32 copy of the block) and reads both back for the square and the two reductions: at LLaMA-7B
shape, compiled, that cost about as much as the product itself. Here torch forms G whole in the activations' dtype
(cuBLAS, as autograd forms W.grad; one projection's G at a time: 86 MiB at 7B's MLP in bf16), and one Triton kernel
reads it once: each program walks a row of tiles of G (or a column of tiles), builds each tile of M from W (int8 with
its row scales, or float) and the rank-r LoRA factors in registers, keeps the row sums (column sums) of (G ⊙ M)^2 in
registers and adds them into the output once, with atomics. Eq. 4 reads one side of each projection (rows of wq, wk,
wv, w1, w3; columns of wo, w2), and the pass computes only the side asked: the other reduction and its atomics took a
sixth to a fifth of the pass's time at 7B's shapes. The tiles (TILES) are the fastest of a sweep on an H100.
(A Triton matmul with these sums in its epilogue, G never written, was tried: its product runs at cuBLAS's rate, but
its epilogue does not overlap it, and the 7B step was no faster; bench/exact_fused.py, bench/RESULTS.md. So was a
warp-specialised Gluon matmul whose two consumers overlap one's epilogue with the other's product: its product alone
takes 1.15-1.2x cuBLAS's time, and per projection it came out 4-7% faster than this file on some shapes and 11%
slower on w1 and w3; not kept, bench/exact_pingpong.py. G formed in chunks small enough to stay in L2 was tried too:
more launches, slower in the one call that timed it. So were the pass on a side stream beside the rest of the
backward, and the programs walking last to first: no faster, the GPU is never idle in this step and the pass on a
side stream takes the SMs the backward's products would use. Nor did other forms of B @ A (a 3-d product summed
over r, which Triton turns into a TF32 tl.dot, not exact; tl.dot in tf32x3; the r loads of A and B taken together)
or evict_first loads: the pass took 12.3-12.8 ms of a 7B step in each (9-10 ms alone with no B @ A at all). One
program per block storing its sums, with no zeroed output, was slower alone: too few programs.)

Imports triton at the top: variants imports this file only for tensors on a CUDA device (or under TRITON_INTERPRET=1,
where the tests run the same kernel on the CPU). The function is a torch custom op, so a compiled block calls it as it
is, inside the backward it compiles.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _eq3_sums_kernel(g_ptr, w_ptr, scales_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, scaling, stride_g, stride_w, stride_a,
                     stride_b, R: tl.constexpr, HAS_SCALES: tl.constexpr, SQUARE: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, STEPS: tl.constexpr):
    """sums (OUT + IN,) += row sums (ROWS), then column sums (COLS), of (G ⊙ M)^2 (|G ⊙ M| unless SQUARE) over STEPS
    (BLOCK_O, BLOCK_I) tiles: G (OUT, IN), M = W * scales[:, None] (HAS_SCALES) or W, + s * B @ A; W (OUT, IN),
    A (R, IN), B (OUT, R). A program walks along a row of tiles (down a column of tiles when only COLS), keeping the
    sums it is walking along in registers and adding them once at the end."""
    DOWN: tl.constexpr = COLS and not ROWS
    if DOWN:
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # this program's columns of W
        in_i = i < IN
    else:
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # this program's rows of W
        in_o = o < OUT
    row_sums = tl.zeros((BLOCK_O,), dtype=tl.float32)
    col_sums = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for step in range(STEPS):
        block = tl.program_id(1) * STEPS + step
        if DOWN:
            o = block * BLOCK_O + tl.arange(0, BLOCK_O)
            in_o = o < OUT
        else:
            i = block * BLOCK_I + tl.arange(0, BLOCK_I)
            in_i = i < IN
        in_tile = in_o[:, None] & in_i[None, :]
        G = tl.load(g_ptr + o[:, None] * stride_g + i[None, :], mask=in_tile, other=0).to(tl.float32)
        M = tl.load(w_ptr + o[:, None] * stride_w + i[None, :], mask=in_tile, other=0).to(tl.float32)
        if HAS_SCALES:
            M = M * tl.load(scales_ptr + o, mask=in_o, other=0).to(tl.float32)[:, None]
        # s * B @ A as r outer products (variants.merged_block's addmm), in a loop: unrolled, the loads of all r rows
        # of A are hoisted and stay live, and fewer programs fit an SM; as one tl.dot (r padded to 16), twice as slow
        for j in range(R):
            b = tl.load(b_ptr + o * stride_b + j, mask=in_o, other=0).to(tl.float32)
            a = tl.load(a_ptr + j * stride_a + i, mask=in_i, other=0).to(tl.float32)
            M += scaling * b[:, None] * a[None, :]
        I = G * M  # Eq. 3 on the tile; zero outside W, where G is
        I = I * I if SQUARE else tl.abs(I)
        if ROWS:
            row_sums += tl.sum(I, axis=1)
        if COLS:
            if DOWN:
                col_sums += tl.sum(I, axis=0)
            else:
                tl.atomic_add(sums_ptr + OUT + i, tl.sum(I, axis=0), mask=in_i)
    if ROWS:
        tl.atomic_add(sums_ptr + o, row_sums, mask=in_o)
    if DOWN:
        tl.atomic_add(sums_ptr + OUT + i, col_sums, mask=in_i)


# (BLOCK_O, BLOCK_I, warps, tiles per program) per side asked: the fastest in `python bench/check_exact.py --sweep`
# on an H100, the columns' checked in the 7B step against (64, 64, 4, 4) (bench/RESULTS.md); "both" is the kernel's
# first tile
TILES = {"rows": (32, 128, 8, 4), "cols": (64, 64, 2, 4), "both": (64, 128, 4, 1)}


@torch.library.custom_op("loraprune::gradient_sums", mutates_args=())
def gradient_sums(x: Tensor, dy: Tensor, W: Tensor, scales: Optional[Tensor], A: Optional[Tensor],
                  B: Optional[Tensor], scaling: float, square: bool, tile: Optional[list[int]] = None,
                  rows: bool = True, cols: bool = True) -> Tensor:
    """Row sums (out,), then column sums (in,), of (G ⊙ M)^2 (Eq. 3; |G ⊙ M| unless `square`), one float32 tensor
    (out + in,): G = dy^T x (out, in) in x's dtype, M = W + s * B @ A (W int8 with `scales` (out,), or float).
    x (..., in), dy (..., out) of one dtype; A (r, in), B (out, r), or both None. Only the row sums (`cols` False)
    or only the column sums (`rows` False): the other side stays zero. `tile` = [BLOCK_O, BLOCK_I, warps, tiles
    per program] (default TILES of the side asked)."""
    x = x.reshape(-1, x.shape[-1])  # (N, in)
    dy = dy.reshape(-1, dy.shape[-1])  # (N, out)
    if W.shape != (dy.shape[1], x.shape[1]) or dy.shape[0] != x.shape[0] or dy.dtype != x.dtype:
        raise ValueError(f"gradient_sums: expected x (N, {W.shape[1]}) and dy (N, {W.shape[0]}) of one dtype for W "
                         f"{tuple(W.shape)}, found x {tuple(x.shape)} {x.dtype} and dy {tuple(dy.shape)} {dy.dtype}")
    if not (rows or cols):
        raise ValueError("gradient_sums: expected rows, cols or both, found neither")
    G = dy.T @ x  # (out, N) @ (N, in): dL/dW, as autograd forms it
    W = W.contiguous()
    out_features, in_features = W.shape
    r = 0 if A is None else A.shape[0]
    A = W if A is None else A.contiguous()  # pointers the kernel does not read when r = 0, or W is float
    B = W if B is None else B.contiguous()
    sums = torch.zeros(out_features + in_features, dtype=torch.float32, device=x.device)
    block_o, block_i, warps, steps = tile or TILES["both" if rows and cols else "rows" if rows else "cols"]
    down = cols and not rows
    own, along = (triton.cdiv(in_features, block_i), triton.cdiv(out_features, block_o)) if down else (
        triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i))
    _eq3_sums_kernel[(own, triton.cdiv(along, steps))](
        G, W, W if scales is None else scales, A, B, sums, out_features, in_features, float(scaling), G.stride(0),
        W.stride(0), A.stride(0), B.stride(0), R=r, HAS_SCALES=scales is not None, SQUARE=square, ROWS=rows,
        COLS=cols, BLOCK_O=block_o, BLOCK_I=block_i, STEPS=steps, num_warps=warps)
    return sums


@gradient_sums.register_fake
def _(x, dy, W, scales, A, B, scaling, square, tile=None, rows=True, cols=True):
    return x.new_empty(W.shape[0] + W.shape[1], dtype=torch.float32)
