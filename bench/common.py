"""What the benchmarks share: the time budget and the results log of one device call, random models built on the
device, pruning steps as run.py takes them, the card's matmul rate, the FLOP count of a LoRA micro-step, the
markdown tables."""
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: llama, loraprune, train
import llama  # noqa: E402
import loraprune  # noqa: E402
import run as cli  # noqa: E402  (run.make_criterion: run.py's names for the criteria)
import train  # noqa: E402

GIB = 2**30
PAPER_ACCUM = 128  # the paper's batch 128 of micro-batch 1: the criterion runs once per 128 micro-steps

# ----------------------------------------------------------------------------------------------
# one device call: results as they come, and the time budget


class Run:
    """Results in order, each also appended to out_dir/results.jsonl at once (a killed call still leaves them), and
    the time budget: `fits(seconds)` says whether a part expected to take that long still ends inside it."""

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

    def skip(self, need_s: float, **tag):
        self.log(**tag, error=f"skipped: needs ~{need_s:.0f} s, {self.left():.0f} s left")


def read_results(out_dir: Path) -> list:
    """The measurements a run wrote to out_dir/results.jsonl, one dict per line (--summarize reads them back)."""
    return [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines() if x.strip()]


def chosen_parts(only: str, known: tuple) -> list:
    """--only as a list of known part names; ValueError for an unknown one."""
    parts = [x.strip() for x in only.split(",") if x.strip()]
    bad = sorted(set(parts) - set(known))
    if bad:
        raise ValueError(f"--only: unknown part(s) {bad}; expected some of {known}")
    return parts


# ----------------------------------------------------------------------------------------------
# the device: synchronize, free, peaks


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset():
    """Free what the last measurement left (compiled graphs too) and restart the peak counters."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(x: int) -> float:
    return round(x / GIB, 2)


def peaks() -> dict:
    """Peak allocated and reserved GiB since the last reset, and what is allocated now; then restart the counters."""
    sync()
    if not torch.cuda.is_available():
        return {}
    out = dict(peak_gib=gib(torch.cuda.max_memory_allocated()), reserved_gib=gib(torch.cuda.max_memory_reserved()),
               allocated_gib=gib(torch.cuda.memory_allocated()))
    torch.cuda.reset_peak_memory_stats()
    return out


def timed(fn) -> float:
    """Seconds fn() takes, synchronized on both sides."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# random models at full shape, built straight on the device


INT8_SCALE = 0.02 / (127 / 3**0.5)  # uniform int8 in [-127, 127] has std 127/sqrt(3): W then has std 0.02


@torch.no_grad()
def build_random(args: llama.ModelArgs, device: str, int8: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> llama.Transformer:
    """The model on the meta device, then every tensor drawn on `device` one module at a time: normal(0, 0.02) in
    `dtype`, norms 1; with int8, the seven block projections are drawn as int8 directly (uniform in [-127, 127], one scale
    per row giving std 0.02), so no float copy of a projection ever exists. Memory and time do not depend on the
    values."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    if int8:
        llama.quantize_model(model)  # on meta: the empty int8 stores
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, llama.LoRALinear) and module.int8:
            shape = (module.out_features, module.in_features)
            module.weight = nn.Parameter(torch.randint(-127, 128, shape, device=device, dtype=torch.int8, generator=g),
                                         requires_grad=False)
            module.scales = torch.full((module.out_features,), INT8_SCALE, device=device)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=dtype)
            t.fill_(1.0) if isinstance(module, llama.RMSNorm) else t.normal_(0, 0.02, generator=g)
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


# ----------------------------------------------------------------------------------------------
# pruning steps, as run.py takes them


def lora_model(args: llama.ModelArgs, device: str, int8: bool, mode: str, backend: str = "inductor",
               criterion: str = "lora", exact_sample=None, dtype: torch.dtype = torch.bfloat16):
    """A random model with LoRA r 8 (alpha 16, dropout 0.05) on all seven projections, set up as run.py does for
    `mode`: 'eager' (checkpointed eager blocks), 'nockpt' (compiled, no recomputation) or a recompute budget ('0.1':
    compiled and checkpointed, llama.compile_blocks(recompute_budget=0.05)); the Pruner (ratio 0.2, every step, a
    run.py --criterion) holds the masks from the start. Returns the model, the adapters and the Pruner."""
    model = build_random(args, device, int8, dtype=dtype)
    params = llama.add_lora(model, r=8, alpha=16.0, dropout=0.05)  # fp32 adapters on the weights' device
    model.checkpoint_activations = mode != "nockpt"
    if mode != "eager":
        llama.compile_blocks(model, backend, **({} if mode == "nockpt" else {"recompute_budget": float(mode)}))
    layers = loraprune.default_pruned_layers(args.n_layers)
    pruner = loraprune.Pruner(model, ratio=0.2, total_steps=100, every=1, layers=layers,
                              channel_multiple=64 if args.dim > 1024 else 1,
                              criterion=cli.make_criterion(criterion, model, layers, exact_sample=exact_sample))
    return model, params, pruner


def step_fn(model, params, pruner, T: int, distill: float = 0.0):
    """One pruning step on random tokens, as run.py takes it: train.backward_batch (forward, float32 cross-entropy,
    backward; distill > 0 adds the frozen teacher's forward and the distillation loss), pruner.update (the
    criterion, the moving average and new masks: the schedule moves at every call here) and AdamW. The returned
    step() gives the three parts' seconds, each timed between syncs."""
    device = next(model.parameters()).device
    rows = torch.randint(0, model.args.vocab_size, (1, T + 1), device=device,
                         generator=torch.Generator(device).manual_seed(1))  # (B, T+1)
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = iter(range(int(pruner.warmup * pruner.total_steps) + 1, 10**9))  # inside the cubic ramp

    def forward_backward():
        train.backward_batch(model, rows, 1, device, distill=distill)

    def step() -> tuple:
        return (timed(forward_backward), timed(lambda: pruner.update(next(steps))),
                timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True))))
    step.forward_backward = forward_backward  # the micro-step's own part, for a profile
    return step


def pruning_steps(step, T: int, warm: int, n: int, at_warm=None) -> dict:
    """warm + n calls of step (step_fn); at_warm() runs once after the warm-up. Medians over the n timed steps:
    the micro-step (forward + backward + AdamW, what each of the paper's 128 micro-batches costs) and the criterion."""
    for _ in range(warm):
        step()
    if at_warm is not None:
        at_warm()
    fb, crit, adam = zip(*[step() for _ in range(n)])
    micro = statistics.median(fb) + statistics.median(adam)
    c = statistics.median(crit)
    return dict(microstep_s=round(micro, 4), forward_backward_s=round(statistics.median(fb), 4),
                adamw_s=round(statistics.median(adam), 4), criterion_s=round(c, 3),
                forward_backward_each_s=[round(t, 4) for t in fb],
                tokens_per_s=round(T / micro, 1), tokens_per_s_paper=round(PAPER_ACCUM * T / (PAPER_ACCUM * micro + c), 1),
                steps=f"{warm}+{n}")


# ----------------------------------------------------------------------------------------------
# the card's bf16 rate, and the work of a LoRA micro-step


def matmul_rate(device: str, n: int, reps: int = 20, warm: int = 5) -> dict:
    """TFLOP/s of torch.matmul on (n, n) bf16 random normal operands (three input pairs in turn, so no product reads
    what the last one left in L2): the median of `reps` products, each timed with CUDA events (host clock on CPU)."""
    g = torch.Generator(device).manual_seed(0)
    pairs = [(torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g),
              torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)) for _ in range(3)]
    for i in range(warm):
        torch.matmul(*pairs[i % 3])
    times = []
    for i in range(reps):
        a, b = pairs[i % 3]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(lambda: torch.matmul(a, b)))
    s = statistics.median(times)
    return dict(n=n, reps=reps, s_median=round(s, 6), tflops=round(2 * n**3 / s / 1e12, 1),
                tflops_min_time=round(2 * n**3 / min(times) / 1e12, 1))


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
    """FLOPs of one LoRA micro-step (batch 1, T tokens, frozen W, LoRA rank r on all seven projections; N = matmul
    weights of the blocks + the output head, N_lora = LoRA parameters, L layers, C model dim):
      useful   = 4·N·T (forward 2NT, backward dL/dx 2NT; no dL/dW: W is frozen) + 6·N_lora·T + 6·L·T²·C (causal
                 attention: forward 2·L·T²·C for QKᵀ and PV over the lower triangle, backward twice that)
      hardware = useful + recomputing every block in backward: 2·N_blocks·T + 2·N_lora·T + 2·L·T²·C
    (a partial recompute does less than `hardware` counts; flash attention's own recompute is in neither)."""
    n_blocks = block_matmul_params(args)
    n = n_blocks + args.dim * args.vocab_size  # + the output head (the embedding is a lookup)
    n_lora = lora_params(args, r)
    attn_fwd = 2 * args.n_layers * T * T * args.n_heads * args.head_dim  # causal: half of 4·L·T²·(H·D)
    useful = 4 * n * T + 6 * n_lora * T + 3 * attn_fwd
    return dict(useful=useful, hardware=useful + 2 * n_blocks * T + 2 * n_lora * T + attn_fwd)


# ----------------------------------------------------------------------------------------------
# tables


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])
