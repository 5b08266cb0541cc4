"""The fast path in one device call: the card's bf16 matmul rate, the HF+PEFT anchor's checkpointed LoRA step, our
compiled LoRA micro-step at LLaMA-7B shape (bf16 and int8 W0) with MFU, the LLaMA-65B int8 pruning step compiled,
and Llama-3.1-70B (int8 W0) on one card: a pruning step, the 20% slice and the sliced forward, each phase's peak.

Parts, in this order (--only picks some; each has a deadline inside --budget-s: a part that would not end in time
is logged as skipped, and the tables are still written):
  matmul  the card's bf16 rate: torch.matmul of 8192 x 8192 x 8192, median of 20 products timed with CUDA events
  7b      our micro-step at LLaMA-7B shape, T=2048, LoRA r 8 (alpha 16, dropout 0.05) on all seven projections:
          train.backward_batch (forward, float32 cross-entropy, backward) + AdamW, the Pruner's criterion and masks
          (timed apart) every step, compiled blocks recomputing under llama.RECOMPUTE_BUDGET (run.py's default on a
          GPU); bf16 and int8 W0 (--7b)
  70b     Llama-3.1-70B's shape (vocabulary 128256, 8 kv heads, MLP 28672, its RoPE) with int8 W0, eager
          blocks: one full pruning step at 2048 tokens (1 warm-up + 2 timed), the masks at the final 20%, run.py's
          slicing in place (loraprune.slice_model, block by block, int8 stays int8) and a 2048-token forward of the
          sliced model; if the step runs out of memory, again at 1024 tokens
  65b     LLaMA-65B with int8 W0, compiled blocks: the pruning step only
  anchor  HF LlamaForCausalLM + peft LoRA, the same step with gradient checkpointing (.carry/hf_peft_anchor.py's
          train_step_bench('lora_ckpt', 2048), in a subprocess with a timeout)
  more    if time is left, more 7B variants beside the default (--more: recompute budgets, no checkpointing)
Models are built layer by layer on the GPU from random weights (no file, no float copy of an int8 projection);
memory and time do not depend on the values. MFU = FLOPs (common.step_flops: useful, and hardware = useful + a full
recompute of every block) / micro-step time / the matmul rate of the same call.

Writes $OUT (--out-dir): results.jsonl (one JSON object per measurement, written as it comes), anchor.log,
summary.md (the tables); prints the short table last.

  python bench/bench_scale.py --small                          # CPU: every code path at tiny shapes (minutes)
  # one H100, carrying .carry (bench/README.md); the second command prints the tables even if the first was killed
  PYTHONUNBUFFERED=1 timeout 330 python3 bench/bench_scale.py --out-dir $OUT --budget-s 300; \\
      python3 bench/bench_scale.py --out-dir $OUT --summarize
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the 65B/70B runs fill the card: let the allocator grow segments instead of fragmenting (before CUDA starts)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: llama, loraprune, train
import llama  # noqa: E402
import loraprune  # noqa: E402
import variants  # noqa: E402
from common import (Run, chosen_parts, lora_model, matmul_rate, peaks, pruning_steps, read_results, reset,  # noqa: E402
                    step_flops, step_fn, sync, table, timed)

TODAY_65B_TOK_S = 1068  # LLaMA-65B int8, compiled, before this call's code (bench/RESULTS.md history)


def shapes(small: bool) -> dict:
    """name -> ModelArgs: LLaMA-7B and -65B as Meta's params.json give them, Llama-3.1-70B as its config.json does.
    --small: tiny shapes of the same structure (GQA and a large vocabulary for '70b')."""
    if small:
        return {"7b": llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=256, max_seq_len=64),
                "65b": llama.ModelArgs(dim=256, n_layers=6, n_heads=4, hidden_dim=704, vocab_size=256, max_seq_len=64),
                "70b": llama.ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, hidden_dim=896, vocab_size=2048,
                                       rope_theta=500000.0, rope_scaling=dict(llama.LLAMA3_ROPE), max_seq_len=64)}
    return {"7b": llama.ModelArgs(),
            "65b": llama.ModelArgs(dim=8192, n_layers=80, n_heads=64, hidden_dim=22016),
            "70b": llama.ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=128256,
                                   rope_theta=500000.0, rope_scaling=dict(llama.LLAMA3_ROPE), max_seq_len=2048)}


# ----------------------------------------------------------------------------------------------
# the kernel-time profile of a step


def kernel_group(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "cudnn_generated")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "xmma", "cutlass", "nvjet", "sm90_", "wgmma", "splitk", "aten::mm",
                            "aten::addmm", "aten::bmm")):
        return "matmul"
    if any(s in n for s in ("triton", "elementwise", "vectorized", "reduce", "multi_tensor", "foreach", "copy",
                            "rand", "philox", "aten::mul", "aten::add")):
        return "elementwise"
    return "other"


def kernel_profile(step, out: Path, n: int = 3, top: int = 40) -> dict:
    """torch.profiler over n forward + backward passes (step_fn's step.forward_backward, each between syncs): GPU
    kernel time per pass by group (matmul, attention, elementwise, other), the time the GPU was busy (the union of
    the kernels' intervals) against the wall time, and the top kernels (written to `out`); on a CPU the aten ops'
    self time, only to run the code path."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        wall = sum(timed(step.forward_backward) for _ in range(n))
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else (e.self_cpu_time_total if e.key.startswith("aten::") else 0)
        if us > 0:
            rows.append((e.key, us / n / 1e3, e.count // n))
    rows.sort(key=lambda r: -r[1])
    groups = {}
    for name, ms, _ in rows:
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + ms
    busy, end = 0.0, float("-inf")  # the union of the kernels' intervals, us
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                              if e.device_type == DeviceType.CUDA):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    out.write_text("\n".join(f"{ms:9.3f} ms x{calls:5d} [{kernel_group(k)}] {k[:120]}" for k, ms, calls in rows[:top]) + "\n")
    return dict({f"kernel_ms_{g}": round(ms, 2) for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])},
                profile_wall_ms=round(wall / n * 1e3, 2), profile_busy_ms=round(busy / n / 1e3, 2))


# ----------------------------------------------------------------------------------------------
# part: the 7B micro-step, with MFU


def time_7b(model, params, pruner, T: int, small: bool) -> dict:
    """The micro-step's and the criterion's seconds, and the memory after building and at peak."""
    weights = peaks().get("allocated_gib")
    r = pruning_steps(step_fn(model, params, pruner, T), T, warm=1 if small else 2, n=2 if small else 5, at_warm=peaks)
    return dict(weights_gib=weights, **r, **peaks())


def run_7b(run: Run, device: str, args, T: int, variant: str, rate, small: bool, backend: str,
           profile: bool = False):
    w0, mode, criterion = (variant.split(":") + ["lora"])[:3]
    tag = dict(part="7b", w0=w0, mode=mode, seq=T, criterion=criterion)
    t0 = time.perf_counter()
    fused = variants.fused_gradient_sums
    criterion, *knobs = criterion.split("-")  # exact's knobs: unfused, both, rowstile/colstile/bothtileBOxBIxWxS
    if "unfused" in knobs:  # exact with variants.gradient_sums (torch) in place of exact_kernel's pass
        variants.fused_gradient_sums = lambda: None
    tiles = {k[:k.index("tile")]: tuple(int(n) for n in k[k.index("tile") + 4:].split("x")) for k in knobs
             if "tile" in k}
    if tiles:  # exact_kernel.TILES for this row (imports triton: CUDA only)
        import exact_kernel
        saved_tiles, exact_kernel.TILES = exact_kernel.TILES, dict(exact_kernel.TILES, **tiles)
    try:
        model, params, pruner = lora_model(args, device, w0 == "int8", mode, backend, criterion=criterion)
        if "both" in knobs:  # both sides' sums, as the kernel formed them before it formed only Eq. 4's side
            for lin in pruner.criterion.linears.values():
                lin.probe.by_rows = None
        r = time_7b(model, params, pruner, T, small)
    finally:
        variants.fused_gradient_sums = fused
        if tiles:
            exact_kernel.TILES = saved_tiles
    if profile:
        name = "profile_7b_" + variant.replace(":", "_") + ".txt"
        r.update(kernel_profile(step_fn(model, params, pruner, T), run.out_dir / name), profile_file=name)
    fl = step_flops(args, T)
    hw = fl["useful"] if mode == "nockpt" else fl["hardware"]
    mfu = (lambda f: round(f / r["microstep_s"] / 1e12 / rate, 3)) if rate else (lambda f: None)
    run.log(**tag, wall_s=round(time.perf_counter() - t0, 1), **r,
            hardware_tflops=round(hw / r["microstep_s"] / 1e12, 1), mfu_hardware=mfu(hw), mfu_useful=mfu(fl["useful"]),
            useful_tflop=round(fl["useful"] / 1e12, 2), hardware_tflop=round(hw / 1e12, 2))
    del model, params, pruner


# ----------------------------------------------------------------------------------------------
# part: the anchor, in its own process


FAKE_ANCHOR = """import json
def train_step_bench(mode, seq):
    print(json.dumps({"bench": "train_step", "stack": "hf+peft", "mode": mode, "seq": seq, "micro_batch": 1,
                      "weights_gib": 12.7, "peak_gib": 14.3, "s_per_step_median": 0.46, "tokens_per_s": seq / 0.46}))
"""


def run_anchor(run: Run, script: Path, timeout_s: float):
    """The anchor's lora_ckpt step at 2048 tokens (its module imported, its function called: the rest of its
    measurements are not this call's); its JSON lines go to anchor.log and to the results."""
    code = (f"import sys; sys.path.insert(0, {str(script.parent)!r}); import {script.stem} as anchor; "
            "anchor.train_step_bench('lora_ckpt', 2048)")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
        out, err, status = r.stdout, r.stderr, f"exit {r.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timeout after {timeout_s:.0f} s"
    (run.out_dir / "anchor.log").write_text(out + ("\n--- stderr ---\n" + err[-4000:] if err.strip() else ""))
    run.log(part="anchor", status=status, wall_s=round(time.perf_counter() - t0, 1))
    for line in out.splitlines():
        if line.startswith("{"):
            run.log(**{"part": "anchor_line", **json.loads(line)})


# ----------------------------------------------------------------------------------------------
# parts: 65B and 70B on one card


def run_big(run: Run, device: str, name: str, args, T: int, int8: bool, mode: str, then_slice: bool, small: bool,
            backend: str):
    """One pruning step (1 warm-up + 2 timed; compiled: +1 that compiles), then, if asked, the masks at the final
    20%, slicing in place as run.py does and a T-token forward of the sliced model. Peak memory per phase."""
    tag = dict(part=name, w0="int8" if int8 else "bf16", mode=mode, seq=T)
    phases = {}
    t0 = time.perf_counter()
    model, params, pruner = lora_model(args, device, int8, mode, backend)
    build_s = time.perf_counter() - t0
    phases["build"] = peaks()
    n_params = llama.count_params(model)
    r = pruning_steps(step_fn(model, params, pruner, T), T, warm=1 + (mode != "eager"), n=1 if small else 2,
                      at_warm=lambda: phases.__setitem__("warmup", peaks()))
    phases["train"] = peaks()
    step = [phases[k] for k in ("warmup", "train")]
    fl = step_flops(args, T)
    run.log(**tag, phase="train", params_b=round(n_params / 1e9, 3), build_s=round(build_s, 1),
            weights_gib=phases["build"].get("allocated_gib"), **r,
            hardware_tflops=round(fl["hardware"] / r["microstep_s"] / 1e12, 1),
            step_peak_gib=max((p["peak_gib"] for p in step if p), default=None),
            step_reserved_gib=max((p["reserved_gib"] for p in step if p), default=None),
            sparsity=round(pruner.sparsity(), 4))
    if not then_slice:
        return
    masks = pruner.next_masks(pruner.final_counts)  # the final 20% from the scores so far
    del pruner, params
    reset()
    t0 = time.perf_counter()
    model = loraprune.slice_model(model, masks, dtype=torch.bfloat16, in_place=True)  # run.py's slicing
    sync()
    slice_s = time.perf_counter() - t0
    phases["slice"] = peaks()
    tokens = torch.randint(0, args.vocab_size, (1, T), device=device)  # (B, T)
    with torch.no_grad():
        model(tokens)
        fwd = [timed(lambda: model(tokens)) for _ in range(2)]
    phases["forward"] = peaks()
    run.log(**tag, phase="slice+forward", sliced_params_b=round(llama.count_params(model) / 1e9, 3),
            slice_s=round(slice_s, 1), sliced_forward_s=round(statistics.median(fwd), 3),
            slice_peak_gib=phases["slice"].get("peak_gib"), forward_peak_gib=phases["forward"].get("peak_gib"),
            run_peak_gib=max((p["peak_gib"] for p in phases.values() if p), default=None),
            run_reserved_gib=max((p["reserved_gib"] for p in phases.values() if p), default=None))


# ----------------------------------------------------------------------------------------------
# the tables


def summary(results: list, command: str) -> str:
    R = [r for r in results if "error" not in r]
    env = next((r for r in results if r.get("part") == "env"), {})
    mm = next((r for r in R if r.get("part") == "matmul"), None)
    anchor = next((r for r in R if r.get("part") == "anchor_line" and r.get("mode") == "lora_ckpt"), None)
    out = [f"bench_scale, {env.get('date')}, device: {env.get('device')}, torch {env.get('torch')}; command: "
           f"`{command}`; wall {results[-1].get('t_s', 0) if results else 0:.0f} s",
           f"bf16 matmul {mm['n']}^3: {mm['tflops']} TFLOP/s (median of {mm['reps']}, CUDA events)" if mm else
           "bf16 matmul: not measured"]
    sevens = [r for r in R if r.get("part") == "7b"]
    bf16 = {r["mode"]: r for r in sevens if r["w0"] == "bf16" and r.get("criterion", "lora") == "lora"}

    def default_of(r):  # the bf16 default row of r's mode run last before r (rows given alternating pair up)
        before = [d for d in sevens[:sevens.index(r)] if d["w0"] == "bf16" and d["mode"] == r["mode"]
                  and d.get("criterion", "lora") == "lora"]
        return before[-1] if before else bf16.get(r["mode"])
    rows = [[r["w0"], r["mode"], r.get("criterion", "lora"), r["microstep_s"], r.get("peak_gib"), r["tokens_per_s"],
             r["hardware_tflops"], r["mfu_hardware"], r["mfu_useful"], r["criterion_s"],
             round(r["microstep_s"] / default_of(r)["microstep_s"], 3) if default_of(r) else None,
             round(anchor["s_per_step_median"] / r["microstep_s"], 2) if anchor else None] for r in sevens]
    if rows:
        out.append("LLaMA-7B LoRA micro-step (forward + backward + AdamW), T=2048; mode: a recompute budget "
                   "(compiled, checkpointed), nockpt (compiled, no recomputation) or eager (checkpointed)"
                   + (f"; anchor (HF+PEFT, gradient checkpointing): {anchor['s_per_step_median']} s, "
                      f"{anchor['peak_gib']} GiB" if anchor else "") + "\n\n"
                   + table(["W0", "mode", "criterion", "s", "peak GiB", "tok/s", "hw TFLOP/s", "MFU hw", "MFU useful",
                            "criterion s", "/ bf16 default before it", "anchor / ours"], rows))
        for r in sevens:
            ms = {k[len("kernel_ms_"):]: v for k, v in r.items() if k.startswith("kernel_ms_")}
            if ms:
                out.append(f"Kernel time per forward + backward, {r['w0']} {r['mode']} {r.get('criterion', 'lora')} "
                           f"(torch.profiler; top kernels in {r['profile_file']}): "
                           + ", ".join(f"{g} {v} ms" for g, v in ms.items())
                           + f"; all {sum(ms.values()):.2f} ms; GPU busy {r['profile_busy_ms']} ms of "
                           f"{r['profile_wall_ms']} ms wall")
    rows = []
    for r in R:
        if r.get("phase") == "train":
            s = next((x for x in R if x.get("phase") == "slice+forward" and x["part"] == r["part"]
                      and x["seq"] == r["seq"]), {})
            rows.append([r["part"], r["w0"], r["mode"], r["seq"], r["params_b"], r["weights_gib"], r["microstep_s"],
                         r["criterion_s"], r["tokens_per_s"], r["tokens_per_s_paper"], r["hardware_tflops"],
                         r.get("step_peak_gib"), r.get("step_reserved_gib"), s.get("slice_peak_gib"),
                         s.get("sliced_params_b"), s.get("sliced_forward_s"), s.get("forward_peak_gib"),
                         s.get("run_peak_gib"), s.get("run_reserved_gib")])
    if rows:
        out.append("Pruning step (criterion every step) -> 20% slice in place -> sliced forward\n\n"
                   + table(["model", "W0", "mode", "T", "params B", "weights GiB", "micro-step s", "criterion s",
                            "tok/s", "tok/s @128", "hw TFLOP/s", "step peak GiB", "step reserved GiB",
                            "slice peak GiB", "sliced B", "sliced fwd s", "fwd peak GiB", "run peak GiB",
                            "run reserved GiB"], rows))
    targets = []
    verdict = lambda v, ok: "not measured" if v is None else ("PASS" if ok(v) else "FAIL")  # noqa: E731
    default = str(llama.RECOMPUTE_BUDGET)
    b, i8 = bf16.get(default), next((r for r in sevens if r["w0"] == "int8" and r["mode"] == default
                                                  and r.get("criterion", "lora") == "lora"), None)
    targets.append(["7B default step: MFU (hardware count) >= 0.60", b and b["mfu_hardware"],
                    verdict(b and b["mfu_hardware"], lambda v: v >= 0.6)])
    targets.append(["7B default step: peak GiB <= 16", b and b.get("peak_gib"), verdict(b and b.get("peak_gib"),
                                                                                       lambda v: v <= 16)])
    ratio = round(i8["microstep_s"] / b["microstep_s"], 3) if b and i8 else None
    targets.append(["7B int8 step / bf16 step <= 1.25", ratio, verdict(ratio, lambda v: v <= 1.25)])
    targets.append(["7B int8 step: peak GiB <= 9", i8 and i8.get("peak_gib"), verdict(i8 and i8.get("peak_gib"),
                                                                                      lambda v: v <= 9)])
    exacts = [r for r in sevens if r["w0"] == "bf16" and r["mode"] == default and default_of(r)  # exact as run.py
              and r.get("criterion", "").split("-")[0] == "exact"  # runs it (its tiles aside)
              and not {"unfused", "both"} & set(r["criterion"].split("-"))]
    ex = exacts[0] if exacts else None
    ratios = [r["microstep_s"] / default_of(r)["microstep_s"] for r in exacts]
    ratio = round(statistics.mean(ratios), 3) if ratios else None
    targets.append(["7B criterion exact, compiled: step / the default's <= 1.25 (mean over pairs)",
                    f"{ratio} ({len(ratios)}: " + ", ".join(f"{v:.3f}" for v in ratios) + ")" if ratios else None,
                    verdict(ratio, lambda v: v <= 1.25)])
    extra = round(ex["peak_gib"] - b["peak_gib"], 2) if b and ex and ex.get("peak_gib") and b.get("peak_gib") else None
    targets.append(["7B criterion exact, compiled: peak GiB - the default's <= 1", extra,
                    verdict(extra, lambda v: v <= 1)])
    r = next((x for x in R if x.get("part") == "65b" and x.get("phase") == "train"), None)
    targets.append([f"65B int8 compiled: tok/s >= 1.6 x {TODAY_65B_TOK_S}", r and r["tokens_per_s"],
                    verdict(r and r["tokens_per_s"], lambda v: v >= 1.6 * TODAY_65B_TOK_S)])
    for s in sorted({x["seq"] for x in R if x.get("part") == "70b" and x.get("phase") == "slice+forward"}) or [None]:
        r = next((x for x in R if x.get("part") == "70b" and x.get("phase") == "slice+forward" and x["seq"] == s), None)
        targets.append([f"Llama-3.1-70B int8, T={s}: run peak (reserved) GiB <= 78", r and r.get("run_reserved_gib"),
                        verdict(r and r.get("run_reserved_gib"), lambda v: v <= 78)])
    out.append(table(["target", "value", "result"], targets))
    errors = [r for r in results if "error" in r]
    if errors:
        out.append("Not measured: " + "; ".join(f"{r.get('part')} {r.get('w0', '')} {r.get('mode', '')} "
                                                f"{r.get('seq', '')}: {r['error']}" for r in errors))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI

PARTS = ("matmul", "7b", "70b", "65b", "anchor", "more")


def guarded(run: Run, tag: dict, fn) -> bool:
    """fn() with an out-of-memory error logged instead of raised; False if it ran out of memory."""
    try:
        fn()
        return True
    except torch.OutOfMemoryError as e:
        run.log(**tag, error=f"OOM: {str(e).splitlines()[0][:160]}")
        return False
    finally:
        reset()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU, tiny shapes: every code path")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--7b", dest="seven", default=f"bf16:{llama.RECOMPUTE_BUDGET},int8:{llama.RECOMPUTE_BUDGET},"
                   f"bf16:{llama.RECOMPUTE_BUDGET}:exact", help="7B variants W0:mode[:criterion] (mode: a recompute "
                   "budget, nockpt or eager; criterion: run.py's --criterion, default lora; exact's knobs after "
                   "dashes: unfused (without exact_kernel, its torch form), both (both sides' sums), "
                   "SIDEtileBOxBIxWARPSxSTEPS (exact_kernel.TILES[SIDE], SIDE rows, cols or both), e.g. "
                   "exact-rowstile32x64x4x4)")
    p.add_argument("--more", default="int8:0.1,bf16:0.1,bf16:0,bf16:nockpt", help="7B variants if time is left")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "out/bench_scale"))
    p.add_argument("--budget-s", type=float, default=300.0, help="the whole call ends inside this (per-part deadlines)")
    p.add_argument("--anchor", default=".carry/hf_peft_anchor.py", help="the anchor script (bench/README.md)")
    p.add_argument("--anchor-timeout-s", type=float, default=90.0)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (--small: aot_eager, quicker on a CPU)")
    p.add_argument("--summarize", action="store_true",
                   help="only print the tables from --out-dir/results.jsonl (after a run killed by its timeout)")
    opts = p.parse_args()
    if opts.summarize:
        results = read_results(Path(opts.out_dir))
        print(summary(results, next((r for r in results if r.get("part") == "env"), {}).get("command", "?")))
        return
    parts = chosen_parts(opts.only, PARTS)
    if opts.small:
        opts.backend, opts.budget_s = "aot_eager", 1e9
    run = Run(Path(opts.out_dir), opts.budget_s)
    device = "cuda" if torch.cuda.is_available() and not opts.small else "cpu"
    command = " ".join([Path(sys.executable).name] + sys.argv)
    S, T = shapes(opts.small), (32 if opts.small else 2048)
    run.log(part="env", date=datetime.date.today().isoformat(), command=command, torch=torch.__version__,
            device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", small=opts.small, parts=parts,
            alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), recompute_budget=llama.RECOMPUTE_BUDGET)
    need = (lambda s: 1.0) if opts.small else (lambda s: s)  # seconds each part takes on one H100

    rate = None
    if "matmul" in parts:
        rate = run.log(part="matmul", **matmul_rate(device, 256 if opts.small else 8192))["tflops"]
        reset()
    sevens = [("7b", v) for v in opts.seven.split(",") if "7b" in parts]
    sevens += [("more", v) for v in opts.more.split(",") if "more" in parts]
    profiled = set()
    for part in PARTS[1:]:
        if part not in parts:
            continue
        if part in ("7b", "more"):
            for _, v in [x for x in sevens if x[0] == part]:
                tag = dict(part="7b", w0=v.split(":")[0], mode=v.split(":")[1], seq=T,
                           criterion=(v.split(":") + ["lora"])[2])
                first = v not in profiled  # profile each variant's first row
                profiled.add(v)
                if run.fits(need(35)):
                    guarded(run, tag, lambda: run_7b(run, device, S["7b"], T, v, rate, opts.small, opts.backend,
                                                  profile=part == "7b" and first and
                                                  v.split(":")[1] == str(llama.RECOMPUTE_BUDGET)))
                else:
                    run.skip(35, **tag)
        elif part == "anchor":
            script = Path(opts.anchor)
            if opts.small:  # the real anchor needs a GPU: a stand-in with its output format
                script = Path(tempfile.mkdtemp()) / "fake_anchor.py"
                script.write_text(FAKE_ANCHOR)
            if not script.exists():
                run.log(part="anchor", error=f"{script} not found: mkdir -p .carry && cp ../shared/bench/"
                                             "hf_peft_anchor.py .carry/ and carry .carry (bench/README.md)")
            elif run.fits(need(50)):  # about 45 s on one H100 (importing transformers, building 7B, 6 steps)
                run_anchor(run, script, min(opts.anchor_timeout_s, run.left()))
            else:
                run.skip(50, part="anchor")
        elif part == "70b":
            for seq in (T, T // 2):  # a shorter sequence only if the first runs out of memory
                tag = dict(part="70b", w0="int8", mode="eager", seq=seq)
                if not run.fits(need(60)):
                    run.skip(60, **tag)
                    break
                if guarded(run, tag, lambda: run_big(run, device, "70b", S["70b"], seq, True, "eager", True, opts.small,
                                                       opts.backend)):
                    break
        elif part == "65b":
            tag = dict(part="65b", w0="int8", mode=str(llama.RECOMPUTE_BUDGET), seq=T)
            if run.fits(need(65)):
                guarded(run, tag, lambda: run_big(run, device, "65b", S["65b"], T, True, str(llama.RECOMPUTE_BUDGET),
                                                  False, opts.small, opts.backend))
            else:
                run.skip(65, **tag)
    md = summary(run.results, command)
    (run.out_dir / "summary.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
