"""LoRAPrune's training loop (Algorithm 1 beside AdamW, Sec. 4.1) and what it needs: its settings, the learning-rate
schedule and data order, forward + backward of a batch in micro-batches (with optional self-distillation from the
frozen weights), the state a run advances with its resume checkpoint, evaluation, the torchrun / DDP helpers, and
the log of an output folder (formats.py puts every file on disk: resume.pt through formats.atomic_write).

run.py, bench/ and the studies call it; nothing here parses flags or reads sys.argv. A study can keep one loaded
(and compiled) model and run many configurations on it one after another, each with fresh adapters and a fresh
Pruner:

    lora = llama.add_lora(model, r=8, alpha=16, seed=seed)               # fresh adapters (B = 0)
    pruner = loraprune.Pruner(model, ratio=0.2, total_steps=args.steps)  # fresh masks (all kept) and scores
    t = train.Training.start(model, lora, pruner, args, rows)
    train.train_loop(t, rows, args, device)
    masks = pruner.masks                                                 # then evaluate, with or without adapters_off
    t.close()                                                            # the model as loaded but for adapters and masks
"""
import contextlib
import fcntl
import hashlib
import inspect
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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
# the loop's settings


@dataclass
class TrainArgs:
    """What the loop does each optimizer step (Sec. 4.1); run.py's training flags of the same names."""
    steps: int = 200  # optimizer steps; the Pruner's schedule spans them
    batch_size: int = 128  # sequences per optimizer step (the paper's), split evenly over the ranks
    micro_batch_size: int = 4  # sequences per forward/backward; batch_size / micro_batch_size of them accumulate
    lr: float = 1e-4  # peak AdamW learning rate (the paper's): warmup over the first 3% of the steps, cosine to 0
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # clip the LoRA gradients' global norm to this, before the Pruner scores; 0 = no clipping
    distill: float = 0.0  # self-distillation weight alpha (distill_loss); 0 = plain cross-entropy
    distill_temperature: float = 1.0  # softmax temperature T of the distillation
    save_every: int = 50  # call save() every this many steps (and at the end)
    seed: int = 0  # data order (RowSampler) and LoRA dropout (the global generator, seed + rank)


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
# the loss: cross-entropy, optionally with self-distillation from the frozen weights


@contextlib.contextmanager
def adapters_off(model: llama.Transformer):
    """Inside the block every LoRA branch of `model` is off (adapters_on = False), on again on exit: the base weights
    under the current masks, e.g. the masks of a run alone, without its fine-tuning."""
    linears = [m for m in model.modules() if isinstance(m, llama.LoRALinear)]
    try:
        for m in linears:
            m.adapters_on = False
        yield model
    finally:
        for m in linears:
            m.adapters_on = True


@contextlib.contextmanager
def frozen_teacher(model: llama.Transformer):
    """Inside the block `model` is the frozen model it was loaded as: every LoRA branch off (adapters_off) and every
    head / channel mask cleared, restored on exit. The teacher of self-distillation costs no second copy of the
    weights (int8 W0 included): it is the student's own W0, run once more without grad."""
    masked = [(m, name) for m in model.modules() for name in ("head_mask", "channel_mask") if hasattr(m, name)]
    saved = [getattr(m, name) for m, name in masked]
    try:
        for m, name in masked:
            setattr(m, name, None)
        with adapters_off(model):
            yield model
    finally:
        for (m, name), mask in zip(masked, saved):
            setattr(m, name, mask)


def _chunk_loss(student: Tensor, teacher: Tensor, targets: Tensor, alpha: float, temperature: float) -> Tensor:
    """The summed (not averaged) distillation loss of one chunk: student, teacher (B, t, V), targets (B, t)."""
    s = student.float()  # (B, t, V)
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="sum") if alpha < 1 else s.new_zeros(())
    if alpha == 0:
        return ce
    log_p_s = F.log_softmax(s / temperature, dim=-1)  # (B, t, V)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # (B, t, V)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # sum over tokens of KL(teacher || student)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def distill_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], targets: Tensor, alpha: float,
                 temperature: float = 1.0, chunk: int = 256) -> Tensor:
    """Mean over tokens of (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher || student), the KL between
    the softmaxes of logits / T (Hinton et al.; T^2 keeps the gradient's scale as T changes). Logits (B, T, V),
    targets (B, T). Computed `chunk` positions at a time, each chunk recomputed in backward (a checkpoint), so the
    float32 copies of the (tokens x vocab) logits exist for one chunk at a time, never whole. alpha = 0 is the
    plain cross-entropy and needs no teacher."""
    B, T, V = student_logits.shape
    total = student_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, T, chunk):
        piece = (student_logits[:, i: i + chunk], teacher_logits[:, i: i + chunk] if alpha else None,
                 targets[:, i: i + chunk])
        if student_logits.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, *piece, alpha, temperature,
                                                              use_reentrant=False)
        else:
            total = total + _chunk_loss(*piece, alpha, temperature)
    return total / (B * T)


def backward_batch(net, rows: Tensor, micro_batch_size: int, device, distill: float = 0.0,
                   temperature: float = 1.0) -> Tensor:
    """Forward and backward of rows (b, T+1) in micro-batches, each loss divided by their number, so the gradients
    accumulate to those of the mean loss over the rows; returns that mean loss (a scalar). Under DDP only the last
    backward all-reduces (the others run under no_sync) and DDP averages over the ranks: with equal shares per rank
    that is the gradient of the mean loss over all ranks' rows, what one process gets from the whole batch.
    distill > 0 adds self-distillation (distill_loss): one more forward per micro-batch, without grad, of the
    frozen teacher (frozen_teacher) on the same tokens."""
    model = net.module if isinstance(net, DistributedDataParallel) else net
    micro_batches = rows.split(micro_batch_size)
    accum = len(micro_batches)
    loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        skip_sync = isinstance(net, DistributedDataParallel) and i < accum - 1
        with net.no_sync() if skip_sync else contextlib.nullcontext():
            batch = batch.to(device)  # (B, T+1)
            x, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
            if distill:
                with torch.no_grad(), frozen_teacher(model):
                    teacher_logits = model(x)  # (B, T, V)
                micro_loss = distill_loss(net(x), teacher_logits, targets, distill, temperature) / accum
            else:
                logits = net(x)  # (B, T, V)
                micro_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / accum
            micro_loss.backward()
        loss += micro_loss.detach()
    return loss


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
    rank read the same files and seeds (run.py checks the adapters and masks). Masks and int8 scales are buffers
    each rank holds itself, so no broadcast before each forward either (that flag was renamed in torch 2.13)."""
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


@dataclass
class Ranks:
    """This process's place in a torchrun job, and every collective a run needs; with one process (world 1) each
    method is the identity, so a run's code has no rank branches of its own."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(*torchrun_ranks())

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes --out."""
        return self.rank == 0

    def device(self, requested: Optional[str]) -> torch.device:
        return rank_device(requested, self.local_rank, self.world)

    def start(self, device: torch.device) -> None:
        """Join the process group (nccl on GPUs, gloo on CPUs); nothing with one process."""
        if self.world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: llama.Transformer, device: torch.device):
        """What the loop calls: the model, or under torchrun its DDP wrapper (data_parallel)."""
        return data_parallel(model, device) if self.world > 1 else model

    def mean(self, x: Tensor) -> Tensor:
        """x averaged over the ranks (in place, all_reduce)."""
        if self.world > 1:
            dist.all_reduce(x)
            x /= self.world
        return x

    def check_same(self, tensors, what: str) -> None:
        if self.world > 1:
            same_on_all_ranks(list(tensors), what)

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (all_gather_object)."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs


# ----------------------------------------------------------------------------------------------
# the state a run advances, and its resume checkpoint


def rng_state(device: torch.device) -> tuple:
    """(CPU generator state, CUDA generator state or None): what LoRA dropout draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda" and state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
        if not isinstance(state[name], Tensor) or state[name].shape != p.shape:  # copy_ would broadcast
            raise ValueError(f"adapter {name}: expected shape {tuple(p.shape)}, found "
                             f"{tuple(getattr(state[name], 'shape', ())) or type(state[name]).__name__}")
        p.copy_(state[name])


def read_resume(path: Path, keys: list) -> dict:
    """The dict in `path`, which must hold every one of `keys`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which one
        raise ValueError(f"{path}: not a readable resume checkpoint ({formats.error_words(e)})") from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else keys
    if missing:
        raise ValueError(f"{path}: expected a resume checkpoint with {', '.join(keys)}; found no {', '.join(missing)}")
    return state


def config_differences(there: dict, here: dict) -> list:
    """'key: value there, value here' for every key whose value differs or that only one of the two has."""
    def show(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "missing"
    keys = list(here) + [k for k in there if k not in here]
    return [f"{k}: {show(there, k)} there, {show(here, k)} here" for k in keys
            if k not in there or k not in here or there[k] != here[k]]


@dataclass
class Training:
    """The state a run advances, all of which its resume checkpoint keeps (with every rank's dropout generator): the
    adapters (in the model), AdamW's moments, the Pruner's moving averages and masks, the data order, the step."""
    model: llama.Transformer
    lora_params: list  # every lora_A and lora_B: what AdamW trains
    pruner: loraprune.Pruner
    optimizer: torch.optim.Optimizer
    sampler: Optional["RowSampler"]  # None for a run of no steps
    step: int = 0  # optimizer steps done
    loss: Optional[float] = None  # the last step's

    @classmethod
    def start(cls, model: llama.Transformer, lora_params: list, pruner: loraprune.Pruner, args: TrainArgs,
              rows: Optional[Tensor], rank: int = 0) -> "Training":
        """Step 0 of a run with these (fresh) adapters and Pruner: AdamW over the adapters, the data order of
        args.seed over the rows (N, T+1) (None: no steps to take), and the global generator that LoRA dropout draws
        from seeded args.seed + rank (one stream per rank). On a model that ran before (after close()), with new
        adapters and a new Pruner, the run is the one a freshly loaded model would give."""
        torch.manual_seed(args.seed + rank)
        optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
        sampler = RowSampler(rows.shape[0], args.seed) if rows is not None and args.steps else None
        return cls(model, lora_params, pruner, optimizer, sampler)

    def masks(self) -> list:
        """Every layer's (heads, channels) keep-masks, flat."""
        return [m for layer in self.pruner.masks for m in layer]

    def save(self, path: Path, config: dict, ranks: "Ranks", device: torch.device, **extra) -> None:
        """Write the state to `path` (rank 0; formats.atomic_write), with `config`, what a resume must match, and the
        caller's `extra` values (run.py: the scores before training, the wall time so far). A collective under
        torchrun: every rank sends its dropout generator's state."""
        rng_per_rank = ranks.gather(rng_state(device))
        if not ranks.main:
            return
        state = {"config": config, "step": self.step, "loss": self.loss, **extra,
                 "lora": lora_state(self.model), "optimizer": self.optimizer.state_dict(),
                 "pruner": self.pruner.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": rng_per_rank[0][0], "cuda_rng": rng_per_rank[0][1],
                 **({"rng_per_rank": rng_per_rank} if ranks.world > 1 else {})}
        formats.atomic_write(path, lambda tmp: torch.save(state, tmp), size=formats.tensor_bytes(state))

    def resume(self, path: Path, config: dict, ranks: "Ranks", device: torch.device, extra: tuple = ()) -> dict:
        """Continue from `path`, written by save() for the same `config` and as many processes; returns the saved
        `extra` values by name. A missing key, a different config or process count is a ValueError naming the file."""
        keys = ["config", "step", "loss", *extra, "lora", "optimizer", "pruner", "sampler", "rng", "cuda_rng"]
        state = read_resume(path, keys + (["rng_per_rank"] if ranks.world > 1 else []))
        world = state["config"].get("world_size", 1)  # the config names it only for several processes
        if world != ranks.world:
            raise ValueError(f"{path} was written by {world} process(es), this run has {ranks.world}; "
                             f"resume with as many (torchrun --nproc-per-node)")
        differ = config_differences(state["config"], config)
        if differ:
            raise ValueError(f"{path} was written by a different run ({'; '.join(differ)})")
        try:
            load_lora_state(self.model, state["lora"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.pruner.load_state_dict(state["pruner"])
            self.sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng_per_rank"][ranks.rank] if ranks.world > 1 else (state["rng"], state["cuda_rng"]),
                          device)
        except KeyError as e:  # a part's own state lacks a key
            raise ValueError(f"{path}: expected a complete resume checkpoint, found no {e} in a part of it") from None
        except (ValueError, TypeError, RuntimeError, IndexError) as e:  # a part of another kind or shape
            raise ValueError(f"{path}: a part does not fit this run ({formats.error_words(e)})") from None
        self.step, self.loss = state["step"], state["loss"]
        return {k: state[k] for k in extra}

    def close(self) -> None:
        """Take off the model what the run put on it besides adapters and masks: the exact criterion's probes, and
        the dL/dW the vanilla criterion switched on, with its gradients. The next run on the model then starts as on
        the model as loaded, once it has fresh adapters and a fresh Pruner."""
        if hasattr(self.pruner.criterion, "remove"):  # variants.ExactSums' probes
            self.pruner.criterion.remove()
        for m in self.model.modules():
            if isinstance(m, llama.LoRALinear):
                m.weight.requires_grad_(False)
                m.weight.grad = None
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# the loop: Algorithm 1 beside AdamW


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the step was not applied. saved_step: the step that the last
    save() holds (None: nothing saved)."""

    def __init__(self, message: str, saved_step: Optional[int] = None):
        super().__init__(message)
        self.saved_step = saved_step


def compile_warmup(step_times: list) -> Optional[float]:
    """The extra seconds of the first step (where torch.compile traces and builds the kernels): its time minus the
    median of the later steps' (s). None with fewer than two steps."""
    if len(step_times) < 2:
        return None
    later = sorted(step_times[1:])
    median = later[len(later) // 2] if len(later) % 2 else (later[len(later) // 2 - 1] + later[len(later) // 2]) / 2
    return step_times[0] - median


def train_loop(t: Training, rows: Tensor, args: TrainArgs, device: torch.device | str, net=None,
               ranks: Optional["Ranks"] = None, log: Optional["Log"] = None, save: Optional[Callable[[], None]] = None,
               until: Optional[int] = None, observe: Optional[Callable[[Training, float], None]] = None,
               stop: Optional[Callable[[], bool]] = None) -> list:
    """Algorithm 1: fine-tune LoRA and, after each batch's backward, let the Pruner score and (on schedule) prune,
    from step t.step to args.steps, or to `until` as if killed there. Each optimizer step, in the official code's
    order: set the lr (lr_at), forward and backward of the batch in micro-batches (backward_batch), clip the LoRA
    gradients, stop before applying anything if the loss or the norm is NaN/inf (TrainingDiverged), Pruner.update,
    observe(t, grad_norm) if given, AdamW's step. rows (N, T+1) are the packed training rows; every rank draws the
    same batch and runs its 1/world share through `net`, the model or its DDP wrapper (default: t.model). save(),
    if given, runs every args.save_every steps, at args.steps and at `until`; nothing is written otherwise. stop(),
    if given, is asked after every step, the safe point: once it says True (on any rank) the loop saves that step
    and returns (run.py's SIGINT / SIGTERM). The progress line goes to `log` (default: none). Returns this call's
    step times (s)."""
    net, device = t.model if net is None else net, torch.device(device)
    ranks, log = ranks or Ranks(), log or Log(quiet=True)
    until = args.steps if until is None else min(until, args.steps)
    per_rank = args.batch_size // ranks.world  # sequences of each optimizer step this rank runs
    tokens_per_step = args.batch_size * (rows.shape[1] - 1)
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    compiled = any(layer.compiled is not None for layer in t.model.layers)  # the progress line then shows the compile warm-up
    saved_step, times, t_session = t.step if save and t.step else None, [], time.time()
    t.model.train()
    while t.step < until:
        t0 = time.time()
        lr = lr_at(t.step, args.steps, args.lr)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        batch = rows[t.sampler.next(args.batch_size)]  # (batch, T+1): the same rows on every rank
        shard = batch[ranks.rank * per_rank: (ranks.rank + 1) * per_rank]  # (per_rank, T+1)
        loss = ranks.mean(backward_batch(net, shard, args.micro_batch_size, device, distill=args.distill,
                                         temperature=args.distill_temperature))  # the whole batch's
        grad_norm = torch.nn.utils.clip_grad_norm_(t.lora_params, max_norm)
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
            raise TrainingDiverged(f"loss {loss.item()} / gradient norm {grad_norm.item()} at step {t.step + 1}; "
                                   "stopped before applying it", saved_step)
        t.step, t.loss = t.step + 1, loss.item()
        # the batch's gradients are complete (Pruner's contract) and all-reduced: score, and prune on schedule
        if t.pruner.update(t.step):
            ranks.check_same(t.masks(), f"masks after step {t.step}")
        if observe is not None:
            observe(t, grad_norm.item())
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

        times.append(time.time() - t0)
        eta = (time.time() - t_session) / len(times) * (args.steps - t.step)
        memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        warmup = compile_warmup(times) if compiled else None
        warmup = f" | compile warm-up {warmup:.1f}s" if warmup is not None else ""
        log.progress(f"step {t.step}/{args.steps} | loss {t.loss:.4f} | lr {lr:.2e} | sparsity "
                     f"{t.pruner.sparsity():.1%} | {tokens_per_step / times[-1]:,.0f} tok/s{memory}{warmup} | "
                     f"ETA {eta:.0f}s", plain=t.step % 10 == 0 or t.step in (1, args.steps))
        # the safe point: the step is whole; a stop asked for on any rank saves it and ends the loop on every rank
        stopping = stop is not None and ranks.mean(torch.tensor(float(stop()), device=device)).item() > 0
        if save is not None and (t.step % args.save_every == 0 or t.step == until or stopping):
            save()
            saved_step = t.step
        if stopping:
            break
    return times


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, eval_sets: dict, seq_len: int, batch_size: int, device, log: Optional["Log"] = None) -> dict:
    """Perplexity on every eval set by data.perplexity's protocol (non-overlapping windows of seq_len tokens)."""
    log = log or Log(quiet=True)
    results = {}
    for label, tokens in eval_sets.items():
        t0 = time.time()
        results[label] = data.perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device)
        log(f"  {label}: perplexity {results[label]:.3f} ({tokens.numel() // seq_len} windows of {seq_len} tokens, "
            f"{time.time() - t0:.1f}s)")
    return results


def score_tasks(model: llama.Transformer, tasks: Optional[dict], when: str, log: Optional["Log"] = None
                ) -> Optional[dict]:
    """lm-eval's scores of the model ({task: {metric: value}}), printed; tasks holds harness.evaluate_tasks'
    arguments but the model (None: no tasks, None returned)."""
    if tasks is None:
        return None
    import harness
    log = log or Log(quiet=True)
    log(f"lm-eval tasks {when} ({tasks['num_fewshot']}-shot):")
    scores = harness.evaluate_tasks(model, **tasks)
    for task, metrics in scores.items():
        log(f"  {task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return scores


# ----------------------------------------------------------------------------------------------
# the output folder: log


class Log:
    """print() that also appends to out/log.txt; lines from before --out exists are kept and written on attach.
    progress() rewrites one line in place on a terminal; elsewhere, and in the file, only `plain` lines appear.
    A quiet Log (torchrun ranks other than 0) prints and writes nothing."""

    def __init__(self, quiet: bool = False):
        self.file, self.pending, self.tty, self.open_line = None, [], sys.stdout.isatty(), False
        self.quiet, self.path = quiet, None

    def attach(self, path: Path) -> None:
        if self.quiet:
            return
        self.path, self.file = path, open(path, "a", encoding="utf-8")
        self._append("".join(line + "\n" for line in self.pending))

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
            self._append(msg + "\n")
        else:
            self.pending.append(msg)

    def _append(self, text: str) -> None:
        """Append to the file; one the system refuses (a full disk, a file size limit) is one OSError naming it,
        and the log writes nothing more there."""
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:
            file, self.file = self.file, None
            with contextlib.suppress(OSError):  # the bytes it could not write fail again on close
                file.close()
            raise OSError(e.errno, f"not written ({e.strerror}); the lines before are kept", str(self.path)) from None

    def close(self) -> None:
        if self.open_line:
            print()
        if self.file:
            self.file.close()


def check_out_dir(out: Path, resume: bool) -> None:
    """--out must be a folder this process can create or write in. Without --resume an --out holding a run is
    refused; with it, there must be an unfinished run to continue."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())  # out, or the folder it will be made in
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no write permission"
        raise ValueError(f"--out {out}: cannot write in {existing} ({why})")
    held = [name for name in ("resume.pt", "report.json") if (out / name).exists()]
    if not resume and held:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); use --resume or another --out")
    if resume and not (out / "resume.pt").exists():
        raise FileNotFoundError(f"--resume: expected {out / 'resume.pt'}, found no such file")
    if resume and (out / "report.json").exists():
        raise ValueError(f"--resume: the run in {out} has finished ({out / 'report.json'} exists); use another --out")


class OutLock:
    """One run per output folder: take() holds an exclusive fcntl.flock on OUT/.lock until release() or the end of
    the process (the OS drops it then, so a killed run leaves no stale lock); a second run gets a ValueError naming
    the process that holds it. Once it holds the lock, take() tidies what a run killed while writing left (no other
    run can be writing now): temporary files go, a folder caught between its old and new version gets its old one."""

    def __init__(self, out: Path):
        self.out, self.file = out, None

    def take(self) -> None:
        if self.file is not None:
            return
        file = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise ValueError(f"--out {self.out} is in use by another run (process {holder}); wait for it to end or "
                             "use another --out") from None
        except OSError as e:  # a file system without flock (some cluster file systems unless mounted with it)
            file.close()
            raise OSError(e.errno, f"cannot lock it ({e.strerror}); use an --out on a file system with flock",
                          str(self.out / ".lock")) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        for stale in self.out.glob("*.tmp-*"):  # formats.atomic_write's temporaries: never a whole file
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for old in self.out.glob("*.old-*"):  # a folder formats.atomic_write_folder was replacing when killed
            new = self.out / old.name.rsplit(".old-", 1)[0]
            if new.exists():
                shutil.rmtree(old)
            else:
                old.rename(new)  # the new one never arrived: the earlier one goes back

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
