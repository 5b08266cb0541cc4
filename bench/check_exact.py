"""Does criterion 'exact' (variants.ExactSums, Eq. 3 from each projection's own backward) give vanilla's sums (from
W.grad) on the device it runs on, with and without compiled blocks and activation checkpointing? One micro-batch, so
the two must agree (in bf16 up to rounding: both form dL/dW in bf16). Prints the largest relative difference of the
row and column sums per configuration.

    python bench/check_exact.py            # cuda if available
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama  # noqa: E402
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


if __name__ == "__main__":
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
