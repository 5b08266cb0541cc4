"""One device call: how close to the hardware a LoRA step runs, and the paper's headline (LLaMA-65B pruned on one
80 GB GPU) measured at shape with random weights (issue 18, items 3, 5, 6).

Parts, in this order (--only picks some; each has a deadline inside --budget-s, a part that would not finish in time
is logged as skipped):
  matmul   the card's bf16 rate: torch.matmul of 8192 x 8192 x 8192, median of 20 products timed with CUDA events
  anchor   the HF+PEFT anchor (.carry/hf_peft_anchor.py, bench/README.md) in a subprocess with a timeout
  7b       our LoRA micro-step at LLaMA-7B shape, 2048 tokens: compiled blocks with and without checkpointing, eager
           with checkpointing (bench_7b.train_step), with MFU from the FLOP count (formula below)
  big      LLaMA-65B and Llama-2-70B with int8 W0, LLaMA-13B bf16 and int8: the model built layer by layer on the GPU
           from random weights (no file), one full pruning step (forward, backward, Eq. 10 criterion, mask update,
           AdamW) at 2048 tokens with checkpointing, eager; then the masks at the final 20%, run.py's slicing
           (loraprune.slice_model in place: block by block, an int8 model stays int8) and a 2048-token forward of the
           sliced model. Peak GPU memory per phase.
  compiled65  if time is left: the 65B int8 step again with compiled blocks (a fresh build; steps only)

FLOPs of one LoRA micro-step (T tokens, frozen W, LoRA rank r on all seven projections; N = matmul weights of the
blocks + the output head, N_lora = LoRA parameters, L layers, C model dim):
  useful   = 4·N·T (forward 2NT, backward dL/dx 2NT; no dL/dW: W is frozen) + 6·N_lora·T + 6·L·T²·C (causal attention:
             forward 2·L·T²·C for QKᵀ and PV over the lower triangle, backward twice that)
  hardware = useful + what activation checkpointing recomputes: 2·N_blocks·T + 2·N_lora·T + 2·L·T²·C
MFU = FLOPs / micro-step time / the matmul rate measured in the same call. (Flash attention's own recomputation of
QKᵀ in backward is not counted in either.)

Writes $OUT (--out-dir): results.jsonl (one JSON object per measurement, written as it comes), anchor.log,
summary.md (the tables); prints the short table last.

  python bench/bench_scale.py --small                                  # CPU: every code path at tiny shapes
  # one H100, carrying .carry (bench/README.md); the second command prints the tables even if the first was killed
  PYTHONUNBUFFERED=1 timeout 545 python3 bench/bench_scale.py --out-dir $OUT --budget-s 510; \\
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
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: llama, loraprune
import llama  # noqa: E402
import loraprune  # noqa: E402
from bench_7b import Device, is_int8, meta_model, timed_steps, train_step  # noqa: E402  (bench/ is on sys.path when run as a script)

GIB = 2**30
PAPER_ACCUM = 128  # the paper's batch 128 of micro-batch 1: the criterion runs once per 128 micro-steps

# ----------------------------------------------------------------------------------------------
# shapes


def shapes(small: bool) -> dict:
    """name -> ModelArgs. LLaMA-13B / 65B as Meta's params.json give them; Llama-2-70B with GQA (8 kv heads) and its
    MLP width 28672. --small: tiny shapes with the same structure (GQA for '70b')."""
    if small:
        tiny = dict(vocab_size=256, max_seq_len=64)
        return {"7b": llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, **tiny),
                "13b": llama.ModelArgs(dim=160, n_layers=5, n_heads=5, hidden_dim=320, **tiny),
                "65b": llama.ModelArgs(dim=256, n_layers=6, n_heads=4, hidden_dim=704, **tiny),
                "70b": llama.ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, hidden_dim=896, **tiny)}
    return {"7b": llama.ModelArgs(),
            "13b": llama.ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
            "65b": llama.ModelArgs(dim=8192, n_layers=80, n_heads=64, hidden_dim=22016),
            "70b": llama.ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672)}


def block_matmul_params(args: llama.ModelArgs) -> int:
    D, C = args.head_dim, args.dim
    return sum(C * D * (2 * sum(args.q_per_kv(l)) + 2 * args.layer_kv_heads[l]) + 3 * C * args.layer_hidden_dims[l]
               for l in range(args.n_layers))


def lora_params(args: llama.ModelArgs, r: int = 8) -> int:
    D, C = args.head_dim, args.dim
    total = 0
    for l in range(args.n_layers):
        H, K, Fw = sum(args.q_per_kv(l)), args.layer_kv_heads[l], args.layer_hidden_dims[l]
        total += r * ((C + H * D) * 2 + (C + K * D) * 2 + (C + Fw) * 3)  # wq, wo; wk, wv; w1, w3, w2
    return total


def step_flops(args: llama.ModelArgs, T: int, r: int = 8) -> dict:
    """The module docstring's FLOP count of one LoRA micro-step (batch 1, T tokens)."""
    n_blocks = block_matmul_params(args)
    n = n_blocks + args.dim * args.vocab_size  # + the output head (the embedding is a lookup)
    n_lora = lora_params(args, r)
    attn_fwd = 2 * args.n_layers * T * T * args.n_heads * args.head_dim  # causal: half of 4·L·T²·(H·D)
    useful = 4 * n * T + 6 * n_lora * T + 3 * attn_fwd
    recompute = 2 * n_blocks * T + 2 * n_lora * T + attn_fwd
    return dict(useful=useful, hardware=useful + recompute, no_recompute=useful)


# ----------------------------------------------------------------------------------------------
# logging and the time budget


class Run:
    """Results in order, each also appended to results.jsonl at once (a killed call still leaves them), and the
    time budget: `fits(seconds)` says whether a part expected to take that long still ends inside it."""

    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir, self.budget_s, self.start = out_dir, budget_s, time.perf_counter()
        self.results = []
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "results.jsonl", "a")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def log(self, **kw) -> dict:
        kw["t_s"] = round(self.elapsed(), 1)
        self.results.append(kw)
        line = json.dumps(kw)
        print(line, flush=True)
        self.jsonl.write(line + "\n")
        self.jsonl.flush()
        return kw

    def skip(self, part: str, need_s: float, **tag):
        self.log(part=part, **tag, error=f"skipped: needs ~{need_s:.0f} s, {self.left():.0f} s left")


def gib(x: int) -> float:
    return round(x / GIB, 2)


# ----------------------------------------------------------------------------------------------
# part: the card's bf16 matmul rate


def matmul_rate(dev: Device, n: int, reps: int = 20, warm: int = 5) -> dict:
    """TFLOP/s of torch.matmul on (n, n) bf16 random normal operands (three input pairs in turn, so no product reads
    what the last one left in L2): the median of `reps` products, each timed with CUDA events (host clock on CPU)."""
    g = torch.Generator(dev.type).manual_seed(0)
    dtype = torch.bfloat16
    pairs = [(torch.randn(n, n, device=dev.type, dtype=dtype, generator=g),
              torch.randn(n, n, device=dev.type, dtype=dtype, generator=g)) for _ in range(3)]
    for i in range(warm):
        torch.matmul(*pairs[i % 3])
    times = []
    for i in range(reps):
        a, b = pairs[i % 3]
        if dev.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return dict(n=n, reps=reps, s_median=round(s, 6), tflops=round(2 * n**3 / s / 1e12, 1),
                tflops_min_time=round(2 * n**3 / min(times) / 1e12, 1))


# ----------------------------------------------------------------------------------------------
# part: the anchor, in its own process


def run_anchor(run: Run, script: Path, timeout_s: float) -> list:
    """Run the HF+PEFT anchor with a timeout; its JSON lines (those printed before a timeout too) go to anchor.log
    and are returned."""
    log_path = run.out_dir / "anchor.log"
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s)
        out, err, status = r.stdout, r.stderr, f"exit {r.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timeout after {timeout_s:.0f} s"
    log_path.write_text(out + ("\n--- stderr ---\n" + err[-4000:] if err.strip() else ""))
    lines = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    run.log(part="anchor", status=status, wall_s=round(time.perf_counter() - t0, 1), lines=len(lines))
    for x in lines:
        run.log(part="anchor_line", **x)
    return lines


FAKE_ANCHOR = """import json
print(json.dumps({"torch": "x", "transformers": "x", "peft": "x", "gpu": "cpu (fake anchor for --small)"}))
for mode, s in (("lora", 0.29), ("lora_ckpt", 0.42)):
    print(json.dumps({"bench": "train_step", "stack": "hf+peft", "mode": mode, "seq": 2048, "micro_batch": 1,
                      "weights_gib": 12.7, "peak_gib": 14.3, "s_per_step_median": s, "tokens_per_s": 2048 / s}))
"""

# ----------------------------------------------------------------------------------------------
# part: our 7B micro-step, with MFU


def run_7b(run: Run, dev: Device, args: llama.ModelArgs, T: int, rate_tflops, small: bool):
    warm, timed = (1, 2) if small else (2, 6)
    configs = [("compiled", True, True, 75), ("compiled", False, True, 70), ("eager", True, False, 20)]
    for label, ckpt, compiled, need in configs:
        tag = dict(part="7b", config=f"{label}-{'ckpt' if ckpt else 'nockpt'}", seq=T)
        need = 1 if small else need
        if not run.fits(need):
            run.skip("7b", need, **tag)
            continue
        dev.reset()
        t0 = time.perf_counter()
        try:
            r = train_step(args, dev, T, int8=False, ckpt=ckpt, criterion="lora", warm=warm, timed=timed,
                           compiled=compiled)
        except torch.OutOfMemoryError:
            run.log(**tag, error="OOM")
            continue
        finally:
            torch._dynamo.reset()
            dev.reset()
        fl = step_flops(args, T)
        flops_hw = fl["hardware"] if ckpt else fl["no_recompute"]
        micro = r["microstep_s"]
        run.log(**tag, wall_s=round(time.perf_counter() - t0, 1), microstep_s=micro,
                criterion_s=r["criterion_s_median"], peak_gib=r["peak_gib"], weights_gib=r["weights_gib"],
                tokens_per_s=round(T / micro, 1), tokens_per_s_paper=r["tokens_per_s_paper"],
                useful_tflop=round(fl["useful"] / 1e12, 2), hardware_tflop=round(flops_hw / 1e12, 2),
                useful_tflops=round(fl["useful"] / micro / 1e12, 1), hardware_tflops=round(flops_hw / micro / 1e12, 1),
                mfu_useful=round(fl["useful"] / micro / 1e12 / rate_tflops, 3) if rate_tflops else None,
                mfu_hardware=round(flops_hw / micro / 1e12 / rate_tflops, 3) if rate_tflops else None,
                steps=r["steps"], mask_updates=r["mask_updates"])


# ----------------------------------------------------------------------------------------------
# part: 13B / 65B / 70B, built on the GPU layer by layer


INT8_SCALE = 0.02 / (127 / 3**0.5)  # uniform int8 in [-127, 127] has std 127/sqrt(3): W then has std 0.02


@torch.no_grad()
def build_random(args: llama.ModelArgs, device: str, int8: bool, seed: int = 0) -> llama.Transformer:
    """The model on the meta device, then every tensor drawn on `device` one module at a time: bf16 normal(0, 0.02),
    norms 1; with int8, the seven block projections are drawn as int8 directly (uniform in [-127, 127], one scale
    per row giving std 0.02), so no float copy of a projection ever exists. Memory and time do not depend on the
    values."""
    model = meta_model(args, int8)
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if is_int8(module):
            q = torch.randint(-127, 128, (module.out_features, module.in_features), device=device, dtype=torch.int8,
                              generator=g)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scales = torch.full((module.out_features,), INT8_SCALE, device=device)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
            t.fill_(1.0) if isinstance(module, llama.RMSNorm) else t.normal_(0, 0.02, generator=g)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"still on the meta device: {left[:4]}"
    return model


def big_model(run: Run, dev: Device, name: str, args: llama.ModelArgs, int8: bool, T: int, small: bool,
              compiled: bool = False):
    """Build, one pruning step (1 warm-up + timed steps; the criterion every step), then (eager only) final masks
    at 20%, slicing in place and a sliced forward. Logs one record per phase."""
    tag = dict(part="big", model=name, w0="int8" if int8 else "bf16", compiled=compiled, seq=T)
    warm, timed = (1, 1) if small else (1, 2)
    if compiled:
        warm += 1  # the first step compiles
    phases = {}

    def phase(label):
        dev.sync()
        if dev.cuda:
            phases[label] = dict(peak_gib=gib(torch.cuda.max_memory_allocated()),
                                 reserved_peak_gib=gib(torch.cuda.max_memory_reserved()),
                                 allocated_gib=gib(torch.cuda.memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        else:
            phases[label] = {}

    dev.reset()
    t0 = time.perf_counter()
    model = build_random(args, dev.type, int8)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)  # fp32 adapters on the weights' device
    model.checkpoint_activations = True
    if compiled:
        llama.compile_blocks(model)
    build_s = time.perf_counter() - t0
    phase("build")
    n_params = llama.count_params(model)
    total_steps = 100  # every step inside the cubic ramp with every=1: the masks change in each timed step
    pruner = loraprune.Pruner(model, ratio=0.2, total_steps=total_steps, every=1,
                              channel_multiple=1 if small else 64)
    first = int(pruner.warmup * total_steps) + 1
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(dev.type).manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (1, T), device=dev.type, generator=g)  # (B, T)
    targets = torch.randint(0, args.vocab_size, (1, T), device=dev.type, generator=g)  # (B, T)
    fb, crit, adam, _ = timed_steps(model, pruner, opt, tokens, targets, first, warm, timed, dev,
                                    at_warm=lambda: phase("warmup"))
    phase("train")
    micro = statistics.median(fb) + statistics.median(adam)
    c = statistics.median(crit)
    fl = step_flops(args, T)
    run.log(**tag, phase="train", params_b=round(n_params / 1e9, 3), build_s=round(build_s, 1),
            weights_gib=phases["build"].get("allocated_gib"), microstep_s=round(micro, 3),
            forward_backward_s=round(statistics.median(fb), 3), adamw_s=round(statistics.median(adam), 3),
            criterion_s=round(c, 3), tokens_per_s=round(T / micro, 1),
            tokens_per_s_paper=round(PAPER_ACCUM * T / (PAPER_ACCUM * micro + c), 1),
            hardware_tflops=round(fl["hardware"] / micro / 1e12, 1),
            step_peak_gib=max(phases["warmup"].get("peak_gib", 0), phases["train"].get("peak_gib", 0)) or None,
            step_reserved_gib=max(phases["warmup"].get("reserved_peak_gib", 0),
                                  phases["train"].get("reserved_peak_gib", 0)) or None, sparsity=round(pruner.sparsity(), 4),
            steps=f"{warm}+{timed}", **{f"{k}_{kk}": v for k, d in phases.items() for kk, v in d.items()})
    if compiled:
        del model, params, pruner, opt
        return
    # the masks at the final 20% from the scores so far, then what run.py does after training
    masks = pruner.next_masks(pruner.final_counts)
    del opt, pruner, params
    dev.reset()
    t0 = time.perf_counter()
    model = loraprune.slice_model(model, masks, dtype=torch.bfloat16, in_place=True)  # run.py's slicing
    dev.sync()
    slice_s = time.perf_counter() - t0
    phase("slice")
    n_sliced = llama.count_params(model)
    fwd = []
    with torch.no_grad():
        for i in range(1 + (1 if small else 3)):
            dev.sync()
            t = time.perf_counter()
            model(tokens)
            dev.sync()
            if i:
                fwd.append(time.perf_counter() - t)
    phase("forward")
    peak = max((d.get("peak_gib", 0) for d in phases.values()), default=None)
    reserved = max((d.get("reserved_peak_gib", 0) for d in phases.values()), default=None)
    run.log(**tag, phase="slice+forward", params_b=round(n_params / 1e9, 3), sliced_params_b=round(n_sliced / 1e9, 3),
            kept=round(n_sliced / n_params, 4), slice_s=round(slice_s, 1),
            sliced_forward_s=round(statistics.median(fwd), 3),
            **{f"{k}_{kk}": v for k, d in phases.items() if k in ("slice", "forward") for kk, v in d.items()},
            run_peak_gib=peak if dev.cuda else None, run_reserved_peak_gib=reserved if dev.cuda else None)
    del model


# ----------------------------------------------------------------------------------------------
# the tables


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def summary(run: Run, dev: Device, command: str, device_name: str = None) -> str:
    R = [r for r in run.results if "error" not in r]
    find = lambda **kw: next((r for r in R if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    mm = find(part="matmul")
    anchor = {r["mode"]: r for r in R if r.get("part") == "anchor_line" and r.get("bench") == "train_step"
              and r.get("seq") == 2048 and "error" not in r}
    out = [f"bench_scale, {datetime.datetime.now().isoformat(timespec='seconds')}, device: {device_name or dev.name()}, "
           f"torch {torch.__version__}; command: `{command}`; wall {run.results[-1].get('t_s') if run.results else 0:.0f} s",
           f"bf16 matmul {mm['n']}^3: {mm['tflops']} TFLOP/s (median of {mm['reps']}, CUDA events)" if mm else
           "bf16 matmul: not measured"]
    rows = []
    for r in R:
        if r.get("part") == "7b":
            a = anchor.get("lora_ckpt" if r["config"].endswith("-ckpt") else "lora")
            rows.append([r["config"], r["microstep_s"], r["peak_gib"], r["tokens_per_s"], r["useful_tflops"],
                         r["mfu_useful"], r["hardware_tflops"], r["mfu_hardware"], r["criterion_s"],
                         a and a["s_per_step_median"], a and a["peak_gib"],
                         round(a["s_per_step_median"] / r["microstep_s"], 2) if a else None])
    if rows:
        out.append("LLaMA-7B LoRA micro-step (fwd + bwd + AdamW), T=2048, bf16; useful = 4NT + 6·N_lora·T + "
                   "6·L·T²·C, hardware = useful + checkpoint recompute (2·N_blocks·T + 2·N_lora·T + 2·L·T²·C)\n\n"
                   + table(["config", "s", "peak GiB", "tok/s", "useful TFLOP/s", "MFU useful", "hw TFLOP/s",
                            "MFU hw", "criterion s", "anchor s", "anchor GiB", "anchor / ours"], rows))
    rows = []
    for r in R:
        if r.get("part") == "big" and r.get("phase") == "train":
            s = find(part="big", model=r["model"], w0=r["w0"], compiled=r["compiled"], phase="slice+forward") or {}
            rows.append([r["model"], r["w0"], "yes" if r["compiled"] else "no", r["params_b"], r["weights_gib"],
                         r["microstep_s"], r["criterion_s"], r["tokens_per_s"], r["tokens_per_s_paper"],
                         r.get("step_peak_gib"), r.get("step_reserved_gib"), s.get("slice_peak_gib"),
                         s.get("sliced_params_b"), s.get("sliced_forward_s"), s.get("forward_peak_gib"),
                         s.get("run_peak_gib"), s.get("run_reserved_peak_gib")])
    if rows:
        out.append("Pruning step (ckpt, T=2048, criterion every step) -> 20% slice in place -> sliced forward\n\n"
                   + table(["model", "W0", "compiled", "params B", "weights GiB", "micro-step s", "criterion s",
                            "tok/s", "tok/s @128", "step peak GiB", "step reserved GiB", "slice peak GiB",
                            "sliced B", "sliced fwd s", "fwd peak GiB", "run peak GiB", "run reserved GiB"], rows))
    targets = []
    verdict = lambda v, ok: "not measured" if v is None else ("PASS" if ok(v) else "FAIL")  # noqa: E731
    r = find(part="7b", config="compiled-ckpt")
    if r:
        targets.append(["7B ckpt LoRA micro-step, T=2048, compiled: MFU (hardware count) >= 0.60", r["mfu_hardware"],
                        verdict(r["mfu_hardware"], lambda v: v >= 0.6)])
        targets.append(["the same: peak GiB <= 16", r["peak_gib"],
                        verdict(r["peak_gib"], lambda v: v <= 16)])
    for name in ("65b", "70b"):
        r = find(part="big", model=name, w0="int8", compiled=False, phase="slice+forward")
        oom = any(x.get("part") == "big" and x.get("model") == name and not x.get("compiled")
                  and "OOM" in str(x.get("error")) for x in run.results)
        v = r and r.get("run_reserved_peak_gib")
        targets.append([f"{name} int8: run peak (reserved) GiB <= 78 (step, slice, sliced forward)", v,
                        "FAIL (OOM)" if oom else verdict(v, lambda v: v <= 78)])
    if targets:
        out.append(table(["target", "value", "result"], targets))
    errors = [r for r in run.results if "error" in r]
    if errors:
        out.append("Not measured: " + "; ".join(f"{r.get('part')} {r.get('model', r.get('config', ''))} "
                                                f"{r.get('w0', '')}: {r['error']}" for r in errors))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI

PARTS = ("matmul", "anchor", "7b", "big", "compiled65")


def read_results(out_dir: Path) -> list:
    """The measurements a run wrote to out_dir/results.jsonl, one dict per line (--summarize reads them back)."""
    return [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines() if x.strip()]


def chosen_parts(only: str, known: tuple, device: str) -> list:
    """--only as a list of known part names; ValueError for an unknown part or a cuda device torch cannot see."""
    parts = [x.strip() for x in only.split(",") if x.strip()]
    bad = sorted(set(parts) - set(known))
    if bad:
        raise ValueError(f"--only: unknown part(s) {bad}; expected some of {known}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --small on the CPU")
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU, tiny shapes: every code path")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "out/bench_scale"))
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole call ends inside this (per-part deadlines)")
    p.add_argument("--anchor", default=".carry/hf_peft_anchor.py", help="the anchor script (bench/README.md)")
    p.add_argument("--anchor-timeout-s", type=float, default=150.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--summarize", action="store_true",
                   help="only print the tables from --out-dir/results.jsonl (after a run killed by its timeout)")
    opts = p.parse_args()
    if opts.summarize:
        run = Run(Path(opts.out_dir), 0)
        run.results = read_results(run.out_dir)
        env = next((r for r in run.results if r.get("part") == "env"), {})
        print(summary(run, Device("cpu"), env.get("command", "?"), env.get("device")), flush=True)
        return
    parts = chosen_parts(opts.only, PARTS, opts.device)
    dev, run = Device(opts.device), Run(Path(opts.out_dir), opts.budget_s)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    S, T = shapes(opts.small), (32 if opts.small else 2048)
    run.log(part="env", device=dev.name(), torch=torch.__version__, small=opts.small, parts=parts, command=command,
            alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    # time each part is expected to take on one H100 (s); --small: 1 s each
    need = (lambda s: 1.0) if opts.small else (lambda s: s)

    rate = None
    if "matmul" in parts:
        r = run.log(part="matmul", **matmul_rate(dev, 256 if opts.small else 8192))
        rate = r["tflops"]
        dev.reset()  # the anchor's process wants the memory
    if "anchor" in parts:
        script = Path(opts.anchor)
        if opts.small and not dev.cuda:  # the real anchor needs a GPU: a stand-in with its output format
            script = Path(tempfile.mkdtemp()) / "fake_anchor.py"
            script.write_text(FAKE_ANCHOR)
        if not script.exists():
            run.log(part="anchor", error=f"{script} not found: mkdir -p .carry && cp ../shared/bench/"
                                         "hf_peft_anchor.py .carry/ and carry .carry (bench/README.md)")
        elif run.fits(need(opts.anchor_timeout_s) + 60):
            run_anchor(run, script, opts.anchor_timeout_s)
        else:
            run.skip("anchor", opts.anchor_timeout_s)
    if "7b" in parts:
        run_7b(run, dev, S["7b"], T, rate, opts.small)
    if "big" in parts:
        # headline first; expected: build ~10 s, 3 steps of ~6 s, slicing ~15 s, forwards ~5 s
        for name, int8, est in (("65b", True, 70), ("70b", True, 75), ("13b", False, 30), ("13b", True, 35)):
            tag = dict(part="big", model=name, w0="int8" if int8 else "bf16", compiled=False)
            if not run.fits(need(est)):
                run.skip("big", est, **tag)
                continue
            try:
                big_model(run, dev, name, S[name], int8, T, opts.small)
            except torch.OutOfMemoryError as e:
                run.log(**tag, error=f"OOM: {str(e).splitlines()[0][:200]}")
            dev.reset()
    if "compiled65" in parts:
        tag = dict(part="big", model="65b", w0="int8", compiled=True)
        if not run.fits(need(150)):
            run.skip("compiled65", 150, **tag)
        else:
            try:
                big_model(run, dev, "65b", S["65b"], True, T, opts.small, compiled=True)
            except torch.OutOfMemoryError as e:
                run.log(**tag, error=f"OOM: {str(e).splitlines()[0][:200]}")
            torch._dynamo.reset()
            dev.reset()
    md = summary(run, dev, command)
    (run.out_dir / "summary.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
