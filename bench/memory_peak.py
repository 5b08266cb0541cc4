"""Where does the GPU memory peak of one LoRA-guided pruning step come from? For each configuration (LLaMA-7B
shape, random weights, LoRA r 8 on all seven projections, activation checkpointing, micro-batch 1), the step as
bench_7b.train_step runs it, split in its phases (forward, backward, pruner.update, AdamW), with the peak of each;
then one more step under torch.cuda.memory._record_memory_history, replayed to the moment of the peak, listing
what was alive then by the line that allocated it.

    python bench/memory_peak.py                                   # int8 eager, int8 compiled, bf16 compiled
    python bench/memory_peak.py --configs int8:compiled --top 20

Written for the question of a compiled int8 step peaking at 12.9 GiB, eager at 8.2 GiB (answered: bench/RESULTS.md).
Appends its tables to --out (default out/memory_peak.md; bench/RESULTS.md is edited by hand: one current document).
"""
import argparse
import collections
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama  # noqa: E402
import loraprune  # noqa: E402
from bench_7b import random_model  # noqa: E402

GiB = 2**30
PHASES = ("forward", "backward", "criterion", "adamw")
OURS = ("llama.py", "quant8.py", "loraprune.py", "memory_peak.py", "torchinductor", "/_inductor/")


def step_phases(model, pruner, opt, tokens, targets, step: int) -> dict:
    """One training step; the peak allocated GiB of each phase (from its start)."""
    peaks = {}

    def mark(name):
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    logits = model(tokens)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    del logits
    mark("forward")
    loss.backward()
    del loss
    mark("backward")
    pruner.update(step)
    mark("criterion")
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark("adamw")
    return peaks


def where(frames: list) -> str:
    """The innermost frame in our code or in generated Inductor code, else the innermost frame."""
    for f in frames:
        if any(key in f["filename"] for key in OURS):
            return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def alive_at_peak(trace: list) -> tuple[float, collections.Counter, collections.Counter]:
    """Replay the allocator trace: the peak of the allocated bytes seen in it, and what was alive then, summed by
    allocating line (bytes) and counted (blocks)."""
    alive, total, best, best_alive = {}, 0, -1, {}
    for e in trace:
        if e["action"] == "alloc":
            alive[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > best:
                best, best_alive = total, dict(alive)
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in alive:
            total -= alive.pop(e["addr"])[0]
    size, count = collections.Counter(), collections.Counter()
    for s, frames in best_alive.values():
        size[where(frames)] += s
        count[where(frames)] += 1
    return best, size, count


def measure(config: str, seq: int, top: int) -> dict:
    w0, mode = config.split(":")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    args = llama.ModelArgs()
    model = random_model(args, "cuda", int8=w0 == "int8")
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)
    model.checkpoint_activations = True
    if mode == "compiled":
        llama.compile_blocks(model)
    pruner = loraprune.Pruner(model, ratio=0.5, total_steps=100, every=1)
    first = int(pruner.warmup * 100) + 1
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator("cuda").manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (1, seq), device="cuda", generator=g)  # (B, T)
    targets = torch.randint(0, args.vocab_size, (1, seq), device="cuda", generator=g)  # (B, T)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() / GiB
    t0 = time.time()
    for i in range(3):  # compiles, then AdamW's moments exist and the masks are tensors
        step_phases(model, pruner, opt, tokens, targets, first + i)
    warm_s = time.time() - t0
    peaks = step_phases(model, pruner, opt, tokens, targets, first + 3)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    before = torch.cuda.memory_allocated()  # alive before the recorded step: not in the trace
    step_phases(model, pruner, opt, tokens, targets, first + 4)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    best, size, count = alive_at_peak(trace)
    out = dict(config=config, seq=seq, weights_gib=weights, peaks=peaks, warm_s=warm_s,
               before_gib=before / GiB, step_peak_gib=(before + best) / GiB,
               top=[(k, size[k] / GiB, count[k]) for k, _ in size.most_common(top)])
    del model, params, pruner, opt
    torch._dynamo.reset()
    return out


def markdown(results: list, command: str) -> str:
    lines = [f"## memory_peak, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}", f"- command: `{command}`",
             "- LLaMA-7B shape, random weights, LoRA r 8 on all seven projections, activation checkpointing, "
             "micro-batch 1, criterion lora every step, ratio 0.5 schedule; peaks are max_memory_allocated per phase "
             "of the 4th step (GiB)", "",
             "| config | T | weights | " + " | ".join(f"peak {p}" for p in PHASES) + " | warm-up s |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['seq']} | {r['weights_gib']:.2f} | "
                     + " | ".join(f"{r['peaks'][p]:.2f}" for p in PHASES) + f" | {r['warm_s']:.0f} |")
    for r in results:
        lines += ["", f"Alive at the peak of the recorded 5th step, {r['config']}: {r['step_peak_gib']:.2f} GiB "
                  f"({r['before_gib']:.2f} allocated before the step, the rest by the line below; top {len(r['top'])})",
                  "", "| allocated at | GiB | blocks |", "|---|---|---|"]
        lines += [f"| `{k}` | {gib:.3f} | {n} |" for k, gib, n in r["top"]]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="int8:eager,int8:compiled,bf16:compiled", help="comma list of w0:mode")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--top", type=int, default=12, help="lines listed per config")
    p.add_argument("--out", default="out/memory_peak.md")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_peak needs a CUDA device (torch.cuda.memory history); found none")
    results = []
    for config in a.configs.split(","):
        results.append(measure(config, a.seq, a.top))
        print(results[-1], flush=True)
    text = markdown(results, "python bench/memory_peak.py " + " ".join(sys.argv[1:]))
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a", encoding="utf-8") as f:
        f.write("\n\n" + text + "\n")


if __name__ == "__main__":
    main()
