"""Data-parallel LoRAPrune at LLaMA-7B shape with random weights, under torchrun: tokens/s on one GPU against all
of them at the same global batch, peak memory per GPU, and whether every rank holds the same masks after a few
pruning updates.

    torchrun --nproc-per-node 2 bench/bench_ddp.py                  # 2 GPUs; appends a section to out/bench_ddp.md
    torchrun --nproc-per-node 2 bench/bench_ddp.py --small          # CPU smoke test: gloo, a tiny shape, prints only

For each W0 (bf16, int8): phase 1, rank 0 alone runs the global batch (no DDP) while the other ranks wait at a
barrier; phase 2, every rank runs batch / N of it with the model in DDP, exactly as run.py does
(train.data_parallel, train.backward_batch: micro-batches under no_sync but the last). A step is forward + backward of
the micro-batches, gradient clipping, Pruner.update (every step, inside the cubic ramp, so the masks change at every
timed step), AdamW. Time and memory do not depend on the weight values, so every weight is random (normal, 0.02).
"""
import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run, llama, loraprune
import llama  # noqa: E402
import loraprune  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
from common import build_random  # noqa: E402

GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pruning_steps(model, net, rows: torch.Tensor, share: slice, opts, device, world: int) -> dict:
    """Fresh adapters, pruner and AdamW on `model`, then warm + timed steps of run.py's loop, `net` being the model
    or its DDP wrapper. rows (steps * batch, T+1) hold every step's global batch; this rank runs rows `share` of each.
    Returns the median step time, the losses and whether the masks agreed on every rank at every update."""
    lora = llama.add_lora(model, r=8, alpha=16.0, dropout=opts.lora_dropout, seed=0)
    loraprune.apply_masks(model, loraprune.full_masks(model.args))  # the last phase's masks are still in the model
    total_steps = 100  # every=1 and a long ramp: each step lies inside the cubic schedule, so the masks change
    layers = loraprune.default_pruned_layers(model.args.n_layers)
    pruner = loraprune.Pruner(model, ratio=0.5, total_steps=total_steps, every=1, layers=layers,
                              criterion=run.make_criterion(opts.criterion, model, layers))
    first_step = int(pruner.warmup * total_steps) + 1
    if world > 1:  # built after the adapters and the Pruner, as in run.py
        net = train.data_parallel(model, device)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    torch.manual_seed(dist.get_rank() if world > 1 else 0)  # dropout: one stream per rank, as in run.py
    warm, timed = opts.warm, opts.timed
    times, losses, changed, agreed = [], [], 0, 0
    model.train()
    for i in range(warm + timed):
        if i == warm and device.type == "cuda":  # steady state: AdamW's moments exist from here on
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        batch = rows[i * opts.batch: (i + 1) * opts.batch]  # (batch, T+1), the same on every rank
        loss = train.backward_batch(net, batch[share], opts.micro, device)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        if pruner.update(first_step + i):
            changed += 1
            if world > 1:  # recorded, not raised: the table says how many updates agreed
                digests = [None] * world
                dist.all_gather_object(digests, train.digest(m for layer in pruner.masks for m in layer))
                agreed += len(set(digests)) == 1
            else:
                agreed += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        losses.append(loss.item())
        if i >= warm:
            times.append(time.perf_counter() - t0)
    adapters = train.digest(p.detach() for p in lora)
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, adapters)
        adapters_agree = len(set(everyone)) == 1
    else:
        adapters_agree = True
    result = dict(s_per_step=round(sorted(times)[len(times) // 2], 4), losses=[round(x, 5) for x in losses],
                  mask_updates=changed, masks_agree=f"{agreed}/{changed}", adapters_agree=adapters_agree,
                  sparsity=round(pruner.sparsity(), 4))
    del pruner, optimizer, lora, net
    return result


def measure(opts, w0: str, device, rank: int, world: int) -> list:
    """Phase 1 (rank 0 alone) and phase 2 (all ranks, DDP) for one W0; returns one row per phase."""
    args = (llama.ModelArgs(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=512, max_seq_len=64)
            if opts.small else llama.ModelArgs())  # LLaMA-7B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    label = "int8" if w0 == "int8" else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    model = build_random(args, str(device), int8=w0 == "int8", dtype=dtype)  # same seed: same weights
    model.checkpoint_activations = opts.checkpoint_activations
    train.same_on_all_ranks([model.tok_embeddings.weight, model.layers[-1].feed_forward.w2.weight], "random weights")
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, args.vocab_size, ((opts.warm + opts.timed) * opts.batch, opts.seq + 1), generator=g)
    tokens = opts.batch * opts.seq  # per optimizer step, every phase
    weights_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    rows_out = []
    for gpus in (1, world):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        per = opts.batch // gpus
        if gpus == 1:  # rank 0 alone; the others wait (their barrier's timeout is set in main)
            r = pruning_steps(model, model, rows, slice(0, per), opts, device, world=1) if rank == 0 else None
        else:
            r = pruning_steps(model, model, rows, slice(rank * per, (rank + 1) * per), opts, device, world)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        if rank == 0:
            rows_out.append(dict(bench="ddp_step", w0=label, gpus=gpus, seq=opts.seq, batch=opts.batch, per_gpu=per,
                                 micro=opts.micro, accum=per // opts.micro, ckpt=opts.checkpoint_activations,
                                 criterion=opts.criterion, weights_gib=weights_gib and round(weights_gib, 3),
                                 peak_gib_per_gpu=[p and round(p, 3) for p in peaks[:gpus]],
                                 tokens_per_s=round(tokens / r["s_per_step"], 1), **r))
            print(json.dumps(rows_out[-1]), flush=True)
        dist.barrier()
    if rank == 0:
        one, many = rows_out
        many["speedup"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
    del model
    return rows_out


def markdown(rows: list, head: str) -> str:
    cols = ["W0", "GPUs", "T", "batch", "per GPU", "micro x accum", "ckpt", "s/step", "tok/s", "speedup",
            "weights GiB", "peak GiB per GPU", "mask updates agreeing on all ranks", "adapters agree",
            "step-1 loss (same rows and init)"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["w0"], r["gpus"], r["seq"], r["batch"], r["per_gpu"], f"{r['micro']} x {r['accum']}", r["ckpt"],
                 r["s_per_step"], r["tokens_per_s"], r.get("speedup", "-"), r["weights_gib"],
                 ", ".join(str(p) for p in r["peak_gib_per_gpu"]), r["masks_agree"], r["adapters_agree"],
                 r["losses"][0]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shape on CPU with gloo: a smoke test of every path")
    p.add_argument("--w0", default="bf16,int8", help="comma list of frozen-weight stores: bf16, int8")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; 32 with --small)")
    p.add_argument("--batch", type=int, help="global sequences per optimizer step (default 8; 4 with --small)")
    p.add_argument("--micro", type=int, default=1, help="sequences per forward/backward (default %(default)s)")
    p.add_argument("--warm", type=int, default=1, help="untimed steps first (default %(default)s)")
    p.add_argument("--timed", type=int, default=3, help="timed steps, median reported (default %(default)s)")
    p.add_argument("--criterion", default="lora", choices=("lora", "vanilla"))
    p.add_argument("--lora-dropout", type=float, default=0.05, help="as run.py's default (default %(default)s)")
    p.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction,
                   help="recompute each block in backward (default: on with cuda, as in run.py)")
    p.add_argument("--out", help="markdown file to append to (default: out/bench_ddp.md; nothing with --small)")
    opts = p.parse_args()
    rank, local_rank, world = train.torchrun_ranks()
    if world < 2:
        raise SystemExit("run under torchrun with 2 or more processes: torchrun --nproc-per-node 2 "
                         "bench/bench_ddp.py [--small]")
    opts.seq = opts.seq or (32 if opts.small else 2048)
    opts.batch = opts.batch or (4 if opts.small else 8)
    if opts.batch % world or opts.batch // world % opts.micro:
        raise SystemExit(f"--batch {opts.batch} must split into {world} equal shares of whole --micro {opts.micro}")
    cuda = torch.cuda.is_available() and not opts.small
    opts.checkpoint_activations = cuda if opts.checkpoint_activations is None else opts.checkpoint_activations
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # phase 1 keeps the other ranks at a barrier for a whole single-GPU run: allow it more than the default
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                            device_id=device if cuda else None)
    try:
        t0 = time.perf_counter()
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        command = "torchrun --nproc-per-node {} {}".format(world, " ".join(sys.argv))
        rows = []
        w0s = [s.strip() for s in opts.w0.split(",") if s.strip()]
        if not w0s or set(w0s) - {"bf16", "int8"}:
            raise SystemExit(f"--w0: expected a comma list of bf16, int8, found {opts.w0!r}")
        for w0 in w0s:
            rows += measure(opts, w0, device, rank, world)
        if rank == 0:
            head = (f"## bench_ddp, {datetime.datetime.now().isoformat(timespec='seconds')}\n\n"
                    f"- device: {world} x {name}; torch {torch.__version__}; backend {dist.get_backend()}\n"
                    f"- command: `{command}`\n- total wall time: {time.perf_counter() - t0:.0f} s\n\n"
                    f"### One pruning step at LLaMA-7B shape{' (--small: tiny shape)' if opts.small else ''}, "
                    f"1 GPU vs {world} (DDP) at the same global batch")
            md = markdown(rows, head)
            print("\n" + md, flush=True)
            out = opts.out or (None if opts.small else "out/bench_ddp.md")
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as f:
                    f.write("\n" + md + "\n")
            bad = [r for r in rows if r["gpus"] > 1 and (r["masks_agree"] != f"{r['mask_updates']}/{r['mask_updates']}"
                                                          or not r["adapters_agree"] or not r["mask_updates"])]
            if bad:
                print(f"FAIL: ranks disagreed (or no mask update ran) in {len(bad)} row(s)", flush=True)
                return 1
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
