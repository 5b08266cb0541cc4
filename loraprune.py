"""LoRAPrune (Zhang et al., arXiv 2305.18403): structured pruning of a LLaMA guided by its LoRA gradients.

Read alongside ../shared/paper/EQUATIONS.md. Top to bottom: per-weight importance (Eq. 10, and Eq. 3 plus two
baselines), group sums (Eq. 4), the moving average (Eq. 11), thresholds (Eq. 12), how many groups each layer loses
and when (the ratio and the schedule of Algorithm 1), masks in the model (Eq. 13), slicing to a smaller dense model,
and the Pruner that runs Algorithm 1 beside any training loop.

Shapes: W (out, in); A (r, in); B (out, r); K kv groups of a layer (each = one kv head and its n_rep query heads),
F MLP channels of a layer, D head dim, C model dim.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from llama import ModelArgs, Transformer, projections

CRITERIA = ("lora", "vanilla", "magnitude", "random")

# ----------------------------------------------------------------------------------------------
# per-weight importance (pure functions; every result is float32 (out, in))
#
# The paper writes squares (Eq. 3, Eq. 10); the official code takes absolute values. Both are offered
# (`square`); the default is the square, as in the paper, because it is the one whose first-order
# meaning is the loss change (Eq. 2) and the one Eq. 3 = Eq. 10 holds for (tests check it).


def lora_weight_gradient(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float) -> Tensor:
    """Eq. 7-9: s * (gB @ A + B @ gA - gB @ gA), the LoRA-only estimate of dL/dW. It is exactly minus the change
    of s * B @ A after one SGD step with lr 1 on A and B. A, gA (r, in); B, gB (out, r) -> (out, in) float32."""
    A, B, gA, gB = A.float(), B.float(), gA.float(), gB.float()
    # gB@A + B@gA - gB@gA = [gB | B - gB] @ [A ; gA]: one rank-2r product instead of three rank-r ones
    return (torch.cat([gB, B - gB], dim=1) @ torch.cat([A, gA], dim=0)).mul_(scaling)  # (out, 2r) @ (2r, in)


def lora_guided_importance(W: Tensor, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float,
                           square: bool = True) -> Tensor:
    """Eq. 10: (s * (gB @ A + B @ gA - gB @ gA) ⊙ (W + s * B @ A))^2 from the LoRA matrices and their gradients;
    dL/dW is never formed. W (out, in) any float dtype; A, gA (r, in); B, gB (out, r) -> (out, in) float32.
    Rows are independent, so callers may pass a slice of rows of W, B and gB."""
    merged = W.float().addmm(B.float(), A.float(), alpha=scaling)  # W + s * B @ A, (out, in)
    score = lora_weight_gradient(A, B, gA, gB, scaling).mul_(merged)
    return score.square_() if square else score.abs_()


def vanilla_importance(W: Tensor, gW: Tensor, square: bool = True) -> Tensor:
    """Eq. 3: (dL/dW ⊙ W)^2, LLM-Pruner's criterion; needs the full gradient of W. (out, in) -> (out, in)."""
    score = gW.float() * W.float()
    return score.square_() if square else score.abs_()


def magnitude_importance(W: Tensor, square: bool = True) -> Tensor:
    """Baseline: W^2 (the official code's magnitude mode: Eq. 3 with the gradient taken as 1)."""
    return W.float().square() if square else W.float().abs()


def random_importance(W: Tensor, generator: torch.Generator) -> Tensor:
    """Baseline: uniform random scores from a seeded generator, (out, in)."""
    return torch.rand(W.shape, generator=generator, device=generator.device).to(W.device)


# ----------------------------------------------------------------------------------------------
# Eq. 4: group importance = the sum of its weights' importance


def row_group_sums(row_sums: Tensor, group_size: int) -> Tensor:
    """(out,) per-row sums -> (out / group_size,) sums over consecutive blocks of rows."""
    return row_sums.view(-1, group_size).sum(dim=1)


def projection_sums(linear, criterion: str, square: bool = True, chunk_rows: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The importance of every weight of one projection, reduced at once to its row sums (out,) and column sums
    (in,). Rows are taken `chunk_rows` at a time (default: 2^24 elements, 64 MiB of float32: large enough that
    a 7B step is not bound by kernel launches), so at most two such blocks are alive, and an int8 W is
    dequantized one chunk at a time."""
    out_features, in_features = linear.out_features, linear.in_features
    chunk_rows = chunk_rows or max(1, 2**24 // in_features)
    row_sums = torch.empty(out_features, dtype=torch.float32, device=linear.weight.device)
    col_sums = torch.zeros(in_features, dtype=torch.float32, device=linear.weight.device)
    s = linear.scaling
    for i in range(0, out_features, chunk_rows):
        rows = slice(i, i + chunk_rows)
        W = linear.dense_weight(rows)  # (rows, in)
        if criterion == "lora":
            A, B = linear.lora_A, linear.lora_B
            I = lora_guided_importance(W, A, B[rows], A.grad, B.grad[rows], s, square)
        else:
            merged = W.float() if not linear.r else W.float().addmm(linear.lora_B[rows].float(),
                                                                     linear.lora_A.float(), alpha=s)
            if criterion == "vanilla":
                I = vanilla_importance(merged, linear.weight.grad[rows], square)
            elif criterion == "magnitude":
                I = magnitude_importance(merged, square)
            else:
                I = random_importance(merged, generator)
        row_sums[rows] = I.sum(dim=1)
        col_sums += I.sum(dim=0)
    return row_sums, col_sums


def layer_group_scores(model: Transformer, layer_id: int, criterion: str, square: bool = True,
                       generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Eq. 4 for one layer: (K,) kv-group scores and (F,) channel scores.
    A kv group g owns rows of wq (its n_rep query heads), rows of wk and wv (head g) and the matching columns of
    wo; MLP channel c owns row c of w1 and w3 and column c of w2. The projections' sums are added as Eq. 4 says;
    the official code L2-normalises each projection's score vector first, which weighs o/down like q/k/v/gate/up
    whatever their scale (not done here: the paper does not, and the groups of one layer share the same sums)."""
    p = projections(model, layer_id)
    D, n_rep = model.args.head_dim, model.args.n_rep
    sums = {name: projection_sums(lin, criterion, square, generator=generator) for name, lin in p.items()}
    heads = (row_group_sums(sums["wq"][0], n_rep * D) + row_group_sums(sums["wk"][0], D)
             + row_group_sums(sums["wv"][0], D) + row_group_sums(sums["wo"][1], n_rep * D))  # (K,)
    channels = sums["w1"][0] + sums["w3"][0] + sums["w2"][1]  # (F,)
    return heads, channels


# ----------------------------------------------------------------------------------------------
# Eq. 11 and Eq. 12


def ema(prev: Tensor, new: Tensor, lam: float) -> Tensor:
    """Eq. 11: lam * prev + (1 - lam) * new. lam = 0 keeps only the latest scores."""
    return lam * prev + (1 - lam) * new


def threshold_mask(scores: Tensor, keep: Tensor, n_pruned: int) -> Tensor:
    """Eq. 12 with an exact count: switch off the lowest-scoring groups among those still kept until `n_pruned`
    groups are off. Groups already off stay off (the official code multiplies the scores by the mask).
    scores (G,), keep (G,) bool -> (G,) bool."""
    n_more = n_pruned - int((~keep).sum())
    if n_more <= 0:
        return keep.clone()
    candidates = torch.where(keep, scores.float(), torch.full_like(scores, math.inf, dtype=torch.float32))
    off = torch.topk(candidates, n_more, largest=False).indices  # lowest kept scores; p is the largest of them
    new = keep.clone()
    new[off] = False
    return new


# ----------------------------------------------------------------------------------------------
# how many groups each layer loses (the ratio), and when (the schedule of Algorithm 1)


def default_pruned_layers(n_layers: int) -> list:
    """The official code never prunes the first int(0.1 * n_layers) layers nor the last one (0-2 and 31 of 32)."""
    return list(range(int(0.1 * n_layers), n_layers - 1))


def group_params(args: ModelArgs) -> tuple[int, int]:
    """Base-weight parameters of one kv group (wq, wk, wv rows + wo columns) and of one MLP channel (w1, w3, w2)."""
    return args.head_dim * args.dim * (2 * args.n_rep + 2), 3 * args.dim


def count_base_params(args: ModelArgs, heads: list, channels: list) -> int:
    """Parameters of a model with `heads` kv groups and `channels` MLP channels per layer (no LoRA)."""
    per_group, per_channel = group_params(args)
    head_out = args.dim * args.vocab_size * (1 if args.tie_embeddings else 2)
    return head_out + args.dim * (2 * args.n_layers + 1) + sum(h * per_group + c * per_channel
                                                               for h, c in zip(heads, channels))


def prune_counts(args: ModelArgs, ratio: float, layers: list, channel_multiple: int = 1) -> list:
    """How many kv groups and MLP channels each layer loses so that `ratio` of the model's parameters go.

    `ratio` is a fraction of all parameters (embeddings and head included), which is how the paper's tables and
    users count; the official code instead takes it as a fraction of groups in the pruned layers, which removes
    fewer parameters. Every pruned layer loses the same fraction f of its block parameters; heads round to whole
    kv groups and the MLP takes up the difference, and the rounding error is carried to the next layer, so the
    total lands within one channel of the target. With channel_multiple > 1, kept channels are rounded to that
    multiple (GPU-friendly matmul sizes) in layers whose width is a multiple of it.
    Returns [(kv groups removed, channels removed)] for every layer (zeros for layers not pruned)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    per_group, per_channel = group_params(args)
    target = ratio * count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims)
    prunable = sum(args.layer_kv_heads[l] * per_group + args.layer_hidden_dims[l] * per_channel for l in layers)
    f = target / prunable if prunable else 0.0
    counts, carry = [(0, 0)] * args.n_layers, 0.0
    for l in layers:
        K, Fw = args.layer_kv_heads[l], args.layer_hidden_dims[l]
        heads = round(f * K)
        if heads >= K or f >= 1:
            raise ValueError(f"ratio {ratio} needs {f:.1%} of each pruned layer's parameters, which would remove "
                             f"every kv head of layer {l} ({K}); lower the ratio or prune more layers")
        want = f * (K * per_group + Fw * per_channel) + carry  # parameters this layer should lose
        channels = round((want - heads * per_group) / per_channel)
        if channel_multiple > 1 and Fw % channel_multiple == 0:
            channels = Fw - channel_multiple * round((Fw - channels) / channel_multiple)
        channels = min(max(channels, 0), Fw - 1)
        carry = want - heads * per_group - channels * per_channel
        counts[l] = (heads, channels)
    return counts


def cubic_schedule(step: int, total_steps: int, warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """The fraction of the final pruning done after `step` optimizer steps (official code): 0 during the first
    `warmup` of the steps, then 1 - (1 - progress)^3 (fast first, slow near the end), then 1 for the last
    `cooldown` of the steps, which fine-tune with the masks fixed. Monotone, 0 at step 0, 1 at total_steps."""
    start, end = warmup * total_steps, (1 - cooldown) * total_steps
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    progress = (step - start) / (end - start)
    return 1 - (1 - progress) ** 3


def counts_at(final_counts: list, fraction: float) -> list:
    """Scale the final per-layer counts by the schedule's fraction (rounded, so monotone in the fraction)."""
    return [(round(fraction * h), round(fraction * c)) for h, c in final_counts]


# ----------------------------------------------------------------------------------------------
# Eq. 13: masks in the model, and slicing them away


def full_masks(args: ModelArgs, device=None) -> list:
    """Keep-everything masks: [(heads_keep bool (K_l,), channels_keep bool (F_l,))] per layer."""
    return [(torch.ones(k, dtype=torch.bool, device=device), torch.ones(f, dtype=torch.bool, device=device))
            for k, f in zip(args.layer_kv_heads, args.layer_hidden_dims)]


def apply_masks(model: Transformer, masks: list, clear_kept: bool = True) -> None:
    """Set each layer's head_mask (K,) and channel_mask (F,) buffers (Eq. 13); an all-kept mask is cleared unless
    clear_kept=False (the Pruner's choice: a compiled block then sees a mask tensor from the first step to the last
    and compiles once, instead of again each time a layer's first head or channel goes)."""
    for layer, (heads, channels) in zip(model.layers, masks):
        att, ff = layer.attention, layer.feed_forward
        if heads.shape != (att.n_kv_heads,) or channels.shape != (ff.w1.out_features,):
            raise ValueError(f"masks of shape {tuple(heads.shape)}, {tuple(channels.shape)}; the layer has "
                             f"{att.n_kv_heads} kv heads and {ff.w1.out_features} channels")
        if not heads.any() or not channels.any():
            raise ValueError("a mask removes every kv head or every channel of a layer")
        device = att.wq.weight.device
        att.head_mask = None if clear_kept and heads.all() else heads.to(device, torch.float32)
        ff.channel_mask = None if clear_kept and channels.all() else channels.to(device, torch.float32)


def masked_param_count(args: ModelArgs, masks: list) -> int:
    """Parameters of the model that slicing with these masks produces (LoRA merged)."""
    return count_base_params(args, [int(h.sum()) for h, _ in masks], [int(c.sum()) for _, c in masks])


def _kept_rows(keep: Tensor, rows_per_group: int) -> Tensor:
    """Indices of the rows (or columns) owned by the kept groups: (G,) bool -> (kept * rows_per_group,)."""
    groups = keep.nonzero().flatten()
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group, device=keep.device)).flatten()


@torch.no_grad()
def slice_model(model: Transformer, masks: list, dtype: Optional[torch.dtype] = None) -> Transformer:
    """A new, smaller, dense Transformer: LoRA merged (W + s * B @ A), the rows and columns of masked kv groups and
    channels removed, per-layer sizes in its ModelArgs. Same logits as the masked model. `dtype` defaults to the
    embedding's (an int8 model gives a float model; quant8.quantize_model re-quantizes it)."""
    args, D, n_rep = model.args, model.args.head_dim, model.args.n_rep
    dtype = dtype or model.tok_embeddings.weight.dtype
    new_args = ModelArgs(**{**vars(args), "layer_kv_heads": [int(h.sum()) for h, _ in masks],
                            "layer_hidden_dims": [int(c.sum()) for _, c in masks]})
    with torch.device("meta"):
        new = Transformer(new_args)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()
             if not k.startswith("layers.") and not (k == "output.weight" and args.tie_embeddings)}
    for l, (heads, channels) in enumerate(masks):
        p, prefix = projections(model, l), f"layers.{l}."
        device = p["wq"].weight.device
        q_rows = _kept_rows(heads.to(device), n_rep * D)
        kv_rows = _kept_rows(heads.to(device), D)
        ch = channels.to(device).nonzero().flatten()
        cut = {"attention.wq": (q_rows, None), "attention.wk": (kv_rows, None), "attention.wv": (kv_rows, None),
               "attention.wo": (None, q_rows), "feed_forward.w1": (ch, None), "feed_forward.w3": (ch, None),
               "feed_forward.w2": (None, ch)}
        for name, (rows, cols) in cut.items():
            W = p[name.split(".")[1]].merged_weight(dtype)
            W = W[rows] if rows is not None else W[:, cols]
            state[prefix + name + ".weight"] = W.contiguous()
        for norm in ("attention_norm.weight", "ffn_norm.weight"):
            state[prefix + norm] = model.layers[l].get_parameter(norm).to(dtype)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    new.load_state_dict(state, strict=True, assign=True)
    for param in new.parameters():
        param.requires_grad_(False)
    if args.tie_embeddings:
        new.output.weight = new.tok_embeddings.weight
    return new


# ----------------------------------------------------------------------------------------------
# Algorithm 1: progressive pruning beside a training loop


class Pruner:
    """Runs Algorithm 1 beside any training loop. Call `update(step)` once per optimizer step, after backward has
    accumulated the gradients of the whole batch and before `optimizer.zero_grad()`, with step = optimizer steps
    done so far (1-based). As in the official code, the criterion sees the accumulated (batch) gradients once per
    optimizer step, not one per micro-batch. Every criterion takes the same path; only the importance differs."""

    def __init__(self, model: Transformer, ratio: float, total_steps: int, criterion: str = "lora",
                 lam: float = 0.9, square: bool = True, every: int = 10, layers: Optional[list] = None,
                 channel_multiple: int = 1, warmup: float = 0.1, cooldown: float = 0.1, seed: int = 0):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion {criterion!r}; expected one of {CRITERIA}")
        self.model, self.criterion, self.lam, self.square, self.every = model, criterion, lam, square, every
        self.total_steps, self.warmup, self.cooldown = total_steps, warmup, cooldown
        args = model.args
        self.layers = default_pruned_layers(args.n_layers) if layers is None else sorted(layers)
        self.final_counts = prune_counts(args, ratio, self.layers, channel_multiple)
        device = model.tok_embeddings.weight.device
        self.scores = [(torch.zeros(k, device=device), torch.zeros(f, device=device))
                       for k, f in zip(args.layer_kv_heads, args.layer_hidden_dims)]
        self.masks = full_masks(args, device)
        apply_masks(model, self.masks, clear_kept=False)  # all ones: the model's output is unchanged
        self.generator = torch.Generator(device).manual_seed(seed)
        for l in self.layers:
            for name, lin in projections(model, l).items():
                if criterion == "lora" and not lin.r:
                    raise ValueError(f"criterion 'lora' needs LoRA on every projection of the pruned layers; "
                                     f"layer {l} {name} has none")
                if criterion == "vanilla":  # Eq. 3 needs dL/dW: the memory the LoRA criterion saves
                    if lin.weight.dtype == torch.int8:
                        raise ValueError("the vanilla criterion needs dL/dW, which an int8 weight does not have")
                    lin.weight.requires_grad_(True)

    def update(self, step: int) -> bool:
        """Score (Eq. 10 or a baseline, Eq. 4), smooth (Eq. 11) and, at scheduled steps, raise the sparsity and
        switch off the lowest groups (Eq. 12-13). Returns True if the masks changed."""
        with torch.no_grad():
            for l in self.layers:
                heads, channels = layer_group_scores(self.model, l, self.criterion, self.square, self.generator)
                if torch.isfinite(heads).all() and torch.isfinite(channels).all():  # the official code skips NaN
                    prev_h, prev_c = self.scores[l]
                    self.scores[l] = (ema(prev_h, heads, self.lam), ema(prev_c, channels, self.lam))
        if self.criterion == "vanilla":
            for l in self.layers:
                for lin in projections(self.model, l).values():
                    lin.weight.grad = None
        fraction = cubic_schedule(step, self.total_steps, self.warmup, self.cooldown)
        target = counts_at(self.final_counts, fraction)
        if target == self.pruned_counts() or (step % self.every and fraction < 1):
            return False
        for l in self.layers:
            (keep_h, keep_c), (n_h, n_c), (s_h, s_c) = self.masks[l], target[l], self.scores[l]
            self.masks[l] = (threshold_mask(s_h, keep_h, n_h), threshold_mask(s_c, keep_c, n_c))
        apply_masks(self.model, self.masks, clear_kept=False)
        return True

    def pruned_counts(self) -> list:
        return [(int((~h).sum()), int((~c).sum())) for h, c in self.masks]

    def sparsity(self) -> float:
        """Fraction of the model's base parameters currently masked."""
        args = self.model.args
        return 1 - masked_param_count(args, self.masks) / masked_param_count(args, full_masks(args))

    def state_dict(self) -> dict:
        return {"scores": self.scores, "masks": self.masks, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        device = self.model.tok_embeddings.weight.device
        self.scores = [(h.to(device), c.to(device)) for h, c in state["scores"]]
        self.masks = [(h.to(device), c.to(device)) for h, c in state["masks"]]
        self.generator.set_state(state["generator"])
        apply_masks(self.model, self.masks, clear_kept=False)
