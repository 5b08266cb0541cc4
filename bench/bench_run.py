"""One device call at LLaMA-7B shape for what issues 15, 16 and 18 ask to be measured after their code is in:
the mission run's peak against its training peak, decode speed, the exact hook criterion, self-distillation.

Parts, in this order (--only picks some; a part that would not end inside --budget-s is logged as skipped, and a
second call with --only runs what was skipped):
  mission  `python run.py --ckpt <random Meta folder at 7B shape> --ratio 0.2 --steps 2 --batch-size 2
           --micro-batch-size 2 --seq-len 2048 --eval "" --out ...` in a subprocess: report.json's
           peak_gpu_memory_gib against the training peak (the last step's progress line), and the process's host RSS
           sampled every 20 ms, split at run.py's 'training' and 'saved' lines (loading / training / slice + save)
  decode   tokens/s of generate.generate(model, [BOS], N, temperature=0) for the dense model and models pruned 20% /
           50% (per-layer sizes from loraprune.prune_counts, channel_multiple 64), eager; one warm-up generate of the
           same length first
  exact    one pruning step (bench_7b.train_step: checkpointing, T=2048, criterion every step) with
           criterion 'exact' (variants.GradientTap, the backward-hook criterion), and with exact_sample=64 (its
           sampled-columns variant), beside criterion 'lora', eager
  distill  the micro-step (train.backward_batch, T=2048, checkpointing) with distill=0 and distill=0.5 (one more
           no-grad forward of the frozen teacher + the chunked distillation loss), eager, then compiled
  decode-compiled  generate(compiled=True): each one-token step is generate.decode_graph, the whole model as one
           graph replayed as a CUDA graph, on one set of caches (kv_caches, 256 positions) for the warm-up and the
           timed runs; recompiles during the timed runs counted
  exact-compiled   the 'exact' / 'lora' step with compiled blocks
Code that is not merged yet (generate.generate, train.backward_batch with distill) is logged as
'not available', and the other parts run.

Writes $OUT (--out-dir): results.jsonl (as it goes), run_report.json and run_log.txt of the mission run,
summary.md; prints the short table last.

  python bench/bench_run.py --small              # CPU: every code path at a tiny shape (the mission run included)
  # one H100, carrying .carry (bench/README.md: .carry/data holds tokenizer.model and tinystories-train.txt)
  PYTHONUNBUFFERED=1 timeout 545 python3 bench/bench_run.py --out-dir $OUT --budget-s 510; \\
      python3 bench/bench_run.py --out-dir $OUT --summarize
"""
import argparse
import importlib
import json
import os
import re
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
sys.path.insert(0, str(ROOT))  # the repo root: llama, loraprune, train
import llama  # noqa: E402
import loraprune  # noqa: E402
from generate import kv_caches  # noqa: E402
from bench_7b import Device, pruned_args, random_model, train_step, write_meta_checkpoint  # noqa: E402
from common import Run, chosen_parts, read_results, table  # noqa: E402

# ----------------------------------------------------------------------------------------------
# shapes


def model_args(small: bool) -> llama.ModelArgs:
    if small:
        return llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=512, max_seq_len=256)
    return llama.ModelArgs()  # LLaMA-7B


def optional(module: str, attr: str):
    """module.attr if the merged code has it, else None (the part then logs 'not available')."""
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


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


def run_mission(run: Run, dev: Device, args: llama.ModelArgs, small: bool, data_dir: Path, timeout_s: float):
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
        wrote = write_meta_checkpoint(args, folder, dev)
        dev.reset()
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


def run_decode(run: Run, dev: Device, args: llama.ModelArgs, small: bool, compiled: bool, need_s: float):
    generate = optional("generate", "generate")
    new_tokens, reps = (16, 2) if small else (128, 3)
    for ratio in (0.0, 0.2, 0.5):
        a = args if ratio == 0 else pruned_args(args, ratio, 1 if small else 64)
        tag = dict(part="decode", ratio=ratio, compiled=compiled, new_tokens=new_tokens)
        if generate is None:
            run.log(**tag, error="not available: generate.generate is not in this checkout (issue 15 item 3)")
            return
        if not run.fits(need_s):
            run.skip(need_s, **tag)
            continue
        dev.reset()
        model = random_model(a, dev.type).eval()
        # one set of caches for every call: the CUDA graph replays on their addresses
        kw = dict(compiled=True, caches=kv_caches(model, 256)) if compiled else {}
        t0 = time.perf_counter()
        generate(model, [1], new_tokens, temperature=0, **kw)  # warm-up (compiled: compiles the decode graph)
        dev.sync()
        warm_s = time.perf_counter() - t0
        graphs = graph_count()
        times = []
        for _ in range(reps):
            dev.sync()
            t = time.perf_counter()
            out = generate(model, [1], new_tokens, temperature=0, **kw)
            dev.sync()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        run.log(**tag, params_b=round(llama.count_params(model) / 1e9, 3), generated=len(out), s_median=round(s, 3),
                tokens_per_s=round(len(out) / s, 1), ms_per_token=round(1e3 * s / len(out), 2),
                warmup_s=round(warm_s, 1), recompiles_in_timed=graph_count() - graphs,
                peak_gib=dev.peak_gib())
        del model
        torch._dynamo.reset()
        dev.reset()


# ----------------------------------------------------------------------------------------------
# part: the exact hook criterion beside 'lora'


def run_exact(run: Run, dev: Device, args: llama.ModelArgs, small: bool, compiled: bool, need_s: float):
    """'lora', 'exact' and 'exact' with exact_sample=64, the sampled-columns variant for accumulated micro-batches."""
    T = 32 if small else 2048
    warm, timed = (1, 1) if small else (2, 4)
    for criterion, sample in (("lora", None), ("exact", None), ("exact", 8 if small else 64)):
        tag = dict(part="criterion", criterion=criterion + (f" exact_sample={sample}" if sample else ""),
                   compiled=compiled, seq=T)
        if not run.fits(need_s):
            run.skip(need_s, **tag)
            continue
        dev.reset()
        try:
            r = train_step(args, dev, T, int8=False, ckpt=True, criterion=criterion, warm=warm, timed=timed,
                           compiled=compiled, exact_sample=sample)
            run.log(**tag, step_s=r["s_per_step_median"], microstep_s=r["microstep_s"],
                    criterion_s=r["criterion_s_median"], peak_gib=r["peak_gib"], weights_gib=r["weights_gib"],
                    tokens_per_s_paper=r["tokens_per_s_paper"], mask_updates=r["mask_updates"], steps=r["steps"])
        except torch.OutOfMemoryError:
            run.log(**tag, error="OOM")
        finally:
            torch._dynamo.reset()
            dev.reset()


# ----------------------------------------------------------------------------------------------
# part: self-distillation's extra time


def run_distill(run: Run, dev: Device, args: llama.ModelArgs, small: bool, need_s: float):
    """One model: micro-steps with distill 0 and 0.5, eager; then its blocks compiled and the same again."""
    backward_batch = optional("train", "backward_batch")
    T = 32 if small else 2048
    warm, timed = (1, 1) if small else (2, 4)
    import inspect
    if backward_batch is None or "distill" not in inspect.signature(backward_batch).parameters:
        run.log(part="distill", error="not available: train.backward_batch(..., distill=) is not in this checkout "
                                      "(issue 16 item 3)")
        return
    dev.reset()
    model = random_model(args, dev.type)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)
    model.checkpoint_activations = True
    # masks as in training (all-ones tensors from the Pruner): the teacher forward clears them, as it will in run.py
    loraprune.Pruner(model, ratio=0.2, total_steps=100, every=1)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows = torch.randint(0, args.vocab_size, (1, T + 1), device=dev.type,
                         generator=torch.Generator(dev.type).manual_seed(1))  # (1, T+1)
    model.train()
    for compiled in (False, True):
        if compiled:
            llama.compile_blocks(model)
        for alpha in (0.0, 0.5):
            tag = dict(part="distill", compiled=compiled, alpha=alpha, seq=T)
            if not run.fits(need_s):
                run.skip(need_s, **tag)
                continue
            graphs = graph_count()
            times, w = [], warm + (2 if compiled else 0)  # compiled: student and (alpha > 0) teacher graphs
            if dev.cuda:
                torch.cuda.reset_peak_memory_stats()
            for i in range(w + timed):
                dev.sync()
                t = time.perf_counter()
                backward_batch(model, rows, 1, dev.type, distill=alpha)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dev.sync()
                if i >= w:
                    times.append(time.perf_counter() - t)
            run.log(**tag, microstep_s=round(statistics.median(times), 4), peak_gib=dev.peak_gib(),
                    graphs_compiled=graph_count() - graphs, steps=f"{w}+{timed}")
    del model, opt, params
    torch._dynamo.reset()
    dev.reset()


# ----------------------------------------------------------------------------------------------
# the tables


def summary(results: list, device: str, command: str) -> str:
    R = [r for r in results if not r.get("error")]
    find = lambda **kw: next((r for r in R if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    out = [f"bench_run, device: {device}, torch {torch.__version__}; command: `{command}`; "
           f"wall {results[-1].get('t_s', 0) if results else 0:.0f} s"]
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
    for r in R:
        if r.get("part") == "decode":
            d = find(part="decode", ratio=0.0, compiled=r["compiled"])
            rows.append([r["ratio"], "yes" if r["compiled"] else "no", r["params_b"], r["tokens_per_s"],
                         r["ms_per_token"], round(r["tokens_per_s"] / d["tokens_per_s"], 2) if d else None,
                         r["recompiles_in_timed"], r["warmup_s"], r["peak_gib"]])
    if rows:
        out.append("Decode, greedy, 1-token prompt, generate.generate:\n\n" + table(
            ["ratio", "compiled", "params B", "tok/s", "ms/token", "/ dense tok/s", "recompiles (timed)",
             "warm-up s", "peak GiB"], rows))
        for c in (False, True):
            d = find(part="decode", ratio=0.0, compiled=c)
            for ratio in (0.2, 0.5):
                r = find(part="decode", ratio=ratio, compiled=c)
                if d and r:
                    targets.append([f"{int(ratio * 100)}%-pruned decodes faster than dense, compiled={c}",
                                    round(r["tokens_per_s"] / d["tokens_per_s"], 2),
                                    "PASS" if r["tokens_per_s"] > d["tokens_per_s"] else "FAIL"])
    rows = [[r["criterion"], "yes" if r["compiled"] else "no", r["microstep_s"], r["criterion_s"], r["step_s"],
             r["peak_gib"], r["tokens_per_s_paper"]] for r in R if r.get("part") == "criterion"]
    if rows:
        out.append("Criterion 'exact' (backward hooks) beside 'lora', one step, ckpt, T=2048:\n\n" + table(
            ["criterion", "compiled", "fwd+bwd+AdamW s", "update() s", "step s", "peak GiB", "tok/s @128"], rows))
    rows = []
    for r in R:
        if r.get("part") == "distill":
            base = find(part="distill", compiled=r["compiled"], alpha=0.0)
            rows.append([r["alpha"], "yes" if r["compiled"] else "no", r["microstep_s"], r["peak_gib"],
                         round(r["microstep_s"] - base["microstep_s"], 4) if base else None,
                         round(r["microstep_s"] / base["microstep_s"], 3) if base else None, r["graphs_compiled"]])
    if rows:
        out.append("Self-distillation, micro-step (train.backward_batch + AdamW), ckpt, T=2048:\n\n" + table(
            ["alpha", "compiled", "s", "peak GiB", "extra s", "/ no distill", "graphs compiled"], rows))
    if targets:
        out.append(table(["target", "value", "result"], targets))
    errors = [r for r in results if r.get("error")]
    if errors:
        out.append("Not measured: " + "; ".join(
            f"{r.get('part')} {' '.join(f'{k}={r[k]}' for k in ('ratio', 'criterion', 'alpha', 'compiled') if k in r)}"
            f": {r['error']}" for r in errors))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI

PARTS = ("mission", "decode", "exact", "distill", "decode-compiled", "exact-compiled")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU, tiny shape: every code path")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "out/bench_run"))
    p.add_argument("--budget-s", type=float, default=510.0)
    p.add_argument("--data-dir", default=".carry/data", help="holds tokenizer.model and tinystories-train.txt")
    p.add_argument("--mission-timeout-s", type=float, default=240.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--summarize", action="store_true", help="only print the tables from --out-dir/results.jsonl")
    opts = p.parse_args()
    if opts.summarize:
        results = read_results(Path(opts.out_dir))
        env = next((r for r in results if r.get("part") == "env"), {})
        print(summary(results, env.get("device", "?"), env.get("command", "?")), flush=True)
        return
    parts = chosen_parts(opts.only, PARTS)
    dev, run = Device(opts.device), Run(Path(opts.out_dir), opts.budget_s)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    args = model_args(opts.small)
    run.log(part="env", device=dev.name(), torch=torch.__version__, small=opts.small, parts=parts, command=command)
    need = (lambda s: 1.0) if opts.small else (lambda s: s)  # expected seconds of one measurement on an H100
    data_dir = Path(opts.data_dir) if Path(opts.data_dir).is_absolute() else ROOT / opts.data_dir
    if opts.small and not data_dir.exists():  # here: the shared data folder (run.py's own default)
        data_dir = Path(os.environ.get("LORAPRUNE_DATA") or next(
            (str(p / "shared" / "data") for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "data").exists()),
            ".carry/data"))
    if "mission" in parts:
        if run.fits(need(opts.mission_timeout_s + 60)):
            run_mission(run, dev, args, opts.small, data_dir, opts.mission_timeout_s)
        else:
            run.skip(opts.mission_timeout_s + 60, part="mission")
    if "decode" in parts:
        run_decode(run, dev, args, opts.small, compiled=False, need_s=need(15))
    if "exact" in parts:
        run_exact(run, dev, args, opts.small, compiled=False, need_s=need(20))
    if "distill" in parts:
        run_distill(run, dev, args, opts.small, need_s=need(45))
    if "decode-compiled" in parts:
        run_decode(run, dev, args, opts.small, compiled=True, need_s=need(60))
    if "exact-compiled" in parts:
        run_exact(run, dev, args, opts.small, compiled=True, need_s=need(70))
    md = summary(run.results, dev.name(), command)
    (run.out_dir / "summary.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
