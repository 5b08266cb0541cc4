"""LoRAPrune from the command line: load a LLaMA, fine-tune LoRA on it while Algorithm 1 prunes attention heads
(kv groups, or single query heads with --head-unit query) and MLP channels, slice the masks away, save a smaller
dense checkpoint and compare perplexity before and after.

    python run.py --ckpt ../shared/data/stories260K.bin --ratio 0.5 --steps 100 --batch-size 16 \
        --micro-batch-size 16 --seq-len 256 --lr 1e-3 --eval ../shared/data/tinystories-valid.txt --out out

The method lives in loraprune.py, the model and checkpoints in llama.py, tokens and perplexity in data.py. This file
holds the flags, the training loop of Sec. 4.1 (AdamW, cosine decay, gradient accumulation) and its bookkeeping:
progress, resume checkpoints and the report. Exit codes: 0 done; 2 bad input (one "error: ..." line on stderr,
nothing half-written in --out); 1 the loss became NaN/inf (out/resume.pt keeps the last good step).

Data parallel on several GPUs (or CPU processes) with the same flags, through torchrun and PyTorch's DDP:

    torchrun --nproc-per-node 2 run.py --ckpt ... --ratio 0.2

Every process holds the whole model and takes a disjoint 1/N of each optimizer step's --batch-size sequences; DDP
averages the LoRA gradients over the processes, so the pruner scores the same gradients as one process would on the
whole batch and every process computes the same masks (checked after each update). Only rank 0 writes --out and
prints. Without torchrun (or with one process) nothing of this runs.
"""
import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import data
import formats
import llama
import loraprune

# ----------------------------------------------------------------------------------------------
# flags


def _default(fn, name):
    """A keyword default of a library function, so the CLI does not restate it."""
    return inspect.signature(fn).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit codes: 0 done, 2 bad input, "
                                "1 NaN/inf loss (out/resume.pt keeps the last good step).")
    p.add_argument("--ckpt", required=True, help="checkpoint: our own folder, a Meta or Hugging Face folder, a "
                   "llama2.c .bin or a .gguf (anything llama.load_checkpoint reads)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one beside --ckpt whose vocab fits the model)")
    # pruning (loraprune.Pruner)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the model's parameters removed, in [0, 1) "
                   "(default %(default)s)")
    p.add_argument("--criterion", choices=loraprune.CRITERIA, default=_default(loraprune.Pruner, "criterion"),
                   help="importance: lora (Eq. 10), vanilla (Eq. 3, needs dL/dW), magnitude or random "
                   "(default %(default)s)")
    power = p.add_mutually_exclusive_group()
    power.add_argument("--square", dest="square", action="store_true", default=_default(loraprune.Pruner, "square"),
                       help="score = (gradient x weight)^2 as Eq. 3/10 write it (default)")
    power.add_argument("--abs", dest="square", action="store_false",
                       help="score = |gradient x weight| as the official code computes it")
    p.add_argument("--lam", type=float, default=_default(loraprune.Pruner, "lam"),
                   help="moving-average weight lambda of Eq. 11 (default %(default)s, the official code's)")
    p.add_argument("--prune-every", type=int, default=_default(loraprune.Pruner, "every"),
                   help="raise the sparsity every this many optimizer steps (default %(default)s, official)")
    p.add_argument("--layers", help="comma list of layer ids to prune (default: all but the first 10%% and the last, "
                   "loraprune.default_pruned_layers)")
    p.add_argument("--head-unit", choices=loraprune.HEAD_UNITS, default=_default(loraprune.Pruner, "head_unit"),
                   help="attention unit pruned: kv = a kv head with all its query heads (the paper's group), query = "
                   "single query heads, a kv head going with its last one (default %(default)s)")
    p.add_argument("--channel-multiple", type=int, default=64, help="round kept MLP channels to this multiple in "
                   "layers whose width divides by it, for GPU-friendly matmuls; 1 = exact (default %(default)s)")
    # data and optimization (Sec. 4.1)
    p.add_argument("--data", help="comma list of training files: text (TinyStories <|endoftext|> separated) or "
                   "Alpaca/LaMini .json/.jsonl (default: data_dir()/tinystories-train.txt)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps; the pruning schedule spans them "
                   "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step (default %(default)s, "
                   "the paper's)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward; the batch is "
                   "accumulated from batch/micro of them (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length, capped at the model's "
                   "max_seq_len (default %(default)s, the official script's)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate; linear warmup over the first "
                   "3%% of the steps (at least one), then cosine decay to 0 (default %(default)s, the paper's)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the LoRA gradients' global norm to this; "
                   "0 = no clipping (default %(default)s)")
    p.add_argument("--lora-rank", type=int, default=_default(llama.add_lora, "r"),
                   help="LoRA rank r on all seven projections (default %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=_default(llama.add_lora, "alpha"),
                   help="LoRA alpha; scaling = alpha / r (default %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=_default(llama.add_lora, "dropout"),
                   help="dropout on the LoRA branch's input (default %(default)s)")
    p.add_argument("--int8", action="store_true", help="store the frozen projections in int8 (quant8.py, the "
                   "paper's 8-bit W0); the saved pruned model is float")
    # evaluation
    p.add_argument("--eval", default="wikitext2,ptb", help="comma list of eval sets: wikitext2, ptb or text file "
                   "paths; empty = none (default %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="perplexity window, capped at the model's "
                   "max_seq_len (default %(default)s, the paper's tables)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, help="use only the first N tokens of each eval set, for quick runs "
                   "(default: all)")
    # run management
    p.add_argument("--out", default="out", help="output folder: model/, report.json, log.txt, resume.pt "
                   "(default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its resume.pt")
    p.add_argument("--save-every", type=int, default=50, help="write out/resume.pt every this many steps and at the "
                   "end of training (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order, dropout and the random "
                   "criterion (default %(default)s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction,
                   help="recompute each block in backward to save memory (default: on with cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (llama.compile_blocks): "
                   "about 2x faster LoRA steps on a GPU after a first step that compiles (~30 s at 7B)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: quit after K steps, as if killed
    p.add_argument("--trace", help=argparse.SUPPRESS)  # tests: each rank appends a line per step to TRACE.<rank>
    return p


def check_args(args, world: int = 1) -> None:
    """Range checks that need nothing loaded, so bad flags fail before any file is read or written. `world` is the
    number of processes torchrun started; each takes batch / world sequences of every optimizer step."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
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


def parse_layers(text: str, n_layers: int) -> list:
    try:
        layers = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--layers: expected a comma list of integers, found {text!r}") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"--layers: expected ids in [0, {n_layers}), found {text!r}")
    return layers


# ----------------------------------------------------------------------------------------------
# learning rate and data order


def lr_at(step: int, total_steps: int, lr: float, warmup_frac: float = 0.03) -> float:
    """LR of optimizer step `step` (0-based): linear warmup over the first 3% of the steps (at least one), then
    cosine decay from lr towards 0 at total_steps (Sec. 4.1: AdamW with cosine decay)."""
    warmup = max(1, math.ceil(warmup_frac * total_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


class RowSampler:
    """Which packed rows each micro-batch reads: a fresh random permutation of all rows every epoch, drawn from a
    seeded generator. Its state (generator, permutation, position) goes into the resume checkpoint."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.generator = n_rows, torch.Generator().manual_seed(seed)
        self.order, self.pos, self.epoch = torch.randperm(n_rows, generator=self.generator), 0, 0

    def next(self, k: int) -> Tensor:
        """The next k row indices (k,), crossing into a new epoch (and permutation) when this one runs out."""
        taken = []
        while k:
            if self.pos == self.n_rows:
                self.order = torch.randperm(self.n_rows, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            n = min(k, self.n_rows - self.pos)
            taken.append(self.order[self.pos: self.pos + n])
            self.pos, k = self.pos + n, k - n
        return torch.cat(taken)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos, self.epoch = state["order"], state["pos"], state["epoch"]


# ----------------------------------------------------------------------------------------------
# data parallel: torchrun's environment, one device per process, and a check that the processes agree


def torchrun_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the variables torchrun sets; (0, 0, 1) for `python run.py`, for an
    in-process run.main(...) and for torchrun with one process, none of which touches torch.distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world


def rank_device(requested: Optional[str], local_rank: int, world: int) -> torch.device:
    """--device (default: cuda if available, else cpu); under torchrun a CUDA process takes GPU LOCAL_RANK."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1 or device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"torchrun LOCAL_RANK {local_rank}: expected one GPU per process, found "
                         f"{torch.cuda.device_count()} on this host; lower --nproc-per-node")
    return torch.device("cuda", local_rank)


def data_parallel(model: llama.Transformer, device: torch.device) -> DistributedDataParallel:
    """The model in PyTorch's DDP, which averages over the ranks the gradients of whatever requires grad when it is
    built: the LoRA adapters, and with the vanilla criterion the W of the pruned layers too (the Pruner switches
    theirs on), so Eq. 10 and Eq. 3 both score all-reduced gradients. No initial broadcast (init_sync=False): every
    rank read the same files and seeds (run() checks the adapters and masks). Masks and int8 scales are buffers each
    rank holds itself, so no broadcast before each forward either (that flag was renamed in torch 2.13)."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   init_sync=False, **no_buffer_sync)


def digest(tensors) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes: equal digests mean equal tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_on_all_ranks(tensors, what: str) -> None:
    """Raise on every rank if `tensors` are not bit-identical on all ranks (an all_gather of their digests)."""
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(tensors))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"{what} differ between processes: rank(s) {differ} do not match rank 0 (digests "
                           f"{[d[:12] for d in digests]}); data-parallel training must keep them identical")


# ----------------------------------------------------------------------------------------------
# the output folder: log, resume checkpoint, report


class Log:
    """print() that also appends to out/log.txt; lines from before --out exists are kept and written on attach.
    progress() rewrites one line in place on a terminal; elsewhere, and in the file, only `plain` lines appear.
    A quiet Log (torchrun ranks other than 0) prints and writes nothing."""

    def __init__(self, quiet: bool = False):
        self.file, self.pending, self.tty, self.open_line = None, [], sys.stdout.isatty(), False
        self.quiet = quiet

    def attach(self, path: Path) -> None:
        if self.quiet:
            return
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("".join(line + "\n" for line in self.pending))
        self.file.flush()

    def __call__(self, msg: str = "") -> None:
        if self.quiet:
            return
        if self.open_line:
            print()
            self.open_line = False
        print(msg, flush=True)
        self.to_file(msg)

    def progress(self, msg: str, plain: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            print("\r" + msg + "\033[K", end="", flush=True)
            self.open_line = True
        elif plain:
            print(msg, flush=True)
        if plain:
            self.to_file(msg)

    def to_file(self, msg: str) -> None:
        if self.quiet:
            return
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()
        else:
            self.pending.append(msg)

    def close(self) -> None:
        if self.open_line:
            print()
        if self.file:
            self.file.close()


def check_out_dir(out: Path, resume: bool) -> None:
    """Without --resume an --out holding a run is refused; with it, there must be an unfinished run to continue."""
    held = [name for name in ("resume.pt", "report.json") if (out / name).exists()]
    if not resume and held:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); use --resume or another --out")
    if resume and not (out / "resume.pt").exists():
        raise FileNotFoundError(f"--resume: expected {out / 'resume.pt'}, found no such file")
    if resume and (out / "report.json").exists():
        raise ValueError(f"--resume: the run in {out} has finished ({out / 'report.json'} exists); use another --out")


def load_resume(out: Path, config: dict) -> dict:
    """out/resume.pt, after checking that it was written by a run with the same defining arguments."""
    try:
        state = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which one
        raise ValueError(f"{out / 'resume.pt'}: not a readable resume checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{out / 'resume.pt'}: expected a run.py resume checkpoint, found no 'config' in it")
    state["config"].setdefault("head_unit", "kv")  # written before --head-unit existed: kv groups
    differ = [f"{k}: {state['config'].get(k)!r} there, {v!r} here" for k, v in config.items()
              if state["config"].get(k) != v]
    if differ:
        raise ValueError(f"--resume: {out / 'resume.pt'} was written by a different run ({'; '.join(differ)})")
    return state


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, then os.replace: a reader sees the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def lora_state(model: llama.Transformer) -> dict:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if ".lora_" in name}


@torch.no_grad()
def load_lora_state(model: llama.Transformer, state: dict) -> None:
    """Copy saved adapters into the fresh ones, insisting on the same names and shapes."""
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    if set(params) != set(state):
        raise ValueError(f"resume.pt holds adapters {sorted(set(state) - set(params))[:4]}..., the model has "
                         f"{sorted(set(params) - set(state))[:4]}...")
    for name, p in params.items():
        p.copy_(state[name])


def save_model(sliced: llama.Transformer, tokenizer_path: Path, folder: Path) -> None:
    """The pruned checkpoint plus its tokenizer, under a temporary name first, so `folder` appears complete or not
    at all. The tokenizer keeps a name data.find_tokenizer looks for, and its suffix, which says how to read it (a
    GGUF tokenizer is the whole source .gguf: its vocabulary lives in the metadata)."""
    name = tokenizer_path.name
    if not (name in ("tokenizer.model", "tokenizer.json", "tokenizer.gguf")
            or (name.startswith("tok") and name.endswith(".model"))):
        name = {".json": "tokenizer.json", ".gguf": "tokenizer.gguf"}.get(tokenizer_path.suffix, "tokenizer.model")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
        llama.save_checkpoint(sliced, tmp, kind="pruned")
        shutil.copyfile(tokenizer_path, tmp / name)
        if name == "tokenizer.json" and (tokenizer_path.parent / "tokenizer_config.json").is_file():  # BOS/EOS
            shutil.copyfile(tokenizer_path.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")
        if folder.exists():  # only on --resume after a crash between saving and the report
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# the run


def evaluate(model, eval_sets: dict, seq_len: int, batch_size: int, device, log: Log) -> dict:
    """Perplexity on every eval set by data.perplexity's protocol (non-overlapping windows of seq_len tokens)."""
    results = {}
    for label, tokens in eval_sets.items():
        t0 = time.time()
        results[label] = data.perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device)
        log(f"  {label}: perplexity {results[label]:.3f} ({tokens.numel() // seq_len} windows of {seq_len} tokens, "
            f"{time.time() - t0:.1f}s)")
    return results


def backward_batch(net, rows: Tensor, micro_batch_size: int, device) -> Tensor:
    """Forward and backward of rows (b, T+1) in micro-batches, each loss divided by their number, so the gradients
    accumulate to those of the mean loss over the rows; returns that mean loss (a scalar). Under DDP only the last
    backward all-reduces (the others run under no_sync) and DDP averages over the ranks: with equal shares per rank
    that is the gradient of the mean loss over all ranks' rows, what one process gets from the whole batch."""
    micro_batches = rows.split(micro_batch_size)
    accum = len(micro_batches)
    loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        skip_sync = isinstance(net, DistributedDataParallel) and i < accum - 1
        with net.no_sync() if skip_sync else contextlib.nullcontext():
            batch = batch.to(device)  # (B, T+1)
            logits = net(batch[:, :-1])  # (B, T, V)
            micro_loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()) / accum
            micro_loss.backward()
        loss += micro_loss.detach()
    return loss


def run(args, log: Log) -> int:
    t_start = time.time()
    rank, local_rank, world = torchrun_ranks()
    check_args(args, world)
    device = rank_device(args.device, local_rank, world)
    cuda = device.type == "cuda"
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    out = Path(args.out)
    check_out_dir(out, args.resume)
    if world > 1:  # after the checks above: bad flags fail alike on every rank, before any collective
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # --- everything that can fail on bad input, before --out is touched
    t0 = time.time()
    model = formats.load(args.ckpt, device=device, dtype=dtype, int8=args.int8)
    margs = model.args
    params_before = llama.count_params(model)
    log(f"loaded {args.ckpt} in {time.time() - t0:.1f}s: {params_before:,} parameters, {margs.n_layers} layers, "
        f"dim {margs.dim}, {margs.n_heads} heads / {margs.n_kv_heads} kv heads, MLP {margs.hidden_dim}, vocab "
        f"{margs.vocab_size}, {'int8 projections + ' if args.int8 else ''}{dtype_name} on {device}")
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else data.find_tokenizer(args.ckpt, margs.vocab_size)
    tokenizer = data.Tokenizer(tokenizer_path)
    tokenizer.check_vocab(margs.vocab_size)
    log(f"tokenizer {tokenizer_path}: {tokenizer.vocab_size} tokens")
    seq_len, eval_seq_len = min(args.seq_len, margs.max_seq_len), min(args.eval_seq_len, margs.max_seq_len)
    for flag, asked, got in (("--seq-len", args.seq_len, seq_len), ("--eval-seq-len", args.eval_seq_len, eval_seq_len)):
        if got < asked:
            log(f"{flag} {asked} capped at the model's max_seq_len {got}")
    data_paths = [Path(s) for s in (args.data or str(data.data_dir() / "tinystories-train.txt")).split(",") if s]
    rows = None
    if args.steps:
        rows = data.training_tokens(data_paths, tokenizer, seq_len)  # (N, seq_len + 1)
        log(f"training data: {rows.shape[0]:,} rows of {seq_len + 1} tokens from {', '.join(map(str, data_paths))}")
    eval_names = [s for s in args.eval.split(",") if s]
    eval_sets = {}
    for name in eval_names:
        label, tokens = data.eval_tokens(name, tokenizer)
        tokens = tokens[: args.eval_tokens]  # (n,)
        if tokens.numel() < eval_seq_len:
            raise ValueError(f"eval set {name}: found {tokens.numel()} tokens, need at least --eval-seq-len "
                             f"{eval_seq_len} for one window")
        eval_sets[label] = tokens
    # LoRA and the pruner go on before the "before" perplexity: B = 0 and all-kept masks leave every logit exactly
    # as loaded, and the Pruner's checks (ratio vs heads, criterion vs int8) run before --out exists.
    layers = parse_layers(args.layers, margs.n_layers) if args.layers else None
    lora_params = llama.add_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                 seed=args.seed)
    model.checkpoint_activations = cuda if args.checkpoint_activations is None else args.checkpoint_activations
    if args.compile:
        llama.compile_blocks(model)
    pruner = loraprune.Pruner(model, ratio=args.ratio, total_steps=args.steps, criterion=args.criterion,
                              lam=args.lam, square=args.square, every=args.prune_every, layers=layers,
                              channel_multiple=args.channel_multiple, seed=args.seed, head_unit=args.head_unit)
    config = {  # the arguments that define the run: a resume must match them
        "ckpt": str(Path(args.ckpt).resolve()), "tokenizer": str(tokenizer_path.resolve()), "ratio": args.ratio,
        "criterion": args.criterion, "square": args.square, "lam": args.lam, "prune_every": args.prune_every,
        "layers": pruner.layers, "channel_multiple": args.channel_multiple, "head_unit": args.head_unit,
        "data": [str(p.resolve()) for p in data_paths], "steps": args.steps, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": seq_len, "lr": args.lr,
        "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "int8": args.int8, "seed": args.seed,
        "dtype": dtype_name, "eval": [n if n in data.EVAL_FILES else str(Path(n).resolve()) for n in eval_names],
        "eval_seq_len": eval_seq_len, "eval_tokens": args.eval_tokens}
    if world > 1:  # each rank's dropout stream is its own, so a resume needs as many ranks
        config["world_size"] = world
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    sampler = RowSampler(rows.shape[0], args.seed) if rows is not None else None  # the same order on every rank
    torch.manual_seed(args.seed + rank)  # dropout draws from the global generator (one stream per rank), saved too
    step, loss, elapsed_before = 0, None, 0.0
    if args.resume:
        resumed = load_resume(out, config)
        if resumed["config"].get("world_size", 1) != world:  # load_resume compares only the keys this run has
            raise ValueError(f"--resume: {out / 'resume.pt'} was written by {resumed['config'].get('world_size', 1)} "
                             f"process(es), this run has {world}; resume with as many (torchrun --nproc-per-node)")
        load_lora_state(model, resumed["lora"])
        optimizer.load_state_dict(resumed["optimizer"])
        pruner.load_state_dict(resumed["pruner"])
        sampler.load_state_dict(resumed["sampler"])
        rng, cuda_rng = resumed["rng_per_rank"][rank] if world > 1 else (resumed["rng"], resumed["cuda_rng"])
        torch.set_rng_state(rng)
        if cuda and cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        step, loss, elapsed_before = resumed["step"], resumed["loss"], resumed["elapsed"]

    # --- from here on --out is written (by rank 0 alone)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log.attach(out / "log.txt")
    if args.resume:
        ppl_before = resumed["ppl_before"]
        log(f"resuming {out / 'resume.pt'} at step {step}/{args.steps}")
    else:  # every rank evaluates (only rank 0 prints): the others would wait for it anyway
        log("perplexity before:" if eval_sets else "no eval sets (--eval is empty)")
        ppl_before = evaluate(model, eval_sets, eval_seq_len, args.eval_batch_size, device, log)
    t_session = time.time()

    def save_resume():
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        rng_per_rank = [None] * world
        if world > 1:  # a collective: every rank sends its dropout generator states to every rank
            dist.all_gather_object(rng_per_rank, rng)
        if rank:
            return
        state = {"config": config, "step": step, "loss": loss, "ppl_before": ppl_before, "lora": lora_state(model),
                 "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict(), "sampler": sampler.state_dict(),
                 "rng": rng[0], "cuda_rng": rng[1], **({"rng_per_rank": rng_per_rank} if world > 1 else {}),
                 "elapsed": elapsed_before + time.time() - t_start}  # wall time of every session so far
        atomic_write(out / "resume.pt", lambda tmp: torch.save(state, tmp))

    # --- Algorithm 1: fine-tune LoRA, and after each batch's backward let the pruner score and (on schedule) prune
    per_rank = args.batch_size // world  # sequences of each optimizer step this rank runs
    accum = per_rank // args.micro_batch_size
    tokens_per_step = args.batch_size * seq_len
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    first_step, saved_step = step, step
    net = model  # what the loop calls: the model, or under torchrun its DDP wrapper
    if world > 1:
        net = data_parallel(model, device)  # after the Pruner: with vanilla it has switched on dL/dW
        same_on_all_ranks(lora_params + [m for layer in pruner.masks for m in layer], "LoRA adapters and masks")
    if args.steps:
        log(f"training {args.steps} steps of {args.batch_size} x {seq_len} tokens ({accum} x "
            f"{args.micro_batch_size} sequences accumulated"
            + (f" on each of {world} processes" if world > 1 else "")
            + f"); pruning layers {pruner.layers} ({args.head_unit} heads) to ratio {args.ratio}")
    model.train()
    while step < args.steps and (args.stop_after is None or step < args.stop_after):
        t0 = time.time()
        lr = lr_at(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = rows[sampler.next(args.batch_size)]  # (batch, T+1): the same rows on every rank
        step_loss = backward_batch(net, batch[rank * per_rank: (rank + 1) * per_rank], args.micro_batch_size, device)
        if world > 1:  # the whole batch's loss: the mean of the ranks' equal shares
            dist.all_reduce(step_loss)
            step_loss /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, max_norm)
        if not (math.isfinite(step_loss.item()) and math.isfinite(grad_norm.item())):
            where = (f"{out / 'resume.pt'} holds step {saved_step}, the last good one" if saved_step else
                     "no resume checkpoint was written yet")
            raise TrainingDiverged(f"loss {step_loss.item()} / gradient norm {grad_norm.item()} at step {step + 1}; "
                                   f"stopped before applying it. {where}; try a lower --lr")
        step, loss = step + 1, step_loss.item()
        # the batch's gradients are complete (Pruner's contract) and all-reduced: score, and prune on schedule
        if pruner.update(step) and world > 1:
            same_on_all_ranks([m for layer in pruner.masks for m in layer], f"masks after step {step}")
        if args.trace:
            with open(f"{args.trace}.{rank}", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm.item(),
                                    "masks": digest(m for layer in pruner.masks for m in layer)}) + "\n")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        dt, done = time.time() - t0, step - first_step
        eta = (time.time() - t_session) / done * (args.steps - step)
        memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
        log.progress(f"step {step}/{args.steps} | loss {loss:.4f} | lr {lr:.2e} | sparsity {pruner.sparsity():.1%} | "
                     f"{tokens_per_step / dt:,.0f} tok/s{memory} | ETA {eta:.0f}s",
                     plain=step % 10 == 0 or step in (1, args.steps))
        if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
            save_resume()
            saved_step = step
    if args.stop_after is not None and step < args.steps:
        log(f"stopped after step {step} (--stop-after); continue with --resume")
        return 0

    # --- slice the masks away (LoRA merged), save, evaluate, report
    if world > 1:
        same_on_all_ranks(lora_params + [m for layer in pruner.masks for m in layer], "LoRA adapters and masks")
    sliced = loraprune.slice_model(model, pruner.masks, dtype=dtype)
    params_after = llama.count_params(sliced)
    if rank == 0:
        save_model(sliced, tokenizer_path, out / "model")
    log(f"saved {out / 'model'}: {params_after:,} parameters ({params_before:,} before)")
    if eval_sets:
        log("perplexity after:")
    ppl_after = evaluate(sliced, eval_sets, eval_seq_len, args.eval_batch_size, device, log)
    heads, channels = sliced.args.layer_kv_heads, sliced.args.layer_hidden_dims

    def groups(a: llama.ModelArgs) -> int:  # attention groups (kv groups or query heads, as pruned) + channels
        units = a.layer_kv_heads if args.head_unit == "kv" else a.layer_n_heads
        return sum(units[l] + a.layer_hidden_dims[l] for l in pruner.layers)
    full_groups, kept_groups = groups(model.args), groups(sliced.args)
    report = {
        "args": {**vars(args), **config},
        "params_before": params_before, "params_after": params_after, "ratio_target": args.ratio,
        "ratio_achieved": 1 - params_after / params_before,
        "group_ratio_in_pruned_layers": 1 - kept_groups / full_groups if full_groups else 0.0,  # the official count
        "pruned_layers": pruner.layers, "kv_heads_per_layer": heads, "channels_per_layer": channels,
        "q_per_kv_per_layer": [sliced.args.q_per_kv(l) for l in range(sliced.args.n_layers)],
        "ppl_before": ppl_before, "ppl_after": ppl_after,
        "wall_time_s": elapsed_before + time.time() - t_start,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "steps_done": step, "final_loss": loss}
    if rank == 0:
        atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))

    log(f"\n{'eval set':<24}{'ppl before':>12}{'ppl after':>12}")
    for label in eval_sets:
        log(f"{label:<24}{ppl_before[label]:>12.3f}{ppl_after[label]:>12.3f}")
    log(f"parameters {params_before:,} -> {params_after:,}: {report['ratio_achieved']:.2%} removed (target "
        f"{args.ratio:.2%}); {report['wall_time_s']:.0f}s; report in {out / 'report.json'}")
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2): keep main's contract of returning a code
        return e.code
    rank, _, world = torchrun_ranks()
    log = Log(quiet=rank != 0)
    try:
        return run(args, log)
    except (ValueError, OSError, TrainingDiverged) as e:  # bad input (2): files, formats, ranges, --out; NaN (1)
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        log.to_file(f"error: {e}")  # lands in out/log.txt only if --out exists by now
        return 1 if isinstance(e, TrainingDiverged) else 2
    finally:
        log.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
