"""Estimates and units that LoRAPrune's paper does not have, passed to loraprune.Pruner as arguments (loraprune.py never
imports this file). None of them is in the paper; each is opt-in in run.py, and when it helps:

- directional_sums (--criterion lora-directional): when Eq. 10's bracket mixes other rows into a column's score.
- l2_normalized (--normalize, the official code's): when one projection's scale would decide a group's score alone.
- GradientTap (--criterion exact): when Eq. 3's ranking is wanted but dL/dW does not fit in memory, or W is int8.
- its sampled form (--exact-sample): the same under gradient accumulation, where the plain tap adds per micro-batch.
- QueryHeads (--head-unit query): with grouped-query attention, when a whole kv group is too coarse a step.

Shapes as in loraprune.py: W (out, in); A (r, in); B (out, r); per layer K kv heads, H query heads, F channels.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import loraprune as lp
from llama import ModelArgs, Transformer, is_compiled, projections

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
# criterion 'exact': Eq. 3's group sums from the backward pass, at LoRA's memory


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
            return lp.merged_rows(self.lin, self.idx)
        chunk = max(1, 2**24 // self.lin.in_features)
        return torch.cat([lp.merged_rows(self.lin, slice(i, i + chunk))[:, self.idx]
                          for i in range(0, self.lin.out_features, chunk)])

    def weight_norms(self) -> Tensor:
        """||M_:j||^2 (in,) or ||M_i:||^2 (out,), a block of rows at a time."""
        chunk = max(1, 2**24 // self.lin.in_features)
        parts = [lp.merged_rows(self.lin, slice(i, i + chunk)).square()
                 for i in range(0, self.lin.out_features, chunk)]
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
    float32 buffers; calling the tap on a projection (as the Pruner does) hands its sums over and zeroes them, and
    take(l) does so for a layer. No dL/dW is kept (no W.requires_grad), so it works with int8 W; the transient is
    one 64 MiB block plus a float32 copy of x and dL/dy.
    With one micro-batch per optimizer step this is Eq. 3 of the batch exactly (the vanilla criterion's numbers).
    With several, it is the sum over micro-batches of each one's Eq. 3 (the square of a sum is not the sum of the
    squares): the empirical-Fisher form of the Taylor criterion, which adds the micro-batch variance of each
    weight's G ⊙ M to the batch's square and so favours weights whose gradient is noisy. Under torchrun the sums
    of all processes are added (one all-reduce per projection), the same sum over more micro-batches.
    sample=k instead keeps k sampled columns of the batch gradient per projection (SampledSums): an unbiased
    estimate of the batch's Eq. 4 sums whatever the accumulation, at (out + in) * k floats per projection. Its
    generator and last-step norms are the tap's state_dict, so a resumed run draws as an unbroken one."""

    def __init__(self, model: Transformer, layers: list, square: bool = True, sample: Optional[int] = None,
                 seed: int = 0):
        if is_compiled(model):
            raise ValueError("criterion 'exact' reads each projection's gradient in a Python backward hook, which a "
                             "compiled block does not run on every step; use eager blocks (run.py --no-compile)")
        self.sums, self.sampled, self.keys, self.handles, self.square = {}, {}, {}, [], square
        device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device).manual_seed(seed)
        for l in layers:
            for name, lin in projections(model, l).items():
                self.keys[lin] = (l, name)
                if sample:
                    self.sampled[l, name] = SampledSums(lin, name not in ("wo", "w2"), sample, square, self.generator)
                    sink = self.sampled[l, name].add
                else:
                    self.sums[l, name] = (torch.zeros(lin.out_features, device=lin.weight.device),
                                          torch.zeros(lin.in_features, device=lin.weight.device))
                    sink = self._sink(self.sums[l, name], lin)
                self.handles.append(lin.register_forward_hook(self._hook(sink)))

    def _sink(self, acc: tuple, lin):
        def sink(x, dy):
            rows, cols = gradient_sums(x, dy, lambda r: lp.merged_rows(lin, r), self.square)
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
    def __call__(self, linear) -> tuple[Tensor, Tensor]:
        """The criterion: (row sums (out,), column sums (in,)) of `linear` accumulated since the last call; zeroes
        them."""
        key = self.keys[linear]
        if key in self.sampled:
            return self.sampled[key].estimate()
        rows, cols = self.sums[key]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rows)
            dist.all_reduce(cols)
        out = (rows.clone(), cols.clone())
        rows.zero_()
        cols.zero_()
        return out

    def take(self, layer_id: int) -> dict:
        """{projection name: (row sums (out,), column sums (in,))} of one layer since the last take; zeroes them."""
        return {name: self(lin) for lin, (l, name) in self.keys.items() if l == layer_id}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "act_norm": [s.act_norm for s in self.sampled.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for s, norm in zip(self.sampled.values(), state["act_norm"]):
            s.act_norm = norm.to(s.act_norm.device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


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
