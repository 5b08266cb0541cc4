"""Issue 18 item 3: the checkpointed, compiled LoRA micro-step at LLaMA-7B shape (2048 tokens, random weights,
LoRA r=8 alpha 16 dropout 0.05 on all seven projections, forward + float32 cross-entropy + backward + AdamW, no
pruning masks) for today's code and for candidate improvements, side by side in one call, each with its peak memory;
plus a torch.profiler summary of today's step (CUDA kernel time grouped: matmul / attention / elementwise / other).

Candidates (switched on per run by patching the model's instances in this script; llama.py is unchanged):
  today       llama.py as it is: TransformerBlock checkpoints the whole block (torch.utils.checkpoint, non-reentrant)
  sac-qkv     (a) selective recomputation: the block is checkpointed with a policy that saves the outputs of the
              block's first three big matmuls (x @ Wq.T, x @ Wk.T, x @ Wv.T) and recomputes everything else
  sac-attn    (a) the same, saving the outputs of scaled_dot_product_attention (flash / efficient / cuDNN) instead
  fused-lora  (b)+(c) one dropout mask and one LoRA-A matmul for the shared input of wq/wk/wv, and one for w1/w3
              (x_d @ [Aq; Ak; Av].T -> (T, 3r)); B stays per projection. NOT the same random function as today:
              today each projection draws its own dropout mask; with dropout off it computes the same gradients
  mem-budget  (a), automatic: no checkpoint call; Inductor's min-cut partitioner chooses what to save under
              torch._functorch.config.activation_memory_budget = 0.1 (a knapsack over recompute time per byte)
  no-ckpt     today without checkpointing (~26 GiB): the bound selective recomputation approaches
  no-dropout  (c) today's code with LoRA dropout 0: what the seven (T, in) dropout masks per block cost (a bound,
              not a proposal: the paper trains with dropout 0.05)
  best-sac+fused  the faster SAC variant with fused-lora, if both beat today

Predictions (METHOD.md: written before the run; 7B, T=2048, one H100 at ~776 TFLOP/s bf16, ~3 TB/s):
  today 0.2074 s / 14.3 GiB measured earlier. Floor: 85.4 TFLOP at 776 -> 0.110 s (hardware count).
  What today really recomputes (--small's "graphs" line: the min-cut partition Inductor uses, per block): 19 of the
  21 forward matmuls (the base matmuls of wq, wk, wv, w1, w3 and all 14 LoRA ones; the outputs of wo and w2 feed
  only the residual, so they are not recomputed) plus the attention forward. bench_scale.py's hardware count
  assumes all 7 base matmuls: it overcounts by 2·T·(C² + C·F)·L = 8.2 TFLOP; counted right, today's MFU is ~0.48.
  sac-qkv     saves 3 (T,C)@(C,C) matmuls per block in recompute: 206 GFLOP x 32 = 6.6 TFLOP ~ 10 ms at ~650 TFLOP/s
              achieved, + 1.5 GiB saved activations (3 x 16 MB x 32): predict 0.197 s, 15.8 GiB (the 16 GiB limit!)
  sac-attn    saves the causal flash forward in recompute: 34 GFLOP x 32 at ~350 TFLOP/s ~ 3 ms, +0.5 GiB:
              predict 0.204 s, 14.8 GiB
  fused-lora  per block 3 dropout passes + 3 (T,C) reads of the LoRA input fewer in forward, recompute and backward
              (~10 passes of 16 MB per block ~ 55 us, x 32): predict -2 ms, 0.205 s, memory -0.1 GiB
  no-dropout  7 masks of (T, in) per block, generated, applied, and saved or regenerated: ~14 passes per block,
              predict -3 ms, 0.204 s
  mem-budget  picks by itself what sac-qkv picks by hand, or better: predict 0.19 s at 14.3 + 32 x 35 MB = 15.4 GiB
  no-ckpt     0.1408 s / 25.9 GiB measured earlier
  The profile is predicted to show matmul ~60-65% of kernel time, attention ~8%, elementwise (Triton) ~25%.

usage:
  python bench/perf_variants.py --small --backend aot_eager   # CPU, ~4 min: tiny shapes, every variant, gradients
                                    # checked (eager and compiled), recomputed matmuls counted; no timing claims
                                    # (with Inductor on the CPU, sac-qkv, sac-attn, mem-budget and fused-lora
                                    # gave today's eager gradients within 2.5e-6 in a separate check)
  # one H100 (no carry; ~200-250 s; variants that would start after --budget-s are skipped):
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 295 python3 bench/perf_variants.py --out-dir $OUT --budget-s 245
  python3 bench/perf_variants.py --out-dir $OUT --summarize   # the table from results.jsonl (after a timeout)
Writes --out-dir/results.jsonl (one JSON line per measurement as it comes), profile.txt, summary.md; prints the
table last.
"""
import argparse
import collections
import functools
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama  # noqa: E402
from bench_7b import Device, random_model  # noqa: E402
from common import matmul_rate, step_flops  # noqa: E402

GIB = 2**30
PREDICTED = {"today": (0.2074, 14.3), "sac-qkv": (0.197, 15.8), "sac-attn": (0.204, 14.8),
             "fused-lora": (0.205, 14.2), "no-dropout": (0.204, 14.2), "sac-qkv+fused": (0.195, 15.7),
             "sac-attn+fused": (0.202, 14.7), "mem-budget": (0.19, 15.4), "no-ckpt": (0.1408, 25.9)}

# ----------------------------------------------------------------------------------------------
# (a) selective recomputation: which ops of a checkpointed block keep their outputs


def is_big_mm(func, args) -> bool:
    """aten.mm of an activation by a frozen W (F.linear's 2-D form), not a LoRA matmul (one side has r columns)."""
    return func is torch.ops.aten.mm.default and min(args[1].shape) > 64


SDPA_OPS = tuple(getattr(torch.ops.aten, name).default for name in
                 ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
                 if hasattr(torch.ops.aten, name))


def sac_context(save: str):
    """context_fn for torch.utils.checkpoint: save 'qkv' (big matmuls 1-3 of the block: wq, wk, wv in forward order)
    or 'attn' (SDPA outputs); recompute the rest. The counters are per checkpoint call and per pass (forward,
    recompute), as in torchtitan's op-level SAC policy."""
    count = collections.defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        if save == "attn" and func in SDPA_OPS:
            return CheckpointPolicy.MUST_SAVE
        if save == "qkv" and is_big_mm(func, args):
            key = "recompute" if ctx.is_recompute else "forward"
            count[key] += 1
            if count[key] <= 3:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def block_forward_sac(self, x, cos, sin, cache=None, positions=None, save="qkv"):
    """TransformerBlock.forward with a selective-recomputation policy (inside forward, so a compiled block sees it)."""
    if self.checkpoint and torch.is_grad_enabled():
        return checkpoint(self._forward, x, cos, sin, cache, positions, use_reentrant=False,
                          context_fn=functools.partial(sac_context, save))
    return self._forward(x, cos, sin, cache, positions)

# ----------------------------------------------------------------------------------------------
# (b)+(c) one dropout mask and one LoRA-A matmul per shared input


def lora_group(x: torch.Tensor, lins: list, dropout: float, training: bool) -> list:
    """The outputs of LoRALinears that read the same x (..., C): base x @ W.T of each, plus one shared
    dropout(x) @ [A_1; ...; A_n].T (..., n r), split, each piece @ B_i.T * s_i (..., out_i)."""
    ys = [lin.base(x) for lin in lins]
    on = [lin.r and lin.adapters_on for lin in lins]
    if not any(on):
        return ys
    assert all(on) and len({lin.r for lin in lins}) == 1, "fused LoRA needs the same rank r on every projection"
    r = lins[0].r
    A = torch.cat([lin.lora_A for lin in lins]).to(x.dtype)  # (n r, C)
    xa = F.linear(F.dropout(x, dropout, training), A)  # (..., C) -> (..., n r)
    return [y + F.linear(xa[..., i * r:(i + 1) * r], lin.lora_B.to(x.dtype)) * lin.scaling  # (..., out_i)
            for i, (y, lin) in enumerate(zip(ys, lins))]


def attention_forward_fused(self, x, cos, sin, cache=None, positions=None):
    """llama.Attention.forward with q, k, v from lora_group (cache and uneven heads not needed by the bench)."""
    assert cache is None and not self.uneven and self.head_mask is None, "fused-lora bench path: training only"
    B, T, _ = x.shape
    q, k, v = lora_group(x, [self.wq, self.wk, self.wv], self.lora_p, self.training)
    q = llama.apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, D)
    k = llama.apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)  # (B, K, T, D)
    v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
    return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


def feed_forward_fused(self, x):
    assert self.channel_mask is None, "fused-lora bench path: no masks"
    g, u = lora_group(x, [self.w1, self.w3], self.lora_p, self.training)
    return self.w2(F.silu(g) * u)  # (B, T, C)

# ----------------------------------------------------------------------------------------------
# switching variants on one model


# in order of predicted gain (the budget may skip the tail); "best-sac+fused" is the faster SAC with fused-lora, run
# only if both beat today; "no-ckpt" (today without checkpointing, ~26 GiB) is the bound selective recomputation
# approaches from below
VARIANTS = ("today", "sac-qkv", "mem-budget", "fused-lora", "sac-attn", "no-dropout", "best-sac+fused", "no-ckpt")
MEM_BUDGET = 0.1  # mem-budget: the min-cut partitioner keeps ~10% of the activations no-ckpt keeps (~35 MB a block)


def set_variant(model: llama.Transformer, name: str, dropout: float, compiled: bool, backend: str):
    """Undo any earlier patch (instance attributes only; the classes stay untouched), apply `name`, recompile."""
    torch._dynamo.reset()
    for layer in model.layers:
        layer._compiled_call_impl = None  # what nn.Module.compile set
        layer.checkpoint = name not in ("no-ckpt", "mem-budget")
        for mod in (layer, layer.attention, layer.feed_forward):
            mod.__dict__.pop("forward", None)
        for lin in layer.modules():
            if isinstance(lin, llama.LoRALinear) and lin.r:
                lin.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if name.startswith("sac-"):
            save = name.split("+")[0][len("sac-"):]
            layer.forward = types.MethodType(functools.partial(block_forward_sac, save=save), layer)
        if "fused" in name:
            layer.attention.lora_p = layer.feed_forward.lora_p = dropout
            layer.attention.forward = types.MethodType(attention_forward_fused, layer.attention)
            layer.feed_forward.forward = types.MethodType(feed_forward_fused, layer.feed_forward)
        if name == "no-dropout":
            for lin in layer.modules():
                if isinstance(lin, llama.LoRALinear):
                    lin.lora_dropout = nn.Identity()
    # read when a graph is partitioned (compile time): 1.0 (the default) saves what the partitioner likes
    torch._functorch.config.activation_memory_budget = MEM_BUDGET if name == "mem-budget" else 1.0
    if compiled:
        llama.compile_blocks(model, backend=backend)

# ----------------------------------------------------------------------------------------------
# the micro-step


def make_step(model, params, T: int, device: str):
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (1, T), device=device, generator=g)  # (B, T)
    targets = torch.randint(0, model.args.vocab_size, (1, T), device=device, generator=g)  # (B, T)

    def step():
        logits = model(tokens)  # (B, T, V)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


def time_variant(model, params, dev: Device, T: int, warm: int, timed: int) -> dict:
    step, opt = make_step(model, params, T, dev.type)
    dev.reset()
    t0 = time.perf_counter()
    step()  # compiles (block 0 once more: its input needs no grad)
    dev.sync()
    first = time.perf_counter() - t0
    for _ in range(warm):
        step()
    dev.sync()
    if dev.cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        dev.sync()
        ts.append(time.perf_counter() - t)
    out = dict(s=round(statistics.median(ts), 4), s_min=round(min(ts), 4), s_max=round(max(ts), 4),
               peak_gib=dev.peak_gib(), first_step_s=round(first, 1), steps=f"1+{warm}+{timed}")
    del opt, step
    return out

# ----------------------------------------------------------------------------------------------
# gradients: every variant computes today's function (dropout off; float32)


def check_grads(args: llama.ModelArgs, device: str, backend: str, compiled: bool, strict: bool) -> dict:
    """Max relative difference of the loss and of every LoRA gradient against today's code, per variant, with dropout
    0 (the fused path shares masks, so with dropout on it is a different random function by design)."""
    torch.manual_seed(0)
    model = random_model(args, device, dtype=torch.float32, std=0.1)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B = 0 would make dL/dA zero and hide a wrong A-gradient
    model.checkpoint_activations = True
    tokens = torch.randint(0, args.vocab_size, (2, 16), device=device)  # (B, T)

    def grads(name):
        set_variant(model, name, 0.0, compiled, backend)
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
        gs = torch.autograd.grad(loss, params)
        return loss.detach(), gs
    ref_loss, ref = grads("today")
    out = {}
    for name in [n for n in VARIANTS[1:] if n != "best-sac+fused"] + ["sac-qkv+fused", "sac-attn+fused"]:
        loss, gs = grads(name)
        rel = max(((g - r).norm() / r.norm()).item() for g, r in zip(gs, ref))
        out[name] = dict(loss_rel=abs((loss - ref_loss) / ref_loss).item(), grad_rel_max=rel)
        out[name]["ok"] = out[name]["grad_rel_max"] < 1e-4 and out[name]["loss_rel"] < 1e-5
        assert out[name]["ok"] or not strict, f"{name} differs from today: {out[name]}"
    set_variant(model, "today", 0.0, False, backend)
    return out

def graph_counts(args: llama.ModelArgs, device: str) -> dict:
    """Matmuls (aten.mm) and SDPA ops in the forward and backward graphs that AOTAutograd's min-cut partitioner (the
    one Inductor uses) makes of one block, per variant: backward mm minus no-ckpt's backward mm is what is recomputed.
    (Ops that draw random numbers, SDPA included, sit inside run_and_save_rng_state / run_with_rng_state and are not
    counted.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    counts = {}

    def counter(tag):
        def compiler(gm, example_inputs):
            ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            counts.setdefault(tag, []).append((sum(o == "aten.mm.default" for o in ops),
                                               sum("scaled_dot_product" in o for o in ops)))
            return make_boxed_func(gm.forward)
        return compiler
    backend = aot_autograd(fw_compiler=counter("fw"), bw_compiler=counter("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    model = random_model(args, device, dtype=torch.float32)
    llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)
    tokens = torch.randint(0, args.vocab_size, (1, 16), device=device)  # (B, T)
    out = {}
    for name in ("today", "sac-qkv", "sac-attn", "fused-lora", "mem-budget", "no-ckpt"):
        counts.clear()
        set_variant(model, name, 0.05, True, backend)
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        last = {k: v[-1] for k, v in counts.items()}  # the last block (block 0's input needs no grad)
        out[name] = dict(fw_mm=last["fw"][0], fw_sdpa=last["fw"][1], bw_mm=last["bw"][0], bw_sdpa=last["bw"][1])
    set_variant(model, "today", 0.05, False, backend)
    return out

# ----------------------------------------------------------------------------------------------
# profile of today's step


def kernel_group(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "cudnn_generated")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "xmma", "cutlass", "nvjet", "sm90_", "wgmma", "aten::mm", "aten::addmm",
                            "aten::bmm", "splitk")):
        return "matmul"
    if any(s in n for s in ("triton", "elementwise", "vectorized", "reduce", "aten::mul", "aten::add",
                            "dropout", "multi_tensor", "foreach", "aten::copy", "rand", "philox")):
        return "elementwise"
    return "other"


def profile_today(model, params, dev: Device, T: int, steps: int, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile
    step, opt = make_step(model, params, T, dev.type)
    for _ in range(2):
        step()
    dev.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        dev.sync()
    rows = []
    for evt in prof.key_averages():
        if dev.cuda:
            us = evt.self_device_time_total if evt.device_type == torch.autograd.DeviceType.CUDA else 0
        else:  # CPU: aten ops' self time, only to prove the code path
            us = evt.self_cpu_time_total if evt.key.startswith("aten::") else 0
        if us > 0:
            rows.append((evt.key, us / steps, evt.count // steps))
    rows.sort(key=lambda r: -r[1])
    groups = collections.defaultdict(float)
    for name, us, _ in rows:
        groups[kernel_group(name)] += us
    total = sum(groups.values())
    del opt, step
    return dict(total_ms_per_step=round(total / 1e3, 2),
                groups={g: dict(ms=round(v / 1e3, 2), share=round(v / total, 3)) for g, v in
                        sorted(groups.items(), key=lambda kv: -kv[1])},
                top=[dict(kernel=n[:110], group=kernel_group(n), ms=round(us / 1e3, 3), calls=c)
                     for n, us, c in rows[:top]])

# ----------------------------------------------------------------------------------------------
# main


def summary(results: list, out_dir: Path) -> None:
    """The table (and the profile's groups) from the logged results; written to summary.md and printed last."""
    env = next((r for r in results if r.get("part") == "env"), {})
    rate = next((r["tflops"] for r in results if r.get("part") == "matmul"), None)
    rows = {r["variant"]: r for r in results if r.get("part") == "variant" and "error" not in r}
    head = ["variant", "s (median)", "min-max", "peak GiB", "MFU hw (full-recompute count)", "MFU useful",
            "vs today", "predicted s / GiB", "first step s"]
    md = [f"perf_variants, {env.get('device')}, torch {env.get('torch')}, T={env.get('T')}, bf16 matmul {rate} "
          f"TFLOP/s; useful {env.get('useful_tflop')} TFLOP, hardware (full recompute) {env.get('hardware_tflop')} "
          "TFLOP", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get("today", {}).get("s")
    for r in results:
        if r.get("part") != "variant":
            continue
        if "error" in r:
            md.append(f"| {r['variant']} | {r['error']} |")
            continue
        pred = PREDICTED.get(r["variant"], ("-", "-"))
        md.append(f"| {r['variant']} | {r['s']} | {r['s_min']}-{r['s_max']} | {r['peak_gib']} | "
                  f"{r['mfu_hw_full_recompute']} | {r['mfu_useful']} | "
                  f"{round(r['s'] / base, 3) if base else '-'} | {pred[0]} / {pred[1]} | {r['first_step_s']} |")
    prof = next((r for r in results if r.get("part") == "profile" and "groups" in r), None)
    if prof:
        md.append("profile of today (kernel ms per step): " + ", ".join(
            f"{g} {v['ms']} ({v['share']:.0%})" for g, v in prof["groups"].items()))
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU, tiny shapes: every variant, gradients checked")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "out/perf_variants"))
    p.add_argument("--budget-s", type=float, default=245.0, help="variants that would not finish are skipped")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--backend", default="inductor", help="torch.compile backend (--small: aot_eager is quicker)")
    p.add_argument("--summarize", action="store_true", help="only print the table from --out-dir/results.jsonl")
    opts = p.parse_args()
    if opts.summarize:
        lines = (Path(opts.out_dir) / "results.jsonl").read_text().splitlines()
        summary([json.loads(x) for x in lines if x.strip()], Path(opts.out_dir))
        return
    start = time.perf_counter()
    dev = Device("cuda" if torch.cuda.is_available() and not opts.small else "cpu")
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = open(out_dir / "results.jsonl", "a")
    results = []

    def log(**kw):
        kw["t_s"] = round(time.perf_counter() - start, 1)
        results.append(kw)
        print(json.dumps(kw), flush=True)
        jsonl.write(json.dumps(kw) + "\n")
        jsonl.flush()
        return kw

    if opts.small:
        args = llama.ModelArgs(dim=128, n_layers=2, n_heads=4, hidden_dim=256, vocab_size=256, max_seq_len=64)
        T, warm, timed, need = 32, 1, 2, 0.0
    else:
        args, T, warm, timed, need = llama.ModelArgs(), 2048, 3, 8, 35.0  # need: compile + steps of one variant (s)
    fl = step_flops(args, T)  # bench_scale.py's count: useful, and hardware = useful + a full block recompute
    log(part="env", device=dev.name(), torch=torch.__version__, small=opts.small, T=T, backend=opts.backend,
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), useful_tflop=round(fl["useful"] / 1e12, 2),
        hardware_tflop=round(fl["hardware"] / 1e12, 2))
    # 1. gradients of every variant equal today's (tiny float32 model, eager and compiled)
    small_args = llama.ModelArgs(dim=128, n_layers=2, n_heads=4, hidden_dim=256, vocab_size=256, max_seq_len=64)
    for compiled in (False, True) if opts.small else (False,):  # compiled: ~10 s per variant, CPU-side only
        log(part="grads", compiled="aot_eager" if compiled else False,
            **check_grads(small_args, dev.type, "aot_eager", compiled, strict=opts.small))
    if opts.small:  # what each variant recomputes (CPU-side; the partition does not depend on the device)
        log(part="graphs", **graph_counts(small_args, dev.type))
    # 2. the card's bf16 matmul rate and the FLOP count (bench_scale.py's formula)
    rate = log(part="matmul", **matmul_rate(dev.type, 256 if opts.small else 8192))["tflops"]
    # 3. one model, each variant compiled in turn
    model = random_model(args, dev.type)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)
    model.checkpoint_activations = True
    rows, prof = {}, None
    for name in opts.variants.split(","):
        if name == "best-sac+fused":
            base = rows.get("today", {}).get("s", 0)
            sac = min((n for n in ("sac-qkv", "sac-attn") if n in rows), key=lambda n: rows[n]["s"], default=None)
            if not (sac and rows[sac]["s"] < base and "fused-lora" in rows and rows["fused-lora"]["s"] < base):
                log(part="variant", variant=name, error="skipped: no SAC variant and fused-lora both beat today")
                continue
            name = sac + "+fused"
        left = opts.budget_s - (time.perf_counter() - start)
        if left < need:
            log(part="variant", variant=name, error=f"skipped: needs ~{need:.0f} s, {left:.0f} s left")
            continue
        t_variant = time.perf_counter()
        try:
            set_variant(model, name, 0.05, compiled=True, backend=opts.backend)
            r = time_variant(model, params, dev, T, warm, timed)
        except Exception as e:  # OOM, or a compile error of one candidate: log it, keep measuring the others
            log(part="variant", variant=name, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            torch._dynamo.reset()
            dev.reset()
            continue
        mfu = (lambda flop: round(flop / r["s"] / 1e12 / rate, 3)) if rate else (lambda flop: None)
        r["mfu_hw_full_recompute"], r["mfu_useful"] = mfu(fl["hardware"]), mfu(fl["useful"])
        r["wall_s"] = round(time.perf_counter() - t_variant, 1)
        need = max(need, 1.15 * r["wall_s"]) if not opts.small else need  # a slow compile: keep the next in budget
        rows[name] = log(part="variant", variant=name, **r)
        if name == "today" and (opts.budget_s - (time.perf_counter() - start) > 2 * need or opts.small):
            try:
                prof = profile_today(model, params, dev, T, steps=2)
            except Exception as e:
                log(part="profile", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                prof = None
        if name == "today" and prof:
            log(part="profile", variant="today", **prof)
            lines = [f"today's step, kernel time per step {prof['total_ms_per_step']} ms"]
            lines += [f"  {g:12s} {v['ms']:8.2f} ms  {v['share']:.3f}" for g, v in prof["groups"].items()]
            lines += [f"  {t['ms']:8.3f} ms x{t['calls']:4d} [{t['group']}] {t['kernel']}" for t in prof["top"]]
            (out_dir / "profile.txt").write_text("\n".join(lines) + "\n")
            print("\n".join(lines), flush=True)
        dev.reset()
    summary(results, out_dir)


if __name__ == "__main__":
    main()
