"""A design of criterion 'exact' on Hopper that was measured and not kept: Eq. 3's row or column sums in the
epilogue of a warp-specialised, ping-pong matmul that forms dL/dW = dy^T x tile by tile (Gluon, sm_90), so G is never
written to memory and one tile's epilogue runs while the tensor cores work on the next. exact_kernel.py (cuBLAS G,
then its pass) stays what run.py uses; bench/RESULTS.md has the measurements.

exact_fused.py put the sums in a Triton matmul's epilogue: its product ran at cuBLAS's rate but the epilogue (about
half the product's time) ran after each tile's product, on the same warps. Here three partitions share one SM:

- a loader (1 warp) fills one ring of STAGES shared-memory slots with TMA blocks of dy and x, tile after tile;
- two consumers (4 warps each) take alternate tiles and take turns on the tensor cores (an mbarrier each: a consumer
  starts its product once the other has issued its last wgmma, so the ring is read in the order it is filled): each
  multiplies its tile (float32 accumulators), rounds it to the activations' dtype as autograd rounds W.grad, puts it
  in its own shared memory, and while the other consumer multiplies the next tile reads it back a slice at a time
  beside W's, builds M = W + s * B @ A (r outer products in float32, exact_kernel's order) and adds the row (or
  column) sums of (G ⊙ M)^2 into the output, one atomic a row (column) a tile.

What it found (H100, 2026-12-07): the sums equal Eq. 3 by hand; the product alone takes about 1.15-1.2x cuBLAS's time
(128 x 128 tiles on one warpgroup, four 32 KiB stages); with the epilogue the columns' side beats exact_kernel by
4-6% and the rows' side of the MLP loses by 11%. Two traps met on the way: two consumers waiting on one ring's
mbarriers out of turn pass a parity wait two phases early (hence the turns), and an epilogue whose loads sit in a
loop waits out their latency one after another (hence the unrolled r and W's next slice loaded ahead).

    python bench/exact_pingpong.py [--variants base,...]   # CUDA (sm_90): small cases by hand, then 7B's shapes
    python bench/exact_pingpong.py --compile-only          # no GPU: compile for sm_90, print ptxas's registers
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@gluon.jit
def _tile(t, OUT, IN, BM: gl.constexpr, BN: gl.constexpr):
    """(row, column) of W's tile number t, eight row tiles at a time: consecutive tiles share x's blocks in L2."""
    n_o = gl.cdiv(OUT, BM)
    n_i = gl.cdiv(IN, BN)
    group = t // (8 * n_i)
    rows = min(n_o - group * 8, 8)
    return (group * 8 + t % rows) * BM, ((t % (8 * n_i)) // rows) * BN


@gluon.jit
def _loader(dy_desc, x_desc, bufs, ready, empty, OUT, IN, N, BM: gl.constexpr, BK: gl.constexpr,
            STAGES: gl.constexpr):
    """Fills the ring with the program's tiles' (dy, x) blocks in tile order: a slot holds dy's block in its first BK
    rows and x's in the next."""
    tiles = gl.cdiv(OUT, BM) * gl.cdiv(IN, BM)
    fill = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        o0, i0 = _tile(t, OUT, IN, BM, BM)
        for k in range(0, N, BK):
            s = fill % STAGES
            mbarrier.wait(empty.index(s), ((fill // STAGES) & 1) ^ 1)  # barriers start with phase 1 complete
            mbarrier.expect(ready.index(s), dy_desc.block_type.nbytes + x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(dy_desc, [k, o0], ready.index(s), bufs.index(s).slice(0, BK, dim=0))
            tma.async_copy_global_to_shared(x_desc, [k, i0], ready.index(s), bufs.index(s).slice(BK, BK, dim=0))
            fill += 1


@gluon.jit
def _eq3(G, Wv, o, i, in_o, in_i, scales_ptr, a_ptr, b_ptr, stride_a, stride_b, scaling, R: gl.constexpr,
         HAS_SCALES: gl.constexpr, SQUARE: gl.constexpr):
    """Eq. 3 on a block: (G ⊙ M)^2 (|G ⊙ M| unless SQUARE), M = W (* scales[o]) + s * B[o] @ A[:, i] as r outer
    products in float32 (exact_kernel's order). Unrolled over r: every load issued at once, not one latency each."""
    M = Wv.to(gl.float32)
    if HAS_SCALES:
        M = M * gl.load(scales_ptr + o, mask=in_o, other=0).to(gl.float32)[:, None]
    for j in gl.static_range(R):
        b = gl.load(b_ptr + o * stride_b + j, mask=in_o, other=0).to(gl.float32)
        a = gl.load(a_ptr + j * stride_a + i, mask=in_i, other=0).to(gl.float32)
        M += scaling * b[:, None] * a[None, :]
    I = G.to(gl.float32) * M
    return I * I if SQUARE else gl.abs(I)


@gluon.jit
def _consumer(me, bufs, ready, empty, turn, g_all, w_ptr, scales_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, N, scaling,
              stride_w, stride_a, stride_b, R: gl.constexpr, HAS_SCALES: gl.constexpr, SQUARE: gl.constexpr,
              ROWS: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, SLICE: gl.constexpr,
              EPILOGUE: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BM, 16])
    g_smem = g_all.index(me)
    tiles = gl.cdiv(OUT, BM) * gl.cdiv(IN, BM)
    steps = gl.cdiv(N, BK)
    mine = 0  # this consumer's tiles so far; the program's tile 2 mine + me
    for t in range(gl.program_id(0) + me * gl.num_programs(0), tiles, 2 * gl.num_programs(0)):
        o0, i0 = _tile(t, OUT, IN, BM, BM)
        acc = gl.zeros((BM, BM), dtype=gl.float32, layout=acc_layout)
        # the products take turns (the other consumer's last wgmma is issued), so the ring is read in fill order:
        # consumer 0's first wait passes (a fresh barrier's phase -1 counts as complete), consumer 1's waits for it
        mbarrier.wait(turn.index(me), (mine + me + 1) & 1)
        fill = (2 * mine + me) * steps
        for k in range(steps):
            s = fill % STAGES
            mbarrier.wait(ready.index(s), (fill // STAGES) & 1)
            acc = warpgroup_mma(bufs.index(s).slice(0, BK, dim=0).permute((1, 0)), bufs.index(s).slice(BK, BK, dim=0),
                                acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))  # the one before it is done: its slot goes back
            mbarrier.arrive(empty.index((fill + STAGES - 1) % STAGES), pred=k > 0)
            fill += 1
        mbarrier.arrive(turn.index(1 - me))
        mine += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((fill + STAGES - 1) % STAGES))
        if not EPILOGUE:  # the product alone, for its rate (not a criterion)
            gl.atomic_add(sums_ptr + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout)), gl.sum(acc, axis=1))
        else:
            # G, rounded as autograd rounds W.grad, through shared memory into the epilogue's layout
            gl.thread_barrier()  # the last tile's reads are done
            g_smem.store(acc.to(bufs.dtype))
            gl.thread_barrier()
            if ROWS:  # slices of columns: each adds to every row's sum, one atomic a row at the end
                lay: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // SLICE, SLICE // 8], [4, 1], [1, 0])
                o = o0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lay))
                in_o = o < OUT
                sums = gl.zeros((BM, ), dtype=gl.float32, layout=gl.SliceLayout(1, lay))
                i = i0 + gl.arange(0, SLICE, layout=gl.SliceLayout(0, lay))
                w_next = gl.load(w_ptr + o[:, None] * stride_w + i[None, :], mask=in_o[:, None] & (i < IN)[None, :],
                                 other=0)
                for c0 in gl.static_range(0, BM, SLICE):
                    i = i0 + c0 + gl.arange(0, SLICE, layout=gl.SliceLayout(0, lay))
                    Wv = w_next
                    if c0 + SLICE < BM:  # W's next slice is on its way while this one is worked
                        w_next = gl.load(w_ptr + o[:, None] * stride_w + (i + SLICE)[None, :],
                                         mask=in_o[:, None] & (i + SLICE < IN)[None, :], other=0)
                    G = g_smem.slice(c0, SLICE, dim=1).load(lay)
                    sums += gl.sum(_eq3(G, Wv, o, i, in_o, i < IN, scales_ptr, a_ptr, b_ptr, stride_a, stride_b,
                                        scaling, R, HAS_SCALES, SQUARE), axis=1)
                gl.atomic_add(sums_ptr + o, sums, mask=in_o)
            else:  # slices of rows: each adds to every column's sum, one atomic a column at the end
                lay: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BM, BM // 8], [4, 1], [1, 0])
                i = i0 + gl.arange(0, BM, layout=gl.SliceLayout(0, lay))
                in_i = i < IN
                sums = gl.zeros((BM, ), dtype=gl.float32, layout=gl.SliceLayout(0, lay))
                o = o0 + gl.arange(0, SLICE, layout=gl.SliceLayout(1, lay))
                w_next = gl.load(w_ptr + o[:, None] * stride_w + i[None, :], mask=(o < OUT)[:, None] & in_i[None, :],
                                 other=0)
                for r0 in gl.static_range(0, BM, SLICE):
                    o = o0 + r0 + gl.arange(0, SLICE, layout=gl.SliceLayout(1, lay))
                    Wv = w_next
                    if r0 + SLICE < BM:
                        w_next = gl.load(w_ptr + (o + SLICE)[:, None] * stride_w + i[None, :],
                                         mask=(o + SLICE < OUT)[:, None] & in_i[None, :], other=0)
                    G = g_smem.slice(r0, SLICE, dim=0).load(lay)
                    sums += gl.sum(_eq3(G, Wv, o, i, o < OUT, in_i, scales_ptr, a_ptr, b_ptr, stride_a, stride_b,
                                        scaling, R, HAS_SCALES, SQUARE), axis=0)
                gl.atomic_add(sums_ptr + OUT + i, sums, mask=in_i)


@gluon.jit
def _pingpong_kernel(dy_desc, x_desc, w_ptr, scales_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, N, scaling, stride_w,
                     stride_a, stride_b, R: gl.constexpr, HAS_SCALES: gl.constexpr, SQUARE: gl.constexpr,
                     ROWS: gl.constexpr, STAGES: gl.constexpr, SLICE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     EPILOGUE: gl.constexpr):
    BK: gl.constexpr = dy_desc.block_type.shape[0]
    BM: gl.constexpr = dy_desc.block_type.shape[1]
    gl.static_assert(x_desc.block_type.shape[1] == BM and 2 * BK == BM, "tiles (BM, BM), slots (2 BK, BM)")
    # the ring: a slot is dy's block over x's, (2 BK, BM), one layout for both
    bufs = gl.allocate_shared_memory(dy_desc.dtype, [STAGES, 2 * BK, BM], dy_desc.layout)
    g_all = gl.allocate_shared_memory(dy_desc.dtype, [2, BM, BM], dy_desc.layout)  # each consumer's G
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for c in gl.static_range(2):
        mbarrier.init(turn.index(c), count=1)
    gl.warp_specialize([
        (_consumer, (0, bufs, ready, empty, turn, g_all, w_ptr, scales_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, N,
                     scaling, stride_w, stride_a, stride_b, R, HAS_SCALES, SQUARE, ROWS, BM, BK, STAGES, SLICE,
                     EPILOGUE)),
        (_consumer, (1, bufs, ready, empty, turn, g_all, w_ptr, scales_ptr, a_ptr, b_ptr, sums_ptr, OUT, IN, N,
                     scaling, stride_w, stride_a, stride_b, R, HAS_SCALES, SQUARE, ROWS, BM, BK, STAGES, SLICE,
                     EPILOGUE)),
        (_loader, (dy_desc, x_desc, bufs, ready, empty, OUT, IN, N, BM, BK, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


# name -> knobs (BASE's changed), for --variants
VARIANTS = {"base": {}, "slice 32": dict(SLICE=32), "slice 16": dict(SLICE=16), "product alone": dict(EPILOGUE=False)}
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
BASE = dict(BM=128, BK=64, STAGES=4, SLICE=64, maxnreg=168, CONSUMER_REGS=232, EPILOGUE=True)


def _descs(x, dy, c):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    dt = GL_DTYPES[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([c["BK"], c["BM"]], dt)
    return (TensorDescriptor.from_tensor(dy, [c["BK"], c["BM"]], layout),
            TensorDescriptor.from_tensor(x, [c["BK"], c["BM"]], layout))


def pingpong_sums(x, dy, W, scales, A, B, scaling: float, square: bool = True, rows: bool = True, **knobs):
    """Row sums (rows) or column sums of (G ⊙ M)^2 (|G ⊙ M| unless square) in one float32 tensor (out + in,), the
    other side zero, as exact_kernel.gradient_sums: G = dy^T x rounded to x's dtype (bf16 or fp16), M = W (* scales)
    + s * B @ A. x (N, in), dy (N, out); in and out multiples of 8 (TMA's 16-byte rows)."""
    c = dict(BASE, **knobs)
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    out_f, in_f = W.shape
    r = 0 if A is None else A.shape[0]
    A = W if A is None else A.contiguous()
    B = W if B is None else B.contiguous()
    W = W.contiguous()
    sums = torch.zeros(out_f + in_f, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(out_f, c["BM"]) * triton.cdiv(in_f, c["BM"])
    programs = min(tiles, c.get("programs") or torch.cuda.get_device_properties(x.device).multi_processor_count)
    dy_desc, x_desc = _descs(x, dy, c)
    _pingpong_kernel[(programs, )](
        dy_desc, x_desc, W, W if scales is None else scales, A, B, sums, out_f, in_f, x.shape[0], float(scaling),
        W.stride(0), A.stride(0), B.stride(0), R=r, HAS_SCALES=scales is not None, SQUARE=square, ROWS=rows,
        STAGES=c["STAGES"], SLICE=c["SLICE"], CONSUMER_REGS=c["CONSUMER_REGS"], EPILOGUE=c["EPILOGUE"], num_warps=4,
        maxnreg=c["maxnreg"])
    return sums


def compile_only(**knobs) -> None:
    """Compile for sm_90 without a GPU (catches Gluon's type and layout errors before device time is spent) and
    print ptxas's registers and spills."""
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    c = dict(BASE, **knobs)
    block = f"bf16[{c['BK']}, {c['BM']}],{gl.NVMMASharedLayout.get_default_for([c['BK'], c['BM']], gl.bfloat16)!r}"
    sig = {"dy_desc": f"tensordesc<{block}>", "x_desc": f"tensordesc<{block}>", "w_ptr": "*bf16",
           "scales_ptr": "*bf16", "a_ptr": "*fp32", "b_ptr": "*fp32", "sums_ptr": "*fp32", "OUT": "i32", "IN": "i32",
           "N": "i32", "scaling": "fp32", "stride_w": "i32", "stride_a": "i32", "stride_b": "i32", "R": "constexpr",
           "HAS_SCALES": "constexpr", "SQUARE": "constexpr", "ROWS": "constexpr", "STAGES": "constexpr",
           "SLICE": "constexpr", "CONSUMER_REGS": "constexpr", "EPILOGUE": "constexpr"}
    ptxas = get_ptxas(90)
    for rows in (True, False):
        const = dict(R=8, HAS_SCALES=False, SQUARE=True, ROWS=rows, STAGES=c["STAGES"], SLICE=c["SLICE"],
                     CONSUMER_REGS=c["CONSUMER_REGS"], EPILOGUE=c["EPILOGUE"])
        src = GluonASTSource(_pingpong_kernel, sig, {(list(sig).index(k), ): v for k, v in const.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=c["maxnreg"]))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            info = subprocess.run([getattr(ptxas, "path", ptxas), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                                  capture_output=True, text=True).stderr
        print(f"{c} rows={rows}: shared memory {k.metadata.shared} bytes; "
              + "; ".join(l.split(":")[-1].strip() for l in info.splitlines() if "spill" in l or "Used" in l))


def by_hand(x, dy, W, A, B, scaling: float, rows: bool) -> torch.Tensor:
    """exact_fused's sums by hand (float64, from G rounded to x's dtype), the side not asked zero."""
    from exact_fused import by_hand as both_sides
    both = both_sides(x, dy, W, A, B, scaling)
    keep = torch.arange(both.numel(), device=both.device) < W.shape[0]
    return torch.where(keep if rows else ~keep, both, 0)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def check_small() -> bool:
    """Ragged shapes (not multiples of the tile), both sides, int8 W with row scales, |.|: against torch in
    float64, on the GPU. True when every case is within 3e-5 (G's rounding to bf16 differs from float64's where the
    float32 sums of N products round the other way)."""
    ok = True
    g = torch.Generator("cuda").manual_seed(1)
    for (N, out_f, in_f, r) in [(200, 264, 136, 3), (64, 128, 128, 0), (1000, 520, 1032, 16)]:
        x, dy = (torch.randn(N, d, device="cuda", generator=g).bfloat16() for d in (in_f, out_f))
        W = torch.randn(out_f, in_f, device="cuda", generator=g).bfloat16()
        A = torch.randn(r, in_f, device="cuda", generator=g) * 0.1 if r else None
        B = torch.randn(out_f, r, device="cuda", generator=g) * 0.1 if r else None
        for rows in (True, False):
            ref = by_hand(x, dy, W, A if r else W.new_zeros(1, in_f).float(),
                          B if r else W.new_zeros(out_f, 1).float(), 0.5, rows)
            for programs in (None, 1, 3):  # 1 and 3: many tiles a program, both consumers, the ring wraps round
                got = pingpong_sums(x, dy, W, None, A, B, 0.5, rows=rows, programs=programs)
                e = relative_error(got, ref)
                print(f"N {N}, {out_f} x {in_f}, r {r}, {'rows' if rows else 'cols'}, programs {programs}: "
                      f"relative error {e:.1e}", flush=True)
                ok &= e < 3e-5
    Wq = torch.randint(-127, 128, (264, 136), device="cuda", dtype=torch.int8)
    sc = torch.rand(264, device="cuda", generator=g).bfloat16() * 0.01
    x, dy = (torch.randn(96, d, device="cuda", generator=g).bfloat16() for d in (136, 264))
    no_lora = torch.zeros(1, 136, device="cuda"), torch.zeros(264, 1, device="cuda")
    ref_sq = by_hand(x, dy, Wq.float() * sc.float()[:, None], *no_lora, 1.0, True)
    e = relative_error(pingpong_sums(x, dy, Wq, sc, None, None, 1.0, rows=True), ref_sq)
    print(f"int8 W with row scales, rows: relative error {e:.1e}")
    ok &= e < 3e-5
    G = (dy.double().T @ x.double()).to(x.dtype).double()
    ref_abs = (G * Wq.double() * sc.double()[:, None]).abs().sum(0).float()
    e = relative_error(pingpong_sums(x, dy, Wq, sc, None, None, 1.0, square=False, rows=False)[264:], ref_abs)
    print(f"int8 W, |G ⊙ M|, cols: relative error {e:.1e}")
    return ok and e < 3e-5


def speed(shapes: list, T: int = 2048, r: int = 8, variants: dict = None) -> None:
    """Median ms (triton.testing.do_bench) at LLaMA-7B's projection shapes, bf16 activations and W, float32 LoRA
    factors: dy^T x alone, exact_kernel (cuBLAS G, then its pass), and each variant of this kernel; the relative
    error of each's sums against Eq. 3 by hand."""
    import exact_kernel
    variants = variants or {"base": {}}
    print(f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; T {T}, r {r}; ms (x dy^T x alone), relative error against Eq. 3 by hand")
    print("| form | " + " | ".join(f"{o} x {i} {'rows' if rw else 'cols'}" for o, i, rw in shapes) + " |\n|---|"
          + "---|" * len(shapes))
    table = {}
    for out_f, in_f, rows in shapes:
        g = torch.Generator("cuda").manual_seed(0)
        x, dy, W = (torch.randn(*s, device="cuda", generator=g).bfloat16() for s in [(T, in_f), (T, out_f),
                                                                                    (out_f, in_f)])
        A, B = (torch.randn(*s, device="cuda", generator=g) * 0.1 for s in [(r, in_f), (out_f, r)])
        ref = by_hand(x, dy, W, A, B, 2.0, rows)
        ms = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        err = lambda got: relative_error(got, ref)  # noqa: E731
        base = ms(lambda: dy.T @ x)
        table.setdefault("dy^T x alone (torch.matmul)", []).append(f"{base:.3f}")
        kw = dict(rows=rows, cols=not rows)
        e = err(exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True, **kw))
        t = ms(lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True, **kw))
        table.setdefault("exact_kernel (cuBLAS G, then its pass)", []).append(f"{t:.3f} ({t / base:.2f}x), {e:.0e}")
        for name, knobs in variants.items():
            try:
                e = err(pingpong_sums(x, dy, W, None, A, B, 2.0, rows=rows, **knobs))
                t = ms(lambda: pingpong_sums(x, dy, W, None, A, B, 2.0, rows=rows, **knobs))
                cell = f"{t:.3f} ({t / base:.2f}x), {e:.0e}"
                torch.cuda.synchronize()  # a fault surfaces here, in this variant's row
            except Exception as ex:  # a variant that fails is a row, not a stop
                cell = f"failed: {type(ex).__name__}: {str(ex)[:200]}"
            table.setdefault(f"ping-pong {name}", []).append(cell)
            print(f"  {name}, {out_f} x {in_f}: {cell}", file=sys.stderr, flush=True)
        print(f"({out_f} x {in_f} done)", file=sys.stderr, flush=True)
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 and stop (no GPU needed)")
    ap.add_argument("--variants", default="base", help="comma-separated names of VARIANTS to time")
    args = ap.parse_args()
    if args.compile_only:
        for name in args.variants.split(","):
            compile_only(**VARIANTS[name])
    else:
        ok = check_small()
        print("small cases:", "all within 3e-5" if ok else "MISMATCH", flush=True)
        speed([(4096, 4096, True), (4096, 4096, False), (11008, 4096, True), (4096, 11008, False)],
              variants={k: VARIANTS[k] for k in args.variants.split(",")})
        sys.exit(0 if ok else 1)
