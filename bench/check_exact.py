"""Does criterion 'exact' (variants.ExactSums, Eq. 3 from each projection's own backward) give vanilla's sums (from
W.grad) on the device it runs on, with and without compiled blocks and activation checkpointing? One micro-batch, so
the two must agree (in bf16 up to rounding: both form dL/dW in bf16). Prints the largest relative difference of the
sums Eq. 4 reads per configuration. With --speed, on CUDA: what the sums cost at LLaMA-7B's projection shapes
(2048 tokens, r 8), the kernel (exact_kernel.py; float and int8 W, both sides or the one ExactSums asks) beside
dy^T x alone and the unfused torch form; with --sweep, the kernel's pass at each tile of SWEEP; with --overhead,
the host's time per call of the pass's pieces.

    python bench/check_exact.py [--speed | --sweep | --overhead]   # cuda if available
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama  # noqa: E402
import quant8  # noqa: E402
import variants  # noqa: E402
from common import timed  # noqa: E402


def check(device: str, dtype: torch.dtype, compiled: bool, ckpt: bool) -> float:
    torch._dynamo.reset()  # a new model each time: no recompile limit across them
    torch.manual_seed(0)
    args = llama.ModelArgs(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512,
                           max_seq_len=128)
    with torch.device(device):
        model = llama.Transformer(args)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.to(dtype)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    for l in range(args.n_layers):
        for lin in llama.projections(model, l).values():
            lin.lora_B.data.normal_(0, 0.05)
            lin.weight.requires_grad_(True)
    model.checkpoint_activations = ckpt
    tap = variants.ExactSums(model, [1], square=True)
    if compiled:
        llama.compile_blocks(model)
    worst = 0.0
    for step in range(3):  # a compiled graph is traced on the first step: the later ones show what it replays
        g = torch.Generator(device).manual_seed(step)
        x = torch.randint(0, args.vocab_size, (2, 65), device=device, generator=g)
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        got = tap.take(1)
        for name, lin in llama.projections(model, 1).items():
            W = lin.merged_weight(torch.float32)
            I = (lin.weight.grad.float() * W).square()
            side = 1 if name in ("wo", "w2") else 0  # the side the probe keeps (Eq. 4's); the other reads zero
            mine, ref = got[name][side], I.sum(1 - side)
            worst = max(worst, ((mine - ref).abs().max() / ref.abs().max()).item())
        model.zero_grad(set_to_none=True)
    return worst


SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # out x in: wq wk wv wo; w1 w3; w2
LAYER = [((4096, 4096), "rows", 3), ((4096, 4096), "cols", 1), ((11008, 4096), "rows", 2), ((4096, 11008), "cols", 1)]
SWEEP = {"rows": [(32, 64, 4, 4), (32, 128, 8, 4), (32, 64, 4, 2), (32, 64, 4, 8), (32, 64, 2, 4), (16, 64, 2, 4),
                  (32, 128, 8, 2), (32, 128, 8, 8), (64, 64, 8, 4), (32, 64, 8, 4), (16, 128, 4, 2), (64, 128, 4, 1)],
         "cols": [(64, 64, 4, 4), (64, 64, 4, 2), (64, 64, 4, 8), (128, 64, 4, 4), (128, 64, 8, 4), (64, 32, 4, 4),
                  (64, 64, 8, 4), (128, 32, 4, 4), (64, 64, 2, 4), (32, 64, 4, 4), (256, 32, 8, 4), (64, 128, 4, 1)]}


def inputs(out_features: int, in_features: int, T: int, r: int):
    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(T, in_features), (T, out_features), (out_features, in_features), (r, in_features), (out_features, r)]
    x, dy, W, A, B = (torch.randn(*s, device="cuda", generator=g) for s in shapes)
    return x.bfloat16(), dy.bfloat16(), W.bfloat16(), A, B  # LoRA's A and B stay float32, as llama.add_lora makes them


def speed(T: int = 2048, r: int = 8) -> None:
    """Median ms of each form of Eq. 3's sums per projection shape of LLaMA-7B (CUDA events around each call:
    triton.testing.do_bench), and its rate counted as dy^T x."""
    import triton

    import exact_kernel
    print("| out x in | form | ms | TFLOP/s (2·T·out·in) |\n|---|---|---|---|")
    for out_features, in_features in SHAPES_7B:
        x, dy, W, A, B = inputs(out_features, in_features, T, r)
        q, scales = quant8.quantize(W)
        side = dict(rows=out_features >= in_features, cols=out_features < in_features)  # as ExactSums asks it
        forms = {"dy^T x alone (torch.matmul)": lambda: dy.T @ x,
                 "exact_kernel.gradient_sums, both sides": lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B,
                                                                                               2.0, True),
                 f"exact_kernel.gradient_sums, {'rows' if side['rows'] else 'columns'}": lambda: (
                     exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True, None, **side)),
                 "exact_kernel.gradient_sums, int8 W, both sides": lambda: exact_kernel.gradient_sums(
                     x, dy, q, scales, A, B, 2.0, True),
                 "variants.gradient_sums (torch)": lambda: variants.gradient_sums(
                     x, dy, lambda rows: variants.merged_block(W, None, A, B, 2.0, rows))}
        for name, fn in forms.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            tflops = 2 * T * out_features * in_features / ms / 1e9
            print(f"| {out_features} x {in_features} | {name} | {ms:.3f} | {tflops:.0f} |", flush=True)


def sweep(T: int = 2048, r: int = 8) -> None:
    """exact_kernel's pass at each tile of SWEEP, one side at a time (as ExactSums asks it): ms of G and the pass
    beyond dy^T x alone per shape, and a layer's sum for that side (LAYER: wq, wk, wv take rows at 4096 x 4096, w1 and
    w3 at 11008 x 4096; wo columns at 4096 x 4096, w2 at 4096 x 11008). Ends with each side's fastest tile."""
    import triton

    import exact_kernel
    ms = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    base, cells = {}, {}
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms(lambda: warm @ warm)  # the clocks up from idle before the first row
    for shape in SHAPES_7B:
        x, dy, W, A, B = inputs(*shape, T, r)
        base[shape] = ms(lambda: dy.T @ x)
        for shape_, side, _ in LAYER:
            for tile in SWEEP[side] if shape_ == shape else []:
                fn = lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True, list(tile), side == "rows",
                                                        side == "cols")
                cells[tile, shape, side] = min(ms(fn), ms(fn)) - base[shape]  # twice: a row now and then runs slow once
        print(f"({shape[0]} x {shape[1]} done)", file=sys.stderr, flush=True)
    layer_base = sum(base[shape] * n for shape, _, n in LAYER)
    print(f"T {T}, r {r}, bf16; dy^T x alone: " + ", ".join(f"{o} x {i} {base[o, i]:.3f} ms" for o, i in SHAPES_7B)
          + f"; a layer {layer_base:.3f} ms")
    best, passes = {}, 0.0
    for side, tiles in SWEEP.items():
        parts = [(shape, n) for shape, s, n in LAYER if s == side]
        print(f"\n| {side}: tile (BLOCK_O, BLOCK_I, warps, steps) | "
              + " | ".join(f"{o} x {i} (x{n}) ms" for (o, i), n in parts) + " | the layer's, ms |\n|---|"
              + "---|" * (len(parts) + 1))
        totals = {tile: sum(cells[tile, shape, side] * n for shape, n in parts) for tile in tiles}
        for tile in tiles:
            print(f"| {tile} | " + " | ".join(f"{cells[tile, shape, side]:.3f}" for shape, _ in parts)
                  + f" | {totals[tile]:.3f} |", flush=True)
        best[side] = min(totals, key=totals.get)
        passes += totals[best[side]]
    print(f"\na layer's passes at the best tiles {passes:.3f} ms: the layer {(layer_base + passes) / layer_base:.3f}x "
          "dy^T x alone")
    for side, tile in best.items():
        print(f"best {side} tile: {'x'.join(map(str, tile))}")


def overhead(calls: int = 2000) -> None:
    """Host time per call of the exact pass's pieces at a tiny shape (64 x 64, 16 tokens: the GPU's part is
    negligible, so `calls` calls queued without a sync take the host's time): what each of a 7B step's 196 calls
    (7 projections x 28 pruned layers) costs the CPU that launches them."""
    import exact_kernel
    x, dy, W, A, B = inputs(64, 64, 16, 8)
    G, sums = dy.T @ x, torch.zeros(128, device="cuda")
    body = exact_kernel.gradient_sums._init_fn  # the op's function without torch.library's dispatch around it
    forms = {"exact_kernel.gradient_sums (the custom op, rows)":
             lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True, None, True, False),
             "its function body alone": lambda: body(x, dy, W, None, A, B, 2.0, True, None, True, False),
             "dy^T x alone": lambda: dy.T @ x, "torch.zeros alone": lambda: torch.zeros(128, device="cuda"),
             "the kernel's launch alone": lambda: exact_kernel._eq3_sums_kernel[(2, 1)](
                 G, W, W, A, B, sums, 64, 64, 2.0, 64, 64, 64, 8, R=8, HAS_SCALES=False, SQUARE=True, ROWS=True,
                 COLS=False, BLOCK_O=32, BLOCK_I=128, STEPS=4, num_warps=8)}
    print(f"| form | host us per call (median of 5 x {calls} calls) |\n|---|---|")
    for name, fn in forms.items():
        runs = [timed(lambda: [fn() for _ in range(calls)]) / calls * 1e6 for _ in range(6)]  # the first warms up
        print(f"| {name} | {sorted(runs[1:])[2]:.1f} |", flush=True)


if __name__ == "__main__":
    if "--speed" in sys.argv or "--sweep" in sys.argv or "--overhead" in sys.argv:
        speed() if "--speed" in sys.argv else sweep() if "--sweep" in sys.argv else overhead()
        sys.exit()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}")
    print("| dtype | compiled | checkpoint | max relative difference of exact vs W.grad sums (3 steps) |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for compiled in (False, True):
            for ckpt in (False, True):
                try:
                    d = f"{check(device, dtype, compiled, ckpt):.2e}"
                except Exception as e:  # report and go on: this is a diagnosis
                    d = f"error {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"| {str(dtype).removeprefix('torch.')} | {compiled} | {ckpt} | {d} |", flush=True)
