"""LoRAPrune from the command line: load a LLaMA, fine-tune LoRA on it while Algorithm 1 prunes attention heads
(kv groups, or single query heads with --head-unit query) and MLP channels, slice the masks away, save a smaller
dense checkpoint and compare perplexity before and after.

    python run.py --ckpt ../shared/data/stories260K.bin --ratio 0.5 --steps 100 --batch-size 16 \
        --micro-batch-size 16 --seq-len 256 --lr 1e-3 --eval ../shared/data/tinystories-valid.txt --out out

The method lives in loraprune.py, the model in llama.py, checkpoints in formats.py, tokens and perplexity in data.py,
the training loop (Sec. 4.1: AdamW, cosine decay, gradient accumulation; DDP; resume checkpoints) in train.py. This file
holds the flags, in groups, and run(), a script of named steps: load, plan_pruning, evaluate_before, fine_tune,
finish, write_report.
Exit codes: 0 done; 2 bad input, a missing optional extra, a file the system would not write, or --out in use by
another run (one "error: ..." line on stderr, nothing half-written in --out); 1 the loss became NaN/inf (out/resume.pt
keeps the last good step); 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (out/resume.pt holds the last finished
step; continue with --resume).

Data parallel on several GPUs (or CPU processes) with the same flags, through torchrun and PyTorch's DDP:

    torchrun --nproc-per-node 2 run.py --ckpt ... --ratio 0.2

Every process holds the whole model and takes a disjoint 1/N of each optimizer step's --batch-size sequences; DDP
averages the LoRA gradients over the processes, so the pruner scores the same gradients as one process would on the
whole batch and every process computes the same masks (checked after each update). Only rank 0 writes --out and
prints. Without torchrun (or with one process) nothing of this runs.
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import data
import formats
import generate
import llama
import loraprune
import train
import variants

# ----------------------------------------------------------------------------------------------
# flags


def _default(fn, name):
    """A keyword default of a library function or dataclass, so the CLI does not restate it."""
    return inspect.signature(fn).parameters[name].default


CRITERIA = {  # --criterion: one projection -> its row and column sums of per-weight importance (make_criterion)
    "lora": loraprune.lora_sums,  # Eq. 10 as the paper writes it
    "lora-directional": variants.directional_sums,
    "exact": variants.ExactSums,  # built on the pruned layers, with its seed and --exact-sample
    "vanilla": loraprune.vanilla_sums,  # Eq. 3; dL/dW switched on by loraprune.require_weight_grads
    "magnitude": loraprune.magnitude_sums,
    "random": loraprune.RandomSums,  # built with the run's seed
}
HEAD_UNITS = {"kv": loraprune.KVGroups(), "query": variants.QueryHeads()}  # --head-unit: the attention unit pruned


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit codes: 0 done, 2 bad input, "
                                "1 NaN/inf loss (out/resume.pt keeps the last good step), 130 / 143 stopped by "
                                "SIGINT / SIGTERM (out/resume.pt holds the last finished step; continue with "
                                "--resume).")
    g = p.add_argument_group("input")
    g.add_argument("--ckpt", required=True, help="checkpoint: our own folder, a Meta or Hugging Face folder, a "
                   "llama2.c .bin or a .gguf (anything formats.load reads)")
    g.add_argument("--tokenizer", help="tokenizer file (default: the one beside --ckpt whose vocab fits the model)")
    g.add_argument("--data", help="comma list of training files: text (TinyStories <|endoftext|> separated) or "
                   "Alpaca/LaMini .json/.jsonl (default: tinystories-train.txt in the data folder, ../shared/data "
                   "beside this repo, or $LORAPRUNE_DATA if set)")
    g.add_argument("--int8", action="store_true", help="store the frozen projections in int8 (quant8.py, the "
                   "paper's 8-bit W0); the pruned model is sliced and saved in int8 too, block by block")

    g = p.add_argument_group("pruning (loraprune.Pruner)")
    g.add_argument("--ratio", type=float, default=0.2, help="fraction of the model's parameters removed, in [0, 1) "
                   "(default %(default)s)")
    g.add_argument("--criterion", choices=CRITERIA, default="lora",
                   help="importance (default %(default)s: Eq. 10 as the paper writes it). lora-directional: rows "
                   "from s*gB@A, columns from s*B@gA (Eq. 10's gB@A scrambles the columns of wo and w2; with "
                   "--normalize level with Eq. 10 or slightly ahead in studies/RESULTS.md, behind it in some "
                   "cells). exact: Eq. 3 from each projection's own backward at LoRA's memory (compiled too): "
                   "vanilla's masks, the best measured, for 1.26-1.37x the step time (7B, H100). vanilla: Eq. 3 from dL/dW "
                   "(LLM-Pruner's). magnitude, random: baselines")
    g.add_argument("--exact-sample", type=int, metavar="K", help="with --criterion exact and gradient "
                   "accumulation: keep K importance-sampled columns of each projection's batch gradient (unbiased) "
                   "instead of summing each micro-batch's scores (default: the sum)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False, help="L2-normalise each "
                   "projection's group scores before Eq. 4 adds them, as the official code does (the projections "
                   "then weigh equally); measured worse than without on both study models (default: off)")
    power = g.add_mutually_exclusive_group()
    power.add_argument("--square", dest="square", action="store_true", default=_default(loraprune.lora_sums, "square"),
                       help="score = (gradient x weight)^2 as Eq. 3/10 write it (default)")
    power.add_argument("--abs", dest="square", action="store_false",
                       help="score = |gradient x weight| as the official code computes it")
    g.add_argument("--lam", type=float, default=_default(loraprune.Pruner, "lam"),
                   help="moving-average weight lambda of Eq. 11 (default %(default)s, the official code's)")
    g.add_argument("--prune-every", type=int, default=_default(loraprune.Pruner, "every"),
                   help="raise the sparsity every this many optimizer steps (default %(default)s, official)")
    g.add_argument("--layers", help="comma list of layer ids to prune (default: all but the first 10%% and the last, "
                   "loraprune.default_pruned_layers)")
    g.add_argument("--head-unit", choices=HEAD_UNITS, default="kv",
                   help="attention unit pruned: kv = a kv head with all its query heads (the paper's group), query = "
                   "single query heads, a kv head going with its last one, for grouped-query attention where a kv "
                   "group is too coarse a step (better in one study protocol at 20%%, worse at 50%%) (default "
                   "%(default)s)")
    g.add_argument("--uniform", action="store_true", help="every pruned layer loses the same kv groups and channels "
                   "(no rounding carried between layers): with --layers covering all layers the pruned model has one "
                   "layer shape, which --hf needs")
    g.add_argument("--channel-multiple", type=int, default=64, help="round kept MLP channels to this multiple in "
                   "layers whose width divides by it, for GPU-friendly matmuls; 1 = exact (default %(default)s)")

    g = p.add_argument_group("training (train.TrainArgs, Sec. 4.1)")
    g.add_argument("--steps", type=int, default=_default(train.TrainArgs, "steps"), help="optimizer steps; the "
                   "pruning schedule spans them (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=_default(train.TrainArgs, "batch_size"), help="sequences per "
                   "optimizer step (default %(default)s, the paper's)")
    g.add_argument("--micro-batch-size", type=int, default=_default(train.TrainArgs, "micro_batch_size"),
                   help="sequences per forward/backward; the batch is accumulated from batch/micro of them (default "
                   "%(default)s)")
    g.add_argument("--seq-len", type=int, default=512, help="training sequence length, capped at the model's "
                   "max_seq_len (default %(default)s, the official script's)")
    g.add_argument("--lr", type=float, default=_default(train.TrainArgs, "lr"), help="peak AdamW learning rate; "
                   "linear warmup over the first 3%% of the steps (at least one), then cosine decay to 0 (default "
                   "%(default)s, the paper's)")
    g.add_argument("--weight-decay", type=float, default=_default(train.TrainArgs, "weight_decay"),
                   help="AdamW weight decay (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=_default(train.TrainArgs, "grad_clip"), help="clip the LoRA "
                   "gradients' global norm to this; 0 = no clipping (default %(default)s)")
    g.add_argument("--lora-rank", type=int, default=_default(llama.add_lora, "r"),
                   help="LoRA rank r on all seven projections (default %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=_default(llama.add_lora, "alpha"),
                   help="LoRA alpha; scaling = alpha / r (default %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=_default(llama.add_lora, "dropout"),
                   help="dropout on the LoRA branch's input (default %(default)s)")
    g.add_argument("--distill", type=float, default=_default(train.TrainArgs, "distill"), metavar="ALPHA",
                   help="self-distillation weight: loss = (1 - ALPHA) CE + ALPHA T^2 KL(teacher || student), the "
                   "teacher being the frozen loaded weights with no masks and LoRA off (one more forward per "
                   "micro-batch without grad, no second copy of the weights); the loss shown is this sum; 0.5 with "
                   "--criterion exact is the best quality in studies/RESULTS.md; 0 = off (default %(default)s)")
    g.add_argument("--distill-temperature", type=float, default=_default(train.TrainArgs, "distill_temperature"),
                   metavar="T", help="softmax temperature T of --distill (default %(default)s)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="wikitext2,ptb", help="comma list of eval sets: wikitext2, ptb or text file "
                   "paths; empty = none (default %(default)s)")
    g.add_argument("--eval-seq-len", type=int, default=_default(data.perplexity, "seq_len"), help="perplexity "
                   "window, capped at the model's max_seq_len (default %(default)s, the paper's tables)")
    g.add_argument("--eval-batch-size", type=int, default=_default(data.perplexity, "batch_size"),
                   help="windows per forward (default %(default)s)")
    g.add_argument("--eval-tokens", type=int, help="use only the first N tokens of each eval set, for quick runs "
                   "(default: all)")
    g.add_argument("--tasks", help="comma list of lm-eval tasks scored before and after pruning, e.g. the paper's "
                   "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa (needs the eval extra: "
                   "pip install -e '.[eval]'; lm-eval downloads the data sets; default: none)")
    g.add_argument("--tasks-batch-size", type=int, default=16, help="lm-eval requests per forward (default "
                   "%(default)s)")
    g.add_argument("--tasks-fewshot", type=int, default=0, help="examples in each prompt (default %(default)s; "
                   "the paper's MMLU is 5)")
    g.add_argument("--tasks-limit", type=int, help="score only the first N documents of each task, for quick runs "
                   "(default: all)")
    g.add_argument("--tasks-include-path", help="folder of your own lm-eval task YAMLs (lm-eval's --include_path)")

    g = p.add_argument_group("export (what else the pruned model is written as)")
    g.add_argument("--gguf", metavar="TYPE", help="also write OUT/model.gguf for llama.cpp / Ollama, matrices as "
                   "TYPE: " + ", ".join(formats.GGUF_TYPES) + " (with --ratio 0 --steps 0: a plain conversion)")
    g.add_argument("--hf", action="store_true", help="also write OUT/hf/, a Hugging Face folder of the family's class "
                   "(Llama, Mistral, Qwen2, Qwen3; every layer must end with one shape: --ratio 0, or --uniform over "
                   "all layers with --head-unit kv)")

    g = p.add_argument_group("sampling (instead of a run)")
    g.add_argument("--sample", metavar="PROMPT", help="print PROMPT and a continuation sampled from --ckpt, then "
                   "stop (no pruning, nothing written)")
    g.add_argument("--max-new-tokens", type=int, default=100, help="tokens --sample generates at most, fewer at "
                   "EOS or at the model's max_seq_len (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, help="--sample's softmax temperature; 0 = greedy "
                   "(default %(default)s)")
    g.add_argument("--top-k", type=int, default=200, help="--sample from the k most likely tokens only (default "
                   "%(default)s; 0 = all)")
    g.add_argument("--top-p", type=float, help="--sample from the smallest set of tokens whose probability "
                   "reaches p (nucleus sampling; default: off)")

    g = p.add_argument_group("run management")
    g.add_argument("--out", default="out", help="output folder: model/, report.json, log.txt, resume.pt "
                   "(default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its resume.pt")
    g.add_argument("--save-every", type=int, default=_default(train.TrainArgs, "save_every"), help="write "
                   "out/resume.pt every this many steps and at the end of training (default %(default)s)")
    g.add_argument("--seed", type=int, default=_default(train.TrainArgs, "seed"), help="seed of LoRA init, data "
                   "order, dropout and the random criterion (default %(default)s)")
    g.add_argument("--device", help="cuda or cpu (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu; the pruned model of a "
                   "quantized GGUF is sliced and saved in bfloat16 unless --dtype is given)")
    g.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction,
                   help="recompute each block in backward to save memory (default: on with cuda)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each block "
                   "(llama.compile_blocks): about 2x faster LoRA steps on a GPU after a first step that compiles "
                   "(~30 s at 7B; the progress line and report.json show this warm-up); with --sample, decode each "
                   "token as one CUDA graph (generate.decode_graph; pays off for long generations) (default: on with "
                   "cuda, off on cpu and with --sample)")
    return p


def check_args(args, world: int = 1) -> None:
    """Range checks that need nothing loaded, so bad flags fail before any file is read or written. `world` is the
    number of processes torchrun started; each takes batch / world sequences of every optimizer step."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(args.ckpt != "" and args.out != "", "--ckpt and --out must name a path, found ''")  # Path("") is "."
    need(0 <= args.ratio < 1, f"--ratio must be in [0, 1), found {args.ratio}")
    need(args.steps >= 0, f"--steps must be >= 0, found {args.steps}")
    need(args.ratio == 0 or args.steps >= 1, f"--ratio {args.ratio} needs --steps >= 1 to prune, found 0")
    need(args.batch_size >= 1 and args.micro_batch_size >= 1,
         f"--batch-size and --micro-batch-size must be >= 1, found {args.batch_size} and {args.micro_batch_size}")
    need(args.batch_size % args.micro_batch_size == 0, f"--batch-size must be a multiple of --micro-batch-size, "
         f"found {args.batch_size} and {args.micro_batch_size}")
    need(args.seq_len >= 1 and args.eval_seq_len >= 2,
         f"--seq-len must be >= 1 and --eval-seq-len >= 2, found {args.seq_len} and {args.eval_seq_len}")
    need(args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, found {args.eval_batch_size}")
    need(args.eval_tokens is None or args.eval_tokens >= 2, f"--eval-tokens must be >= 2, found {args.eval_tokens}")
    need(0 <= args.lam <= 1, f"--lam must be in [0, 1], found {args.lam}")
    need(args.prune_every >= 1 and args.save_every >= 1,
         f"--prune-every and --save-every must be >= 1, found {args.prune_every} and {args.save_every}")
    need(math.isfinite(args.lr) and args.lr >= 0, f"--lr must be finite and >= 0, found {args.lr}")
    need(args.lora_rank >= 1, f"--lora-rank must be >= 1 (the adapters are what is trained), found {args.lora_rank}")
    need(0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1), found {args.lora_dropout}")
    need(0 <= args.distill <= 1, f"--distill must be in [0, 1], found {args.distill}")
    need(args.distill_temperature > 0 and math.isfinite(args.distill_temperature),
         f"--distill-temperature must be finite and > 0, found {args.distill_temperature}")
    need(args.exact_sample is None or (args.exact_sample >= 1 and args.criterion == "exact"),
         f"--exact-sample needs --criterion exact and K >= 1, found {args.exact_sample} with {args.criterion}")
    need(args.gguf is None or args.gguf in formats.GGUF_TYPES,
         f"--gguf must be one of {', '.join(formats.GGUF_TYPES)}, found {args.gguf!r}")
    need(args.max_new_tokens >= 1 and args.temperature >= 0 and args.top_k >= 0
         and (args.top_p is None or 0 < args.top_p <= 1), f"--max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 "
         f"and --top-p in (0, 1] expected, found {args.max_new_tokens}, {args.temperature}, {args.top_k}, {args.top_p}")
    need(args.tasks_batch_size >= 1 and args.tasks_fewshot >= 0, f"--tasks-batch-size >= 1 and --tasks-fewshot >= 0 "
         f"expected, found {args.tasks_batch_size} and {args.tasks_fewshot}")
    need(args.channel_multiple >= 1, f"--channel-multiple must be >= 1, found {args.channel_multiple}")
    need(args.device in (None, "cpu", "cuda") or args.device.startswith("cuda:"),
         f"--device must be cpu or cuda[:N], found {args.device!r}")
    need(not (args.device or "").startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: expected a CUDA device, found none (torch.cuda.is_available() is False)")
    if world > 1:
        need(args.batch_size % world == 0, f"--batch-size must split evenly over the {world} processes torchrun "
             f"started, found {args.batch_size}")
        need(args.batch_size // world % args.micro_batch_size == 0, f"--batch-size {args.batch_size} over {world} "
             f"processes is {args.batch_size // world} sequences each, which must be a multiple of "
             f"--micro-batch-size, found {args.micro_batch_size}")
        need(not (args.device or "").startswith("cuda:"), f"--device {args.device}: under torchrun process i uses "
             f"cuda:LOCAL_RANK; pass --device cuda or cpu")


def resolve_defaults(args, device: torch.device) -> None:
    """Fill in the flags whose default depends on the device, so the report shows what ran: --dtype bfloat16 on
    cuda, float32 on cpu; --compile (but not with --sample) and --checkpoint-activations on with cuda, off on cpu
    (CPU stays eager)."""
    cuda = device.type == "cuda"
    quantized = args.dtype is None and Path(args.ckpt).is_file() and formats.gguf_quantized(args.ckpt)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.save_dtype = "bfloat16" if quantized else args.dtype  # Q4 weights saved as float32 would quadruple
    if args.compile is None:  # --sample's compiled decode takes longer to compile (~1 min at 7B) than 100 tokens take
        args.compile = cuda and args.sample is None  # eager
    args.checkpoint_activations = cuda if args.checkpoint_activations is None else args.checkpoint_activations


def parse_layers(text: str, n_layers: int) -> list:
    try:
        layers = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--layers: expected a comma list of integers, found {text!r}") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"--layers: expected ids in [0, {n_layers}), found {text!r}")
    return layers


# ----------------------------------------------------------------------------------------------
# the steps of a run


def hooks_from_env() -> tuple[Optional[int], Optional[str]]:
    """Two hooks for the tests, read from the environment here and nowhere else (neither flags nor in the report):
    LORAPRUNE_STOP_AFTER=K quits after optimizer step K as if killed (resume.pt holds step K), and
    LORAPRUNE_TRACE=PATH makes each rank append one JSON line per step (loss, gradient norm, masks' digest) to
    PATH.<rank>."""
    stop_after = os.environ.get("LORAPRUNE_STOP_AFTER")
    return int(stop_after) if stop_after else None, os.environ.get("LORAPRUNE_TRACE") or None


def tracer(path: Optional[str], rank: int) -> Optional[Callable]:
    """LORAPRUNE_TRACE's observer for train.train_loop: one JSON line per step (loss, gradient norm, masks' digest)
    appended to PATH.<rank>; None without the variable."""
    if not path:
        return None

    def observe(t: train.Training, grad_norm: float) -> None:
        with open(f"{path}.{rank}", "a") as f:
            f.write(json.dumps({"step": t.step, "loss": t.loss, "grad_norm": grad_norm,
                                "masks": train.digest(t.masks())}) + "\n")
    return observe


@dataclass
class Inputs:
    """What load() read, all before --out is touched."""
    model: llama.Transformer
    params: int  # the loaded model's parameter count
    tokenizer: data.Tokenizer
    tokenizer_path: Path
    data_paths: list  # training files
    rows: Optional[Tensor]  # (N, seq_len + 1) packed training rows; None when --steps is 0
    eval_sets: dict  # label -> (n,) tokens
    seq_len: int  # --seq-len and --eval-seq-len, capped at the model's max_seq_len
    eval_seq_len: int
    tasks: Optional[dict] = None  # --tasks: harness.evaluate_tasks' arguments but the model; None without --tasks


def load(args, device: torch.device, dtype: torch.dtype, log: train.Log) -> Inputs:
    """The checkpoint, its tokenizer, the training rows, the eval sets and the lm-eval tasks: everything that can fail
    on bad input."""
    # before the checkpoint: a missing extra, an unknown task or a bad tokenizer fails at once
    tasks = check_tasks(args)
    if args.gguf:
        formats.import_extra("gguf", "gguf", "--gguf")
    tokenizer = tokenizer_before_model(args)
    t0 = time.time()
    model = formats.load(args.ckpt, device=device, dtype=dtype, int8=args.int8)
    a, params = model.args, llama.count_params(model)
    log(f"loaded {args.ckpt} ({a.family}) in {time.time() - t0:.1f}s: {params:,} parameters, {a.n_layers} "
        f"layers, dim {a.dim}, {a.n_heads} heads / {a.n_kv_heads} kv heads, MLP {a.hidden_dim}, vocab "
        f"{a.vocab_size}, {'int8 projections + ' if args.int8 else ''}{str(dtype).removeprefix('torch.')} on {device}")
    tokenizer = tokenizer or data.Tokenizer(data.find_tokenizer(args.ckpt, a.vocab_size))
    tokenizer_path = tokenizer.path
    tokenizer.check_vocab(a.vocab_size)
    log(f"tokenizer {tokenizer_path}: {tokenizer.vocab_size} tokens")
    seq_len, eval_seq_len = min(args.seq_len, a.max_seq_len), min(args.eval_seq_len, a.max_seq_len)
    eval_names = [s for s in args.eval.split(",") if s]
    for flag, asked, got, used in (("--seq-len", args.seq_len, seq_len, args.steps > 0),
                                   ("--eval-seq-len", args.eval_seq_len, eval_seq_len, bool(eval_names))):
        if used and got < asked:
            log(f"{flag} {asked} capped at the model's max_seq_len {got}")
    data_paths = [Path(s) for s in (args.data or str(data.data_dir() / "tinystories-train.txt")).split(",") if s]
    rows = None
    if args.steps:
        rows = data.training_tokens(data_paths, tokenizer, seq_len)  # (N, seq_len + 1)
        log(f"training data: {rows.shape[0]:,} rows of {seq_len + 1} tokens from {', '.join(map(str, data_paths))}")
    eval_sets = {}
    for name in eval_names:
        label, tokens = data.eval_tokens(name, tokenizer)
        tokens = tokens[: args.eval_tokens]  # (n,)
        if tokens.numel() < eval_seq_len:
            raise ValueError(f"eval set {name}: found {tokens.numel()} tokens, need at least --eval-seq-len "
                             f"{eval_seq_len} for one window")
        eval_sets[label] = tokens
    if tasks is not None:
        tasks["tokenizer"] = tokenizer
    return Inputs(model, params, tokenizer, tokenizer_path, data_paths, rows, eval_sets, seq_len, eval_seq_len, tasks)


def tokenizer_before_model(args) -> Optional[data.Tokenizer]:
    """--tokenizer, or the tokenizer inside a GGUF --ckpt, read before the checkpoint, so a bad file or a missing
    extra fails before a long read; None when the tokenizer is found beside --ckpt by the model's vocab size."""
    if args.tokenizer:
        return data.Tokenizer(args.tokenizer)
    ckpt = Path(args.ckpt)
    return data.Tokenizer(ckpt) if ckpt.suffix == ".gguf" and ckpt.is_file() else None


def check_tasks(args) -> Optional[dict]:
    """--tasks: lm-eval imported (harness.py imports it at its top), every task known; returns the arguments of
    harness.evaluate_tasks but the model and tokenizer, or None without --tasks."""
    tasks = [name for name in (args.tasks or "").split(",") if name]
    if not tasks:
        return None
    formats.import_extra("lm_eval", "eval", "--tasks")
    import harness
    if args.tasks_include_path and not Path(args.tasks_include_path).is_dir():
        raise ValueError(f"--tasks-include-path {args.tasks_include_path}: expected a folder of task YAMLs, found "
                         f"{'a file' if Path(args.tasks_include_path).exists() else 'nothing'}")
    task_manager = harness.TaskManager(include_path=args.tasks_include_path)  # indexes every task YAML (~10 s)
    harness.check_tasks(tasks, task_manager)
    return {"tasks": tasks, "batch_size": args.tasks_batch_size, "num_fewshot": args.tasks_fewshot,
            "limit": args.tasks_limit, "task_manager": task_manager}


def sample(args, device: torch.device, log: train.Log) -> int:
    """--sample: print the prompt and a continuation sampled from --ckpt (generate.generate, KV cache, stops at EOS),
    decoded whole, so a SentencePiece word boundary between prompt and continuation keeps its space."""
    tokenizer = tokenizer_before_model(args)
    model = formats.load(args.ckpt, device=device, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = tokenizer or data.Tokenizer(data.find_tokenizer(args.ckpt, model.args.vocab_size))
    prompt = tokenizer.encode(args.sample)  # BOS first where the tokenizer adds one
    room = model.args.max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(f"--sample: the prompt is {len(prompt)} tokens, the model's max_seq_len "
                         f"{model.args.max_seq_len} leaves no room to generate")
    new = generate.generate(model, prompt, max_new_tokens=min(args.max_new_tokens, room),
                            temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                            eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
                            generator=torch.Generator(device).manual_seed(args.seed), compiled=args.compile)
    log(tokenizer.decode(prompt + new))
    return 0


def make_criterion(name: str, model: llama.Transformer, layers: list, square: bool = True, seed: int = 0,
                   exact_sample: Optional[int] = None):
    """The Pruner's criterion for --criterion `name` on the pruned `layers`, with what it reads set up in the model:
    dL/dW for vanilla (before any backward, and before DDP wraps the model), the probes for exact (before DDP too:
    their gradients carry the sums)."""
    if name == "exact":
        return variants.ExactSums(model, layers, square, exact_sample, seed)
    if name == "random":
        return loraprune.RandomSums(seed, model.tok_embeddings.weight.device)
    if name == "vanilla":
        loraprune.require_weight_grads(model, layers)
    return partial(CRITERIA[name], square=square)


def plan_pruning(args, model: llama.Transformer) -> tuple[list, loraprune.Pruner]:
    """LoRA on the seven projections, activation checkpointing and compilation as asked, the criterion and the
    Pruner; returns the adapters' parameters and the pruner. They go on before the "before" perplexity: B = 0 and
    all-kept masks leave every logit exactly as loaded, and the checks (ratio vs heads, criterion vs int8) run before
    --out exists."""
    n_layers = model.args.n_layers
    layers = parse_layers(args.layers, n_layers) if args.layers else loraprune.default_pruned_layers(n_layers)
    if args.uniform and args.head_unit == "query":
        raise ValueError("--uniform needs --head-unit kv: query heads empty kv heads layer by layer as the scores "
                         "fall, so the layers would not keep one shape")
    lora_params = llama.add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                 seed=args.seed)
    model.checkpoint_activations = args.checkpoint_activations
    if args.compile:
        llama.compile_blocks(model)
    criterion = make_criterion(args.criterion, model, layers, square=args.square, seed=args.seed,
                               exact_sample=args.exact_sample)
    pruner = loraprune.Pruner(model, ratio=args.ratio, total_steps=args.steps, criterion=criterion,
                              unit=HEAD_UNITS[args.head_unit], normalize=variants.l2_normalized if args.normalize
                              else None, lam=args.lam, every=args.prune_every, layers=layers,
                              channel_multiple=args.channel_multiple, uniform=args.uniform)
    return lora_params, pruner


def check_exports(args, inputs: Inputs, pruner: loraprune.Pruner) -> None:
    """--gguf / --hf: refuse, before any training, what the target format cannot hold (a tokenizer it cannot carry;
    layers that will end with shapes the family's class or llama.cpp architecture cannot hold)."""
    a = inputs.model.args
    planned = None  # per layer (query heads, kv heads, MLP width) after pruning; None: known only after pruning
    if args.ratio == 0:
        planned = formats.layer_shapes(inputs.model)
    elif args.head_unit != "query":
        kept = [(a.layer_kv_heads[l] - h, a.layer_hidden_dims[l] - c) for l, (h, c) in enumerate(pruner.final_counts)]
        planned = [(k * a.n_rep, k, c) for k, c in kept]
    for flag, needs_one_shape in (("--gguf", a.family == "qwen3"), ("--hf", True)):
        if getattr(args, flag[2:]) and needs_one_shape and planned is None:
            raise ValueError(f"{flag} with --head-unit query: which kv heads are left is known only after pruning, "
                             f"and {flag} holds one shape for every layer here; use --head-unit kv")
    if args.gguf:
        formats.gguf_tokenizer_fields(inputs.tokenizer_path, a.vocab_size)
        if planned is not None:
            formats.gguf_architecture(a, planned, "--gguf")
    if args.hf:
        formats.hf_tokenizer_files(inputs.tokenizer_path)
        formats.check_hf_shapes(planned, a, "--hf")


def run_config(args, inputs: Inputs, pruner: loraprune.Pruner, world: int) -> dict:
    """The arguments that define the run, resolved (paths absolute, lengths capped): a resume must match them."""
    return {
        "ckpt": str(Path(args.ckpt).resolve()), "tokenizer": str(inputs.tokenizer_path.resolve()), "ratio": args.ratio,
        "criterion": args.criterion, "square": args.square, "lam": args.lam, "prune_every": args.prune_every,
        "layers": pruner.layers, "channel_multiple": args.channel_multiple, "head_unit": args.head_unit,
        "data": [str(p.resolve()) for p in inputs.data_paths], "steps": args.steps, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": inputs.seq_len, "lr": args.lr,
        "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "int8": args.int8, "seed": args.seed,
        "distill": args.distill, "distill_temperature": args.distill_temperature, "normalize": args.normalize,
        "exact_sample": args.exact_sample, "uniform": args.uniform, "tasks": (inputs.tasks or {}).get("tasks", []),
        "tasks_fewshot": args.tasks_fewshot,
        "tasks_limit": args.tasks_limit,
        "dtype": args.dtype, "save_dtype": args.save_dtype,
        "eval": [n if n in data.EVAL_FILES else str(Path(n).resolve()) for n in args.eval.split(",") if n],
        "eval_seq_len": inputs.eval_seq_len, "eval_tokens": args.eval_tokens,
        **({"world_size": world} if world > 1 else {})}  # each rank's dropout stream is its own: resume with as many


def train_args(args) -> train.TrainArgs:
    """The loop's settings: the training flags of the same names."""
    return train.TrainArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(train.TrainArgs)})


def evaluate_before(args, inputs: Inputs, device: torch.device, log: train.Log) -> dict:
    """Perplexity and --tasks scores of the model as loaded (its fresh adapters, B = 0, and all-kept masks leave
    every logit as it was): the report's "before", which resume.pt keeps. Every rank evaluates (only rank 0
    prints): the others would wait for it anyway."""
    log("perplexity before:" if inputs.eval_sets else "no eval sets (--eval is empty)")
    return {"ppl_before": train.evaluate(inputs.model, inputs.eval_sets, inputs.eval_seq_len, args.eval_batch_size,
                                         device, log),
            "tasks_before": train.score_tasks(inputs.model, inputs.tasks, "before", log)}


def fine_tune(args, t: train.Training, net, rows: Tensor, ranks: train.Ranks, device: torch.device, log: train.Log,
              save: Callable[[], None], signals: "Signals", stop_after: Optional[int], trace: Optional[str]) -> list:
    """Algorithm 1 from step t.step to --steps (or LORAPRUNE_STOP_AFTER, or a SIGINT / SIGTERM: the step in flight
    finishes and is saved): train.train_loop, after a line saying what it runs; on NaN/inf, the error says which
    step resume.pt keeps. Returns this session's step times (s)."""
    accum = args.batch_size // ranks.world // args.micro_batch_size
    where = f" on each of {ranks.world} processes" if ranks.world > 1 else ""
    log(f"training {args.steps} steps of {args.batch_size} x {rows.shape[1] - 1} tokens ({accum} x "
        f"{args.micro_batch_size} sequences accumulated{where}); pruning layers {t.pruner.layers} "
        f"({args.head_unit} heads) to ratio {args.ratio}"
        + (", blocks compiled (the first step compiles)" if args.compile else "")
        + (f"; self-distillation from the frozen weights, alpha {args.distill}, T {args.distill_temperature}"
           if args.distill else ""))
    try:
        with signals.deferred():
            return train.train_loop(t, rows, train_args(args), device, net=net, ranks=ranks, log=log, save=save,
                                    until=stop_after, observe=tracer(trace, ranks.rank), stop=signals.stop_asked)
    except train.TrainingDiverged as e:
        held = (f"{Path(args.out) / 'resume.pt'} holds step {e.saved_step}, the last good one" if e.saved_step else
                "no resume checkpoint was written yet")
        raise train.TrainingDiverged(f"{e}. {held}; try a lower --lr", e.saved_step) from None


def finish(args, t: train.Training, inputs: Inputs, before: dict, ranks: train.Ranks, device: torch.device,
           log: train.Log) -> dict:
    """Slice the masks away (LoRA merged), save out/model (rank 0), evaluate the sliced model; returns the report's
    measured fields, beside the scores `before` (evaluate_before's)."""
    ranks.check_same(t.lora_params + t.masks(), "LoRA adapters and masks")

    def groups(a: llama.ModelArgs) -> int:  # attention groups (kv groups or query heads, as pruned) + channels
        units = a.layer_kv_heads if args.head_unit == "kv" else a.layer_n_heads
        return sum(units[l] + a.layer_hidden_dims[l] for l in t.pruner.layers)
    full_groups = groups(t.model.args)
    # in place: each block is freed as soon as its sliced copy exists, so the run never holds two models
    sliced = loraprune.slice_model(t.model, t.pruner.masks, dtype=getattr(torch, args.save_dtype), in_place=True)
    params_before, params_after = inputs.params, llama.count_params(sliced)
    out = Path(args.out)
    if ranks.main:
        formats.save_model(sliced, inputs.tokenizer_path, out / "model")
        log(f"saved {out / 'model'}: {params_after:,} parameters ({params_before:,} before)")
        if args.gguf:
            formats.export_gguf(sliced, out / "model.gguf", ftype=args.gguf, tokenizer_path=inputs.tokenizer_path)
            arch = formats.gguf_architecture(sliced.args, formats.layer_shapes(sliced), "--gguf")
            log(f"saved {out / 'model.gguf'} ({args.gguf}, llama.cpp architecture '{arch}')")
        if args.hf:
            formats.export_hf(sliced, out / "hf", tokenizer_path=inputs.tokenizer_path)
            model_type = formats.check_hf_shapes(formats.layer_shapes(sliced), sliced.args, str(out / "hf"))
            log(f"saved {out / 'hf'} (Hugging Face {formats.HF_CLASSES[model_type]})")
    if inputs.eval_sets:
        log("perplexity after:")
    ppl_after = train.evaluate(sliced, inputs.eval_sets, inputs.eval_seq_len, args.eval_batch_size, device, log)
    tasks_after = train.score_tasks(sliced, inputs.tasks, "after", log)
    kept_groups = groups(sliced.args)
    return {
        "params_before": params_before, "params_after": params_after, "ratio_target": args.ratio,
        "ratio_achieved": 1 - params_after / params_before,
        "group_ratio_in_pruned_layers": 1 - kept_groups / full_groups if full_groups else 0.0,  # the official count
        "pruned_layers": t.pruner.layers, "kv_heads_per_layer": sliced.args.layer_kv_heads,
        "channels_per_layer": sliced.args.layer_hidden_dims,
        "q_per_kv_per_layer": [sliced.args.q_per_kv(l) for l in range(sliced.args.n_layers)],
        "ppl_before": before["ppl_before"], "ppl_after": ppl_after, "tasks_before": before["tasks_before"],
        "tasks_after": tasks_after}


def write_report(report: dict, out: Path, eval_sets: dict, log: train.Log) -> None:
    """out/report.json, and the before/after table on the console."""
    text = json.dumps(report, indent=2)
    formats.atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text), size=len(text.encode()))
    if eval_sets:
        log(f"\n{'eval set':<24}{'ppl before':>12}{'ppl after':>12}")
    for label in eval_sets:
        log(f"{label:<24}{report['ppl_before'][label]:>12.3f}{report['ppl_after'][label]:>12.3f}")
    before, after = report["tasks_before"] or {}, report["tasks_after"] or {}
    if after:  # one row per task and metric, then the mean acc over the tasks (the paper's Average)
        log(f"\n{'lm-eval task':<24}{'metric':>10}{'before':>12}{'after':>12}")
        for task, metrics in after.items():
            for name, value in metrics.items():
                log(f"{task:<24}{name:>10}{before.get(task, {}).get(name, math.nan):>12.4f}{value:>12.4f}")
        accs = [(before.get(task, {}).get("acc", math.nan), m["acc"]) for task, m in after.items() if "acc" in m]
        if len(accs) > 1:
            mean_before, mean_after = (sum(pair[i] for pair in accs) / len(accs) for i in (0, 1))
            log(f"{f'mean of {len(accs)}':<24}{'acc':>10}{mean_before:>12.4f}{mean_after:>12.4f}")
    log(f"parameters {report['params_before']:,} -> {report['params_after']:,}: {report['ratio_achieved']:.2%} "
        f"removed (target {report['ratio_target']:.2%}); {report['wall_time_s']:.0f}s; report in "
        f"{out / 'report.json'}")


def run(args, log: train.Log, ranks: train.Ranks, lock: train.OutLock, signals: "Signals") -> int:
    t_start = time.time()
    stop_after, trace = hooks_from_env()
    check_args(args, ranks.world)
    device = ranks.device(args.device)
    resolve_defaults(args, device)
    if args.sample is not None:  # sample and stop: nothing is pruned or written
        return sample(args, device, log)
    out = Path(args.out)
    train.check_out_dir(out, args.resume)
    if ranks.main and out.is_dir():
        lock.take()  # a second run on this folder stops here, before anything is read
    ranks.start(device)  # after the checks above: bad flags fail alike on every rank, before any collective
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # --- everything that can fail on bad input, before --out is touched
    inputs = load(args, device, getattr(torch, args.dtype), log)
    lora_params, pruner = plan_pruning(args, inputs.model)
    check_exports(args, inputs, pruner)
    config = run_config(args, inputs, pruner, ranks.world)
    t = train.Training.start(inputs.model, lora_params, pruner, train_args(args), inputs.rows, rank=ranks.rank)
    if args.resume:
        before = t.resume(out / "resume.pt", config, ranks, device, extra=("ppl_before", "tasks_before", "elapsed"))
        t_start -= before.pop("elapsed")  # the wall time of the earlier sessions counts too
        signals.saved_step = t.step

    # --- from here on --out is written (by rank 0 alone)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        lock.take()
        train.check_out_dir(out, args.resume)  # again, under the lock: a run that held it may have finished since
    log.attach(out / "log.txt")
    if args.resume:
        log(f"resuming {out / 'resume.pt'} at step {t.step}/{args.steps}")
    else:
        before = evaluate_before(args, inputs, device, log)

    def save() -> None:  # out/resume.pt: the loop's state, the scores before and the wall time of every session
        t.save(out / "resume.pt", config, ranks, device, **before, elapsed=time.time() - t_start)
        signals.saved_step = t.step

    net = ranks.wrap(inputs.model, device)  # after the Pruner: with vanilla it has switched on dL/dW
    ranks.check_same(lora_params + t.masks(), "LoRA adapters and masks")
    times = (fine_tune(args, t, net, inputs.rows, ranks, device, log, save, signals, stop_after, trace)
             if args.steps else [])
    if signals.received is not None:  # the loop stopped at its safe point, resume.pt written
        raise Interrupted(signals.received)
    if t.step < args.steps:
        log(f"stopped after step {t.step} (LORAPRUNE_STOP_AFTER); continue with --resume")
        return 0

    pruned = finish(args, t, inputs, before, ranks, device, log)  # slice, save, evaluate
    report = {"args": {**vars(args), **config}, **pruned, "compile": args.compile,
              "compile_warmup_s": train.compile_warmup(times) if args.compile else None,
              "step_time_s": statistics.median(times[1:] or times) if times else None,
              "wall_time_s": time.time() - t_start,
              "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "steps_done": t.step, "final_loss": t.loss}
    if ranks.main:
        write_report(report, out, inputs.eval_sets, log)
    return 0


# ----------------------------------------------------------------------------------------------
# the command: SIGINT / SIGTERM, and every failure as one line and an exit code


class Interrupted(BaseException):
    """SIGINT or SIGTERM (signum) ended the run. A BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on the way turns it into another error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT (Ctrl-C) and SIGTERM while main runs. Inside deferred() (the training loop) the first one only asks to
    stop (stop_asked): the loop finishes the step in flight, saves it to resume.pt and returns. Anywhere else, and the
    second time, Interrupted is raised at once: every file is written atomically, so that loses nothing already
    saved. saved_step: the step out/resume.pt holds, for the line an interruption prints."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.received, self.deferring, self.saved_step, self.previous = quiet, None, False, None, {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # started under nohup or with &: leave it ignored
                    self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if not (self.deferring and self.received is None):
            raise Interrupted(signum)
        self.received = signum
        if not self.quiet:  # os.write, not print: the handler may run in the middle of a print
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stdout.fileno(), f"\n{signal.Signals(signum).name}: the step in flight finishes, goes to "
                         "resume.pt, and the run stops (again: stop at once)\n".encode())

    def stop_asked(self) -> bool:
        return self.received is not None

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


def one_line(e: Exception) -> str:
    """What an error prints: the system's errors as 'file: reason', ours as they are worded (one line; of a
    library's message that is not, its first)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2): keep main's contract of returning a code
        return e.code
    ranks = train.Ranks.from_env()
    log = train.Log(quiet=not ranks.main)
    lock = train.OutLock(Path(args.out))

    def fail(line: str, code: int) -> int:  # one line on stderr, and in out/log.txt if it exists by now
        print(line if ranks.main else f"(rank {ranks.rank}) {line}", file=sys.stderr)
        with contextlib.suppress(OSError):  # a full disk refuses log.txt too
            log.to_file(line)
        return code

    with Signals(quiet=not ranks.main) as signals:
        try:
            return run(args, log, ranks, lock, signals)
        except (ValueError, OSError, formats.MissingExtra) as e:  # bad input: files, ranges, --out, extras, a full disk
            return fail(f"error: {one_line(e)}", 2)
        except train.TrainingDiverged as e:  # NaN/inf
            return fail(f"error: {e}", 1)
        except Interrupted as e:  # SIGINT / SIGTERM: resume.pt holds the last step saved
            if args.sample is not None:
                line = "interrupted"
            elif signals.saved_step is not None:
                line = f"interrupted at step {signals.saved_step}/{args.steps}; continue with --resume"
            else:
                line = ("interrupted before resuming; continue with --resume" if args.resume else
                        "interrupted before any step was saved; nothing to resume")
            return fail(line, 128 + e.signum)
        finally:
            lock.release()
            log.close()
            ranks.stop()


if __name__ == "__main__":
    sys.exit(main())
