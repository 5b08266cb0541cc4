"""LoRAPrune (Zhang et al., arXiv 2305.18403): structured pruning of a LLaMA guided by its LoRA gradients.

Read alongside ../shared/paper/EQUATIONS.md. Top to bottom: per-weight importance (Eq. 10, and Eq. 3 plus two
baselines), group sums (Eq. 4), the moving average (Eq. 11), thresholds (Eq. 12), how many groups each layer loses
and when (the ratio and the schedule of Algorithm 1), masks in the model (Eq. 13), slicing to a smaller dense model,
and the Pruner that runs Algorithm 1 beside any training loop.

Two attention units (`head_unit`): 'kv' (default, the paper's group for grouped-query attention: a kv head with all
the query heads that share it) and 'query' (single query heads; a kv head's wk/wv rows go with its last query head).

Shapes: W (out, in); A (r, in); B (out, r); K kv groups of a layer (each = one kv head and its n_rep query heads),
H query heads of a layer, F MLP channels of a layer, D head dim, C model dim.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import quant8
from llama import ModelArgs, Transformer, projections, quantize_model

CRITERIA = ("lora", "lora-directional", "exact", "vanilla", "magnitude", "random")
LORA_CRITERIA = ("lora", "lora-directional")  # the ones that read only the LoRA matrices and their gradients
HEAD_UNITS = ("kv", "query")  # what one attention group is: a kv group, or one query head

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


def directional_importance(W: Tensor, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float,
                           square: bool = True) -> tuple[Tensor, Tensor]:
    """The bracket of Eq. 10 split by what each term knows of dL/dW = G (not in the paper): with gB = s G A^T and
    gA = s B^T G, s * gB @ A = s^2 G A^T A keeps every row of G (projected onto A's row space) but mixes its
    columns, and s * B @ gA = s^2 B B^T G keeps every column but mixes the rows. So rows are scored with the first
    and columns with the second: returns ((s gB@A ⊙ M)^2, (s B@gA ⊙ M)^2), M = W + s * B @ A, both (out, in) float32;
    the caller takes row sums of the first and column sums of the second. The second-order term gB @ gA of Eq. 7-9
    mixes both and is left out. While B = 0 (before the first optimizer step) the column map is zero."""
    A, B, gA, gB, merged = A.float(), B.float(), gA.float(), gB.float(), W.float()
    merged = merged.addmm(B, A, alpha=scaling)  # W + s * B @ A, (out, in)
    rows = (gB @ A).mul_(scaling).mul_(merged)  # (out, r) @ (r, in)
    cols = (B @ gA).mul_(scaling).mul_(merged)
    return (rows.square_(), cols.square_()) if square else (rows.abs_(), cols.abs_())


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


def merged_rows(linear, rows: slice, W: Optional[Tensor] = None) -> Tensor:
    """(W + s * B @ A)[rows] in float32, W dequantized if it is int8 (pass W = linear.dense_weight(rows) if it is
    at hand already)."""
    W = (linear.dense_weight(rows) if W is None else W).float()
    return W if not linear.r else W.addmm(linear.lora_B[rows].float(), linear.lora_A.float(), alpha=linear.scaling)


@torch.no_grad()
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
        if criterion == "lora-directional":
            A, B = linear.lora_A, linear.lora_B
            I_rows, I_cols = directional_importance(W, A, B[rows], A.grad, B.grad[rows], s, square)
            row_sums[rows] = I_rows.sum(dim=1)
            col_sums += I_cols.sum(dim=0)
            continue
        if criterion == "lora":
            A, B = linear.lora_A, linear.lora_B
            I = lora_guided_importance(W, A, B[rows], A.grad, B.grad[rows], s, square)
        else:
            merged = merged_rows(linear, rows, W)
            if criterion == "vanilla":
                I = vanilla_importance(merged, linear.weight.grad[rows], square)
            elif criterion == "magnitude":
                I = magnitude_importance(merged, square)
            else:
                I = random_importance(merged, generator)
        row_sums[rows] = I.sum(dim=1)
        col_sums += I.sum(dim=0)
    return row_sums, col_sums


def l2_normalized(v: Tensor) -> Tensor:
    """v / ||v||, and an all-zero v as it is (the official code adds 1e-8 to the norm instead, which would wipe out
    a vector of squared scores whose norm is below it)."""
    norm = v.norm()
    return v / torch.where(norm > 0, norm, torch.ones_like(norm))


def unit_parts(sums: dict, head_dim: int) -> dict:
    """Each projection's share of Eq. 4 per unit, from its (row sums, column sums): wq and wo (columns) per query
    head (H,), wk and wv per kv head (K,), w1, w3 and w2 (columns) per channel (F,)."""
    D = head_dim
    return {"wq": row_group_sums(sums["wq"][0], D), "wo": row_group_sums(sums["wo"][1], D),  # (H,) each
            "wk": row_group_sums(sums["wk"][0], D), "wv": row_group_sums(sums["wv"][0], D),  # (K,) each
            "w1": sums["w1"][0], "w3": sums["w3"][0], "w2": sums["w2"][1]}  # (F,) each


def unit_scores(sums: dict, head_dim: int, normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 4 for one layer from its projections' (row sums, column sums) {name: ((out,), (in,))}: (H,) query-head
    scores (query head h owns rows h*D:(h+1)*D of wq and the same columns of wo), (F,) channel scores (channel c
    owns row c of w1 and w3 and column c of w2) and (K,) kv-row scores (rows g*D:(g+1)*D of wk and wv).
    normalize: L2-normalise each projection's vector of per-unit sums before adding them, as the official code
    does (wq, wo over query heads; wk, wv over kv heads; w1, w3, w2 over channels); an all-zero vector (the
    directional column part while B = 0) then adds nothing."""
    parts = unit_parts(sums, head_dim)
    if normalize:
        parts = {name: l2_normalized(v) for name, v in parts.items()}
    return parts["wq"] + parts["wo"], parts["w1"] + parts["w3"] + parts["w2"], parts["wk"] + parts["wv"]


def layer_sums(model: Transformer, layer_id: int, criterion: str, square: bool = True,
               generator: Optional[torch.Generator] = None) -> dict:
    """{projection name: (row sums (out,), column sums (in,))} of one layer (projection_sums of each)."""
    return {name: projection_sums(lin, criterion, square, generator=generator)
            for name, lin in projections(model, layer_id).items()}


def layer_scores(model: Transformer, layer_id: int, criterion: str, square: bool = True,
                 generator: Optional[torch.Generator] = None, normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 4 for one layer, computed once for both head units: (H,) query-head, (F,) channel and (K,) kv-row
    scores (unit_scores). A kv group's score is kv_group_scores of them; a query head's is query_head_scores.
    By default the projections' sums are added as Eq. 4 says; normalize=True L2-normalises each projection's
    vector first, as the official code does, so that each projection's own scale (for the LoRA estimates, the
    persistent random gain of its fixed A) does not decide which projection dominates a group's score.
    (Criterion 'exact' has no such function: its sums come from the backward pass, GradientTap.)"""
    return unit_scores(layer_sums(model, layer_id, criterion, square, generator), model.args.head_dim, normalize)


def kv_of_heads(q_per_kv: list, device=None) -> Tensor:
    """The kv head each query head reads: q_per_kv = [2, 1, 3] -> [0, 0, 1, 2, 2, 2], (H,) int64."""
    return torch.repeat_interleave(torch.arange(len(q_per_kv), device=device), torch.tensor(q_per_kv, device=device))


def kv_group_scores(heads: Tensor, kv: Tensor, q_per_kv: list) -> Tensor:
    """Eq. 4 for head_unit 'kv': a kv group (one kv head and the query heads that read it) scores the sum of its
    query heads' scores plus its kv rows' score. heads (H,), kv (K,) -> (K,)."""
    return kv.clone().index_add_(0, kv_of_heads(q_per_kv, heads.device), heads)


def query_heads_left(q_keep: Tensor, q_per_kv: list) -> Tensor:
    """Kept query heads of each kv head: (H,) bool -> (K,) int64. A kv head is live while this is > 0."""
    kv = kv_of_heads(q_per_kv, q_keep.device)  # (H,)
    return torch.zeros(len(q_per_kv), dtype=torch.int64, device=q_keep.device).index_add_(0, kv, q_keep.long())


def query_head_scores(heads: Tensor, kv: Tensor, q_keep: Tensor, q_per_kv: list) -> Tensor:
    """Query-head scores for Eq. 12: a head's own sum (wq rows + wo columns) plus an equal share of its kv head's
    wk/wv score among the kv head's live query heads. heads (H,), kv (K,), q_keep (H,) bool -> (H,).

    Why a share: Eq. 4 scores the weights a removal takes away. Removing a query head takes none of the wk/wv rows
    while a sibling lives, and all of them when it is the last; which head will be last is not known in advance.
    Sharing gives both ends right: the live heads of a kv head together carry the whole kv score (with all of them
    live, their sum is exactly the kv-group score of head_unit 'kv'), and a last head carries all of it, which is
    Eq. 4 for it. A kv head whose rows matter little is thus cheap to empty, and emptying it also saves its rows."""
    kv_index = kv_of_heads(q_per_kv, heads.device)  # (H,)
    live = query_heads_left(q_keep, q_per_kv).clamp(min=1).to(kv.dtype)  # (K,)
    return heads + (kv / live)[kv_index]  # (H,)


# ----------------------------------------------------------------------------------------------
# criterion 'exact': Eq. 3's group sums from the backward pass, at LoRA's memory (not in the paper)


@torch.no_grad()
def gradient_sums(x: Tensor, dy: Tensor, merged, square: bool = True,
                  chunk_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Row sums (out,) and column sums (in,) of (G ⊙ M)^2 (Eq. 3) where G = dy^T x is dL/dW of y = x @ W.T,
    formed `chunk_rows` rows at a time (default 2^24 elements) and reduced at once, so dL/dW never exists whole.
    x (..., in) the projection's input, dy (..., out) dL/dy, merged(rows: slice) -> M[rows] (rows, in) float32."""
    x = x.reshape(-1, x.shape[-1]).float()  # (N, in), N tokens
    dy = dy.reshape(-1, dy.shape[-1]).float()  # (N, out)
    out_features, in_features = dy.shape[1], x.shape[1]
    chunk_rows = chunk_rows or max(1, 2**24 // in_features)
    row_sums = torch.empty(out_features, dtype=torch.float32, device=x.device)
    col_sums = torch.zeros(in_features, dtype=torch.float32, device=x.device)
    for i in range(0, out_features, chunk_rows):
        rows = slice(i, i + chunk_rows)
        I = (dy[:, rows].T @ x).mul_(merged(rows))  # (rows, N) @ (N, in) -> G[rows] ⊙ M[rows]
        I = I.square_() if square else I.abs_()
        row_sums[rows] = I.sum(dim=1)
        col_sums += I.sum(dim=0)
    return row_sums, col_sums


class _Tap(torch.autograd.Function):
    """Identity on a projection's output y whose backward hands (x, dL/dy) to `sink`. x is saved through autograd,
    so under activation checkpointing it is recomputed with its block rather than kept; the recomputed forward's
    graph is never backpropagated (non-reentrant checkpoint) and a reentrant one runs its first forward without
    grad, where no tap is set: either way a sink runs once per projection per backward."""

    @staticmethod
    def forward(ctx, y, x, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ctx.sink(x, dy)
        return dy, None, None


class SampledSums:
    """One projection's Eq. 4 sums under gradient accumulation, unbiased: the square of the batch gradient needs
    the whole batch's G, so only k columns J of G (k rows I for wo and w2, whose groups are columns) are kept,
    accumulated exactly over the micro-batches as G[:, J] = sum of dy^T x[:, J] (out, k), and each sampled column
    is importance-weighted: row sum_i ≈ sum_t I[i, j_t] / (k p_j_t), whose expectation is the exact row sum for
    any p. J is drawn with replacement at the first micro-batch of a step, with p_j ∝ ||x_j||^2 ||M_:j||^2 (the
    size of column j of G ⊙ M, with the last step's ||x_j||^2; ||M_:j||^2 alone at the first step). The other
    side's sums (columns of wq, rows of wo, ...) are not estimated (zeros): Eq. 4 does not use them."""

    def __init__(self, lin, by_rows: bool, k: int, square: bool, generator: torch.Generator):
        self.lin, self.by_rows, self.k, self.square, self.generator = lin, by_rows, k, square, generator
        n = lin.in_features if by_rows else lin.out_features  # the sampled dimension
        self.act_norm = torch.ones(n, device=lin.weight.device)  # ||x_j||^2 (or ||dy_i||^2) of the last step
        self.running = torch.zeros(n, device=lin.weight.device)
        self.idx = self.weight = self.acc = None

    def merged_part(self) -> Tensor:
        """M[:, J] (out, k) or M[I, :] (k, in), float32."""
        if not self.by_rows:
            return merged_rows(self.lin, self.idx)
        chunk = max(1, 2**24 // self.lin.in_features)
        return torch.cat([merged_rows(self.lin, slice(i, i + chunk))[:, self.idx]
                          for i in range(0, self.lin.out_features, chunk)])

    def weight_norms(self) -> Tensor:
        """||M_:j||^2 (in,) or ||M_i:||^2 (out,), a block of rows at a time."""
        chunk = max(1, 2**24 // self.lin.in_features)
        parts = [merged_rows(self.lin, slice(i, i + chunk)).square() for i in range(0, self.lin.out_features, chunk)]
        return sum(p.sum(0) for p in parts) if self.by_rows else torch.cat([p.sum(1) for p in parts])

    def add(self, x: Tensor, dy: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        dy = dy.reshape(-1, dy.shape[-1]).float()  # (N, out)
        if self.idx is None:  # the first micro-batch of the step: draw J (or I)
            p = self.act_norm * self.weight_norms()
            p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / p.numel())
            self.idx = torch.multinomial(p, self.k, replacement=True, generator=self.generator)  # (k,)
            self.weight = 1 / (self.k * p[self.idx])  # (k,) importance weights
            shape = (self.lin.out_features, self.k) if self.by_rows else (self.k, self.lin.in_features)
            self.acc = torch.zeros(shape, device=x.device)
        if self.by_rows:
            self.acc += dy.T @ x[:, self.idx]  # (out, N) @ (N, k)
            self.running += x.square().sum(0)
        else:
            self.acc += dy[:, self.idx].T @ x  # (k, N) @ (N, in)
            self.running += dy.square().sum(0)

    def estimate(self) -> tuple[Tensor, Tensor]:
        """(row sums (out,), column sums (in,)) of this step, one side estimated and the other zero; resets."""
        out, inp = self.lin.out_features, self.lin.in_features
        rows, cols = torch.zeros(out, device=self.running.device), torch.zeros(inp, device=self.running.device)
        if self.acc is not None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(self.acc)  # the same J on every rank: same generator, same all-reduced norms
                dist.all_reduce(self.running)
            I = self.acc.mul_(self.merged_part())
            I = I.square_() if self.square else I.abs_()
            if self.by_rows:
                rows = I @ self.weight  # (out, k) @ (k,)
            else:
                cols = self.weight @ I  # (k,) @ (k, in)
            self.act_norm, self.running = self.running, torch.zeros_like(self.running)
        self.idx = self.weight = self.acc = None
        return rows, cols


class GradientTap:
    """Criterion 'exact': for every projection of `layers`, a forward hook puts a _Tap on its output, whose
    backward reduces (dL/dW ⊙ (W + s B A))^2 to row and column sums (gradient_sums) and adds them to this tap's
    float32 buffers; take(l) hands a layer's sums over and zeroes them. No dL/dW is kept (no W.requires_grad), so
    it works with int8 W; the transient is one 64 MiB block plus a float32 copy of x and dL/dy.
    With one micro-batch per optimizer step this is Eq. 3 of the batch exactly (the vanilla criterion's numbers).
    With several, it is the sum over micro-batches of each one's Eq. 3 (the square of a sum is not the sum of the
    squares): the empirical-Fisher form of the Taylor criterion, which adds the micro-batch variance of each
    weight's G ⊙ M to the batch's square and so favours weights whose gradient is noisy. Under torchrun the sums
    of all processes are added (one all-reduce per layer), the same sum over more micro-batches.
    sample=k instead keeps k sampled columns of the batch gradient per projection (SampledSums): an unbiased
    estimate of the batch's Eq. 4 sums whatever the accumulation, at (out + in) * k floats per projection."""

    def __init__(self, model: Transformer, layers: list, square: bool = True, sample: Optional[int] = None,
                 seed: int = 0):
        self.sums, self.sampled, self.handles, self.square = {}, {}, [], square
        device = model.tok_embeddings.weight.device
        generator = torch.Generator(device).manual_seed(seed)
        for l in layers:
            for name, lin in projections(model, l).items():
                if sample:
                    self.sampled[l, name] = SampledSums(lin, name not in ("wo", "w2"), sample, square, generator)
                    sink = self.sampled[l, name].add
                else:
                    self.sums[l, name] = (torch.zeros(lin.out_features, device=lin.weight.device),
                                          torch.zeros(lin.in_features, device=lin.weight.device))
                    sink = self._sink(self.sums[l, name], lin)
                self.handles.append(lin.register_forward_hook(self._hook(sink)))

    def _sink(self, acc: tuple, lin):
        def sink(x, dy):
            rows, cols = gradient_sums(x, dy, lambda r: merged_rows(lin, r), self.square)
            acc[0].add_(rows)
            acc[1].add_(cols)
        return sink

    @staticmethod
    def _hook(sink):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:  # not in eval or a no-grad teacher forward
                return _Tap.apply(output, inputs[0], sink)
        return hook

    @torch.no_grad()
    def take(self, layer_id: int) -> dict:
        """{projection name: (row sums (out,), column sums (in,))} accumulated since the last take; zeroes them."""
        out = {name: s.estimate() for (l, name), s in self.sampled.items() if l == layer_id}
        for (l, name), (rows, cols) in self.sums.items():
            if l == layer_id:
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(rows)
                    dist.all_reduce(cols)
                out[name] = (rows.clone(), cols.clone())
                rows.zero_()
                cols.zero_()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


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


def threshold_query_heads(heads: Tensor, kv: Tensor, keep: Tensor, q_per_kv: list, n_pruned: int) -> Tensor:
    """Eq. 12 for query heads: switch off the lowest query_head_scores one head at a time, re-sharing the kv scores
    among the heads still live after each, until `n_pruned` heads are off. heads (H,), kv (K,), keep (H,) bool."""
    keep = keep.clone()
    for _ in range(n_pruned - int((~keep).sum())):
        keep = threshold_mask(query_head_scores(heads, kv, keep, q_per_kv), keep, int((~keep).sum()) + 1)
    return keep


# ----------------------------------------------------------------------------------------------
# how many groups each layer loses (the ratio), and when (the schedule of Algorithm 1)


def default_pruned_layers(n_layers: int) -> list:
    """The official code never prunes the first int(0.1 * n_layers) layers nor the last one (0-2 and 31 of 32)."""
    return list(range(int(0.1 * n_layers), n_layers - 1))


def head_params(args: ModelArgs) -> tuple[int, int]:
    """Base-weight parameters of one query head (D rows of wq + D columns of wo) and of one kv head (D rows each of
    wk and wv): 2*D*C each."""
    return 2 * args.head_dim * args.dim, 2 * args.head_dim * args.dim


def group_params(args: ModelArgs) -> tuple[int, int]:
    """Base-weight parameters of one kv group (wq, wk, wv rows + wo columns) and of one MLP channel (w1, w3, w2)."""
    per_query, per_kv = head_params(args)
    return args.n_rep * per_query + per_kv, 3 * args.dim


def count_base_params(args: ModelArgs, heads: list, channels: list, query_heads: Optional[list] = None) -> int:
    """Parameters of a model with `heads` kv heads, `query_heads` query heads (default: n_rep per kv head) and
    `channels` MLP channels per layer (no LoRA)."""
    (per_query, per_kv), (_, per_channel) = head_params(args), group_params(args)
    query_heads = [h * args.n_rep for h in heads] if query_heads is None else query_heads
    head_out = args.dim * args.vocab_size * (1 if args.tie_embeddings else 2)
    return head_out + args.dim * (2 * args.n_layers + 1) + sum(
        k * per_kv + q * per_query + c * per_channel for k, q, c in zip(heads, query_heads, channels))


def round_channels(exact: float, width: int, channel_multiple: int = 1, least: int = 0) -> int:
    """Channels a layer of `width` loses: `exact` rounded, the kept width rounded to a multiple of channel_multiple
    where the width is one, and kept within [least, width - 1]."""
    channels = round(exact)
    if channel_multiple > 1 and width % channel_multiple == 0:
        channels = width - channel_multiple * round((width - channels) / channel_multiple)
    return min(max(channels, least), width - 1)


def prune_counts(args: ModelArgs, ratio: float, layers: list, channel_multiple: int = 1,
                 head_unit: str = "kv", uniform: bool = False) -> list:
    """How many kv groups (or query heads) and MLP channels each layer loses so that `ratio` of the model's
    parameters go.

    `ratio` is a fraction of all parameters (embeddings and head included), which is how the paper's tables and
    users count; the official code instead takes it as a fraction of groups in the pruned layers, which removes
    fewer parameters. Every pruned layer loses the same fraction f of its block parameters; heads round to whole
    kv groups and the MLP takes up the difference, and the rounding error is carried to the next layer, so the
    total lands within one channel of the target. With channel_multiple > 1, kept channels are rounded to that
    multiple (GPU-friendly matmul sizes) in layers whose width is a multiple of it.
    With head_unit 'query', heads round to whole query heads (2*D*C each) and the channels are counted as if no kv
    head were emptied; which kv heads empty depends on which query heads go, so the Pruner gives their rows back to
    the MLP at mask time (channels_after_kv).
    With uniform=True no rounding is carried: every pruned layer (all of the same shape) loses the same counts, so a
    model pruned in all its layers keeps one shape per layer, which Hugging Face LlamaForCausalLM and vLLM can hold;
    the total then lands within one channel (one multiple) per layer of the target. kv heads only: query-head
    pruning empties kv heads layer by layer as the scores fall.
    Returns [(kv groups or query heads removed, channels removed)] for every layer (zeros for layers not pruned)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head_unit {head_unit!r}; expected one of {HEAD_UNITS}")
    if uniform:
        shapes = {(args.layer_kv_heads[l], args.layer_n_heads[l], args.layer_hidden_dims[l]) for l in layers}
        if len(shapes) > 1 or head_unit != "kv":
            raise ValueError(f"uniform counts need head_unit 'kv' (found {head_unit!r}) and pruned layers of one "
                             f"shape (kv heads, query heads, channels); found {sorted(shapes)}")
    (per_query, per_kv), (per_group, per_channel) = head_params(args), group_params(args)
    target = ratio * count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims, args.layer_n_heads)
    prunable = sum(args.layer_kv_heads[l] * per_kv + args.layer_n_heads[l] * per_query
                   + args.layer_hidden_dims[l] * per_channel for l in layers)
    f = target / prunable if prunable else 0.0
    counts, carry = [(0, 0)] * args.n_layers, 0.0
    for l in layers:
        K, H, Fw = args.layer_kv_heads[l], args.layer_n_heads[l], args.layer_hidden_dims[l]
        if head_unit == "kv" and H != K * args.n_rep:
            raise ValueError(f"layer {l} has uneven kv groups {args.q_per_kv(l)} (query heads per kv head); "
                             "prune it with head_unit 'query'")
        units, per_unit = (K, per_group) if head_unit == "kv" else (H, per_query)
        heads = round(f * units)
        if heads >= units or f >= 1:
            raise ValueError(f"ratio {ratio} needs {f:.1%} of each pruned layer's parameters, which would remove "
                             f"every {head_unit} head of layer {l} ({units}); lower the ratio or prune more layers")
        want = f * (K * per_kv + H * per_query + Fw * per_channel) + carry  # parameters this layer should lose
        channels = round_channels((want - heads * per_unit) / per_channel, Fw, channel_multiple)
        carry = 0.0 if uniform else want - heads * per_unit - channels * per_channel
        counts[l] = (heads, channels)
    return counts


def channels_after_kv(args: ModelArgs, layers: list, counts: list, kv_emptied: list, already: list,
                      channel_multiple: int = 1) -> list:
    """Query-head mode at mask time: the channels each pruned layer loses once the kv heads its query-head masks
    emptied are counted. `counts` are the schedule's (query heads, channels), whose channels assume no kv head
    emptied; each emptied kv head saves its wk/wv rows (2*D*C), i.e. that many parameters' worth of channels fewer.
    The rounding is carried to the next layer as in prune_counts, and a layer never loses fewer channels than the
    `already` masked ones (masks do not come back), so the total lands within two channels (two multiples) of the
    target unless kv heads emptied after their channels were cut. Returns channels removed per layer."""
    (_, per_kv), (_, per_channel) = head_params(args), group_params(args)
    channels, carry = [c for _, c in counts], 0.0
    for l in layers:
        exact = counts[l][1] - kv_emptied[l] * per_kv / per_channel + carry
        channels[l] = round_channels(exact, args.layer_hidden_dims[l], channel_multiple, least=already[l])
        carry = exact - channels[l]
    return channels


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


def full_masks(args: ModelArgs, device=None, head_unit: str = "kv") -> list:
    """Keep-everything masks: [(heads_keep bool (K_l,) or, with head_unit 'query', (H_l,), channels_keep bool
    (F_l,))] per layer."""
    heads = args.layer_kv_heads if head_unit == "kv" else args.layer_n_heads
    return [(torch.ones(h, dtype=torch.bool, device=device), torch.ones(f, dtype=torch.bool, device=device))
            for h, f in zip(heads, args.layer_hidden_dims)]


def query_keep(heads: Tensor, q_per_kv: list) -> Tensor:
    """A head mask as one flag per query head: (K,) per kv group -> each flag repeated for the group's query heads;
    (H,) per query head -> as it is (when K == H every group is one head, and the two readings agree)."""
    if heads.shape == (len(q_per_kv),):
        return heads[kv_of_heads(q_per_kv, heads.device)]  # (H,)
    if heads.shape == (sum(q_per_kv),):
        return heads
    raise ValueError(f"head mask of shape {tuple(heads.shape)}; the layer has {len(q_per_kv)} kv heads and "
                     f"{sum(q_per_kv)} query heads")


def apply_masks(model: Transformer, masks: list, clear_kept: bool = True) -> None:
    """Set each layer's head_mask (H,) and channel_mask (F,) buffers (Eq. 13) from masks per kv group (K,) or per
    query head (H,); an all-kept mask is cleared unless clear_kept=False (the Pruner's choice: a compiled block then
    sees a mask tensor from the first step to the last and compiles once, instead of again each time a layer's
    first head or channel goes)."""
    for layer, (heads, channels) in zip(model.layers, masks):
        att, ff = layer.attention, layer.feed_forward
        if channels.shape != (ff.w1.out_features,):
            raise ValueError(f"channel mask of shape {tuple(channels.shape)}; the layer has {ff.w1.out_features} "
                             "channels")
        heads = query_keep(heads, att.q_per_kv)  # (H,)
        if not heads.any() or not channels.any():
            raise ValueError("a mask removes every head or every channel of a layer")
        device = att.wq.weight.device
        att.head_mask = None if clear_kept and heads.all() else heads.to(device, torch.float32)
        ff.channel_mask = None if clear_kept and channels.all() else channels.to(device, torch.float32)


def masked_param_count(args: ModelArgs, masks: list) -> int:
    """Parameters of the model that slicing with these masks produces (LoRA merged): a kept query head counts its
    wq rows and wo columns, a kv head its wk/wv rows while any of its query heads is kept."""
    left = [query_heads_left(query_keep(h, args.q_per_kv(l)), args.q_per_kv(l)) for l, (h, _) in enumerate(masks)]
    return count_base_params(args, [int((n > 0).sum()) for n in left], [int(c.sum()) for _, c in masks],
                             [int(n.sum()) for n in left])


def _kept_rows(keep: Tensor, rows_per_group: int) -> Tensor:
    """Indices of the rows (or columns) owned by the kept groups: (G,) bool -> (kept * rows_per_group,)."""
    groups = keep.nonzero().flatten()
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group, device=keep.device)).flatten()


@torch.no_grad()
def slice_model(model: Transformer, masks: list, dtype: Optional[torch.dtype] = None,
                in_place: bool = False, int8: Optional[bool] = None) -> Transformer:
    """A new, smaller, dense Transformer: LoRA merged (W + s * B @ A), the rows and columns of masked query heads
    (or kv groups) and channels removed, a kv head's wk/wv rows with its last query head, per-layer sizes (and
    uneven query heads per kv head) in its ModelArgs. Same logits as the masked model. `dtype` defaults to the
    embedding's. int8 (default: as `model`'s projections are) re-quantizes each sliced projection as it is made
    (quant8.quantize, per row), so an int8 model stays int8 and never exists in float. in_place=True consumes
    `model` block by block: each old block is emptied (to the meta device) as soon as its sliced copy exists, so
    at most one block's extra weights are ever alive; `model` is unusable afterwards."""
    args, D = model.args, model.args.head_dim
    dtype = dtype or model.tok_embeddings.weight.dtype
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
        q_rows = _kept_rows(q_keeps[l].to(device), D)
        kv_rows = _kept_rows(left[l].to(device) > 0, D)
        ch = channels.to(device).nonzero().flatten()
        cut = {"attention.wq": (q_rows, None), "attention.wk": (kv_rows, None), "attention.wv": (kv_rows, None),
               "attention.wo": (None, q_rows), "feed_forward.w1": (ch, None), "feed_forward.w3": (ch, None),
               "feed_forward.w2": (None, ch)}
        for name, (rows, cols) in cut.items():
            W = p[name.split(".")[1]].merged_weight(torch.float32 if int8 else dtype)
            W = (W[rows] if rows is not None else W[:, cols]).contiguous()
            if int8:  # scales are per row, so a column cut (wo, w2) needs new ones: quantize the float slice
                state[prefix + name + ".weight"], state[prefix + name + ".scales"] = quant8.quantize(W)
            else:
                state[prefix + name + ".weight"] = W
            del W
        for norm in ("attention_norm.weight", "ffn_norm.weight"):
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
    for param in new.parameters():
        param.requires_grad_(False)
    if args.tie_embeddings:
        new.output.weight = new.tok_embeddings.weight
    return new


# ----------------------------------------------------------------------------------------------
# Algorithm 1: progressive pruning beside a training loop


class Pruner:
    """Runs Algorithm 1 beside any training loop. Call `update(step)` once per optimizer step, after backward has
    accumulated the gradients of the whole batch and before `optimizer.step()`, with step = optimizer steps
    done so far (1-based). As in the official code, the criterion sees the accumulated (batch) gradients once per
    optimizer step, not one per micro-batch, after clipping, before the step, and the moving average starts from
    zero. Every criterion takes the same path; only the importance differs.
    Clipping (run.py clips the LoRA gradients only, so that training is the same whatever the criterion) scales a
    step's LoRA gradients by one number: it leaves that step's ranking as it is and only weighs the step in the
    moving average, and 'vanilla' (dL/dW, not clipped here; the official code clips it together with the adapters)
    and 'exact' (the backward's own gradients) do not see it.
    Criterion 'exact' (GradientTap) scores from the backward pass; exact_sample=k makes it keep k sampled columns
    of each projection's batch gradient instead (unbiased under accumulation; SampledSums).
    head_unit 'kv' prunes kv groups (scores and masks (K,) per layer); 'query' prunes query heads (masks (H,),
    scores (H,) plus (K,) for the shared kv rows, each with its own moving average)."""

    def __init__(self, model: Transformer, ratio: float, total_steps: int, criterion: str = "lora-directional",
                 lam: float = 0.9, square: bool = True, every: int = 10, layers: Optional[list] = None,
                 channel_multiple: int = 1, warmup: float = 0.1, cooldown: float = 0.1, seed: int = 0,
                 head_unit: str = "kv", normalize: Optional[bool] = None, exact_sample: Optional[int] = None,
                 uniform: bool = False):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion {criterion!r}; expected one of {CRITERIA}")
        if criterion == "exact" and any(getattr(layer, "_compiled_call_impl", None) for layer in model.layers):
            raise ValueError("criterion 'exact' reads each projection's gradient in a Python backward hook, which a "
                             "compiled block does not run on every step; use eager blocks (run.py --no-compile)")
        self.model, self.criterion, self.lam, self.square, self.every = model, criterion, lam, square, every
        # L2-normalise each projection's vector before the sums of Eq. 4 (unit_scores). Default: on for the LoRA-only
        # estimates, whose per-projection gain is arbitrary (A is random and fixed), off for the others (measured:
        # bench/study_smollm2, bench/study/criteria_compare.md)
        self.normalize = criterion in LORA_CRITERIA if normalize is None else normalize
        self.total_steps, self.warmup, self.cooldown = total_steps, warmup, cooldown
        self.head_unit, self.channel_multiple = head_unit, channel_multiple
        args = model.args
        self.layers = default_pruned_layers(args.n_layers) if layers is None else sorted(layers)
        self.final_counts = prune_counts(args, ratio, self.layers, channel_multiple, head_unit, uniform=uniform)
        device = model.tok_embeddings.weight.device
        self.masks = full_masks(args, device, head_unit)
        self.scores = [tuple(torch.zeros_like(m, dtype=torch.float32) for m in layer) for layer in self.masks]
        if head_unit == "query":  # and the kv rows' scores, (K,) per layer
            self.scores = [(h, c, torch.zeros(k, device=device)) for (h, c), k in zip(self.scores, args.layer_kv_heads)]
        apply_masks(model, self.masks, clear_kept=False)  # all ones: the model's output is unchanged
        self.generator = torch.Generator(device).manual_seed(seed)
        self.tap = GradientTap(model, self.layers, square, exact_sample, seed) if criterion == "exact" else None
        for l in self.layers:
            for name, lin in projections(model, l).items():
                if criterion in LORA_CRITERIA and not lin.r:
                    raise ValueError(f"criterion {criterion!r} needs LoRA on every projection of the pruned layers; "
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
                sums = (self.tap.take(l) if self.tap else
                        layer_sums(self.model, l, self.criterion, self.square, self.generator))
                heads, channels, kv = unit_scores(sums, self.model.args.head_dim, self.normalize)
                new = ((kv_group_scores(heads, kv, self.model.args.q_per_kv(l)), channels) if self.head_unit == "kv"
                       else (heads, channels, kv))
                if all(torch.isfinite(t).all() for t in new):  # the official code skips NaN
                    self.scores[l] = tuple(ema(prev, t, self.lam) for prev, t in zip(self.scores[l], new))
        if self.criterion == "vanilla":
            for l in self.layers:
                for lin in projections(self.model, l).values():
                    lin.weight.grad = None
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
        """Masks with `counts` (heads, channels) off per pruned layer, the lowest smoothed scores going first (Eq. 12);
        in query mode the channels are first recounted for the kv heads the new head masks empty."""
        args, masks = self.model.args, list(self.masks)
        for l in self.layers:
            (keep_h, keep_c), n_heads = masks[l], counts[l][0]
            if self.head_unit == "kv":
                keep_h = threshold_mask(self.scores[l][0], keep_h, n_heads)
            else:
                keep_h = threshold_query_heads(self.scores[l][0], self.scores[l][2], keep_h, args.q_per_kv(l), n_heads)
            masks[l] = (keep_h, keep_c)
        channels = [c for _, c in counts]
        if self.head_unit == "query":
            emptied = [int((query_heads_left(h, args.q_per_kv(l)) == 0).sum()) for l, (h, _) in enumerate(masks)]
            already = [int((~c).sum()) for _, c in masks]
            channels = channels_after_kv(args, self.layers, counts, emptied, already, self.channel_multiple)
        for l in self.layers:
            masks[l] = (masks[l][0], threshold_mask(self.scores[l][1], masks[l][1], channels[l]))
        return masks

    def pruned_counts(self) -> list:
        """[(kv groups or query heads off, channels off)] per layer."""
        return [(int((~h).sum()), int((~c).sum())) for h, c in self.masks]

    def sparsity(self) -> float:
        """Fraction of the model's base parameters currently masked."""
        args = self.model.args
        return 1 - masked_param_count(args, self.masks) / masked_param_count(args, full_masks(args))

    def state_dict(self) -> dict:
        return {"scores": self.scores, "masks": self.masks, "generator": self.generator.get_state(),
                "head_unit": self.head_unit}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("head_unit", "kv")  # states from before head_unit were kv-group states
        if saved != self.head_unit:
            raise ValueError(f"pruner state of head_unit {saved!r}, this pruner's is {self.head_unit!r}")
        device = self.model.tok_embeddings.weight.device
        self.scores = [tuple(t.to(device) for t in layer) for layer in state["scores"]]
        self.masks = [(h.to(device), c.to(device)) for h, c in state["masks"]]
        self.generator.set_state(state["generator"])
        apply_masks(self.model, self.masks, clear_kept=False)
