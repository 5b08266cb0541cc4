"""A design of criterion 'exact' on CUDA that was measured and not kept: Eq. 3's row and column sums fused into the
epilogue of the Triton matmul that forms dL/dW = dy^T x, so G is never written. exact_kernel.py (the one run.py uses)
forms G with cuBLAS and reads it back in a second pass; this file is here so that the comparison in bench/RESULTS.md
can be rerun, and as the starting point for whoever tries the next design (an epilogue that overlaps the product).

The kernel: persistent programs take (BLOCK_O, BLOCK_I) tiles of G in turn; each forms its tile on the tensor cores
from TMA loads of dy and x (float32 accumulators), rounds it to the activations' dtype as autograd rounds W.grad, then
reads W's tile, builds M = W + s * B @ A (tl.dot, r padded to 16) and adds the row and column sums of (G ⊙ M)^2 into
the output with atomics. The knobs are the variants swept (see VARIANTS).

    python bench/exact_fused.py [--shapes 4096x4096,...]   # CUDA: each variant against dy^T x and exact_kernel
    TRITON_INTERPRET=1 python bench/exact_fused.py --check   # CPU: each variant equals Eq. 3 by hand (float32)
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@triton.jit
def _add_sums(G, o0, i0, w_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, scaling, stride_w, stride_a, stride_b,
              BO: tl.constexpr, BI: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, LORA_PRECISION: tl.constexpr,
              ONTO_W: tl.constexpr):
    """sums (OUT + IN,) += row sums, then column sums, of (G ⊙ M)^2 on the tile G (BO, BI) at rows o0, columns i0."""
    o = o0 + tl.arange(0, BO)
    i = i0 + tl.arange(0, BI)
    in_o, in_i = o < OUT, i < IN
    M = tl.load(w_ptr + o[:, None] * stride_w + i[None, :], mask=in_o[:, None] & in_i[None, :], other=0).to(tl.float32)
    if R > 0:
        j = tl.arange(0, RP)
        b = tl.load(b_ptr + o[:, None] * stride_b + j[None, :], mask=in_o[:, None] & (j < R)[None, :], other=0)
        a = tl.load(a_ptr + j[:, None] * stride_a + i[None, :], mask=(j < R)[:, None] & in_i[None, :], other=0)
        if ONTO_W:  # the product accumulates onto W's registers: one (BO, BI) float32 block fewer live
            M = tl.dot(b, a, M * (1.0 / scaling), input_precision=LORA_PRECISION) * scaling
        else:
            M += scaling * tl.dot(b, a, input_precision=LORA_PRECISION)
    I = G.to(tl.float32) * M  # Eq. 3 on the tile; zero outside W, where G is
    I = I * I
    tl.atomic_add(sums_ptr + o, tl.sum(I, axis=1), mask=in_o)
    tl.atomic_add(sums_ptr + OUT + i, tl.sum(I, axis=0), mask=in_i)


@triton.jit
def _halves(G, BO: tl.constexpr, BI: tl.constexpr):
    return tl.split(tl.permute(tl.reshape(G, (BO, 2, BI // 2)), (0, 2, 1)))


@triton.jit
def _fused_kernel(dy_desc, x_desc, w_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, N, scaling, stride_w, stride_a, stride_b,
                  R: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                  BO: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, PROGRAMS: tl.constexpr, PARTS: tl.constexpr,
                  G_LOW: tl.constexpr, ONTO_W: tl.constexpr, FLATTEN: tl.constexpr, EPILOGUE: tl.constexpr):
    n_o = tl.cdiv(OUT, BO)
    n_i = tl.cdiv(IN, BI)
    for tile in tl.range(tl.program_id(0), n_o * n_i, PROGRAMS, flatten=FLATTEN):
        group = tile // (8 * n_i)  # eight row tiles at a time: consecutive tiles share x's blocks in L2
        rows = min(n_o - group * 8, 8)
        o0 = (group * 8 + tile % rows) * BO
        i0 = ((tile % (8 * n_i)) // rows) * BI
        G = tl.zeros((BO, BI), dtype=tl.float32)
        for k in range(tl.cdiv(N, BN)):  # TMA fills past N with zeros
            G = tl.dot(dy_desc.load([k * BN, o0]).T, x_desc.load([k * BN, i0]), G, input_precision=PRECISION)
        if not EPILOGUE:  # the product alone (its rate)
            tl.atomic_add(sums_ptr, tl.sum(tl.sum(G, 1), 0))
        else:
            G = G.to(dy_desc.dtype)  # rounded as autograd rounds W.grad
            if not G_LOW:
                G = G.to(tl.float32)
            if PARTS == 1:
                _add_sums(G, o0, i0, w_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, scaling, stride_w, stride_a, stride_b,
                          BO, BI, R, RP, LORA_PRECISION, ONTO_W)
            else:  # half the columns at a time: a whole float32 M beside G does not fit in registers
                G0, G1 = _halves(G, BO, BI)
                _add_sums(G0, o0, i0, w_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, scaling, stride_w, stride_a, stride_b,
                          BO, BI // 2, R, RP, LORA_PRECISION, ONTO_W)
                _add_sums(G1, o0, i0 + BI // 2, w_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, scaling, stride_w, stride_a,
                          stride_b, BO, BI // 2, R, RP, LORA_PRECISION, ONTO_W)


# name -> knobs; the first is the fastest exact one measured (bench/RESULTS.md). G_LOW keeps G in bf16 after the
# product (half its registers), ONTO_W accumulates B @ A onto W, "tf32x3" / "tf32" for float32 LoRA factors instead
# of full float32 ("ieee"); "tf32" is not exact (B @ A to 10 bits) and is there to show what exactness costs.
BASE = dict(BO=128, BI=256, BN=64, warps=8, stages=3, persistent=1, PARTS=2, G_LOW=False, ONTO_W=False,
            lora_precision="ieee", FLATTEN=False, EPILOGUE=True)
VARIANTS = {
    "halves": {},
    "product alone (no Eq. 3)": dict(EPILOGUE=False),
    "halves, flattened loop": dict(FLATTEN=True),
    "halves, G bf16, B@A onto W, tf32x3": dict(G_LOW=True, ONTO_W=True, lora_precision="tf32x3"),
    "whole tile, G bf16, B@A onto W, tf32x3": dict(PARTS=1, G_LOW=True, ONTO_W=True, lora_precision="tf32x3"),
    "128x128 tiles, 2 per SM, G bf16, onto W, tf32x3": dict(BI=128, PARTS=1, persistent=2, G_LOW=True, ONTO_W=True,
                                                              lora_precision="tf32x3"),
    "halves, tf32 B@A (not exact)": dict(G_LOW=True, ONTO_W=True, lora_precision="tf32"),
}


LAST = None  # the last launch's compiled kernel: its registers (n_regs) and spills (n_spills) go in the table


def fused_sums(x, dy, W, A, B, scaling: float, **knobs) -> torch.Tensor:
    """Row sums (out,), then column sums (in,), of (G ⊙ (W + s * B @ A))^2, G = dy^T x rounded to x's dtype:
    x (N, in), dy (N, out), W (out, in) float, A (r, in), B (out, r) or both None; rows 16-byte aligned (TMA)."""
    c = dict(BASE, **knobs)
    out_f, in_f = W.shape
    r = 0 if A is None else A.shape[0]
    A = W if A is None else A.contiguous()  # a pointer the kernel does not read when r = 0
    B = W if B is None else B.contiguous()
    sums = torch.zeros(out_f + in_f, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(out_f, c["BO"]) * triton.cdiv(in_f, c["BI"])
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else tiles
    programs = min(tiles, c["persistent"] * sms)
    float32 = x.dtype == torch.float32
    global LAST
    LAST = _fused_kernel[(programs,)](
        TensorDescriptor.from_tensor(dy, [c["BN"], c["BO"]]), TensorDescriptor.from_tensor(x, [c["BN"], c["BI"]]),
        W, A, B, sums, out_f, in_f, x.shape[0], float(scaling), W.stride(0), A.stride(0), B.stride(0), R=r,
        RP=max(16, triton.next_power_of_2(max(r, 1))), PRECISION="ieee" if float32 else "tf32",
        LORA_PRECISION=c["lora_precision"] if A.dtype == torch.float32 else "tf32", BO=c["BO"], BI=c["BI"],
        BN=c["BN"], PROGRAMS=programs, PARTS=c["PARTS"], G_LOW=c["G_LOW"] and not float32, ONTO_W=c["ONTO_W"],
        FLATTEN=c["FLATTEN"], EPILOGUE=c["EPILOGUE"], num_warps=c["warps"], num_stages=c["stages"])
    return sums


def by_hand(x, dy, W, A, B, scaling: float) -> torch.Tensor:
    """The same sums in float64 from G rounded to x's dtype: Eq. 3 as vanilla forms it from W.grad."""
    G = (dy.double().T @ x.double()).to(x.dtype).double()
    I = (G * (W.double() + scaling * B.double() @ A.double())).square()
    return torch.cat([I.sum(1), I.sum(0)]).float()


def check() -> None:
    """Every variant with Eq. 3 equals it by hand on a small float32 case with ragged edges (CPU, interpreter)."""
    g = torch.Generator().manual_seed(0)
    x, dy, W = (torch.randn(*s, generator=g) for s in [(40, 80), (40, 48), (48, 80)])
    A, B = torch.randn(3, 80, generator=g) * 0.1, torch.randn(48, 3, generator=g) * 0.1
    ref = by_hand(x, dy, W, A, B, 2.0)
    for name, knobs in VARIANTS.items():
        if knobs.get("EPILOGUE", True):
            knobs = dict(knobs, BO=16, BI=64 if knobs.get("BI", 256) == 256 else 32, BN=16)
            err = ((fused_sums(x, dy, W, A, B, 2.0, **knobs) - ref).norm() / ref.norm()).item()
            print(f"{name}: relative error {err:.1e}")
            assert err < 1e-5 or "not exact" in name, f"{name}: expected Eq. 3 by hand within 1e-5, found {err:.1e}"


def speed(shapes: list, T: int = 2048, r: int = 8) -> None:
    """Median ms (CUDA events, triton.testing.do_bench) of each variant at LLaMA-7B's projection shapes, bf16
    activations and W, float32 LoRA factors as training keeps them; beside dy^T x alone and exact_kernel."""
    import exact_kernel
    print(f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; T {T}, r {r}; ms (x dy^T x alone), relative error of the sums, registers / spills")
    print("| variant | " + " | ".join(f"{o} x {i}" for o, i in shapes) + " |\n|---|" + "---|" * len(shapes))
    rows = {}
    for out_f, in_f in shapes:
        g = torch.Generator("cuda").manual_seed(0)
        x, dy, W = (torch.randn(*s, device="cuda", generator=g).bfloat16() for s in [(T, in_f), (T, out_f), (out_f, in_f)])
        A, B = (torch.randn(*s, device="cuda", generator=g) * 0.1 for s in [(r, in_f), (out_f, r)])
        ref = by_hand(x, dy, W, A, B, 2.0)
        ms = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        base = ms(lambda: dy.T @ x)
        rows.setdefault("dy^T x alone (torch.matmul)", []).append(f"{base:.3f}")
        err = ((exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True) - ref).norm() / ref.norm()).item()
        t = ms(lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True))
        rows.setdefault("exact_kernel.gradient_sums (cuBLAS G, then a pass)", []).append(
            f"{t:.3f} ({t / base:.2f}x), {err:.0e}")
        for name, knobs in VARIANTS.items():
            try:
                got = fused_sums(x, dy, W, A, B, 2.0, **knobs)
                err = ((got - ref).norm() / ref.norm()).item() if knobs.get("EPILOGUE", True) else float("nan")
                t = ms(lambda: fused_sums(x, dy, W, A, B, 2.0, **knobs))
                cell = f"{t:.3f} ({t / base:.2f}x), {err:.0e}, {LAST.n_regs} / {LAST.n_spills}"
            except Exception as e:  # a variant that does not compile on this card/triton is a row, not a stop
                cell = f"failed: {type(e).__name__}"
            rows.setdefault(name, []).append(cell)
        print(f"({out_f} x {in_f} done)", file=sys.stderr, flush=True)
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare each variant with Eq. 3 by hand (CPU: set "
                    "TRITON_INTERPRET=1)")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in of each projection timed")
    args = ap.parse_args()
    check() if args.check else speed([tuple(map(int, s.split("x"))) for s in args.shapes.split(",")])
