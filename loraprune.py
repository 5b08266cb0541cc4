"""LoRAPrune (Zhang et al. 2023, arXiv 2305.18403), the paper's method only, in its order: per-weight importance
(Eq. 7-10; Eq. 3, two baselines) as row and column sums, group importance (Eq. 4, Pruner.score), the moving average
(Eq. 11), thresholds (Eq. 12), the ratio and Algorithm 1's schedule, masks (Eq. 13), slicing, and the Pruner
(Algorithm 1), which takes its criterion and attention unit as arguments (variants.py has those not in the paper).
Shapes: W (out, in); A (r, in); B (out, r); per layer K kv heads, H query heads, F MLP channels; D head dim, C dim."""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

import quant8
from llama import ModelArgs, Transformer, projections, quantize_model

# ----------------------------------------------------------------------------------------------
# per-weight importance, float32 (out, in). The paper writes squares (Eq. 3, 10), the official code absolute values:
# `square` picks; the default is the paper's (the loss change of Eq. 2 to first order, for which Eq. 3 = Eq. 10 holds).


def lora_weight_gradient(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float) -> Tensor:
    """Eq. 7-9: s * (gB @ A + B @ gA - gB @ gA), the LoRA-only estimate of dL/dW. It is exactly minus the change
    of s * B @ A after one SGD step with lr 1 on A and B. A, gA (r, in); B, gB (out, r) -> (out, in) float32."""
    A, B, gA, gB = A.float(), B.float(), gA.float(), gB.float()
    # gB@A + B@gA - gB@gA = [gB | B - gB] @ [A ; gA]: one rank-2r product instead of three rank-r ones
    return (torch.cat([gB, B - gB], dim=1) @ torch.cat([A, gA], dim=0)).mul_(scaling)  # (out, 2r) @ (2r, in)


def lora_guided_importance(W: Tensor, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float,
                           square: bool = True) -> Tensor:
    """Eq. 10: (s * (gB @ A + B @ gA - gB @ gA) ⊙ (W + s * B @ A))^2, dL/dW never formed. W (out, in) any float
    dtype; A, gA (r, in); B, gB (out, r) -> (out, in) float32. Rows are independent: pass a slice of W, B, gB rows."""
    merged = W.float().addmm(B.float(), A.float(), alpha=scaling)  # W + s * B @ A, (out, in)
    score = lora_weight_gradient(A, B, gA, gB, scaling).mul_(merged)
    return score.square_() if square else score.abs_()


def vanilla_importance(W: Tensor, gW: Tensor, square: bool = True) -> Tensor:
    """Eq. 3: (dL/dW ⊙ W)^2, LLM-Pruner's criterion; needs the full gradient of W. (out, in) -> (out, in)."""
    score = gW.float() * W.float()
    return score.square_() if square else score.abs_()


# ----------------------------------------------------------------------------------------------
# criteria: one projection -> its importance reduced at once to row sums (out,) and column sums (in,) (all Eq. 4 needs)


def merged_rows(linear, rows: slice, W: Optional[Tensor] = None) -> Tensor:
    """(W + s * B @ A)[rows] in float32, an int8 W dequantized (pass W = linear.dense_weight(rows) if at hand)."""
    W = (linear.dense_weight(rows) if W is None else W).float()
    return W if not linear.r else W.addmm(linear.lora_B[rows].float(), linear.lora_A.float(), alpha=linear.scaling)


@torch.no_grad()
def projection_sums(linear, importance: Callable, chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Row sums (out,) and column sums (in,) of importance(rows, W[rows]) -> (rows, in), `chunk_rows` rows at a time
    (default 2^24 elements, 64 MiB of float32), so the (out, in) map never exists whole nor a dequantized int8 W."""
    out_features, in_features = linear.out_features, linear.in_features
    chunk_rows = chunk_rows or max(1, 2**24 // in_features)
    row_sums = torch.empty(out_features, dtype=torch.float32, device=linear.weight.device)
    col_sums = torch.zeros(in_features, dtype=torch.float32, device=linear.weight.device)
    for i in range(0, out_features, chunk_rows):
        rows = slice(i, i + chunk_rows)
        I = importance(rows, linear.dense_weight(rows))  # (rows, in)
        row_sums[rows] = I.sum(dim=1)
        col_sums += I.sum(dim=0)
    return row_sums, col_sums


def lora_sums(linear, square: bool = True, chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The paper's criterion: Eq. 10 of one projection (LoRA on it, after the backward), as row and column sums."""
    if not linear.r or linear.lora_A.grad is None:
        raise ValueError("Eq. 10 needs LoRA and its gradients on every projection of the pruned layers; found a "
                         f"projection {'without LoRA (llama.add_lora)' if not linear.r else 'with no gradient'}")
    A, B, s = linear.lora_A, linear.lora_B, linear.scaling
    return projection_sums(linear, lambda rows, W: lora_guided_importance(W, A, B[rows], A.grad, B.grad[rows], s,
                                                                          square), chunk_rows)


def require_weight_grads(model: Transformer, layers: list) -> None:
    """Eq. 3 needs dL/dW: on for every projection of `layers`, before the first backward (the memory Eq. 10 saves)."""
    for lin in (lin for l in layers for lin in projections(model, l).values()):
        if lin.weight.dtype == torch.int8:
            raise ValueError("the vanilla criterion needs dL/dW, which an int8 weight does not have")
        lin.weight.requires_grad_(True)


def vanilla_sums(linear, square: bool = True, chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Eq. 3 of one projection as row and column sums, from W.grad (require_weight_grads), which it then frees."""
    gW = linear.weight.grad
    if gW is None:
        raise ValueError("the vanilla criterion reads dL/dW; found no W.grad (require_weight_grads before backward)")
    sums = projection_sums(linear, lambda rows, W: vanilla_importance(merged_rows(linear, rows, W), gW[rows], square),
                           chunk_rows)
    linear.weight.grad = None  # read once per step; the next batch accumulates a new one
    return sums


def magnitude_sums(linear, square: bool = True, chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The magnitude baseline (W + s * B @ A)^2 as row and column sums (the official code's: Eq. 3 with dL/dW = 1)."""
    power = torch.square if square else torch.abs
    return projection_sums(linear, lambda rows, W: power(merged_rows(linear, rows, W)), chunk_rows)


class RandomSums:
    """The random baseline: uniform per-weight scores from a seeded generator, whose state the Pruner saves."""
    def __init__(self, seed: int = 0, device="cpu"):
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, linear) -> tuple[Tensor, Tensor]:
        g = self.generator
        return projection_sums(linear, lambda rows, W: torch.rand(W.shape, generator=g, device=g.device).to(W.device))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# Eq. 4 (a group's importance is the sum of its weights', in Pruner.score), Eq. 11 and Eq. 12, and the attention unit.
# Groups (Appendix A): a head owns D rows of wq, wk, wv and D columns of wo; a channel a row of w1, w3 and a column of
# w2. With GQA the paper's unit is a kv group (KVGroups): size (mask length), params (of one unit), scores (from
# per-head sums), threshold (Eq. 12), channels (MLP counts once heads are masked); variants.QueryHeads is another.


def ema(prev: Tensor, new: Tensor, lam: float) -> Tensor:
    """Eq. 11: lam * prev + (1 - lam) * new. lam = 0 keeps only the latest scores."""
    return lam * prev + (1 - lam) * new


def threshold_mask(scores: Tensor, keep: Tensor, n_pruned: int) -> Tensor:
    """Eq. 12 with an exact count: switch off the lowest-scoring kept groups until `n_pruned` are off; groups already
    off stay off (the official code multiplies the scores by the mask). scores (G,), keep (G,) bool -> (G,) bool."""
    n_more, new = n_pruned - int((~keep).sum()), keep.clone()
    if n_more > 0:
        candidates = torch.where(keep, scores.float(), torch.full_like(scores, math.inf, dtype=torch.float32))
        new[torch.topk(candidates, n_more, largest=False).indices] = False  # the lowest kept; p is the largest of them
    return new


def kv_of_heads(q_per_kv: list, device=None) -> Tensor:
    """The kv head each query head reads: q_per_kv = [2, 1, 3] -> [0, 0, 1, 2, 2, 2], (H,) int64."""
    return torch.repeat_interleave(torch.arange(len(q_per_kv), device=device), torch.tensor(q_per_kv, device=device))


class KVGroups:
    """The paper's attention unit: a kv group (one kv head and the query heads that read it); masks (K,) per layer."""
    name = "kv"

    def size(self, args: ModelArgs, l: int) -> int:
        return args.layer_kv_heads[l]

    def params(self, args: ModelArgs, l: int) -> int:
        if args.layer_n_heads[l] != args.layer_kv_heads[l] * args.n_rep:
            raise ValueError(f"layer {l} has uneven kv groups {args.q_per_kv(l)} (query heads per kv head); prune "
                             "it by query heads (--head-unit query, variants.QueryHeads)")
        return group_params(args)[0]

    def scores(self, heads: Tensor, kv: Tensor, q_per_kv: list) -> Tensor:
        """Eq. 4: a group's query heads' sums plus its kv rows' sums. heads (H,), kv (K,) -> (K,)."""
        return kv.clone().index_add_(0, kv_of_heads(q_per_kv, heads.device), heads)

    def threshold(self, scores: Tensor, keep: Tensor, q_per_kv: list, n_pruned: int) -> Tensor:
        return threshold_mask(scores, keep, n_pruned)

    def channels(self, args: ModelArgs, layers: list, counts: list, masks: list, channel_multiple: int) -> list:
        return [c for _, c in counts]  # a kv group takes its wk/wv rows along: the schedule's counts stand


# ----------------------------------------------------------------------------------------------
# how many groups each layer loses (the ratio), and when (the schedule of Algorithm 1)


def default_pruned_layers(n_layers: int) -> list:
    """The official code never prunes the first int(0.1 * n_layers) layers nor the last one (0-2 and 31 of 32)."""
    return list(range(int(0.1 * n_layers), n_layers - 1))


def head_params(args: ModelArgs) -> int:
    """Base-weight parameters of one query head (D rows of wq, D columns of wo) or one kv head (wk, wv rows): 2*D*C."""
    return 2 * args.head_dim * args.dim


def group_params(args: ModelArgs) -> tuple[int, int]:
    """Base-weight parameters of one kv group (n_rep query heads and a kv head) and of one MLP channel (w1, w3, w2)."""
    return (args.n_rep + 1) * head_params(args), 3 * args.dim


def count_base_params(args: ModelArgs, heads: list, channels: list, query_heads: Optional[list] = None) -> int:
    """Parameters (no LoRA) with `heads` kv heads, `query_heads` (default n_rep each) and `channels` per layer."""
    per_head, per_channel = head_params(args), group_params(args)[1]
    query_heads = [h * args.n_rep for h in heads] if query_heads is None else query_heads
    head_out = args.dim * args.vocab_size * (1 if args.tie_embeddings else 2)
    bias = args.head_dim if args.qkv_bias else 0  # Qwen2: D bias rows per query head, 2D per kv head (k and v)
    norms = (2 * args.dim + (2 * args.head_dim if args.qk_norm else 0)) * args.n_layers + args.dim  # Qwen3: q/k norms
    return head_out + norms + sum(
        (k + q) * per_head + (q + 2 * k) * bias + c * per_channel for k, q, c in zip(heads, query_heads, channels))


def round_channels(exact: float, width: int, channel_multiple: int = 1, least: int = 0) -> int:
    """Channels a layer of `width` loses: `exact` rounded (kept width to channel_multiple), in [least, width - 1]."""
    channels = round(exact)
    if channel_multiple > 1 and width % channel_multiple == 0:
        channels = width - channel_multiple * round((width - channels) / channel_multiple)
    return min(max(channels, least), width - 1)


def prune_counts(args: ModelArgs, ratio: float, layers: list, channel_multiple: int = 1, unit=KVGroups(),
                 uniform: bool = False) -> list:
    """[(attention units, MLP channels) removed] per layer (zeros where not pruned) so that `ratio` of the model's
    parameters go: all parameters, as the paper's tables count (the official code's ratio is of groups in the pruned
    layers, which removes fewer). Each pruned layer loses the same fraction of its block; heads round to whole units,
    the MLP takes up the rest and the rounding is carried to the next layer (total within one channel of the target).
    channel_multiple > 1 rounds kept channels to that multiple where the width is one. uniform=True carries nothing:
    layers of one shape lose the same counts and keep one shape (what Hugging Face and vLLM hold)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    shapes = {(args.layer_kv_heads[l], args.layer_n_heads[l], args.layer_hidden_dims[l]) for l in layers}
    if uniform and len(shapes) > 1:
        raise ValueError(f"uniform counts need pruned layers of one shape (kv heads, query heads, channels); "
                         f"found {sorted(shapes)}")
    per_head, per_channel = head_params(args), group_params(args)[1]
    target = ratio * count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims, args.layer_n_heads)
    block = {l: (args.layer_kv_heads[l] + args.layer_n_heads[l]) * per_head + args.layer_hidden_dims[l] * per_channel
             for l in layers}  # each pruned layer's prunable parameters
    f = target / sum(block.values()) if block else 0.0
    counts, carry = [(0, 0)] * args.n_layers, 0.0
    for l in layers:
        units, per_unit = unit.size(args, l), unit.params(args, l)
        heads = round(f * units)
        if heads >= units or f >= 1:
            raise ValueError(f"ratio {ratio} needs {f:.1%} of each pruned layer's parameters, which would remove "
                             f"every {unit.name} head of layer {l} ({units}); lower the ratio or prune more layers")
        want = f * block[l] + carry  # parameters this layer should lose
        channels = round_channels((want - heads * per_unit) / per_channel, args.layer_hidden_dims[l], channel_multiple)
        carry = 0.0 if uniform else want - heads * per_unit - channels * per_channel
        counts[l] = (heads, channels)
    return counts


def cubic_schedule(step: int, total_steps: int, warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """Fraction of the final pruning done after `step` optimizer steps (official code): 0 for the first `warmup` of
    the steps, then 1 - (1 - progress)^3, then 1 for the last `cooldown` (masks fixed). Monotone, 0 -> 1."""
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
# Eq. 13: masks in the model, and slicing them away. A head mask is one flag per kv group (K,) or (as saved models
# may have it) per query head (H,); a kv head's wk/wv rows go with its last query head.


def full_masks(args: ModelArgs, device=None, unit=KVGroups()) -> list:
    """Keep-everything masks: [(heads_keep bool (unit.size,), channels_keep bool (F_l,))] per layer."""
    return [(torch.ones(unit.size(args, l), dtype=torch.bool, device=device),
             torch.ones(args.layer_hidden_dims[l], dtype=torch.bool, device=device)) for l in range(args.n_layers)]


def query_keep(heads: Tensor, q_per_kv: list) -> Tensor:
    """A head mask as one flag per query head (H,): a (K,) mask repeated over each group's query heads, (H,) as is."""
    if heads.shape == (len(q_per_kv),):
        return heads[kv_of_heads(q_per_kv, heads.device)]  # (H,)
    if heads.shape == (sum(q_per_kv),):
        return heads
    raise ValueError(f"head mask of shape {tuple(heads.shape)}; the layer has {len(q_per_kv)} kv heads and "
                     f"{sum(q_per_kv)} query heads")


def query_heads_left(q_keep: Tensor, q_per_kv: list) -> Tensor:
    """Kept query heads of each kv head: (H,) bool -> (K,) int64. A kv head is live while this is > 0."""
    return torch.bincount(kv_of_heads(q_per_kv, q_keep.device)[q_keep], minlength=len(q_per_kv))  # (K,)


def apply_masks(model: Transformer, masks: list, clear_kept: bool = True) -> None:
    """Set each layer's head_mask (H,) and channel_mask (F,) (Eq. 13) from masks per kv group or query head; an
    all-kept mask is cleared unless clear_kept=False (the Pruner's: a compiled block then compiles once)."""
    for layer, (heads, channels) in zip(model.layers, masks):
        att, ff = layer.attention, layer.feed_forward
        if channels.shape != (ff.w1.out_features,):
            raise ValueError(f"channel mask of shape {tuple(channels.shape)}; the layer has {ff.w1.out_features}")
        heads = query_keep(heads, att.q_per_kv)  # (H,)
        if not heads.any() or not channels.any():
            raise ValueError("a mask removes every head or every channel of a layer")
        att.head_mask = None if clear_kept and heads.all() else heads.to(att.wq.weight.device, torch.float32)
        ff.channel_mask = None if clear_kept and channels.all() else channels.to(ff.w1.weight.device, torch.float32)


def masked_param_count(args: ModelArgs, masks: list) -> int:
    """Parameters after slicing with these masks: a kv head's wk/wv rows count while any of its query heads is kept."""
    left = [query_heads_left(query_keep(h, args.q_per_kv(l)), args.q_per_kv(l)) for l, (h, _) in enumerate(masks)]
    return count_base_params(args, [int((n > 0).sum()) for n in left], [int(c.sum()) for _, c in masks],
                             [int(n.sum()) for n in left])


@torch.no_grad()
def slice_model(model: Transformer, masks: list, dtype: Optional[torch.dtype] = None,
                in_place: bool = False, int8: Optional[bool] = None) -> Transformer:
    """A smaller dense Transformer with the masked model's logits: LoRA merged (W + s * B @ A), the rows and columns
    of masked heads and channels removed, per-layer sizes (and uneven query heads per kv head) in its ModelArgs.
    `dtype` defaults to the embedding's. int8 (default: as `model` is) re-quantizes each sliced projection as it is
    made (quant8.quantize, per row). in_place=True empties each old block (to meta) as soon as its sliced copy exists,
    so at most one block's extra weights are alive; `model` is unusable afterwards."""
    args, D = model.args, model.args.head_dim
    dtype = dtype or model.tok_embeddings.weight.dtype
    def kept_rows(keep):  # (G,) bool -> (kept * D,) indices of the rows (columns) of the kept heads
        return (keep.nonzero().flatten()[:, None] * D + torch.arange(D, device=keep.device)).flatten()
    q_keeps = [query_keep(h.cpu(), args.q_per_kv(l)) for l, (h, _) in enumerate(masks)]  # [(H_l,) bool]
    left = [query_heads_left(q, args.q_per_kv(l)) for l, q in enumerate(q_keeps)]  # [(K_l,) query heads kept]
    new_args = ModelArgs(**{**vars(args), "layer_kv_heads": [int((n > 0).sum()) for n in left],
                            "layer_hidden_dims": [int(c.sum()) for _, c in masks],
                            "layer_q_per_kv": [n[n > 0].tolist() for n in left]})
    int8 = projections(model, 0)["wq"].int8 if int8 is None else int8
    with torch.device("meta"):
        new = Transformer(new_args)
        if int8:
            quantize_model(new)  # empty int8 stores, filled below
    state = {}
    for l, (heads, channels) in enumerate(masks):
        p, prefix = projections(model, l), f"layers.{l}."
        device = p["wq"].weight.device
        q_rows, kv_rows = kept_rows(q_keeps[l].to(device)), kept_rows(left[l].to(device) > 0)
        ch = channels.to(device).nonzero().flatten()
        cut = {"attention.wq": (q_rows, None), "attention.wk": (kv_rows, None), "attention.wv": (kv_rows, None),
               "attention.wo": (None, q_rows), "feed_forward.w1": (ch, None), "feed_forward.w3": (ch, None),
               "feed_forward.w2": (None, ch)}
        for name, (rows, cols) in cut.items():
            if p[name.split(".")[1]].bias is not None:  # Qwen2's q/k/v biases go with their rows (Eq. 4's groups)
                state[prefix + name + ".bias"] = p[name.split(".")[1]].bias[rows].to(dtype)
            W = p[name.split(".")[1]].merged_weight(torch.float32 if int8 else dtype)
            W = (W[rows] if rows is not None else W[:, cols]).contiguous()
            if int8:  # scales are per row, so a column cut (wo, w2) needs new ones: quantize the float slice
                state[prefix + name + ".weight"], state[prefix + name + ".scales"] = quant8.quantize(W)
            else:
                state[prefix + name + ".weight"] = W
            del W
        qk_norms = ("attention.q_norm.weight", "attention.k_norm.weight") if args.qk_norm else ()  # shared by all heads
        for norm in ("attention_norm.weight", "ffn_norm.weight") + qk_norms:
            state[prefix + norm] = model.layers[l].get_parameter(norm).to(dtype)
        if in_place:
            model.layers[l].to_empty(device="meta")  # frees the old block before the next is sliced
    state.update({k: v.to(dtype) for k, v in model.state_dict().items()
                  if not k.startswith("layers.") and not (k == "output.weight" and args.tie_embeddings)})
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    if in_place:
        model.to_empty(device="meta")  # the embedding, norm and head now live in `new` (or were copied to dtype)
    new.load_state_dict(state, strict=True, assign=True)
    new.requires_grad_(False)
    if args.tie_embeddings:
        new.output.weight = new.tok_embeddings.weight
    return new


# ----------------------------------------------------------------------------------------------
# Algorithm 1: progressive pruning beside a training loop


class Pruner:
    """Algorithm 1 beside any training loop: call `update(step)` once per optimizer step (step = steps done, from 1),
    after backward has accumulated (and clipping scaled) the batch's gradients, before `optimizer.step()`, as the
    official code scores. criterion(linear) -> (row sums (out,), column sums (in,)), default Eq. 10 (lora_sums); its
    state_dict, if any, is saved with the Pruner's. unit: default KVGroups, the paper's. normalize: None adds the
    projections' sums as Eq. 4 does, or a function applied to each projection's per-unit vector first."""
    def __init__(self, model: Transformer, ratio: float, total_steps: int, criterion: Callable = lora_sums,
                 unit=KVGroups(), normalize: Optional[Callable] = None, lam: float = 0.9, every: int = 10,
                 layers: Optional[list] = None, channel_multiple: int = 1, warmup: float = 0.1,
                 cooldown: float = 0.1, uniform: bool = False):
        self.model, self.criterion, self.unit, self.normalize, self.lam = model, criterion, unit, normalize, lam
        self.every, self.total_steps, self.warmup, self.cooldown = every, total_steps, warmup, cooldown
        self.channel_multiple = channel_multiple
        args = model.args
        self.layers = default_pruned_layers(args.n_layers) if layers is None else sorted(layers)
        self.final_counts = prune_counts(args, ratio, self.layers, channel_multiple, unit, uniform)
        device = model.tok_embeddings.weight.device
        self.masks = full_masks(args, device, unit)
        self.scores = [(unit.scores(torch.zeros(H, device=device), torch.zeros(K, device=device), args.q_per_kv(l)),
                        torch.zeros(F, device=device)) for l, (H, K, F) in  # Eq. 11 starts from zero
                       enumerate(zip(args.layer_n_heads, args.layer_kv_heads, args.layer_hidden_dims))]
        apply_masks(model, self.masks, clear_kept=False)  # all ones: the model's output is unchanged

    @torch.no_grad()
    def score(self, l: int) -> tuple[Tensor, Tensor]:
        """Eq. 4 for layer l: (its attention units' scores (unit.scores), (F,) channel scores), each the sum of its
        weights' importance, from every projection's row and column sums (the criterion)."""
        sums = {name: self.criterion(lin) for name, lin in projections(self.model, l).items()}  # (out,), (in,) each
        D = self.model.args.head_dim  # each projection's share per unit: rows of wq, wk, wv, w1, w3; columns of wo, w2
        parts = {"wq": sums["wq"][0].view(-1, D).sum(1), "wo": sums["wo"][1].view(-1, D).sum(1),  # (H,) each
                 "wk": sums["wk"][0].view(-1, D).sum(1), "wv": sums["wv"][0].view(-1, D).sum(1),  # (K,) each
                 "w1": sums["w1"][0], "w3": sums["w3"][0], "w2": sums["w2"][1]}  # (F,) each
        if self.normalize:
            parts = {name: self.normalize(v) for name, v in parts.items()}
        heads, kv = parts["wq"] + parts["wo"], parts["wk"] + parts["wv"]  # (H,), (K,)
        channels = parts["w1"] + parts["w3"] + parts["w2"]  # (F,)
        return self.unit.scores(heads, kv, self.model.args.q_per_kv(l)), channels

    def update(self, step: int) -> bool:
        """Score (Eq. 4), smooth (Eq. 11), on schedule mask the lowest groups (Eq. 12-13); True if masks changed."""
        for l in self.layers:
            new = self.score(l)
            if all(torch.isfinite(t).all() for t in new):  # the official code skips NaN
                self.scores[l] = tuple(ema(prev, t, self.lam) for prev, t in zip(self.scores[l], new))
        fraction = cubic_schedule(step, self.total_steps, self.warmup, self.cooldown)
        if step % self.every and fraction < 1:
            return False
        masks = self.next_masks(counts_at(self.final_counts, fraction))
        if all(torch.equal(a, b) for old, new in zip(self.masks, masks) for a, b in zip(old, new)):
            return False
        self.masks = masks
        apply_masks(self.model, self.masks, clear_kept=False)
        return True

    def next_masks(self, counts: list) -> list:
        """Masks with `counts` (units, channels) off per pruned layer, lowest smoothed scores first (Eq. 12)."""
        args, masks = self.model.args, list(self.masks)
        for l in self.layers:
            heads = self.unit.threshold(self.scores[l][0], masks[l][0], args.q_per_kv(l), counts[l][0])
            masks[l] = (heads, masks[l][1])
        channels = self.unit.channels(args, self.layers, counts, masks, self.channel_multiple)
        for l in self.layers:
            masks[l] = (masks[l][0], threshold_mask(self.scores[l][1], masks[l][1], channels[l]))
        return masks

    def sparsity(self) -> float:  # the fraction of the model's base parameters masked now
        args = self.model.args
        return 1 - masked_param_count(args, self.masks) / masked_param_count(args, full_masks(args))

    def state_dict(self) -> dict:  # with the criterion's generator or sampler: a resumed run draws as an unbroken one
        criterion = {"criterion": self.criterion.state_dict()} if hasattr(self.criterion, "state_dict") else {}
        return {"unit": self.unit.name, "scores": self.scores, "masks": self.masks, **criterion}

    def load_state_dict(self, state: dict) -> None:
        if state["unit"] != self.unit.name:
            raise ValueError(f"pruner state of unit {state['unit']!r}, this pruner's is {self.unit.name!r}")
        device = self.model.tok_embeddings.weight.device
        self.scores = [tuple(t.to(device) for t in layer) for layer in state["scores"]]
        self.masks = [(h.to(device), c.to(device)) for h, c in state["masks"]]
        if hasattr(self.criterion, "load_state_dict"):
            self.criterion.load_state_dict(state["criterion"])
        apply_masks(self.model, self.masks, clear_kept=False)
