"""How well does each LoRA-only estimate rank groups like the full gradient does? From one and the same backward
per step, every pruned layer is scored by the vanilla criterion (Eq. 3, dL/dW) and by each estimate: Eq. 10 as
written ('lora'), the direction-aware split ('lora-directional'), the backward-hook criterion ('exact'), each
with and without per-projection L2 normalisation; printed as Spearman rank correlations with vanilla, per
projection (each projection's share of Eq. 4: wq/wk/wv/w1/w3 by rows, wo/w2 by columns) and per group (kv groups,
query heads, channels), raw at chosen steps and after the moving average (Eq. 11) at the last one.

    python bench/agreement.py                                   # stories260K on CPU, study_tiny's settings
    python bench/agreement.py --micro-batch-size 4              # with accumulation: 'exact' sums micro-batches
    python bench/agreement.py --ckpt out/smol/model --tokenizer x.gguf --data a.txt,b.txt --extra "..."  # any model

Training is run.py's (AdamW, warmup + cosine lr, accumulation, LoRA-only clipping, masks all on): nothing is pruned,
so every step's scores come from the same unpruned model for every criterion. Vanilla is the reference as the
Pruner computes it (plain Eq. 4 sums, no normalisation); per-projection agreement does not depend on normalisation.
"""
import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import data  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402
import loraprune  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
import variants  # noqa: E402
from study_tiny import CKPT, TRAIN_FLAGS, TRAIN_TEXT, first_pruning_step, mean_std, spearman  # noqa: E402

ESTIMATES = ("lora", "lora-directional", "exact")  # compared with vanilla; each also with L2 normalisation
PARTS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
UNITS = ("kv groups", "query heads", "channels")


def rank_agreement(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation, NaN when either vector is constant (e.g. the direction-aware column part while B = 0:
    nothing to rank)."""
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    return spearman(x, y)


def projection_parts(sums: dict, head_dim: int) -> dict:
    """Each projection's share of Eq. 4 per unit, as Pruner.score forms it: wq and wo (columns) per query head, wk and
    wv per kv head, w1, w3 and w2 (columns) per channel."""
    def per_head(v):
        return v.view(-1, head_dim).sum(1)
    return {"wq": per_head(sums["wq"][0]), "wo": per_head(sums["wo"][1]), "wk": per_head(sums["wk"][0]),
            "wv": per_head(sums["wv"][0]), "w1": sums["w1"][0], "w3": sums["w3"][0], "w2": sums["w2"][1]}


def group_scores(pruner: loraprune.Pruner, layer_id: int) -> tuple:
    """(K,) kv-group, (H,) query-head (with every head live) and (F,) channel scores from one Pruner.score of a
    query-head pruner (its scores keep the query heads' and the kv heads' sums apart)."""
    att, channels = pruner.score(layer_id)  # (H + K,), (F,)
    q_per_kv = pruner.model.args.q_per_kv(layer_id)
    heads, kv = att[:sum(q_per_kv)], att[sum(q_per_kv):]  # (H,), (K,)
    live = torch.ones_like(heads, dtype=torch.bool)
    return (loraprune.KVGroups().scores(heads, kv, q_per_kv), variants.query_head_scores(heads, kv, live, q_per_kv),
            channels)


def agreement(seed: int, flags: list, rows: torch.Tensor, ckpt: Path, shown: list, tokenizer_flags: list,
              device="cpu", dtype=torch.float32, sample: int = 0) -> dict:
    """Train as run.py would with `flags` for max(shown) steps; at each step in `shown` record the Spearman
    correlation with vanilla of every estimate per projection part and per unit (raw), and at the last one of the
    moving averages too. Returns {"parts": {(estimate, step): {part: mean over layers}}, "units": {(name, step,
    'raw' or 'EMA'): {unit: mean over layers}}, "grad_norm": [LoRA gradient norm before clipping per step]}."""
    args = run.build_parser().parse_args(["--ckpt", str(ckpt)] + tokenizer_flags + flags + ["--seed", str(seed)])
    model = formats.load(ckpt, device=device, dtype=dtype)
    margs = model.args
    layers = loraprune.default_pruned_layers(margs.n_layers)
    lora_params = llama.add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, seed=seed)
    model.checkpoint_activations = bool(args.checkpoint_activations)
    loraprune.require_weight_grads(model, layers)  # dL/dW for the vanilla reference; the optimizer never sees W
    tap = variants.GradientTap(model, layers, args.square)  # 'exact', from the same backward
    sampled = variants.GradientTap(model, layers, args.square, sample, seed) if sample else None  # exact_sample
    estimates = ESTIMATES + (("exact-sampled",) if sample else ())
    criteria = {"vanilla": partial(loraprune.vanilla_sums, square=args.square),  # frees W.grad once read
                "lora": partial(loraprune.lora_sums, square=args.square),
                "lora-directional": partial(variants.directional_sums, square=args.square), "exact": tap,
                **({"exact-sampled": sampled} if sample else {})}
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    sampler = train.RowSampler(rows.shape[0], seed)
    torch.manual_seed(seed)
    names = [(e, norm) for e in estimates for norm in (False, True)] + [("vanilla", False)]
    # each criterion scores a projection once per step (recorded); every (estimate, normalisation) pair's Pruner.score
    # reads the recorded sums
    recorded = {}  # estimate -> {projection: (row sums (out,), column sums (in,))} of the current layer
    pruners = {n: loraprune.Pruner(model, ratio=0.0, total_steps=args.steps, unit=variants.QueryHeads(), layers=layers,
                                   normalize=variants.l2_normalized if n[1] else None,
                                   criterion=lambda lin, e=n[0]: recorded[e][lin]) for n in names}
    ema = {n: [None] * len(layers) for n in names}
    out = {"parts": {}, "units": {}, "grad_norm": []}
    model.train()
    for step in range(1, max(shown) + 1):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step - 1, args.steps, args.lr)
        train.backward_batch(model, rows[sampler.next(args.batch_size)], args.micro_batch_size, device)
        norm = torch.nn.utils.clip_grad_norm_(lora_params, args.grad_clip or math.inf)  # as run.py, before scoring
        out["grad_norm"].append(float(norm))
        with torch.no_grad():
            for i, l in enumerate(layers):
                projections = llama.projections(model, l)
                for e, criterion in criteria.items():
                    recorded[e] = {lin: criterion(lin) for lin in projections.values()}
                sums = {e: {name: recorded[e][lin] for name, lin in projections.items()} for e in criteria}
                ref_parts = projection_parts(sums["vanilla"], margs.head_dim)
                groups = {n: group_scores(pruners[n], l) for n in names}
                for n in names:  # Eq. 11 from zero, as the Pruner starts
                    prev = ema[n][i] or tuple(torch.zeros_like(g) for g in groups[n])
                    ema[n][i] = tuple(loraprune.ema(p, g, args.lam) for p, g in zip(prev, groups[n]))
                if step not in shown:
                    continue
                for e in estimates:
                    parts = projection_parts(sums[e], margs.head_dim)
                    cell = out["parts"].setdefault((e, step), {p: 0.0 for p in PARTS})
                    for p in PARTS:
                        cell[p] += rank_agreement(parts[p], ref_parts[p]) / len(layers)
                kinds = [("raw", groups)] + ([("EMA", {n: ema[n][i] for n in names})] if step == max(shown) else [])
                for kind, source in kinds:
                    for n in names[:-1]:
                        cell = out["units"].setdefault((n, step, kind), {u: 0.0 for u in UNITS})
                        for u, mine, ref in zip(UNITS, source[n], source[("vanilla", False)]):
                            cell[u] += rank_agreement(mine, ref) / len(layers)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    tap.remove()
    if sampled:
        sampled.remove()
    return out


def label(name) -> str:
    estimate, norm = name
    return {"lora": "Eq. 10 as written", "lora-directional": "direction-aware", "exact": "exact (hook)",
            "exact-sampled": "exact, sampled columns"}[estimate] \
        + (" + L2" if norm else "")


def tables(results: list, shown: list) -> str:
    """Markdown: per-projection and per-unit agreement, mean ± std over seeds."""
    def cell(values):
        m, s = mean_std(values)
        return f"{m:+.2f} ± {s:.2f}" if len(values) > 1 else f"{m:+.2f}"
    lines = [f"Spearman correlation with vanilla's scores, mean over pruned layers, {len(results)} seed(s). "
             "Per projection: each projection's share of Eq. 4 (normalisation does not change it).", "",
             "| estimate | step | " + " | ".join(PARTS) + " |", "| --- | --- | " + " | ".join("---" for _ in PARTS) + " |"]
    for e in [e for e in ESTIMATES + ("exact-sampled",) if (e, shown[0]) in results[0]["parts"]]:
        for step in shown:
            lines.append(f"| {label((e, False))} | {step} | "
                         + " | ".join(cell([r["parts"][(e, step)][p] for r in results]) for p in PARTS) + " |")
    lines += ["", "Per group (Eq. 4 sums; EMA = the moving average of Eq. 11 from zero, as the Pruner keeps it):", "",
              "| estimate | step | " + " | ".join(UNITS) + " |", "| --- | --- | " + " | ".join("---" for _ in UNITS) + " |"]
    for key in results[0]["units"]:
        name, step, kind = key
        lines.append(f"| {label(name)} | {step}{' EMA' if kind == 'EMA' else ''} | "
                     + " | ".join(cell([r["units"][key][u] for r in results]) for u in UNITS) + " |")
    norms = [sum(r["grad_norm"]) / len(r["grad_norm"]) for r in results]
    lines += ["", f"LoRA gradient norm before clipping, mean over steps 1-{max(shown)}: {cell(norms)} "
              f"(max {max(max(r['grad_norm']) for r in results):.3f})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(CKPT), help="model (default stories260K)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one beside --ckpt)")
    p.add_argument("--data", default=str(TRAIN_TEXT), help="comma list of training files (default TinyStories train)")
    p.add_argument("--seeds", default="0,1", help="comma list (default %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="the run's length, for the lr and the schedule (default "
                   "%(default)s, study_tiny's)")
    p.add_argument("--shown", help="comma list of steps to report (default: 1, 2, 5 and the first pruning step)")
    p.add_argument("--micro-batch-size", type=int, help="override study_tiny's (= the batch: no accumulation)")
    p.add_argument("--exact-sample", type=int, default=0, metavar="K", help="also the hook criterion with K sampled "
                   "columns per projection (Pruner exact_sample), e.g. with --micro-batch-size 4")
    p.add_argument("--extra", default="", help="more run.py flags, e.g. '--abs' or '--batch-size 8 --seq-len 512'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = TRAIN_FLAGS + args.extra.split() + ["--steps", str(args.steps)]
    if args.micro_batch_size:
        flags += ["--micro-batch-size", str(args.micro_batch_size)]
    tokenizer_flags = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    parsed = run.build_parser().parse_args(["--ckpt", args.ckpt] + tokenizer_flags + flags)
    t0 = time.time()
    model_args = formats.load(args.ckpt, dtype=torch.float32).args
    tok_path = Path(args.tokenizer) if args.tokenizer else data.find_tokenizer(args.ckpt, model_args.vocab_size)
    rows = data.training_tokens([Path(s) for s in args.data.split(",")], data.Tokenizer(tok_path), parsed.seq_len)
    k = first_pruning_step(model_args, 0.5, parsed.steps, parsed.prune_every,
                           loraprune.default_pruned_layers(model_args.n_layers))
    shown = sorted({int(s) for s in args.shown.split(",")} if args.shown else {1, 2, 5, k})
    results = [agreement(int(s), flags, rows, Path(args.ckpt), shown, tokenizer_flags, args.device,
                         getattr(torch, args.dtype), args.exact_sample) for s in args.seeds.split(",")]
    print(f"{args.ckpt}: flags `{' '.join(flags)}`; step {k} is the first the 0.5 schedule prunes at; "
          f"{time.time() - t0:.0f}s\n")
    print(tables(results, shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
