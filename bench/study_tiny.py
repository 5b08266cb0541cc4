"""Does LoRA-guided pruning work? The ordering claim of the paper's Table 2 (at the same ratio, the LoRA-guided
criterion, Eq. 10, keeps perplexity close to the vanilla full-gradient one, Eq. 3, and well below magnitude
pruning), checked on a real model that runs on a CPU: stories260K (llama2.c, trained on TinyStories).

    python bench/study_tiny.py                                  # the default study (~15 min on 2 CPU cores)
    python bench/study_tiny.py --seeds 0 --steps 20             # a quick look
    python bench/study_tiny.py --heldout --extra="--lam 0.5"    # a tuning variant, scored on held-out TRAIN text

Every configuration is one `run.main([...])` job (prune + fine-tune + slice + save + eval) in its own folder under a
temporary directory; the numbers are read back from its report.json. Criteria lora, vanilla, magnitude and random
at ratios 0.2 and 0.5, three seeds each, the same steps, data order (the seed's) and flags for all; references: the
unpruned model as loaded (--ratio 0 --steps 0) and after the same LoRA fine-tuning (--ratio 0 --steps N).
Fine-tuning reads tinystories-train.txt; perplexity is measured on the whole of tinystories-valid.txt (each story
with its own BOS) and on the first as many tokens of WikiText-2 test. With --heldout the runs instead train on the
first 80% of the train stories and are scored on the last 20%: tuning decisions are made there, never on the
validation text.

Separately, `score_agreement` measures the paper's approximation directly: from one and the same backward it
computes the LoRA-guided and the vanilla group scores of every pruned layer and reports their Spearman rank
correlation, at the first step and after the moving average (Eq. 11) up to the first step that prunes.

Writes <out-dir>/results.md (with <out-dir>/investigation.md, the hand-written account of the held-out tuning runs,
appended when it exists), results.json (every run's numbers and final masks) and ppl_vs_ratio.png (matplotlib, the
`plot` extra), and appends results.md to bench/RESULTS.md (--append-to '' to skip).
"""
import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repo root: run, llama, loraprune, data
import data  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402
import loraprune  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import variants  # noqa: E402

# ----------------------------------------------------------------------------------------------
# settings: what every run shares

CKPT = data.data_dir() / "stories260K.bin"
TRAIN_TEXT = data.data_dir() / "tinystories-train.txt"
VALID_TEXT = data.data_dir() / "tinystories-valid.txt"
CRITERIA = ("lora", "vanilla", "magnitude", "random")  # the default study
VARIANTS = ("lora+l2", "lora-directional", "lora-directional+l2", "exact", "exact+l2")  # --criteria may name these
CRITERION_ORDER = CRITERIA[:1] + VARIANTS + CRITERIA[1:]  # tables and plots: the LoRA-only estimates together
RATIOS = (0.2, 0.5)
STEPS = 60  # optimizer steps of every fine-tuning run: 60 x 16 x 256 = 246k tokens, two passes over the train text
TRAIN_FLAGS = [  # run.py flags shared by every run that trains; the rest are run.py's defaults (LoRA r 8, alpha 16,
    "--batch-size", "16",  # dropout 0.05, lambda 0.9, squared scores, cubic schedule, grad clip 1)
    "--micro-batch-size", "16",  # one forward per step: the model is tiny
    "--seq-len", "256",
    "--lr", "1e-3",  # the paper's 1e-4 is for 7B and thousands of steps; 1e-3 is what stories260K was trained with
    "--prune-every", "2",  # the official 10 is a negligible fraction of its ~40k steps; 2 of 60 keeps the ramp smooth
]
EVAL_FLAGS = ["--eval-seq-len", "512"]  # the model's max_seq_len
HELDOUT_FRACTION = 0.2  # --heldout: the last 20% of the train stories score the tuning runs


# ----------------------------------------------------------------------------------------------
# rank agreement of the LoRA-guided and the vanilla group scores (the paper's approximation, measured)


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two score vectors (n,): Pearson correlation of their ranks (ties broken by
    position, which is harmless for continuous scores)."""
    rx = x.double().argsort().argsort().double()  # (n,) rank of each entry
    ry = y.double().argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def first_pruning_step(model_args, ratio: float, steps: int, every: int, layers: list) -> int:
    """The first optimizer step at which the Pruner (cubic schedule, masks raised every `every` steps) switches a
    group off: the moving average at that step is what decides the first masks."""
    final = loraprune.prune_counts(model_args, ratio, layers, channel_multiple=64)
    for step in range(1, steps + 1):
        fraction = loraprune.cubic_schedule(step, steps)
        if loraprune.counts_at(final, fraction) != loraprune.counts_at(final, 0.0) and step % every == 0:
            return step
    return steps


def unit_scores(pruner: loraprune.Pruner, layer_id: int) -> tuple:
    """(K,) kv-group, (F,) channel and (H,) query-head scores of one unpruned layer from one Pruner.score (one draw
    for the random criterion) of a query-head pruner, whose scores keep the query heads' and the kv heads' sums
    apart: a kv group adds them (loraprune.KVGroups), a query head takes its share with every head live."""
    att, channels = pruner.score(layer_id)  # (H + K,), (F,)
    q_per_kv = pruner.model.args.q_per_kv(layer_id)
    heads, kv = att[:sum(q_per_kv)], att[sum(q_per_kv):]  # (H,), (K,)
    query = variants.query_head_scores(heads, kv, torch.ones_like(heads, dtype=torch.bool), q_per_kv)  # (H,)
    return loraprune.KVGroups().scores(heads, kv, q_per_kv), channels, query


def score_agreement(seed: int, flags: list, rows: Tensor, ratio: float = 0.5, k: Optional[int] = None,
                    ckpt: Path = CKPT, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Fine-tune LoRA on `ckpt` (default stories260K) as run.py would with these flags (AdamW, warmup + cosine lr,
    micro-batch accumulation, grad clip, LoRA rank/alpha/dropout, lambda, square or abs; no masks) and after every
    step score each pruned layer with every criterion from the same backward (W.grad is switched on so Eq. 3 has
    dL/dW; the LoRA gradients exist anyway). rows (N, T+1) are the training rows. Returns, per layer, the Spearman
    correlation with the vanilla scores of the kv-group scores (K,), the channel scores (F,) and the query-head
    scores (H,) of --head-unit query with every head live: raw at step 1, raw at step k, and the moving averages
    (Eq. 11, from zero as the Pruner starts) at step k, where k defaults to the first step the `ratio` run prunes."""
    args = run.build_parser().parse_args(["--ckpt", str(ckpt)] + flags + ["--seed", str(seed)])
    model = formats.load(ckpt, device=device, dtype=dtype)
    layers = loraprune.default_pruned_layers(model.args.n_layers)
    k = k or first_pruning_step(model.args, ratio, args.steps, args.prune_every, layers)
    lora_params = llama.add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, seed=seed)
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    sampler = train.RowSampler(rows.shape[0], seed)  # run.py's data order for this seed
    torch.manual_seed(seed)  # LoRA dropout, as run.py seeds it
    names = ("lora", "magnitude", "random")  # each is compared with vanilla
    # one scorer per criterion, as run.py builds it (vanilla switches dL/dW on; the optimizer never sees W); vanilla
    # last, as it frees W.grad once read
    pruners = {c: loraprune.Pruner(model, ratio=0.0, total_steps=args.steps, unit=variants.QueryHeads(), layers=layers,
                                   criterion=run.make_criterion(c, model, layers, square=args.square, seed=seed))
               for c in names + ("vanilla",)}
    smoothed = {c: [(torch.zeros(model.args.layer_kv_heads[l], device=device),
                     torch.zeros(model.args.layer_hidden_dims[l], device=device),
                     torch.zeros(model.args.layer_n_heads[l], device=device)) for l in layers]
                for c in names + ("vanilla",)}
    out = {}
    model.train()
    for step in range(1, k + 1):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step - 1, args.steps, args.lr)
        batch = rows[sampler.next(args.batch_size)]  # (B, T+1)
        train.backward_batch(model, batch, args.micro_batch_size, device)  # run.py's forward and backward
        torch.nn.utils.clip_grad_norm_(lora_params, args.grad_clip or math.inf)  # as run.py, before the pruner
        with torch.no_grad():
            scores = {c: [unit_scores(pruners[c], l) for l in layers] for c in names + ("vanilla",)}
            for c, per_layer in scores.items():
                smoothed[c] = [tuple(loraprune.ema(p, s, args.lam) for p, s in zip(prev, now))
                               for prev, now in zip(smoothed[c], per_layer)]
        taken = [("step 1", scores)] if step == 1 else []
        taken += [(f"step {k}", scores), (f"EMA at step {k}", smoothed)] if step == k else []
        for when, source in taken:
            for c in names:
                out[f"{c}|{when}"] = [tuple(spearman(s, v) for s, v in zip(mine, theirs))
                                      for mine, theirs in zip(source[c], source["vanilla"])]
        optimizer.step()
        model.zero_grad(set_to_none=True)  # LoRA and W gradients alike
    return {"k": k, "layers": layers, "corr": out}


def agreements(seeds: list, flags: list, tokenizer, train_path=TRAIN_TEXT) -> list:
    """score_agreement for every seed, on the training rows run.py would pack from train_path (a path or a comma
    list of them) with these flags."""
    seq_len = run.build_parser().parse_args(["--ckpt", str(CKPT)] + flags).seq_len
    rows = data.training_tokens([Path(f) for f in str(train_path).split(",")], tokenizer, seq_len)  # (N, T+1)
    return [score_agreement(s, flags, rows) for s in seeds]


# ----------------------------------------------------------------------------------------------
# the runs


def heldout_split(folder: Path) -> tuple[Path, Path]:
    """Split the train stories into the first 80% (tuning train) and the last 20% (tuning eval), as two
    <|endoftext|>-separated files in `folder`."""
    stories = data.read_documents(TRAIN_TEXT)
    cut = round(len(stories) * (1 - HELDOUT_FRACTION))
    paths = folder / "train-head.txt", folder / "train-heldout.txt"
    for path, part in zip(paths, (stories[:cut], stories[cut:])):
        path.write_text("".join(f"{s}\n{data.ENDOFTEXT}\n" for s in part), encoding="utf-8")
    return paths


def criterion_flags(name: str) -> list:
    """run.py flags of a criterion name: a loraprune criterion, '+l2' appended for per-projection L2 normalisation."""
    base = name.removesuffix("+l2")
    return ["--criterion", base, "--normalize" if name.endswith("+l2") else "--no-normalize"]


def configurations(seeds: list, steps: int, criteria: list, ratios: list, references: bool = True) -> list:
    """(name, criterion, ratio, seed, run.py flags) of every run: the references first, then the pruned runs."""
    configs = []
    if references:
        configs += [("unpruned", "-", 0.0, seeds[0], ["--ratio", "0", "--steps", "0"])]
        configs += [("unpruned + LoRA", "-", 0.0, s, ["--ratio", "0", "--steps", str(steps)]) for s in seeds]
    configs += [(c, c, r, s, ["--ratio", str(r), "--steps", str(steps)] + criterion_flags(c))
                for r in ratios for c in criteria for s in seeds]
    return configs


def run_one(argv: list, out: str, threads: Optional[int] = 1) -> dict:
    """One run.main job, its stdout and stderr kept in out/console.txt; returns its report.json (plus wall time).
    threads: torch's CPU threads for it (None = leave them as they are)."""
    if threads is not None:
        torch.set_num_threads(threads)  # measured: 1 is as fast as 2 on stories260K, and no oversubscription
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    console = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        rc = run.main(argv + ["--out", out])
    if rc != 0:
        raise RuntimeError(f"run.main({' '.join(argv)}) returned {rc}:\n{console.getvalue()[-3000:]}")
    (Path(out) / "console.txt").write_text(console.getvalue(), encoding="utf-8")
    report = json.loads((Path(out) / "report.json").read_text())
    pruned = None
    if (Path(out) / "resume.pt").exists():  # the final masks: which kv groups and channels each layer lost
        masks = torch.load(Path(out) / "resume.pt", weights_only=True)["pruner"]["masks"]
        pruned = [((~h).nonzero().flatten().tolist(), (~c).nonzero().flatten().tolist(), h.numel(), c.numel())
                  for h, c in masks]  # per layer: kv groups off, channels off, K, F
    return {"ppl_before": report["ppl_before"], "ppl_after": report["ppl_after"],
            "ratio_achieved": report["ratio_achieved"], "params_after": report["params_after"],
            "final_loss": report["final_loss"], "pruned": pruned, "wall_s": time.time() - t0}


def run_all(configs: list, common: list, extra: list, workdir: Path, jobs: int) -> list:
    """Every configuration through run.main, `jobs` at a time (worker processes of one thread each), in order."""
    jobs_argv = []
    for i, (name, criterion, ratio, seed, flags) in enumerate(configs):
        trains = "--steps" in flags and flags[flags.index("--steps") + 1] != "0"
        argv = common + flags + ["--seed", str(seed)] + (TRAIN_FLAGS + extra if trains else [])
        jobs_argv.append((argv, str(workdir / f"{i:02d}-{name.replace(' ', '')}-{ratio}-s{seed}")))
    results = [None] * len(configs)
    if jobs == 1:  # in this process
        for i, (argv, out) in enumerate(jobs_argv):
            results[i] = run_one(argv, out)
            print(progress_line(configs[i], results[i]), flush=True)
        return results
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, argv, out) for argv, out in jobs_argv]
        for i, future in enumerate(futures):
            results[i] = future.result()
            print(progress_line(configs[i], results[i]), flush=True)
    return results


def progress_line(config, result) -> str:
    name, _, ratio, seed, _ = config
    ppl = "  ".join(f"{label} {v:8.3f}" for label, v in result["ppl_after"].items())
    return f"{name:<16} ratio {ratio:.1f} seed {seed}: {ppl}  ({result['wall_s']:.0f}s)"


# ----------------------------------------------------------------------------------------------
# tables and the plot


def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def summarize(configs: list, results: list) -> dict:
    """{(name, ratio): {eval label: [ppl per seed]}} plus the achieved parameter ratios."""
    groups = {}
    for (name, _, ratio, _, _), res in zip(configs, results):
        g = groups.setdefault((name, ratio), {"ppl": {}, "ratio_achieved": res["ratio_achieved"]})
        for label, v in res["ppl_after"].items():
            g["ppl"].setdefault(label, []).append(v)
    return groups


def fmt(values: list) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def overlap_markdown(configs: list, results: list) -> Optional[str]:
    """How many of the kv groups and channels the vanilla run of the same seed and ratio switched off were also
    switched off by each other criterion (pooled over layers), against what chance gives (the pruned fraction)."""
    runs = {(c[1], c[2], c[3]): r["pruned"] for c, r in zip(configs, results) if r.get("pruned") and c[2] > 0}
    ratios = sorted({ratio for _, ratio, _ in runs})
    criteria = [c for c in CRITERION_ORDER if c != "vanilla" and any(k[0] == c for k in runs)]
    if not any(k[0] == "vanilla" for k in runs) or not criteria:
        return None
    lines = ["Final masks compared with the vanilla run of the same seed: the share of the kv groups / channels "
             "vanilla removed that the criterion removed too (mean ± std over seeds; chance = the removed fraction "
             "of each kind, in brackets).", "",
             "| criterion | " + " | ".join(f"ratio {r} heads | ratio {r} channels" for r in ratios) + " |",
             "| --- | " + " | ".join("--- | ---" for _ in ratios) + " |"]
    for c in criteria:
        cells = []
        for r in ratios:
            seeds = [s for (cc, rr, s) in runs if cc == c and rr == r and ("vanilla", r, s) in runs]
            if not seeds:  # no pair with a vanilla run of the same ratio and seed (a study still running)
                cells += ["-", "-"]
                continue
            for kind in (0, 1):
                shares, chance = [], 0.0
                for s in seeds:
                    mine, ref = runs[(c, r, s)], runs[("vanilla", r, s)]
                    both = sum(len(set(a[kind]) & set(b[kind])) for a, b in zip(mine, ref))
                    shares.append(both / max(1, sum(len(b[kind]) for b in ref)))
                chance = (sum(len(b[kind]) for b in ref)  # removed / all groups of that kind in layers that lost any
                          / max(1, sum(b[2 + kind] for b in ref if b[kind])))
                m, sd = mean_std(shares)
                cells.append(f"{m:.2f} ± {sd:.2f} [{chance:.2f}]")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(groups: dict, labels: list, agreement: Optional[list], meta: dict,
             overlap: Optional[str] = None) -> str:
    lines = [f"- command: `{meta['command']}`", f"- date: {meta['date']}; machine: {meta['machine']}; "
             f"total wall time {meta['wall_s'] / 60:.1f} min ({meta['jobs']} runs at a time, one thread each)",
             f"- model: stories260K (260,032 parameters); fine-tune text: {meta['train']}; "
             f"{meta['steps']} steps; seeds {meta['seeds']}; shared flags `{' '.join(meta['flags'])}`",
             f"- perplexity after slicing, {meta['eval']}; mean ± sample std over seeds", ""]
    lines += ["| model | ratio (params removed) | " + " | ".join(labels) + " |",
              "| --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for (name, ratio), g in groups.items():
        lines.append(f"| {name} | {ratio:.1f} ({g['ratio_achieved']:.1%}) | "
                     + " | ".join(fmt(g["ppl"][label]) for label in labels) + " |")
    if overlap:
        lines += ["", overlap]
    if agreement:
        lines += ["", agreement_markdown(agreement)]
    return "\n".join(lines) + "\n"


def agreement_markdown(agreement: list) -> str:
    """Mean ± std over seeds of the per-layer Spearman correlations with the vanilla scores."""
    k, layers = agreement[0]["k"], agreement[0]["layers"]
    keys = list(agreement[0]["corr"])
    lines = [f"Spearman rank correlation with the vanilla (Eq. 3) group scores, from the same backward, over "
             f"{len(agreement)} seed(s); heads: K = 4 kv groups per layer, channels: F = 172 per layer. "
             f"Step {k} is the first step the default schedule prunes at.", "",
             "| criterion | scores | " + " | ".join(f"layer {l} heads | layer {l} channels" for l in layers)
             + " | mean heads | mean channels |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in layers + ["mean"]) + " |"]
    for key in keys:
        criterion, when = key.split("|")
        cells = []
        for i in range(len(layers) + 1):  # the last: the mean over layers, then over seeds
            for j in range(2):
                per_seed = [a["corr"][key][i][j] if i < len(layers) else
                            sum(c[j] for c in a["corr"][key]) / len(layers) for a in agreement]
                m, s = mean_std(per_seed)
                cells.append(f"{m:+.2f} ± {s:.2f}" if len(agreement) > 1 else f"{m:+.2f}")
        lines.append(f"| {criterion} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict, label: str, criteria: list, path: Path, title: str) -> None:
    """Perplexity vs ratio, one line per criterion with error bars (std over seeds); every line starts from the
    unpruned + LoRA reference at ratio 0; the unpruned model as loaded is a dotted horizontal line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install -e '.[plot]'") from e
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ref = mean_std(groups[("unpruned + LoRA", 0.0)]["ppl"][label])
    for i, c in enumerate(criteria):
        ratios = sorted(r for name, r in groups if name == c)
        stats = [ref] + [mean_std(groups[(c, r)]["ppl"][label]) for r in ratios]
        x = [0.0] + [r + (i - 1.5) * 0.006 for r in ratios]  # a small offset so error bars do not overlap
        ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=c)
    ax.axhline(groups[("unpruned", 0.0)]["ppl"][label][0], color="gray", linestyle=":", label="unpruned, no fine-tune")
    ax.set_yscale("log")
    ax.set_xticks([0.0] + sorted({r for name, r in groups if name in criteria}))
    ax.set_xlabel("ratio (fraction of parameters removed)")
    ax.set_ylabel(f"perplexity, {label} (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the command line


def write_outputs(configs: list, results: list, agreement: Optional[list], meta: dict, out_dir: Path,
                  append_to: str) -> str:
    """results.md (+ investigation.md if present), results.json, ppl_vs_ratio.png (when the references ran), and the
    markdown appended to `append_to` ('' = nowhere). Returns the markdown."""
    groups = summarize(configs, results)
    labels = list(results[0]["ppl_after"])
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(groups, labels, agreement, meta, overlap_markdown(configs, results))
    notes = out_dir / "investigation.md"  # hand-written: what was tried on held-out train text, kept on reruns
    if notes.is_file():
        md += "\n" + notes.read_text(encoding="utf-8")
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    runs = [{"name": c[0], "criterion": c[1], "ratio": c[2], "seed": c[3], **r} for c, r in zip(configs, results)]
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "agreement": agreement}, indent=1))
    criteria = [c for c in CRITERION_ORDER if any(name == c for name, _ in groups)]
    if ("unpruned + LoRA", 0.0) in groups:
        plot(groups, labels[0], criteria, out_dir / "ppl_vs_ratio.png",
             f"stories260K, {meta['steps']} steps, {len(meta['seeds'])} seed(s): {labels[0]}")
    if append_to:
        with open(append_to, "a", encoding="utf-8") as f:
            f.write(f"\n## study_tiny, {meta['date']}: `{meta['command']}`\n\n{md}")
    return md


def drop_workdir(workdir: Path, keep: bool) -> None:
    """The run folders go when the study ends, unless --keep-runs asked to keep them (then say where)."""
    if keep:
        print(f"run folders kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default %(default)s)")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="comma list (default %(default)s; also "
                   f"{', '.join(VARIANTS)}: '+l2' = --normalize)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma list (default %(default)s)")
    p.add_argument("--extra", default="", help="more run.py flags for every run that trains, e.g. '--lam 0.5 --abs'")
    p.add_argument("--train", help="comma list of fine-tuning files in the data folder instead of "
                   "tinystories-train.txt; 'wiki.valid.raw,ptb.valid.txt' is the off-domain protocol (issue 16): the "
                   "model's own domain, TinyStories valid, is then what the fine-tuning text is not")
    p.add_argument("--heldout", action="store_true", help="train on the first 80%% of the train stories, score "
                   "on the last 20%% (for tuning; never tune on tinystories-valid)")
    p.add_argument("--no-references", dest="references", action="store_false", help="skip the unpruned runs")
    p.add_argument("--no-agreement", dest="agreement", action="store_false", help="skip the rank correlations")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default %(default)s)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "study"), help="where results.md, results.json and "
                   "ppl_vs_ratio.png go (default bench/study)")
    p.add_argument("--append-to", default="", help="also append results.md to this file (default: none; "
                   "bench/RESULTS.md is one current document, edited by hand)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (printed) instead of deleting them")
    p.add_argument("--agreement-only", action="store_true", help="run only the rank correlations (with --extra, "
                   "--steps, --seeds) and print their table")
    p.add_argument("--render", help="run nothing: rewrite the outputs from this results.json (e.g. after editing "
                   "investigation.md)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        configs = [(r["name"], r["criterion"], r["ratio"], r["seed"], None) for r in saved["runs"]]
        md = write_outputs(configs, saved["runs"], saved["agreement"], saved["meta"], out_dir, args.append_to)
        print(md)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    extra = args.extra.split()
    if args.references and not args.agreement_only and importlib.util.find_spec("matplotlib") is None:
        p.error("the plot (drawn when the references run) needs matplotlib: pip install -e '.[plot]', or pass "
                "--no-references")  # before the runs, not after 20 minutes of them
    t_start = time.time()
    torch.set_num_threads(1)
    if args.agreement_only:
        tokenizer = data.Tokenizer(data.find_tokenizer(CKPT, 512))
        print(agreement_markdown(agreements(seeds, TRAIN_FLAGS + extra + ["--steps", str(args.steps)], tokenizer)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="study_tiny-"))
    try:
        if args.heldout:
            train_path, eval_path = heldout_split(workdir)
            evals, train_label = [str(eval_path)], "first 80% of tinystories-train.txt"
        else:
            train_label = args.train or TRAIN_TEXT.name
            train_path = ",".join(str(data.data_dir() / f) for f in train_label.split(","))
            evals = [str(VALID_TEXT), "wikitext2"]
        tokenizer = data.Tokenizer(data.find_tokenizer(CKPT, 512))
        n_eval = data.eval_tokens(evals[0], tokenizer)[1].numel()  # all of the first set; the others capped to it
        common = ["--ckpt", str(CKPT), "--data", str(train_path), "--eval", ",".join(evals),
                  "--eval-tokens", str(n_eval)] + EVAL_FLAGS
        configs = configurations(seeds, args.steps, criteria, ratios, args.references)
        print(f"{len(configs)} runs, {args.jobs} at a time, in {workdir}", flush=True)
        results = run_all(configs, common, extra, workdir, args.jobs)
        agreement = None
        if args.agreement:
            agreement = agreements(seeds, TRAIN_FLAGS + extra + ["--steps", str(args.steps)], tokenizer, train_path)
        meta = {"command": "python bench/study_tiny.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
                "date": datetime.date.today().isoformat(), "machine": f"CPU, {os.cpu_count()} cores "
                f"({platform.processor() or platform.machine()}), torch {torch.__version__}",
                "wall_s": time.time() - t_start, "jobs": args.jobs, "steps": args.steps, "seeds": seeds,
                "train": train_label, "flags": TRAIN_FLAGS + extra,
                "eval": f"{n_eval:,} tokens of each eval set in windows of 512"}
        md = write_outputs(configs, results, agreement, meta, out_dir, args.append_to)
        print("\n" + md)
    finally:
        drop_workdir(workdir, args.keep_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
