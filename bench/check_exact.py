"""Does criterion 'exact' (variants.ExactSums, Eq. 3 from each projection's own backward) give vanilla's sums (from
W.grad) on the device it runs on, with and without compiled blocks and activation checkpointing? One micro-batch, so
the two must agree (in bf16 up to rounding: both form dL/dW in bf16). Prints the largest relative difference of the
row and column sums per configuration. With --speed, on CUDA: what the sums cost at LLaMA-7B's projection shapes
(2048 tokens, r 8), the kernel (exact_kernel.py; float and int8 W) beside dy^T x alone and the unfused torch form.

    python bench/check_exact.py [--speed]   # cuda if available
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama  # noqa: E402
import quant8  # noqa: E402
import variants  # noqa: E402


def check(device: str, dtype: torch.dtype, compiled: bool, ckpt: bool) -> float:
    torch._dynamo.reset()  # a new model each time: no recompile limit across them
    torch.manual_seed(0)
    args = llama.ModelArgs(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512, max_seq_len=128)
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
        x = torch.randint(0, args.vocab_size, (2, 65), device=device, generator=torch.Generator(device).manual_seed(step))
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        got = tap.take(1)
        for name, lin in llama.projections(model, 1).items():
            W = lin.merged_weight(torch.float32)
            I = (lin.weight.grad.float() * W).square()
            for mine, ref in zip(got[name], (I.sum(1), I.sum(0))):
                worst = max(worst, ((mine - ref).abs().max() / ref.abs().max()).item())
        model.zero_grad(set_to_none=True)
    return worst


def speed(T: int = 2048, r: int = 8) -> None:
    """Median ms of each form of Eq. 3's sums per projection shape of LLaMA-7B (CUDA events around each call:
    triton.testing.do_bench), and its rate counted as dy^T x."""
    import triton

    import exact_kernel
    print("| out x in | form | ms | TFLOP/s (2·T·out·in) |\n|---|---|---|---|")
    for out_features, in_features in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        g = torch.Generator("cuda").manual_seed(0)
        x, dy, W, A, B = (torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16) for s in
                          [(T, in_features), (T, out_features), (out_features, in_features), (r, in_features),
                           (out_features, r)])
        q, scales = quant8.quantize(W)
        forms = {"dy^T x alone (torch.matmul)": lambda: dy.T @ x,
                 "exact_kernel.gradient_sums": lambda: exact_kernel.gradient_sums(x, dy, W, None, A, B, 2.0, True),
                 "exact_kernel.gradient_sums, int8 W": lambda: exact_kernel.gradient_sums(x, dy, q, scales, A, B, 2.0,
                                                                                         True),
                 "variants.gradient_sums (torch)": lambda: variants.gradient_sums(
                     x, dy, lambda rows: variants.merged_block(W, None, A, B, 2.0, rows))}
        for name, fn in forms.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            tflops = 2 * T * out_features * in_features / ms / 1e9
            print(f"| {out_features} x {in_features} | {name} | {ms:.3f} | {tflops:.0f} |", flush=True)


if __name__ == "__main__":
    if "--speed" in sys.argv:
        speed()
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
