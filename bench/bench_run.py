"""One device call at LLaMA-7B shape for what the run around the training step costs: the mission run's peak against
its training peak, decode speed, the exact criterion, self-distillation, 2048-token forwards of sliced models beside
Hugging Face's, and loading a Meta checkpoint.

Parts, in this order (--only picks some; a part that would not end inside --budget-s is logged as skipped, and a
second call with --only runs what was skipped):
  mission  `python run.py --ckpt <random Meta folder at 7B shape> --ratio 0.2 --steps 2 --batch-size 2
           --micro-batch-size 2 --seq-len 2048 --eval "" --out ...` in a subprocess: report.json's
           peak_gpu_memory_gib against the training peak (the last step's progress line), and the process's host RSS
           sampled every 20 ms, split at run.py's 'training' and 'saved' lines (loading / training / slice + save)
  decode   tokens/s of generate.generate(model, [BOS], N, temperature=0) for the dense model and models pruned 20% /
           50% (per-layer sizes from loraprune.prune_counts, channel_multiple 64), eager; one warm-up generate first
  exact    one pruning step (common.step_fn: checkpointing, T=2048, criterion every step) with run.py's criteria
           'lora', 'exact' (variants.ExactSums: Eq. 3's sums from each projection's own backward) and 'exact' with
           --exact-sample 64, eager and then compiled (run.py's default: llama.compile_blocks, recompute budget)
  distill  the micro-step with distill 0 and 0.5 (one more no-grad forward of the frozen teacher and the chunked
           distillation loss), eager, then compiled
  forward  a 2048-token forward (no grad) of the dense model (bf16, int8; eager and compiled) and of models sliced
           at 20% / 50% (channel multiples 1, 8, 64, 128; compiled at 64), beside HF LlamaForCausalLM at the sliced
           models' mean uniform shapes
  load     a two-shard Meta checkpoint written once, then formats.load (bf16, int8) in a fresh process each: wall
           time, host memory over the baseline (sampled VmRSS), GPU peak
  decode-compiled  generate(compiled=True): each one-token step is generate.decode_graph, the whole model as one
           graph replayed as a CUDA graph, on one set of caches (kv_caches, 256 positions); recompiles counted

Writes $OUT (--out-dir): results.jsonl (as it goes), run_report.json and run_log.txt of the mission run,
summary.md; prints the short table last.

  python bench/bench_run.py --small              # CPU: every code path at a tiny shape (the mission run included)
  # one H100, carrying .carry (bench/README.md: .carry/data holds tokenizer.model and tinystories-train.txt)
  PYTHONUNBUFFERED=1 timeout 545 python3 bench/bench_run.py --out-dir $OUT --budget-s 510; \\
      python3 bench/bench_run.py --out-dir $OUT --summarize
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo root: llama, loraprune, formats, generate
import formats  # noqa: E402
import llama  # noqa: E402
from common import (Run, build_random, chosen_parts, gib, lora_model, peaks, pruned_args, pruning_steps,  # noqa: E402
                    read_results, reset, step_fn, sync, table, timed)
from generate import generate, kv_caches  # noqa: E402


def model_args(small: bool) -> llama.ModelArgs:
    if small:
        return llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=512, max_seq_len=256)
    return llama.ModelArgs()  # LLaMA-7B


# ----------------------------------------------------------------------------------------------
# a random Meta checkpoint (the mission run and the load part read it)


@torch.no_grad()
def write_meta_checkpoint(args: llama.ModelArgs, folder: Path, device: str, n_shards: int = 2) -> dict:
    """Meta's layout from random bf16 weights: params.json and consolidated.0k.pth, each tensor split on
    formats.meta_shard_dim (norms replicated). One shard at a time is held in host memory; every tensor is drawn on
    the device from its own seed, so each shard redraws the same full tensor and keeps its slice."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "norm_eps": args.norm_eps,
              "vocab_size": -1, **({"multiple_of": 256} if args == llama.ModelArgs() else {"hidden_dim": args.hidden_dim})}
    (folder / "params.json").write_text(json.dumps(params))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in llama.Transformer(args).state_dict().items()}
    t0 = time.perf_counter()
    for s in range(n_shards):
        shard = {}
        for i, (name, shape) in enumerate(shapes.items()):
            full = torch.empty(shape, device=device, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            else:
                full.normal_(0, 0.02, generator=torch.Generator(device).manual_seed(i))
            dim = formats.meta_shard_dim(name)
            shard[name] = (full if dim is None else full.chunk(n_shards, dim=dim)[s]).contiguous().cpu()
        shard["rope.freqs"] = torch.ones(args.head_dim // 2)  # Meta ships it; the loader drops it
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
        del shard
    sizes = [p.stat().st_size for p in sorted(folder.glob("consolidated.*.pth"))]
    return dict(write_s=round(time.perf_counter() - t0, 2), shard_gib=[gib(x) for x in sizes])


# ----------------------------------------------------------------------------------------------
# part: the mission run, in a subprocess, with its host memory sampled


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch(cmd: list, timeout_s: float, markers: tuple, env: dict) -> dict:
    """Run cmd; sample its VmRSS every 20 ms and note when a stdout line first contains each marker. Returns the
    output, exit status, and the RSS peak before the first marker, between markers, and after the last."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen, lines, samples, t0 = {}, [], [], time.perf_counter()

    def read():
        for line in proc.stdout:
            lines.append(line)
            for m in markers:
                if m not in seen and m in line:
                    seen[m] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = None
    while status is None:
        samples.append((time.perf_counter() - t0, rss_kib(proc.pid)))
        try:
            status = proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                status = f"killed after {timeout_s:.0f} s"
    reader.join(timeout=5)
    bounds = [0.0] + [seen[m] for m in markers if m in seen] + [float("inf")]
    names = ["before " + markers[0]] + [f"from {m}" for m in markers if m in seen]
    phases = {}
    for name, lo, hi in zip(names, bounds, bounds[1:]):
        phases[name] = round(max((kib for t, kib in samples if lo <= t < hi), default=0) / 2**20, 2)
    return dict(status=status, wall_s=round(time.perf_counter() - t0, 1), output="".join(lines),
                rss_peak_gib=round(max((k for _, k in samples), default=0) / 2**20, 2), rss_by_phase_gib=phases,
                markers_s={m: round(s, 1) for m, s in seen.items()})


def run_mission(run: Run, device: str, args: llama.ModelArgs, small: bool, data_dir: Path, timeout_s: float):
    # LLaMA's 32000-token SentencePiece model; the --small model has llama2.c's 512-token one
    tokenizer, data = data_dir / ("tok512.model" if small else "tokenizer.model"), data_dir / "tinystories-train.txt"
    missing = [str(p) for p in (tokenizer, data) if not p.exists()]
    if missing:
        run.log(part="mission", error=f"missing {missing}: mkdir -p .carry/data && cp ../shared/data/"
                                      "{tokenizer.model,tinystories-train.txt} .carry/data/ (bench/README.md)")
        return
    work = Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        folder = work / "meta"
        wrote = write_meta_checkpoint(args, folder, device)
        reset()
        run.log(part="mission", phase="write_meta", **wrote)
        seq = 64 if small else 2048
        cmd = [sys.executable, str(ROOT / "run.py"), "--ckpt", str(folder), "--tokenizer", str(tokenizer),
               "--data", str(data), "--ratio", "0.2", "--steps", "2", "--batch-size", "2", "--micro-batch-size",
               "2", "--seq-len", str(seq), "--eval", "", "--out", str(work / "out")]
        if small:
            cmd += ["--device", "cpu"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        w = watch(cmd, timeout_s, ("training ", "saved "), env)
        out = w.pop("output")
        (run.out_dir / "run_log.txt").write_text(out[-200_000:])
        report_path = work / "out" / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        if report:
            shutil.copy(report_path, run.out_dir / "run_report.json")
        # the training peak: the last step's progress line ('... | 15.9 GiB ...', max allocated so far)
        steps = [ln for ln in re.split(r"[\r\n]", out) if re.search(r"step \d+/\d+", ln)]
        train_peak = None
        if steps and (m := re.search(r"\| ([\d.]+) GiB", steps[-1])):
            train_peak = float(m.group(1))
        train_peak = report.get("training_peak_gpu_memory_gib", train_peak)
        run_peak = report.get("peak_gpu_memory_gib")
        run.log(part="mission", phase="run", command=" ".join(["python", "run.py"] + cmd[2:]), **w,
                run_peak_gib=run_peak and round(run_peak, 2), training_peak_gib=train_peak,
                excess_gib=round(run_peak - train_peak, 2) if run_peak is not None and train_peak is not None else None,
                compile=report.get("compile"), compile_warmup_s=report.get("compile_warmup_s"),
                step_time_s=report.get("step_time_s"), ratio_achieved=report.get("ratio_achieved"),
                error=None if report else f"no report.json ({w['status']}): see run_log.txt")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# part: decode speed


def graph_count() -> int:
    """Graphs torch.compile has produced so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def run_decode(run: Run, device: str, args: llama.ModelArgs, small: bool, compiled: bool, need_s: float):
    new_tokens, reps = (16, 2) if small else (128, 3)
    for ratio in (0.0, 0.2, 0.5):
        tag = dict(part="decode", ratio=ratio, compiled=compiled, new_tokens=new_tokens)
        if not run.fits(need_s):
            run.skip(need_s, **tag)
            continue
        model = build_random(args if ratio == 0 else pruned_args(args, ratio, 1 if small else 64), device).eval()
        # one set of caches for every call: the CUDA graph replays on their addresses
        kw = dict(compiled=True, caches=kv_caches(model, 256)) if compiled else {}
        warm_s = timed(lambda: generate(model, [1], new_tokens, temperature=0, **kw))  # compiled: compiles
        graphs = graph_count()
        times = [timed(lambda: generate(model, [1], new_tokens, temperature=0, **kw)) for _ in range(reps)]
        s = statistics.median(times)
        run.log(**tag, params_b=round(llama.count_params(model) / 1e9, 3), s_median=round(s, 3),
                tokens_per_s=round(new_tokens / s, 1), ms_per_token=round(1e3 * s / new_tokens, 2),
                warmup_s=round(warm_s, 1), recompiles_in_timed=graph_count() - graphs, **peaks())
        model = kw = None
        reset()


# ----------------------------------------------------------------------------------------------
# parts: the exact criterion beside Eq. 10, and self-distillation


def run_exact(run: Run, device: str, args: llama.ModelArgs, small: bool, need_s: float):
    """run.py's criteria 'lora' (Eq. 10), 'exact' and 'exact' with --exact-sample 64, eager and compiled (run.py's
    default on a GPU: checkpointed blocks under the recompute budget): one pruning step each."""
    T = 32 if small else 2048
    for mode in ("eager", str(llama.RECOMPUTE_BUDGET)):
        for criterion, sample in (("lora", None), ("exact", None), ("exact", 8 if small else 64)):
            tag = dict(part="criterion", criterion=criterion + (f" exact_sample={sample}" if sample else ""), seq=T,
                       compiled=mode != "eager")
            if not run.fits(need_s):
                run.skip(need_s, **tag)
                continue
            model, params, pruner = lora_model(args, device, False, mode, criterion=criterion, exact_sample=sample)
            r = pruning_steps(step_fn(model, params, pruner, T), T, warm=(1 if small else 2) + 2 * (mode != "eager"),
                              n=1 if small else 4, at_warm=peaks)
            run.log(**tag, **r, **peaks())
            del model, params, pruner
            reset()


def run_distill(run: Run, device: str, args: llama.ModelArgs, small: bool, need_s: float):
    """Micro-steps with distill 0 and 0.5 on one model, eager; then its blocks compiled and the same again."""
    T = 32 if small else 2048
    model, params, pruner = lora_model(args, device, False, "eager")
    for compiled in (False, True):
        if compiled:
            llama.compile_blocks(model)
        for alpha in (0.0, 0.5):
            tag = dict(part="distill", compiled=compiled, alpha=alpha, seq=T)
            if not run.fits(need_s):
                run.skip(need_s, **tag)
                continue
            graphs = graph_count()
            r = pruning_steps(step_fn(model, params, pruner, T, distill=alpha), T,
                              warm=(1 if small else 2) + 2 * compiled, n=1 if small else 4, at_warm=peaks)
            run.log(**tag, **r, **peaks(), graphs_compiled=graph_count() - graphs)
    del model, params, pruner
    reset()


# ----------------------------------------------------------------------------------------------
# part: 2048-token forwards, dense and sliced, ours and Hugging Face's


def hf_model(args: llama.ModelArgs, heads: int, hidden: int, device: str):
    """HF LlamaForCausalLM built the anchor's way (bf16, under the device context) at uniform sizes (attributes set
    after construction: transformers 5 refuses hidden_size % heads != 0, and a head-pruned model keeps head_dim)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=hidden,
                    num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                    num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, max_position_embeddings=args.max_seq_len,
                    rms_norm_eps=args.norm_eps, attn_implementation="sdpa")
    c.num_attention_heads = c.num_key_value_heads = heads
    with torch.device(device):
        return LlamaForCausalLM(c).to(torch.bfloat16).eval()


def run_forward(run: Run, device: str, args: llama.ModelArgs, small: bool, need_s: float):
    T, reps = (32, 2) if small else (2048, 10)
    x = torch.randint(0, args.vocab_size, (1, T), device=device, generator=torch.Generator(device).manual_seed(2))
    jobs = [("dense", 0.0, None, False, c) for c in (False, True)] + [("dense", 0.0, None, True, c) for c in (False, True)]
    jobs += [("sliced", r, m, False, False) for r in (0.2, 0.5) for m in (1, 8, 64, 128)]
    jobs += [("sliced", r, 64, False, True) for r in (0.2, 0.5)] + [("hf", r, None, False, False) for r in (0.2, 0.5)]
    for kind, ratio, multiple, int8, compiled in jobs:
        tag = dict(part="forward", model=kind, ratio=ratio, channel_multiple=multiple, w0="int8" if int8 else "bf16",
                   compiled=compiled, seq=T)
        if not run.fits(need_s):
            run.skip(need_s, **tag)
            continue
        a = args if kind == "dense" else pruned_args(args, ratio, multiple or 64)
        if kind == "hf":  # the sliced models' mean sizes, uniform
            heads = round(sum(k * a.n_rep for k in a.layer_kv_heads) / a.n_layers)
            hidden = round(sum(a.layer_hidden_dims) / a.n_layers)
            model, tag = hf_model(args, heads, hidden, device), {**tag, "heads": heads, "hidden": hidden}
            forward = lambda: model(input_ids=x)  # noqa: E731
        else:
            model = build_random(a, device, int8)
            if compiled:
                llama.compile_blocks(model)  # the warm-up forwards compile
            forward = lambda: model(x)  # noqa: E731
        with torch.no_grad():
            for _ in range(3):
                forward()
            s = statistics.median([timed(forward) for _ in range(reps)])
        run.log(**tag, params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3), s_median=round(s, 4),
                **peaks())
        model = forward = None
        reset()


# ----------------------------------------------------------------------------------------------
# part: loading a two-shard Meta checkpoint in a fresh process


def rss_now() -> dict:
    """VmRSS, RssAnon, RssFile of this process in KiB (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def load_child(folder: str, device: str, int8: bool):
    """In a fresh process: the baseline RSS once torch and the CUDA context are up, then formats.load, with a 5 ms
    poller sampling resident memory (VmRSS, and its anonymous and file-backed parts). ru_maxrss is not used: Linux
    carries it over fork and exec, so the child starts with the parent's high-water mark."""
    if device == "cuda":
        torch.zeros(1, device="cuda")
        sync()
    base, peak, stop = rss_now(), rss_now(), threading.Event()

    def poll():
        while not stop.is_set():
            for k, v in rss_now().items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    model = formats.load(folder, device=device, dtype=torch.bfloat16, int8=int8)
    sync()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    extra = {k: round((peak.get(k, 0) - base.get(k, 0)) / 2**20, 3) for k in ("VmRSS", "RssAnon", "RssFile")}
    print(json.dumps(dict(load_s=round(wall, 2), params_b=round(llama.count_params(model) / 1e9, 3),
                          rss_baseline_gib=round(base.get("VmRSS", 0) / 2**20, 3), host_extra_gib=extra["VmRSS"],
                          anon_extra_gib=extra["RssAnon"], file_extra_gib=extra["RssFile"],
                          ru_maxrss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                          **peaks())), flush=True)


def run_load(run: Run, device: str, args: llama.ModelArgs, need_s: float):
    if not run.fits(need_s):
        run.skip(need_s, part="load")
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        run.log(part="load", phase="write", **write_meta_checkpoint(args, folder, device))
        reset()
        shard_gib = gib(max(p.stat().st_size for p in folder.glob("consolidated.*.pth")))
        for int8 in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--load-child", str(folder), "--device", device]
            r = subprocess.run(cmd + (["--int8"] if int8 else []), capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            tag = dict(part="load", w0="int8" if int8 else "bf16", shards=2, shard_gib=shard_gib)
            if r.returncode or not lines:
                run.log(**tag, error=f"child exit {r.returncode}: {r.stderr.strip()[-600:]}")
            else:
                run.log(**tag, **json.loads(lines[-1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the tables


def summary(results: list, command: str) -> str:
    R = [r for r in results if not r.get("error")]
    find = lambda **kw: next((r for r in R if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    env = next((r for r in results if r.get("part") == "env"), {})
    out = [f"bench_run, {env.get('date')}, device: {env.get('device')}, torch {env.get('torch')}; command: "
           f"`{command}`; wall {results[-1].get('t_s', 0) if results else 0:.0f} s"]
    targets = []
    m = find(part="mission", phase="run")
    if m:
        out.append("Mission run (7B shape, random Meta folder): " + table(
            ["run peak GiB", "training peak GiB", "excess GiB", "host RSS peak GiB", "RSS by phase GiB", "compile",
             "compile warm-up s", "step s", "wall s"],
            [[m["run_peak_gib"], m["training_peak_gib"], m["excess_gib"], m["rss_peak_gib"],
              ", ".join(f"{k}: {v}" for k, v in m["rss_by_phase_gib"].items()), m["compile"], m["compile_warmup_s"],
              m["step_time_s"], m["wall_s"]]]))
        v = m["excess_gib"]
        targets.append(["7B run peak <= training peak + 1 GiB", v,
                        "not measured" if v is None else ("PASS" if v <= 1 else "FAIL")])
    rows = []
    for r in (r for r in R if r.get("part") == "decode"):
        d = find(part="decode", ratio=0.0, compiled=r["compiled"])
        rows.append([r["ratio"], "yes" if r["compiled"] else "no", r["params_b"], r["tokens_per_s"], r["ms_per_token"],
                     round(r["tokens_per_s"] / d["tokens_per_s"], 2) if d else None, r["recompiles_in_timed"],
                     r["warmup_s"], r.get("peak_gib")])
    if rows:
        out.append("Decode, greedy, 1-token prompt, generate.generate:\n\n" + table(
            ["ratio", "compiled", "params B", "tok/s", "ms/token", "/ dense tok/s", "recompiles (timed)",
             "warm-up s", "peak GiB"], rows))
    rows = [[r["criterion"], "yes" if r.get("compiled") else "no", r["microstep_s"], r["criterion_s"],
             r.get("peak_gib"), r["tokens_per_s_paper"]] for r in R if r.get("part") == "criterion"]
    if rows:
        out.append("Criteria, one pruning step, checkpointing, T=2048:\n\n" + table(
            ["criterion", "compiled", "fwd+bwd+AdamW s", "update() s", "peak GiB", "tok/s @128"], rows))
    rows = []
    for r in (r for r in R if r.get("part") == "distill"):
        base = find(part="distill", compiled=r["compiled"], alpha=0.0)
        rows.append([r["alpha"], "yes" if r["compiled"] else "no", r["microstep_s"], r.get("peak_gib"),
                     round(r["microstep_s"] - base["microstep_s"], 4) if base else None,
                     round(r["microstep_s"] / base["microstep_s"], 3) if base else None, r["graphs_compiled"]])
    if rows:
        out.append("Self-distillation, micro-step (train.backward_batch + AdamW), checkpointing, T=2048:\n\n" + table(
            ["alpha", "compiled", "s", "peak GiB", "extra s", "/ no distill", "graphs compiled"], rows))
    rows = []
    for r in (r for r in R if r.get("part") == "forward"):
        d = find(part="forward", model="dense", w0="bf16", compiled=r["compiled"])
        rows.append([r["model"], r["w0"], "yes" if r["compiled"] else "no", r["ratio"], r["channel_multiple"],
                     r["params_b"], r["s_median"], round(r["s_median"] / d["s_median"], 3) if d else None,
                     r.get("peak_gib")])
    if rows:
        out.append("Forward of 2048 tokens, no grad (hf: LlamaForCausalLM at the sliced models' mean uniform "
                   "shape):\n\n" + table(["model", "W0", "compiled", "ratio", "channel multiple", "params B", "s",
                                          "/ our dense bf16", "peak GiB"], rows))
    rows = [[r["w0"], r["load_s"], r["shard_gib"], r["rss_baseline_gib"], r["host_extra_gib"], r["anon_extra_gib"],
             r["file_extra_gib"], r.get("peak_gib"), r.get("allocated_gib")]
            for r in R if r.get("part") == "load" and "load_s" in r]
    if rows:
        out.append("Loading a two-shard Meta checkpoint (formats.load, a fresh process each):\n\n" + table(
            ["W0", "load s", "shard GiB", "RSS before GiB", "host extra GiB", "anon extra GiB", "file extra GiB",
             "GPU peak GiB", "GPU model GiB"], rows))
    if targets:
        out.append(table(["target", "value", "result"], targets))
    errors = [r for r in results if r.get("error")]
    if errors:
        out.append("Not measured: " + "; ".join(
            f"{r.get('part')} {' '.join(f'{k}={r[k]}' for k in ('ratio', 'criterion', 'alpha', 'compiled', 'model') if k in r)}"
            f": {r['error']}" for r in errors))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI

PARTS = ("mission", "decode", "exact", "distill", "forward", "load", "decode-compiled")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU, tiny shape: every code path")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "out/bench_run"))
    p.add_argument("--budget-s", type=float, default=510.0)
    p.add_argument("--data-dir", default=".carry/data", help="holds tokenizer.model and tinystories-train.txt")
    p.add_argument("--mission-timeout-s", type=float, default=240.0)
    p.add_argument("--summarize", action="store_true", help="only print the tables from --out-dir/results.jsonl")
    p.add_argument("--load-child", help=argparse.SUPPRESS)  # the load part's fresh process
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=argparse.SUPPRESS)
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.load_child:
        return load_child(opts.load_child, opts.device, opts.int8)
    if opts.summarize:
        results = read_results(Path(opts.out_dir))
        print(summary(results, next((r for r in results if r.get("part") == "env"), {}).get("command", "?")))
        return
    parts = chosen_parts(opts.only, PARTS)
    run = Run(Path(opts.out_dir), 1e9 if opts.small else opts.budget_s)
    device = "cpu" if opts.small else opts.device
    command = " ".join([Path(sys.executable).name] + sys.argv)
    args = model_args(opts.small)
    run.log(part="env", date=time.strftime("%Y-%m-%d"), command=command, torch=torch.__version__,
            device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", small=opts.small, parts=parts)
    need = (lambda s: 1.0) if opts.small else (lambda s: s)  # expected seconds of one measurement on an H100
    data_dir = Path(opts.data_dir) if Path(opts.data_dir).is_absolute() else ROOT / opts.data_dir
    if opts.small and not data_dir.exists():  # here: the shared data folder (run.py's own default)
        data_dir = Path(os.environ.get("LORAPRUNE_DATA") or next(
            (str(p / "shared" / "data") for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "data").exists()),
            ".carry/data"))
    if "mission" in parts:
        if run.fits(need(opts.mission_timeout_s + 60)):
            run_mission(run, device, args, opts.small, data_dir, opts.mission_timeout_s)
        else:
            run.skip(opts.mission_timeout_s + 60, part="mission")
    if "decode" in parts:
        run_decode(run, device, args, opts.small, compiled=False, need_s=need(15))
    if "exact" in parts:
        run_exact(run, device, args, opts.small, need_s=need(20))
    if "distill" in parts:
        run_distill(run, device, args, opts.small, need_s=need(45))
    if "forward" in parts:
        run_forward(run, device, args, opts.small, need_s=need(12))
    if "load" in parts:
        run_load(run, device, args, need_s=need(90))
    if "decode-compiled" in parts:
        run_decode(run, device, args, opts.small, compiled=True, need_s=need(60))
    md = summary(run.results, command)
    (run.out_dir / "summary.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
