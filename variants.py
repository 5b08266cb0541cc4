"""Estimates and units that LoRAPrune's paper does not have, passed to loraprune.Pruner as arguments (loraprune.py never
imports this file). None of them is in the paper; each is opt-in in run.py, and when it helps:

- directional_sums (--criterion lora-directional): when Eq. 10's bracket mixes other rows into a column's score.
- l2_normalized (--normalize, the official code's): when one projection's scale would decide a group's score alone.
- ExactSums (--criterion exact): when Eq. 3's ranking is wanted but dL/dW does not fit in memory, or W is int8.
- its sampled form (--exact-sample): the same under gradient accumulation, where the plain sums add per micro-batch.
- QueryHeads (--head-unit query): with grouped-query attention, when a whole kv group is too coarse a step.

Shapes as in loraprune.py: W (out, in); A (r, in); B (out, r); per layer K kv heads, H query heads, F channels.
"""
import functools
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

import loraprune as lp
import quant8
from llama import ModelArgs, Transformer, projections

# ----------------------------------------------------------------------------------------------
# the direction-aware LoRA estimate (criterion 'lora-directional')


def directional_importance(W: Tensor, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float,
                           square: bool = True) -> tuple[Tensor, Tensor]:
    """The bracket of Eq. 10 split by what each term knows of dL/dW = G (not in the paper): with gB = s G A^T and
    gA = s B^T G, s * gB @ A = s^2 G A^T A keeps every row of G (projected onto A's row space) but mixes its
    columns, and s * B @ gA = s^2 B B^T G keeps every column but mixes the rows. So rows are scored with the first
    and columns with the second: returns ((s gB@A ⊙ M)^2, (s B@gA ⊙ M)^2), M = W + s * B @ A, (out, in) float32;
    the caller takes row sums of the first and column sums of the second. The second-order term gB @ gA of Eq. 7-9
    mixes both and is left out. While B = 0 (before the first optimizer step) the column map is zero."""
    A, B, gA, gB, merged = A.float(), B.float(), gA.float(), gB.float(), W.float()
    merged = merged.addmm(B, A, alpha=scaling)  # W + s * B @ A, (out, in)
    rows = (gB @ A).mul_(scaling).mul_(merged)  # (out, r) @ (r, in)
    cols = (B @ gA).mul_(scaling).mul_(merged)
    return (rows.square_(), cols.square_()) if square else (rows.abs_(), cols.abs_())


@torch.no_grad()
def directional_sums(linear, square: bool = True, chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Criterion 'lora-directional': row sums (out,) of the row map and column sums (in,) of the column map of
    directional_importance, `chunk_rows` rows at a time as loraprune.projection_sums takes them."""
    if not linear.r or linear.lora_A.grad is None:
        raise ValueError("the direction-aware estimate needs LoRA and its gradients on every projection of the "
                         f"pruned layers; found a projection {'without LoRA' if not linear.r else 'with no gradient'}")
    A, B = linear.lora_A, linear.lora_B
    chunk_rows = chunk_rows or max(1, 2**24 // linear.in_features)
    row_sums = torch.empty(linear.out_features, dtype=torch.float32, device=linear.weight.device)
    col_sums = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
    for i in range(0, linear.out_features, chunk_rows):
        rows = slice(i, i + chunk_rows)
        I_rows, I_cols = directional_importance(linear.dense_weight(rows), A, B[rows], A.grad, B.grad[rows],
                                                linear.scaling, square)
        row_sums[rows] = I_rows.sum(dim=1)
        col_sums += I_cols.sum(dim=0)
    return row_sums, col_sums


# ----------------------------------------------------------------------------------------------
# L2 normalisation of each projection's per-unit vector before Eq. 4 adds them (the official code's)


def l2_normalized(v: Tensor) -> Tensor:
    """v / ||v||, and an all-zero v as it is (the official code adds 1e-8 to the norm instead, which would wipe out
    a vector of squared scores whose norm is below it)."""
    norm = v.norm()
    return v / torch.where(norm > 0, norm, torch.ones_like(norm))


# ----------------------------------------------------------------------------------------------
# criterion 'exact': Eq. 3's group sums from each projection's own backward, at LoRA's memory, compiled or not.
# A probe (llama.LoRALinear.probe) leaves the projection's output as it is and puts an autograd.Function on it whose
# backward forms dL/dW = dy^T x and returns the row sums of Eq. 3 (the column sums for wo and w2: the side Eq. 4 reads)
# as the gradient of the probe's parameter: autograd accumulates them over micro-batches, an activation checkpoint
# recomputes x like any activation, DDP all-reduces them like any gradient, and torch.compile traces them into the
# block's graph. gradient_sums below is the reference form (a block of rows at a time, both sides); on CUDA one Triton
# pass over dL/dW does the rest (exact_kernel.py; 7B micro-step times against the default's in bench/RESULTS.md).


def merged_block(W: Tensor, scales: Optional[Tensor], A: Optional[Tensor], B: Optional[Tensor], scaling: float,
                 rows: slice) -> Tensor:
    """(W + s * B @ A)[rows] (rows, in) in float32 from a LoRA linear's tensors: W float, or int8 with its scales
    (out,); A (r, in) and B (out, r), or None without LoRA."""
    M = quant8.dequantize(W[rows], scales[rows]) if scales is not None else W[rows].float()
    return M if A is None else M.addmm(B[rows].float(), A.float(), alpha=scaling)


def gradient_sums(x: Tensor, dy: Tensor, merged, square: bool = True,
                  chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Row sums (out,) and column sums (in,) of (G ⊙ M)^2 (Eq. 3) where G = dy^T x is dL/dW of y = x @ W.T,
    formed `chunk_rows` rows at a time (default 2^24 elements) and reduced at once, so dL/dW never exists whole.
    x (..., in) the projection's input, dy (..., out) dL/dy, merged(rows: slice) -> M[rows] (rows, in) float32.
    G is formed in the activations' dtype, as autograd forms W.grad, and multiplied in float32."""
    x = x.reshape(-1, x.shape[-1])  # (N, in), N tokens
    dy = dy.reshape(-1, dy.shape[-1])  # (N, out)
    out_features, in_features = dy.shape[1], x.shape[1]
    chunk_rows = chunk_rows or max(1, 2**24 // in_features)
    row_sums, col_sums = [], torch.zeros(in_features, dtype=torch.float32, device=x.device)
    for i in range(0, out_features, chunk_rows):
        rows = slice(i, i + chunk_rows)
        I = (dy[:, rows].T @ x).float() * merged(rows)  # (rows, N) @ (N, in) -> G[rows] ⊙ M[rows]
        I = I.square() if square else I.abs()
        row_sums.append(I.sum(dim=1))
        col_sums = col_sums + I.sum(dim=0)
    return torch.cat(row_sums), col_sums


def sampled_gradient(x: Tensor, dy: Tensor, idx: Tensor, by_rows: bool) -> tuple[Tensor, Tensor]:
    """k sampled columns of G = dy^T x, G[:, J] (out, k), and the squared input norms ||x_j||^2 (in,); or, where
    the groups are columns (by_rows=False), k sampled rows G[I] (k, in) and ||dy_i||^2 (out,). float32."""
    x = x.reshape(-1, x.shape[-1])  # (N, in)
    dy = dy.reshape(-1, dy.shape[-1])  # (N, out)
    if by_rows:
        return (dy.T @ x[:, idx]).float(), x.float().square().sum(0)  # (out, N) @ (N, k)
    return (dy[:, idx].T @ x).float(), dy.float().square().sum(0)  # (k, N) @ (N, in)


def world_size() -> int:
    """Processes in the torchrun job, N (1 without one): DDP averages every gradient over them."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@functools.cache  # once: without triton, each backward would search the path for it again
def fused_gradient_sums():
    """exact_kernel.gradient_sums (one Triton pass over dL/dW; on CUDA: as gradient_sums, at a fraction of its
    elementwise cost), or None where triton is not installed."""
    try:
        import exact_kernel
    except ImportError:
        return None
    return exact_kernel.gradient_sums


class _GradientSums(torch.autograd.Function):
    """y as it is; backward passes dL/dy through and returns gradient_sums (rows, then columns) as the gradient of
    `sums` (out + in,). x is saved as autograd saves an activation (recomputed under a checkpoint); W, A, B are the
    projection's own parameters."""

    @staticmethod
    def forward(ctx, y, x, sums, W, scales, A, B, scaling, square, chunk_rows, by_rows):
        ctx.save_for_backward(x, W, scales, A, B)
        ctx.scaling, ctx.square, ctx.chunk_rows, ctx.by_rows = scaling, square, chunk_rows, by_rows
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, W, scales, A, B = ctx.saved_tensors
        fused = fused_gradient_sums() if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else None
        if fused is not None:  # one side only where asked: the kernel's other reduction is not free
            sums = fused(x, dy, W, scales, A, B, ctx.scaling, ctx.square, None, ctx.by_rows is not False,
                         ctx.by_rows is not True)
        else:
            sums = torch.cat(gradient_sums(x, dy, lambda r: merged_block(W, scales, A, B, ctx.scaling, r),
                                           ctx.square, ctx.chunk_rows))
        return dy, None, sums, None, None, None, None, None, None, None, None


class _SampledGradient(torch.autograd.Function):
    """y as it is; backward returns sampled_gradient (flattened, then the norms) as the gradient of `sums`."""

    @staticmethod
    def forward(ctx, y, x, sums, idx, by_rows):
        ctx.save_for_backward(x, idx)
        ctx.by_rows = by_rows
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, idx = ctx.saved_tensors
        part, norms = sampled_gradient(x, dy, idx, ctx.by_rows)
        return dy, None, torch.cat([part.flatten(), norms]), None, None


class ExactProbe(nn.Module):
    """Criterion 'exact' on one projection: after backward, `sums.grad` (out + in,) holds the row sums (by_rows True),
    the column sums (False) or both (None) of Eq. 3 of every micro-batch since the last take(), added (see ExactSums);
    a side not kept reads zero."""

    def __init__(self, lin, by_rows: Optional[bool], square: bool = True, chunk_rows: Optional[int] = None):
        super().__init__()
        self.sums = nn.Parameter(torch.zeros(lin.out_features + lin.in_features, device=lin.weight.device))
        self.by_rows, self.square = by_rows, square
        self.chunk_rows = chunk_rows or max(1, 2**24 // lin.in_features)

    def forward(self, x: Tensor, y: Tensor, lin) -> Tensor:
        return _GradientSums.apply(y, x, self.sums, lin.weight, lin.scales, lin.lora_A, lin.lora_B, lin.scaling,
                                   self.square, self.chunk_rows, self.by_rows)

    def take(self, lin) -> tuple[Tensor, Tensor]:
        """(row sums (out,), column sums (in,)) since the last take, the side not kept zero; zeroes them."""
        g, self.sums.grad = self.sums.grad, None
        g = torch.zeros_like(self.sums) if g is None else g.detach() / world_size()  # see ExactSums on DDP
        rows, cols = g[:lin.out_features], g[lin.out_features:]
        return (rows if self.by_rows is not False else torch.zeros_like(rows),
                cols if self.by_rows is not True else torch.zeros_like(cols))


class SampledProbe(nn.Module):
    """One projection's Eq. 4 sums under gradient accumulation, unbiased (--exact-sample k): the square of the batch
    gradient needs the whole batch's G, so only k columns J of G (k rows I for wo and w2, whose groups are columns)
    are kept, accumulated exactly over the micro-batches by autograd as G[:, J] = sum of dy^T x[:, J] (out, k), and
    each sampled column is importance-weighted: row sum_i ≈ sum_t I[i, j_t] / (k p_j_t), whose expectation is the
    exact row sum for any p. J is drawn with replacement before the step (at start, then at each take), with
    p_j ∝ ||x_j||^2 ||M_:j||^2 (the size of column j of G ⊙ M, with the last step's ||x_j||^2; ||M_:j||^2 alone
    at first). The other side's sums (columns of wq, rows of wo, ...) are not estimated (zeros): Eq. 4 does not use
    them."""

    def __init__(self, lin, by_rows: bool, k: int, square: bool, generator: torch.Generator):
        super().__init__()
        self.by_rows, self.k, self.square, self.generator = by_rows, k, square, generator
        n, other = (lin.in_features, lin.out_features) if by_rows else (lin.out_features, lin.in_features)
        device = lin.weight.device
        self.sums = nn.Parameter(torch.zeros(other * k + n, device=device))  # its gradient: G's part, then norms
        self.register_buffer("idx", torch.zeros(k, dtype=torch.int64, device=device), persistent=False)
        self.act_norm = torch.ones(n, device=device)  # ||x_j||^2 (or ||dy_i||^2) of the last step
        self.weight = None  # (k,) importance weights 1 / (k p) of the drawn idx
        self.draw(lin)

    def forward(self, x: Tensor, y: Tensor, lin) -> Tensor:
        return _SampledGradient.apply(y, x, self.sums, self.idx, self.by_rows)

    def weight_norms(self, lin) -> Tensor:
        """||M_:j||^2 (in,) or ||M_i:||^2 (out,), a block of rows at a time."""
        chunk = max(1, 2**24 // lin.in_features)
        parts = [lp.merged_rows(lin, slice(i, i + chunk)).square() for i in range(0, lin.out_features, chunk)]
        return sum(p.sum(0) for p in parts) if self.by_rows else torch.cat([p.sum(1) for p in parts])

    @torch.no_grad()
    def draw(self, lin) -> None:
        p = self.act_norm * self.weight_norms(lin)
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / p.numel())
        self.idx.copy_(torch.multinomial(p, self.k, replacement=True, generator=self.generator))  # (k,)
        self.weight = 1 / (self.k * p[self.idx])  # (k,)

    @torch.no_grad()
    def take(self, lin) -> tuple[Tensor, Tensor]:
        """(row sums (out,), column sums (in,)) of this step, one side estimated and the other zero; draws the next
        step's idx."""
        out, inp = lin.out_features, lin.in_features
        rows, cols = torch.zeros(out, device=self.idx.device), torch.zeros(inp, device=self.idx.device)
        g, self.sums.grad = self.sums.grad, None
        if g is not None:
            n = self.act_norm.numel()
            part, self.act_norm = g[:-n].view(out, self.k) if self.by_rows else g[:-n].view(self.k, inp), g[-n:]
            chunk = max(1, 2**24 // inp)
            merged = (torch.cat([lp.merged_rows(lin, slice(i, i + chunk))[:, self.idx] for i in range(0, out, chunk)])
                      if self.by_rows else lp.merged_rows(lin, self.idx))  # M[:, J] (out, k) or M[I] (k, in)
            I = part * merged
            I = I.square() if self.square else I.abs()
            if self.by_rows:
                rows = I @ self.weight  # (out, k) @ (k,)
            else:
                cols = self.weight @ I  # (k,) @ (k, in)
        self.draw(lin)
        return rows, cols


class ExactSums:
    """Criterion 'exact': a probe on every projection of `layers` (ExactProbe, or SampledProbe with sample=k), and,
    called on a projection as the Pruner does, its sums since the last call. No dL/dW is kept (W needs no grad), so
    it works with int8 W and with compiled blocks; the transient is one 64 MiB block of G ⊙ M per projection.
    With one micro-batch per optimizer step this is Eq. 3 of the batch exactly (the vanilla criterion's numbers).
    With several, it is the sum over micro-batches of each one's Eq. 3 (the square of a sum is not the sum of the
    squares): the empirical-Fisher form of the Taylor criterion, which adds the micro-batch variance of each
    weight's G ⊙ M to the batch's square and so favours weights whose gradient is noisy. Under torchrun DDP averages
    the probes' gradients over the processes; as each process's dL/dy is that of its own share's mean loss, N times
    the whole batch's, the averaged squares are N times those of one process on the whole batch, and take() divides
    by N (the sampled columns are linear in dL/dy: their average is already the whole batch's).
    Each probe keeps the side of its projection that Eq. 4 reads (loraprune.Pruner.score: rows of wq, wk, wv, w1, w3,
    columns of wo and w2); the other side reads zero.
    sample=k instead keeps k sampled columns of the batch gradient per projection (SampledProbe): an unbiased estimate
    of the batch's Eq. 4 sums whatever the accumulation, at (out + in) * k floats per projection. Its generator, draws
    and last-step norms are its state_dict, so a resumed run draws as an unbroken one."""

    def __init__(self, model: Transformer, layers: list, square: bool = True, sample: Optional[int] = None,
                 seed: int = 0):
        self.generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
        self.linears = {}  # (layer, projection name) -> LoRALinear
        for l in layers:
            for name, lin in projections(model, l).items():
                by_rows = name not in ("wo", "w2")  # the side Eq. 4 reads (loraprune.Pruner.score)
                lin.probe = (SampledProbe(lin, by_rows, sample, square, self.generator) if sample
                             else ExactProbe(lin, by_rows, square))
                self.linears[l, name] = lin

    def __call__(self, linear) -> tuple[Tensor, Tensor]:
        """The criterion: (row sums (out,), column sums (in,)) of `linear` since the last call; zeroes them."""
        return linear.probe.take(linear)

    def take(self, layer_id: int) -> dict:
        """{projection name: (row sums (out,), column sums (in,))} of one layer since the last take; zeroes them."""
        return {name: self(lin) for (l, name), lin in self.linears.items() if l == layer_id}

    def state_dict(self) -> dict:
        sampled = [lin.probe for lin in self.linears.values() if isinstance(lin.probe, SampledProbe)]
        return {"generator": self.generator.get_state(), "act_norm": [p.act_norm for p in sampled],
                "idx": [p.idx.clone() for p in sampled], "weight": [p.weight for p in sampled]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        sampled = [lin.probe for lin in self.linears.values() if isinstance(lin.probe, SampledProbe)]
        for p, norm, idx, weight in zip(sampled, state["act_norm"], state["idx"], state["weight"]):
            p.act_norm, p.weight = norm.to(p.idx.device), weight.to(p.idx.device)
            p.idx.copy_(idx)

    def remove(self) -> None:
        """Take the probes off the model (train.Training.close)."""
        for lin in self.linears.values():
            lin.probe = None


# ----------------------------------------------------------------------------------------------
# the query-head unit: single query heads, a kv head's wk/wv rows going with its last query head


def query_head_scores(heads: Tensor, kv: Tensor, q_keep: Tensor, q_per_kv: list) -> Tensor:
    """Query-head scores for Eq. 12: a head's own sum (wq rows + wo columns) plus an equal share of its kv head's
    wk/wv score among the kv head's live query heads. heads (H,), kv (K,), q_keep (H,) bool -> (H,).

    Why a share: Eq. 4 scores the weights a removal takes away. Removing a query head takes none of the wk/wv rows
    while a sibling lives, and all of them when it is the last; which head will be last is not known in advance.
    Sharing gives both ends right: the live heads of a kv head together carry the whole kv score (with all of them
    live, their sum is exactly the kv-group score of loraprune.KVGroups), and a last head carries all of it, which is
    Eq. 4 for it. A kv head whose rows matter little is thus cheap to empty, and emptying it also saves its rows."""
    kv_index = lp.kv_of_heads(q_per_kv, heads.device)  # (H,)
    live = lp.query_heads_left(q_keep, q_per_kv).clamp(min=1).to(kv.dtype)  # (K,)
    return heads + (kv / live)[kv_index]  # (H,)


def threshold_query_heads(heads: Tensor, kv: Tensor, keep: Tensor, q_per_kv: list, n_pruned: int) -> Tensor:
    """Eq. 12 for query heads: switch off the lowest query_head_scores one head at a time, re-sharing the kv scores
    among the heads still live after each, until `n_pruned` heads are off. heads (H,), kv (K,), keep (H,) bool."""
    keep = keep.clone()
    for _ in range(n_pruned - int((~keep).sum())):
        keep = lp.threshold_mask(query_head_scores(heads, kv, keep, q_per_kv), keep, int((~keep).sum()) + 1)
    return keep


def channels_after_kv(args: ModelArgs, layers: list, counts: list, kv_emptied: list, already: list,
                      channel_multiple: int = 1) -> list:
    """Query-head mode at mask time: the channels each pruned layer loses once the kv heads its query-head masks
    emptied are counted. `counts` are the schedule's (query heads, channels), whose channels assume no kv head
    emptied; each emptied kv head saves its wk/wv rows (2*D*C), i.e. that many parameters' worth of channels fewer.
    The rounding is carried to the next layer as in prune_counts, and a layer never loses fewer channels than the
    `already` masked ones (masks do not come back), so the total lands within two channels (two multiples) of the
    target unless kv heads emptied after their channels were cut. Returns channels removed per layer."""
    per_kv, per_channel = lp.head_params(args), lp.group_params(args)[1]
    channels, carry = [c for _, c in counts], 0.0
    for l in layers:
        exact = counts[l][1] - kv_emptied[l] * per_kv / per_channel + carry
        channels[l] = lp.round_channels(exact, args.layer_hidden_dims[l], channel_multiple, least=already[l])
        carry = exact - channels[l]
    return channels


class QueryHeads:
    """Single query heads as the attention unit: masks (H,) per layer. Its scores are (H + K,) per layer: each query
    head's own sum, then each kv head's wk/wv sum, smoothed (Eq. 11) apart and shared among the live heads only when
    thresholding (query_head_scores). prune_counts counts whole query heads (2*D*C each) and channels as if no kv head
    emptied; which do depends on which query heads go, so channels() gives their rows back to the MLP at mask time.
    Counts per layer therefore differ once kv heads empty: no uniform layer shapes with this unit."""
    name = "query"

    def size(self, args: ModelArgs, l: int) -> int:
        return args.layer_n_heads[l]

    def params(self, args: ModelArgs, l: int) -> int:
        return lp.head_params(args)

    def scores(self, heads: Tensor, kv: Tensor, q_per_kv: list) -> Tensor:
        return torch.cat([heads, kv])  # (H + K,)

    def threshold(self, scores: Tensor, keep: Tensor, q_per_kv: list, n_pruned: int) -> Tensor:
        H = keep.numel()
        return threshold_query_heads(scores[:H], scores[H:], keep, q_per_kv, n_pruned)

    def channels(self, args: ModelArgs, layers: list, counts: list, masks: list, channel_multiple: int) -> list:
        emptied = [int((lp.query_heads_left(h, args.q_per_kv(l)) == 0).sum()) for l, (h, _) in enumerate(masks)]
        already = [int((~c).sum()) for _, c in masks]
        return channels_after_kv(args, layers, counts, emptied, already, channel_multiple)
