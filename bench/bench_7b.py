"""GPU benchmarks of LoRAPrune at LLaMA-7B shape with random weights (issues 5 and 7).

Three parts, each selectable with --only:
  train    one LoRA-guided pruning step (forward, backward, Eq. 10 criterion, group sums, moving average, mask
           update, AdamW) at 256 and 2048 tokens: bf16 / int8 W0, with / without activation checkpointing, and the
           vanilla criterion (Eq. 3, bf16). Time per step, tokens/s, peak memory, the criterion's share.
  forward  2048-token forward (no grad) of the dense model, int8 W0, and models sliced at 20% / 50% with per-layer
           sizes from loraprune.prune_counts (channel_multiple 1, 8, 64, 128), against HF LlamaForCausalLM at the
           uniform mean shapes, plus our model at the anchor's uniform shapes (26 / 8806, 16 / 5504).
  load     write a two-shard Meta checkpoint once, then time formats.load (bf16 and int8) in a fresh
           subprocess each: wall time, host peak RSS over the pre-load baseline, GPU peak.

Prints one JSON line per measurement and a markdown table at the end, which is also appended to --out.
Memory and time do not depend on the weight values, so every weight is random (normal, std 0.02).

  python bench/bench_7b.py --small                      # CPU smoke test at a tiny shape: every code path
  python bench/bench_7b.py --anchor anchor.log          # on the GPU, after .carry/hf_peft_anchor.py > anchor.log
"""
import argparse
import datetime
import gc
import json
import os
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: llama, loraprune, quant8
import formats  # noqa: E402
import llama  # noqa: E402
import loraprune  # noqa: E402
import quant8  # noqa: E402

GIB = 2**30
RESULTS = []  # every measurement logged, in order: the markdown tables are built from this list

# ----------------------------------------------------------------------------------------------
# shapes and settings


def model_args(small: bool) -> llama.ModelArgs:
    """LLaMA-7B (32 layers, dim 4096, 32 heads, MLP 11008, vocab 32000), or a tiny shape for the CPU smoke test."""
    if small:
        return llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=512, max_seq_len=64)
    return llama.ModelArgs()


def settings(small: bool) -> dict:
    if small:
        return dict(seqs=(16, 32), fwd_seq=32, train_steps=(1, 2), fwd_reps=(1, 2))
    return dict(seqs=(256, 2048), fwd_seq=2048, train_steps=(3, 5), fwd_reps=(5, 10))


PAPER_ACCUM = 128  # the paper's batch 128 of micro-batch 1: the criterion runs once per 128 micro-steps
RATIOS = (0.2, 0.5)
CHANNEL_MULTIPLES = (1, 8, 64, 128)
ANCHOR_UNIFORM = {0.2: (26, 8806), 0.5: (16, 5504)}  # the anchor's shapes: 32 - round(32 r), 11008 - round(11008 r)

# ----------------------------------------------------------------------------------------------
# device helpers: synchronize, memory, logging, a soft deadline


class Device:
    def __init__(self, name: str):
        self.type = name
        self.cuda = name == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self):
        """Free what the last measurement left and restart the peak counter."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated_gib(self):
        return round(torch.cuda.memory_allocated() / GIB, 3) if self.cuda else None

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / GIB, 3) if self.cuda else None

    def name(self) -> str:
        return torch.cuda.get_device_name(0) if self.cuda else "cpu"


def log(**kw) -> dict:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


class Deadline:
    """Soft time budget: once it has passed, the remaining measurements are logged as skipped, not run, so the
    tables are still written inside the device call's limit. `reserve` seconds are kept back for later parts."""

    def __init__(self, seconds):
        self.start, self.seconds, self.reserve = time.perf_counter(), seconds, 0.0

    def passed(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds - self.reserve


def median(xs):
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------------------------
# random models, built on the meta device and materialized straight on the target device


def int8_store(module: nn.Module) -> nn.Module:
    """Give every LoRALinear of `module` (on the meta device) an empty int8 store: quant8.convert_to_int8 before
    the quant8 decoupling of issue 17, LoRALinear.quantize_ after it."""
    if hasattr(quant8, "convert_to_int8"):
        return quant8.convert_to_int8(module)
    for lin in module.modules():
        if isinstance(lin, llama.LoRALinear):
            lin.quantize_()
    return module


def meta_model(args: llama.ModelArgs, int8: bool) -> llama.Transformer:
    """The model on the meta device (no memory), with int8 stores for the seven projections if asked: the caller
    then draws every tensor straight on the target device, one module at a time."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    return int8_store(model) if int8 else model


def is_int8(module: nn.Module) -> bool:
    return isinstance(module, llama.LoRALinear) and module.weight.dtype == torch.int8


@torch.no_grad()
def random_model(args: llama.ModelArgs, device: str, dtype=torch.bfloat16, int8: bool = False,
                 seed: int = 0, std: float = 0.02) -> llama.Transformer:
    """A Transformer with normal(0, std) weights (norms 1) in `dtype`; with int8=True the seven projections are
    drawn in `dtype` one matrix at a time, quantized on the device and dropped, so no full float model exists."""
    model = meta_model(args, int8)
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if is_int8(module):
            W = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype).normal_(0, std, generator=g)
            q, scale = quant8.quantize(W)  # (out, in) int8, (out,) float32
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scales = scale
            del W
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=dtype)
            t.fill_(1.0) if isinstance(module, llama.RMSNorm) else t.normal_(0, std, generator=g)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"still on the meta device: {left[:4]}"
    return model


def pruned_args(args: llama.ModelArgs, ratio: float, channel_multiple: int) -> llama.ModelArgs:
    """The per-layer sizes LoRAPrune leaves at `ratio` (loraprune.prune_counts over the default pruned layers)."""
    layers = loraprune.default_pruned_layers(args.n_layers)
    counts = loraprune.prune_counts(args, ratio, layers, channel_multiple)
    return llama.ModelArgs(**{**vars(args),
                              "layer_kv_heads": [k - h for k, (h, _) in zip(args.layer_kv_heads, counts)],
                              "layer_hidden_dims": [f - c for f, (_, c) in zip(args.layer_hidden_dims, counts)]})


def uniform_args(args: llama.ModelArgs, heads: int, hidden: int) -> llama.ModelArgs:
    return llama.ModelArgs(**{**vars(args), "layer_kv_heads": [heads] * args.n_layers,
                              "layer_hidden_dims": [hidden] * args.n_layers})


# ----------------------------------------------------------------------------------------------
# part 1: one LoRA-guided pruning step


def timed_steps(model, pruner, opt, tokens: torch.Tensor, targets: torch.Tensor, first_step: int, warm: int, timed: int,
                dev: Device, at_warm=None) -> tuple[list, list, list, list]:
    """warm + timed pruning steps (forward with float32 cross-entropy and backward, pruner.update, AdamW), each part
    timed between syncs; at_warm() runs once after the warm-up (steady state: AdamW's moments exist from there on).
    Returns, over the timed steps: forward+backward s, update s, AdamW s, whether the masks changed."""
    fb, crit, adam, changed = [], [], [], []
    for i in range(warm + timed):
        if i == warm and at_warm is not None:
            dev.sync()
            at_warm()
        dev.sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())  # (B*T, V) logits
        loss.backward()
        del loss
        dev.sync()
        t1 = time.perf_counter()
        did = pruner.update(first_step + i)
        dev.sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dev.sync()
        t3 = time.perf_counter()
        if i >= warm:
            fb.append(t1 - t0)
            crit.append(t2 - t1)
            adam.append(t3 - t2)
            changed.append(did)
    return fb, crit, adam, changed


def train_step(args, dev: Device, seq: int, int8: bool, ckpt: bool, criterion: str, warm: int, timed: int,
               compiled: bool = False, exact_sample: int = None) -> dict:
    """Build a random model with LoRA r=8 alpha 16 on all seven projections (blocks compiled if asked), then run
    warm + timed steps of forward, float32 cross-entropy, backward, pruner.update (timed on its own) and AdamW.
    criterion: a run.py --criterion name (exact_sample: its --exact-sample)."""
    from run import make_criterion  # run.py's names for the criteria
    model = random_model(args, dev.type, int8=int8)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)
    model.checkpoint_activations = ckpt
    if compiled:
        llama.compile_blocks(model)  # the first warm step compiles (the masks' arrival recompiles once)
        warm += 1
    # every=1 and a short schedule: each step lies in the cubic ramp, so the masks really change in timed steps
    total_steps = 100
    layers = loraprune.default_pruned_layers(args.n_layers)
    pruner = loraprune.Pruner(model, ratio=0.5, total_steps=total_steps, every=1, layers=layers,
                              criterion=make_criterion(criterion, model, layers, exact_sample=exact_sample))
    first_step = int(pruner.warmup * total_steps) + 1
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(dev.type).manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (1, seq), device=dev.type, generator=g)  # (B, T)
    targets = torch.randint(0, args.vocab_size, (1, seq), device=dev.type, generator=g)  # (B, T)
    dev.sync()
    weights = dev.allocated_gib()
    fb, crits, adam, changed = timed_steps(model, pruner, opt, tokens, targets, first_step, warm, timed, dev,
                                           at_warm=lambda: torch.cuda.reset_peak_memory_stats() if dev.cuda else None)
    steps = [a + b + c for a, b, c in zip(fb, crits, adam)]
    step, crit = median(steps), median(crits)
    micro = step - crit  # forward + backward + AdamW: what each of the 128 accumulated micro-steps costs
    out = dict(bench="train_step", stack="ours", criterion=criterion, w0="int8" if int8 else "bf16", ckpt=ckpt,
               compiled=compiled, seq=seq, micro_batch=1, weights_gib=weights, peak_gib=dev.peak_gib(),
               s_per_step_median=round(step, 4), tokens_per_s=round(seq / step, 1),
               criterion_s_median=round(crit, 4), microstep_s=round(micro, 4),
               criterion_per_microstep=round(crit / micro, 3),
               criterion_share_paper=round(crit / (PAPER_ACCUM * micro + crit), 4),
               tokens_per_s_paper=round(PAPER_ACCUM * seq / (PAPER_ACCUM * micro + crit), 1),
               mask_updates=f"{sum(changed)}/{len(changed)}", sparsity=round(pruner.sparsity(), 4),
               steps=f"{warm}+{timed}")
    del model, params, pruner, opt
    return out


def config_name(seq, int8, ckpt, criterion, compiled) -> str:
    return (f"{criterion}:{'int8' if int8 else 'bf16'}:{'ckpt' if ckpt else 'nockpt'}:"
            f"{'compiled' if compiled else 'eager'}:{seq}")


def run_train(args, dev, cfg, deadline):
    warm, timed = cfg["train_steps"]
    big = max(cfg["seqs"])
    configs = [(seq, int8, ckpt, "lora", False) for seq in cfg["seqs"] for int8 in (False, True)
               for ckpt in (False, True)]
    configs += [(big, False, True, "lora", True), (big, False, False, "lora", True), (big, True, True, "lora", True)]
    configs += [(seq, False, ckpt, "vanilla", False) for seq in cfg["seqs"] for ckpt in (False, True)]
    configs += [(min(cfg["seqs"]), False, True, "lora", True), (big, True, False, "lora", True)]
    if cfg.get("train_only"):  # --train-only: e.g. "lora:int8:ckpt:compiled:2048"
        configs = [c for c in configs if config_name(*c) in cfg["train_only"]]
    for seq, int8, ckpt, criterion, compiled in configs:
        tag = dict(bench="train_step", stack="ours", criterion=criterion, w0="int8" if int8 else "bf16",
                   ckpt=ckpt, compiled=compiled, seq=seq)
        if deadline.passed():
            log(**tag, error="skipped: deadline")
            continue
        dev.reset()
        try:
            log(**train_step(args, dev, seq, int8, ckpt, criterion, warm, timed, compiled))
        except torch.OutOfMemoryError:
            log(**tag, error="OOM")
        torch._dynamo.reset()  # drop compiled graphs (and the models they hold)
        dev.reset()


# ----------------------------------------------------------------------------------------------
# part 2: forward time of 2048 tokens, dense and sliced, ours and Hugging Face's


@torch.no_grad()
def time_forward(forward, vocab: int, seq: int, dev: Device, warm: int, reps: int) -> float:
    x = torch.randint(0, vocab, (1, seq), device=dev.type, generator=torch.Generator(dev.type).manual_seed(2))
    for _ in range(warm):
        forward(x)
    ts = []
    for _ in range(reps):
        dev.sync()
        t = time.perf_counter()
        forward(x)
        dev.sync()
        ts.append(time.perf_counter() - t)
    return median(ts)


def ours_forward(args, dev, cfg, int8=False, compiled=False) -> dict:
    model = random_model(args, dev.type, int8=int8)
    if compiled:
        llama.compile_blocks(model)  # the warm-up forwards compile
    dev.sync()
    weights = dev.allocated_gib()
    s = time_forward(model, args.vocab_size, cfg["fwd_seq"], dev, *cfg["fwd_reps"])
    out = dict(params_b=round(llama.count_params(model) / 1e9, 4), weights_gib=weights, peak_gib=dev.peak_gib(),
               s_median=round(s, 4))
    del model
    return out


def hf_config(args: llama.ModelArgs, heads: int, hidden: int):
    """The anchor's LlamaConfig at uniform sizes (attributes set after construction: transformers 5 refuses
    hidden_size % heads != 0, and a head-pruned model keeps head_dim 128)."""
    from transformers import LlamaConfig
    c = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=hidden,
                    num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                    num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, max_position_embeddings=args.max_seq_len,
                    rms_norm_eps=args.norm_eps, attn_implementation="sdpa")
    c.num_attention_heads = heads
    c.num_key_value_heads = heads
    return c


def hf_forward(args, dev, cfg, heads: int, hidden: int) -> dict:
    """HF LlamaForCausalLM built the anchor's way (default dtype bf16 under the device context), forward timed
    the anchor's way (eval, no grad, input_ids only)."""
    from transformers import LlamaForCausalLM
    config = hf_config(args, heads, hidden)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev.type):
            m = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    dev.sync()
    weights = dev.allocated_gib()
    s = time_forward(lambda x: m(input_ids=x), args.vocab_size, cfg["fwd_seq"], dev, *cfg["fwd_reps"])
    out = dict(params_b=round(sum(p.numel() for p in m.parameters()) / 1e9, 4), weights_gib=weights,
               peak_gib=dev.peak_gib(), s_median=round(s, 4))
    del m
    return out


def shape_summary(a: llama.ModelArgs) -> dict:
    heads = [k * a.n_rep for k in a.layer_kv_heads]
    return dict(heads_min=min(heads), heads_max=max(heads), heads_mean=round(sum(heads) / len(heads), 2),
                hidden_min=min(a.layer_hidden_dims), hidden_max=max(a.layer_hidden_dims),
                hidden_mean=round(sum(a.layer_hidden_dims) / len(a.layer_hidden_dims), 1))


def run_forward(args, dev, cfg, deadline):
    jobs = [("ours", "dense", 0.0, None, args, False, False), ("ours", "dense-int8", 0.0, None, args, True, False)]
    hf_shapes = {}  # (heads, hidden) -> [labels]: one HF model per distinct uniform shape
    for ratio in RATIOS:
        for m in CHANNEL_MULTIPLES:
            a = pruned_args(args, ratio, m)
            jobs.append(("ours", f"sliced-m{m}", ratio, m, a, False, False))
            s = shape_summary(a)
            hf_shapes.setdefault((ratio, round(s["heads_mean"]), round(s["hidden_mean"])), []).append(m)
        heads, hidden = ANCHOR_UNIFORM[ratio] if args.n_layers == 32 and args.dim == 4096 else \
            (args.n_heads - round(args.n_heads * ratio), args.hidden_dim - round(args.hidden_dim * ratio))
        jobs.append(("ours", "uniform-anchor", ratio, None, uniform_args(args, heads, hidden), False, False))
    # compiled blocks last (each distinct sliced layer size compiles once)
    jobs += [("ours", "dense", 0.0, None, args, False, True), ("ours", "dense-int8", 0.0, None, args, True, True)]
    jobs += [("ours", "sliced-m64", ratio, 64, pruned_args(args, ratio, 64), False, True) for ratio in RATIOS]
    if cfg.get("forward_only"):  # --forward-only: e.g. "dense-int8:int8:compiled:0.0"
        jobs = [j for j in jobs if f"{j[1]}:{'int8' if j[5] else 'bf16'}:{'compiled' if j[6] else 'eager'}:{j[2]}"
                in cfg["forward_only"]]
    for stack, label, ratio, multiple, a, int8, compiled in jobs:
        tag = dict(bench="forward", stack=stack, model=label, ratio=ratio, channel_multiple=multiple,
                   seq=cfg["fwd_seq"], w0="int8" if int8 else "bf16", compiled=compiled, **shape_summary(a))
        if deadline.passed():
            log(**tag, error="skipped: deadline")
            continue
        dev.reset()
        try:
            log(**tag, **ours_forward(a, dev, cfg, int8, compiled))
        except torch.OutOfMemoryError:
            log(**tag, error="OOM")
        torch._dynamo.reset()
        dev.reset()
    if cfg.get("forward_only"):
        return  # HF's models run only in a full forward part
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        log(bench="forward", stack="hf", error=f"transformers not importable: {e}")
        return
    for (ratio, heads, hidden), multiples in hf_shapes.items():
        tag = dict(bench="forward", stack="hf", model="uniform-mean", ratio=ratio, channel_multiples=multiples,
                   seq=cfg["fwd_seq"], w0="bf16", heads=heads, intermediate=hidden)
        if deadline.passed():
            log(**tag, error="skipped: deadline")
            continue
        dev.reset()
        try:
            log(**tag, **hf_forward(args, dev, cfg, heads, hidden))
        except torch.OutOfMemoryError:
            log(**tag, error="OOM")
        dev.reset()


# ----------------------------------------------------------------------------------------------
# part 3: loading a two-shard Meta checkpoint in a fresh process


META_PARAMS_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}


@torch.no_grad()
def write_meta_checkpoint(args: llama.ModelArgs, folder: Path, dev: Device, n_shards: int = 2) -> dict:
    """Meta's layout from random bf16 weights: params.json and consolidated.0k.pth, each tensor split on
    formats.meta_shard_dim (norms replicated). One shard at a time is held in host memory; every tensor is drawn on
    the device from its own seed, so each shard redraws the same full tensor and keeps its slice."""
    folder.mkdir(parents=True, exist_ok=True)
    params = META_PARAMS_7B if args == llama.ModelArgs() else {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "norm_eps": args.norm_eps,
        "hidden_dim": args.hidden_dim, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in llama.Transformer(args).state_dict().items()}
    t0 = time.perf_counter()
    for s in range(n_shards):
        shard = {}
        for i, (name, shape) in enumerate(shapes.items()):
            full = torch.empty(shape, device=dev.type, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            else:
                full.normal_(0, 0.02, generator=torch.Generator(dev.type).manual_seed(i))
            dim = formats.meta_shard_dim(name)
            part = full if dim is None else full.chunk(n_shards, dim=dim)[s]
            shard[name] = part.contiguous().cpu()
        shard["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2)[: args.head_dim // 2]
                                                          .float() / args.head_dim))  # Meta ships it; loaders drop it
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
        del shard
    (folder / "COMPLETE").write_text("ok")
    sizes = [p.stat().st_size for p in sorted(folder.glob("consolidated.*.pth"))]
    return dict(write_s=round(time.perf_counter() - t0, 2), shard_gib=[round(x / GIB, 3) for x in sizes])


def _rss_kib() -> dict:
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
    """Runs in a fresh process: baseline RSS after torch and the CUDA context are up, then load_checkpoint once.
    A 5 ms poller samples resident memory (VmRSS, and its anonymous and file-backed (mmap'd checkpoint) parts);
    the host-extra figure is the sampled VmRSS peak over the baseline. ru_maxrss is reported but not used: Linux
    carries it over fork and exec, so the child starts with the parent's high-water mark (8 GiB in the first
    H100 run, from writing the checkpoint)."""
    dev = Device(device)
    if dev.cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_kib()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peaks, stop = dict(base), threading.Event()

    def poll():
        while not stop.is_set():
            for k, v in _rss_kib().items():
                peaks[k] = max(peaks.get(k, 0), v)
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    model = formats.load(folder, device=device, dtype=torch.bfloat16, int8=int8)
    dev.sync()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    peak_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = 2**20  # KiB per GiB
    print(json.dumps(dict(
        load_s=round(wall, 2), params_b=round(llama.count_params(model) / 1e9, 4),
        rss_baseline_gib=round(base.get("VmRSS", base_max) / kib, 3), ru_maxrss_baseline_gib=round(base_max / kib, 3),
        ru_maxrss_gib=round(peak_max / kib, 3), host_extra_gib=round((peaks.get("VmRSS", 0) - base.get("VmRSS", 0)) / kib, 3),
        anon_extra_peak_gib=round((peaks.get("RssAnon", 0) - base.get("RssAnon", 0)) / kib, 3),
        file_extra_peak_gib=round((peaks.get("RssFile", 0) - base.get("RssFile", 0)) / kib, 3),
        gpu_peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3) if dev.cuda else None,
        gpu_model_gib=round(torch.cuda.memory_allocated() / GIB, 3) if dev.cuda else None)), flush=True)


def run_load(args, dev, cfg, deadline, ckpt_dir: Path, keep: bool):
    if deadline.passed():
        log(bench="load", error="skipped: deadline")
        return
    if (ckpt_dir / "COMPLETE").exists():
        sizes = [p.stat().st_size for p in sorted(ckpt_dir.glob("consolidated.*.pth"))]
        log(bench="load_write", reused=str(ckpt_dir), shard_gib=[round(x / GIB, 3) for x in sizes])
    else:
        dev.reset()
        log(bench="load_write", folder=str(ckpt_dir), **write_meta_checkpoint(args, ckpt_dir, dev))
        dev.reset()
    shard_gib = max(p.stat().st_size for p in ckpt_dir.glob("consolidated.*.pth")) / GIB
    try:
        for int8 in (False, True):
            if deadline.passed():
                log(bench="load", int8=int8, error="skipped: deadline")
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--load-child", str(ckpt_dir), "--device", dev.type]
            cmd += ["--int8"] if int8 else []
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode or not lines:
                log(bench="load", int8=int8, error=f"child exit {r.returncode}: {r.stderr.strip()[-600:]}")
                continue
            res = json.loads(lines[-1])
            log(bench="load", stack="ours", w0="int8" if int8 else "bf16", shards=2,
                shard_gib=round(shard_gib, 3), **res)
    finally:
        if not keep:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the anchor's JSON lines, the comparisons, the markdown


def read_anchor(path) -> list:
    """Every JSON object line of the anchor's log (other lines, e.g. warnings, are skipped)."""
    out = []
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def check(rows: list, name: str, value, op: str, limit, note: str = ""):
    if value is None:
        rows.append([name, "-", f"{op} {fmt(limit)}", "not measured", note])
    else:
        ok = value <= limit if op == "<=" else value >= limit
        rows.append([name, fmt(value), f"{op} {fmt(limit)}", "PASS" if ok else "FAIL", note])


def markdown(anchor: list) -> str:
    ok = [r for r in RESULTS if "error" not in r]
    train = [r for r in ok if r["bench"] == "train_step"]
    fwd = [r for r in ok if r["bench"] == "forward"]
    loads = [r for r in ok if r["bench"] == "load"]
    a_train = {(r["mode"], r["seq"]): r for r in anchor if r.get("bench") == "train_step" and "error" not in r}
    a_fwd = {r["ratio"]: r for r in anchor if r.get("bench") == "forward_2048"}
    parts, targets = [], []

    def find(rows, **kw):
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)

    if train:
        rows = []
        for r in train:
            mode = "vanilla" if r["criterion"] == "vanilla" else ("lora_ckpt" if r["ckpt"] else "lora")
            a = a_train.get((mode, r["seq"]))
            speed = round(r["tokens_per_s"] / a["tokens_per_s"], 2) if a else None
            rows.append([r["criterion"], r["w0"], r["ckpt"], r["compiled"], r["seq"], r["s_per_step_median"],
                         r["tokens_per_s"],
                         r["tokens_per_s_paper"], r["weights_gib"], r["peak_gib"], r["criterion_s_median"],
                         r["criterion_per_microstep"], r["criterion_share_paper"], r["mask_updates"],
                         a and a["tokens_per_s"], a and a["peak_gib"], speed])
        parts.append("### One pruning step (micro-batch 1; criterion every step)\n\n" + table(
            ["criterion", "W0", "ckpt", "compiled", "T", "s/step", "tok/s", "tok/s @128 accum", "weights GiB", "peak GiB",
             "criterion s", "criterion / microstep", "criterion share @128", "mask updates", "anchor tok/s",
             "anchor peak GiB", "ours / anchor tok/s"], rows))
        big = max(r["seq"] for r in train)
        for compiled in (False, True):
            for ckpt, mode in ((False, "lora"), (True, "lora_ckpt")):
                r = find(train, criterion="lora", w0="bf16", ckpt=ckpt, compiled=compiled, seq=big)
                a = a_train.get((mode, big))
                for key, what in (("tokens_per_s", "full step"), ("tokens_per_s_paper", "criterion amortized @128")):
                    v = round(r[key] / a["tokens_per_s"], 2) if r and a else None
                    check(targets, f"LoRA step T={big} bf16 ckpt={ckpt} compiled={compiled}: tok/s / anchor {mode} "
                          f"({what})", v, ">=", 1.7)
            for w0, limit in (("bf16", 16), ("int8", 9)):
                r = find(train, criterion="lora", w0=w0, ckpt=True, compiled=compiled, seq=big)
                check(targets, f"peak GiB, LoRA step T={big} {w0} ckpt compiled={compiled}", r and r["peak_gib"],
                      "<=", limit)
        r = find(train, criterion="lora", w0="int8", ckpt=True, seq=big)
        check(targets, "int8 weight memory GiB (LoRA adapters included)", r and r["weights_gib"], "<=", 7)
        for w0 in ("bf16", "int8"):
            r = find(train, criterion="lora", w0=w0, ckpt=True, compiled=False, seq=big)
            check(targets, f"criterion share @128 accum, T={big} {w0} ckpt", r and r["criterion_share_paper"],
                  "<=", 0.05)
    if fwd:
        ours = [r for r in fwd if r["stack"] == "ours"]
        hf = [r for r in fwd if r["stack"] == "hf"]
        dense = {c: find(ours, model="dense", compiled=c) for c in (False, True)}
        rows = []
        for r in ours:
            d = dense[r["compiled"]]
            rel = round(r["s_median"] / d["s_median"], 3) if d else None
            h = next((x for x in hf if x["ratio"] == r["ratio"] and r["channel_multiple"] in x["channel_multiples"]),
                     None)
            source = h and "here"
            if r["model"] in ("uniform-anchor", "dense"):  # the anchor ran HF at exactly these shapes
                h = a_fwd.get(r["ratio"])
                source = h and "anchor"
            rows.append([r["model"], r["w0"], r["compiled"], r["ratio"], r["channel_multiple"],
                         f"{r['heads_min']}-{r['heads_max']} (mean {r['heads_mean']})",
                         f"{r['hidden_min']}-{r['hidden_max']} (mean {r['hidden_mean']})", r["params_b"],
                         r["s_median"], rel, h and h.get("s_median"), source,
                         round(r["s_median"] / h["s_median"], 3) if h and h.get("s_median") else None])
        parts.append(f"### Forward, {ours[0]['seq'] if ours else '-'} tokens, no grad (HF: uniform shapes, "
                     "the anchor's own numbers where its shapes match)\n\n" + table(
                         ["model", "W0", "compiled", "ratio", "channel multiple", "heads per layer", "MLP per layer",
                          "params B", "s", "/ our dense (same compiled)", "HF s (eager)", "HF run", "ours / HF"], rows))
        if hf:
            parts.append("HF models run here (uniform mean shapes):\n\n" + table(
                ["ratio", "for multiples", "heads", "intermediate", "params B", "s"],
                [[r["ratio"], r["channel_multiples"], r["heads"], r["intermediate"], r["params_b"], r["s_median"]]
                 for r in hf]))
        for c in (False, True):
            i8, d = find(ours, model="dense-int8", compiled=c), dense[c]
            check(targets, f"int8 / bf16 dense forward time, compiled={c}", round(i8["s_median"] / d["s_median"], 3)
                  if i8 and d else None, "<=", 1.3)
            for ratio, limit in ((0.2, 0.8), (0.5, 0.55)):
                for m in CHANNEL_MULTIPLES:
                    r = find(ours, model=f"sliced-m{m}", ratio=ratio, compiled=c)
                    if r or not c:
                        check(targets, f"{int(ratio * 100)}%-sliced (multiple {m}) / our dense forward, compiled={c}",
                              round(r["s_median"] / d["s_median"], 3) if r and d else None, "<=", limit)
    if loads:
        parts.append("### Loading a two-shard Meta checkpoint (fresh process each)\n\n" + table(
            ["W0", "load s", "shard GiB", "RSS before GiB", "ru_maxrss GiB", "host extra GiB", "anon extra GiB",
             "file-backed extra GiB", "GPU peak GiB", "GPU model GiB"],
            [[r["w0"], r["load_s"], r["shard_gib"], r["rss_baseline_gib"], r["ru_maxrss_gib"], r["host_extra_gib"],
              r["anon_extra_peak_gib"], r["file_extra_peak_gib"], r["gpu_peak_gib"], r["gpu_model_gib"]] for r in loads]))
        for r in loads:
            check(targets, f"load {r['w0']}: host extra (sampled VmRSS peak - baseline) GiB", r["host_extra_gib"], "<=",
                  r["shard_gib"], "one shard")
    if anchor:
        rows = [[r.get("bench"), r.get("mode", r.get("ratio")), r.get("seq"), r.get("tokens_per_s"),
                 r.get("s_per_step_median", r.get("s_median")), r.get("peak_gib"), r.get("error")]
                for r in anchor if "bench" in r]
        parts.append("### Anchor (HF + PEFT, same device call)\n\n" + table(
            ["bench", "mode / ratio", "T", "tok/s", "s", "peak GiB", "error"], rows))
    errors = [r for r in RESULTS if "error" in r]
    if errors:
        parts.append("### Not measured\n\n" + "\n".join(f"- `{json.dumps(r)}`" for r in errors))
    if targets:
        parts.append("### Targets\n\n" + table(["target", "value", "limit", "result", "note"], targets))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# CLI


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shape, for a CPU smoke test of every code path")
    p.add_argument("--only", default="train,forward,load", help="comma-separated parts: train, forward, load")
    p.add_argument("--out", default="out/bench_7b.md",
                   help="markdown file the results are appended to (bench/RESULTS.md is edited by hand: one current "
                        "document)")
    p.add_argument("--anchor", default=None, help="log of the HF+PEFT anchor (../shared/bench/hf_peft_anchor.py) from the same device call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="soft budget: measurements not started by then are skipped (the tables are still written)")
    p.add_argument("--ckpt-dir", default=None, help="where the Meta checkpoint is written (default: a temp folder)")
    p.add_argument("--keep-ckpt", action="store_true", help="keep the written checkpoint (reused if present)")
    p.add_argument("--train-only", default=None, help="comma list of train configs to run, named criterion:w0:ckpt:"
                   "compiled:T, e.g. lora:int8:ckpt:compiled:2048 (default: all)")
    p.add_argument("--forward-only", default=None, help="comma list of forward models to run, named "
                   "model:w0:compiled:ratio, e.g. dense-int8:int8:compiled:0.0 (default: all)")
    p.add_argument("--load-child", default=None, help=argparse.SUPPRESS)  # internal: one load in a fresh process
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.load_child:
        return load_child(opts.load_child, opts.device, opts.int8)
    parts = [x.strip() for x in opts.only.split(",") if x.strip()]
    bad = sorted(set(parts) - {"train", "forward", "load"})
    if bad:
        raise ValueError(f"--only: unknown part(s) {bad}; expected train, forward, load")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --small (CPU) for a smoke test")
    dev, args, cfg = Device(opts.device), model_args(opts.small), settings(opts.small)
    cfg["train_only"] = opts.train_only and opts.train_only.split(",")
    cfg["forward_only"] = opts.forward_only and opts.forward_only.split(",")
    deadline = Deadline(opts.deadline_s)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    log(bench="env", device=dev.name(), torch=torch.__version__, small=opts.small, parts=parts, command=command)
    load_reserve = 120.0 if not opts.small else 0.0  # writing 13.5 GB and two loads in fresh processes
    if "train" in parts:
        deadline.reserve = load_reserve if "load" in parts else 0.0
        run_train(args, dev, cfg, deadline)
    if "forward" in parts:
        run_forward(args, dev, cfg, deadline)
    if "load" in parts:
        deadline.reserve = 0.0
        ckpt_dir = Path(opts.ckpt_dir) if opts.ckpt_dir else Path(tempfile.gettempdir()) / f"bench7b-meta-{os.getpid()}"
        run_load(args, dev, cfg, deadline, ckpt_dir, opts.keep_ckpt)
    anchor = read_anchor(opts.anchor)
    head = anchor[0] if anchor and "bench" not in anchor[0] else {}
    md = (f"## bench_7b, {datetime.datetime.now().isoformat(timespec='seconds')}\n\n"
          f"- device: {dev.name()}; torch {torch.__version__}"
          + (f"; anchor: transformers {head.get('transformers')}, peft {head.get('peft')}" if head else "")
          + f"\n- command: `{command}`\n- total wall time: {time.perf_counter() - deadline.start:.0f} s\n\n"
          + markdown(anchor) + "\n")
    print("\n" + md, flush=True)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    with open(opts.out, "a") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
