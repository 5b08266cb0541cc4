"""What the benchmarks share: the time budget and the results log of one device call, random models built on the
device, the card's matmul rate, the FLOP count of a LoRA micro-step, the markdown tables."""
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

GIB = 2**30

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
def build_random(args: llama.ModelArgs, device: str, int8: bool, seed: int = 0) -> llama.Transformer:
    """The model on the meta device, then every tensor drawn on `device` one module at a time: bf16 normal(0, 0.02),
    norms 1; with int8, the seven block projections are drawn as int8 directly (uniform in [-127, 127], one scale
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
            t = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
            t.fill_(1.0) if isinstance(module, llama.RMSNorm) else t.normal_(0, 0.02, generator=g)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"still on the meta device: {left[:4]}"
    return model


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
