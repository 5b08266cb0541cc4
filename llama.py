"""LLaMA with built-in LoRA linears (frozen W in float or int8) and per-layer sizes, so a pruned model is an ordinary
model: config, RMSNorm and RoPE, LoRALinear, attention, MLP, blocks, the transformer, the LoRA / int8 helpers.
Generation (and its KV cache) is in generate.py; every checkpoint format, reading and writing, in formats.py.
Shapes: B batch, T time, C model dim, H query heads, K kv heads, D head dim, F MLP width, V vocab, r LoRA rank.
Parameter names are Meta's (`layers.N.attention.wq.weight`, `feed_forward.w1.weight`, ...)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import quant8

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ModelArgs:
    dim: int = 4096  # C, the residual width (never pruned)
    n_layers: int = 32
    n_heads: int = 32  # H: query heads of an unpruned layer
    n_kv_heads: Optional[int] = None  # K: None means n_heads (multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # F: None means derived from multiple_of as in Meta's code
    multiple_of: int = 256  # Meta: the MLP width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # Meta (Llama 2 70B, Llama 3)
    head_dim: Optional[int] = None  # D: None means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output head shares the token embedding (llama2.c, Llama 3.2 1B/3B, small Qwen)
    rope_scaling: Optional[dict] = None  # Llama 3.1's 'llama3' RoPE: factor, low_freq_factor, high_freq_factor,
    #   original_max_position_embeddings (rope_frequencies); None: plain RoPE
    qkv_bias: bool = False  # Qwen2: wq, wk and wv add a bias (out,)
    qk_norm: bool = False  # Qwen3: an RMSNorm over D on every query and key head, before RoPE
    family: str = "llama"  # whose checkpoint this is: 'llama', 'mistral', 'qwen2' or 'qwen3'. The model never
    #   reads it (the switches above say what it computes); formats.py writes this family's classes on export
    # per-layer sizes: a pruned layer keeps some kv heads and some MLP channels, and (after query-head pruning)
    # each kept kv head keeps 1..n_rep of its query heads. None means every layer has the full size.
    layer_kv_heads: Optional[list] = None
    layer_hidden_dims: Optional[list] = None
    layer_q_per_kv: Optional[list] = None  # per layer, query heads of each kv head, e.g. [[3, 1], ...]; None: n_rep

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}; expected one of {FAMILIES}")
        if self.rope_scaling is not None and set(self.rope_scaling) != set(LLAMA3_ROPE):  # Llama 3.1's 'llama3'
            raise ValueError(f"rope_scaling must hold {sorted(LLAMA3_ROPE)}, found {self.rope_scaling}")
        self.layer_kv_heads = list(self.layer_kv_heads or [self.n_kv_heads] * self.n_layers)
        self.layer_hidden_dims = list(self.layer_hidden_dims or [self.hidden_dim] * self.n_layers)
        for name in ("layer_kv_heads", "layer_hidden_dims"):
            sizes = getattr(self, name)
            if len(sizes) != self.n_layers or min(sizes) < 1:
                raise ValueError(f"{name} must hold {self.n_layers} positive sizes, found {sizes}")
        if self.layer_q_per_kv is not None:
            check_q_per_kv(self.layer_q_per_kv, self.layer_kv_heads, self.n_rep)
            self.layer_q_per_kv = [list(counts) for counts in self.layer_q_per_kv]
            if all(c == self.n_rep for counts in self.layer_q_per_kv for c in counts):
                self.layer_q_per_kv = None  # one spelling of "uniform", so equal models have equal args

    @property
    def n_rep(self) -> int:
        """Query heads per kv head of the unpruned model (query-head pruning may leave fewer: q_per_kv)."""
        return self.n_heads // self.n_kv_heads

    def q_per_kv(self, layer_id: int) -> list:
        """Query heads of each kv head of one layer: [n_rep] * K unless layer_q_per_kv says otherwise."""
        if self.layer_q_per_kv is None:
            return [self.n_rep] * self.layer_kv_heads[layer_id]
        return list(self.layer_q_per_kv[layer_id])

    @property
    def layer_n_heads(self) -> list:
        """Query heads of every layer (H_l)."""
        return [sum(self.q_per_kv(l)) for l in range(self.n_layers)]


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,  # Meta's Llama 3.1 values
               "original_max_position_embeddings": 8192}


def check_q_per_kv(layer_q_per_kv, layer_kv_heads: list, n_rep: int) -> None:
    """ValueError unless layer_q_per_kv holds, for every layer, one count in [1, n_rep] per kv head."""
    if not isinstance(layer_q_per_kv, (list, tuple)) or len(layer_q_per_kv) != len(layer_kv_heads):
        raise ValueError(f"layer_q_per_kv must hold one list per layer ({len(layer_kv_heads)}), found {layer_q_per_kv}")
    for l, (counts, K) in enumerate(zip(layer_q_per_kv, layer_kv_heads)):
        if not isinstance(counts, (list, tuple)) or len(counts) != K:
            raise ValueError(f"layer_q_per_kv[{l}] must list the query heads of each of the layer's {K} kv heads "
                             f"(layer_kv_heads[{l}]), found {counts}")
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= n_rep]
        if bad:
            raise ValueError(f"layer_q_per_kv[{l}] = {counts}: every count must be an integer in [1, n_rep={n_rep}], "
                             f"found {bad}")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """MLP width exactly as Meta's FeedForward derives it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------------------------
# math helpers: RMSNorm, RoPE


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim; accumulated in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_frequencies(D: int, theta: float, scaling: Optional[dict] = None) -> Tensor:
    """RoPE's D/2 frequencies theta^(-2j/D), float32. Llama 3.1's `scaling` (Meta's apply_scaling): a wavelength
    2*pi/f above L / low_freq_factor is divided by `factor`, below L / high_freq_factor kept, blended between, by
    how many wavelengths fit in L = original_max_position_embeddings."""
    freqs = 1.0 / theta ** (torch.arange(0, D, 2)[: D // 2].float() / D)  # (D/2,), Meta's
    if scaling is None:
        return freqs
    factor, L = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / freqs  # (D/2,)
    smooth = (L / wavelength - low) / (high - low)  # 0 at wavelength L / low, 1 at L / high
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelength > L / low, freqs / factor, torch.where(wavelength < L / high, freqs, blended))


def rope_cos_sin(positions: Tensor, D: int, theta: float, scaling: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles position * rope_frequencies(D, theta, scaling) (Meta's freqs_cis as two real
    tables): positions (T,) -> (T, D/2), (T, D/2), float32."""
    freqs = rope_frequencies(D, theta, scaling).to(positions.device)  # (D/2,)
    angles = torch.outer(positions.float(), freqs)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2j], x[2j+1]) by its position's angle, in float32: Meta's interleaved pairing (Hugging
    Face's rotate-half layout is converted at load time). x (B, T, H, D), cos and sin (T, D/2) -> (B, T, H, D)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2) each
    cos, sin = cos[:, None].to(xf.dtype), sin[:, None].to(xf.dtype)  # (T, 1, D/2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)  # (B, T, H, D)


def repeat_kv(x: Tensor, q_per_kv: tuple) -> Tensor:
    """Kv head g repeated q_per_kv[g] times: (B, K, T, D) -> (B, H, T, D) (llama2.c's repeat_kv when every count is
    n_rep). Built from views, so no tensor of counts is copied to the device on every forward."""
    B, _, T, D = x.shape
    return torch.cat([x[:, g:g + 1].expand(B, c, T, D) for g, c in enumerate(q_per_kv)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------
# LoRA linear


class LoRALinear(nn.Module):
    """y = x @ W.T + b + s * (dropout(x) @ A.T) @ B.T with W (out, in) and the optional bias b (out,) frozen,
    A (r, in), B (out, r), s = alpha / r. r = 0 is a plain frozen linear. B starts at zero, so a fresh adapter leaves
    the output unchanged. W is a float `weight`, or an int8 `weight` with float32 `scales` (out,) (quant8.py; see
    `quantize_`); b stays float either way (LoRA never touches it, merging neither)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None  # Qwen2's q/k/v
        self.register_buffer("scales", None)  # (out,) float32 when W is int8
        self.drop_lora()  # r = 0, no adapters until add_lora
        self.adapters_on = True  # False: the base layer alone (e.g. a teacher forward for self-distillation)
        self.register_module("probe", None)  # criterion 'exact' sets a module here (variants.ExactProbe)

    @property
    def int8(self) -> bool:
        return self.weight.dtype == torch.int8

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, generator: Optional[torch.Generator] = None):
        """Attach fresh adapters (fp32, on the weight's device): A Kaiming-uniform as in loralib, B zero."""
        self.r, self.scaling = r, alpha / r
        device = self.weight.device
        A = torch.empty(r, self.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default kaiming_uniform_(a=sqrt(5))
        A.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def drop_lora(self):
        self.r, self.scaling, self.lora_A, self.lora_B, self.lora_dropout = 0, 0.0, None, None, nn.Identity()

    def base(self, x: Tensor) -> Tensor:
        """The frozen part x @ W.T + b."""
        if self.int8:
            y = quant8.int8_matmul(x, self.weight, self.scales)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self, rows: slice = slice(None)) -> Tensor:
        """W[rows] in a float dtype: an int8 W is dequantized to float32 (the criterion asks a slice at a time)."""
        if self.int8:
            return quant8.dequantize(self.weight[rows], self.scales[rows])
        return self.weight[rows]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.r and self.adapters_on:
            A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            y = y + F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling  # (..., in) -> (..., r) -> (..., out)
        if self.probe is not None:  # y unchanged; its backward gives the probe's parameter Eq. 3's group sums
            y = self.probe(x, y, self)
        return y

    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """W + s * B @ A computed in float32, returned in `dtype` (default: W's float dtype, float32 for int8)."""
        W = self.dense_weight()
        dtype = dtype or W.dtype
        if not self.r:
            return W.to(dtype)
        acc = torch.promote_types(W.dtype, torch.float32)  # at least float32 (float64 stays float64)
        return W.to(acc).addmm(self.lora_B.to(acc), self.lora_A.to(acc), alpha=self.scaling).to(dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapters into a float W (explicit, never a side effect of .eval()) and drop them."""
        if self.int8 and self.r:
            raise ValueError("merging LoRA into an int8 weight would need a re-quantization: use quantize_ (merges "
                             "in float32, then quantizes), or loraprune.slice_model for a float model")
        if self.r:
            self.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
            self.drop_lora()

    @torch.no_grad()
    def quantize_(self):
        """Store W + s * B @ A (merged in float32) as int8 `weight` + float32 `scales` (quant8.quantize), adapters
        dropped. On the meta device this makes the empty int8 store that a checkpoint is then assigned into."""
        q, scale = quant8.quantize(self.merged_weight(torch.float32))  # not bf16: its rounding adds 1/4 step
        self.weight, self.scales = nn.Parameter(q, requires_grad=False), scale
        self.drop_lora()

    def extra_repr(self) -> str:
        int8 = ", int8" if self.int8 else ""
        bias = ", bias" if self.bias is not None else ""
        return f"in={self.in_features}, out={self.out_features}{bias}, r={self.r}, scaling={self.scaling}{int8}"


# ----------------------------------------------------------------------------------------------
# modules: attention, MLP, block, transformer


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, q_per_kv: list):
        super().__init__()
        self.q_per_kv = tuple(q_per_kv)  # query heads of each kv head, in order: n_rep each unless query-pruned
        self.n_kv_heads, self.n_heads, self.head_dim = len(q_per_kv), sum(q_per_kv), args.head_dim
        self.uneven = len(set(q_per_kv)) > 1
        self.wq = LoRALinear(args.dim, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = LoRALinear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = LoRALinear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = LoRALinear(self.n_heads * self.head_dim, args.dim)
        # Qwen3: one RMSNorm weight (D,) for every query head, one for every key head (shared, so never pruned)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.register_buffer("head_mask", None, persistent=False)  # Eq. 13: (H,) 0/1 per query head (apply_masks)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, positions: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C) at `positions` (T,) -> (B, T, C); without a cache (generate.KVCache) the positions are
        0..T-1 (causal)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        if self.q_norm is not None:  # Qwen3: each query and key head normalised over D, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, D)
        mask = None
        if cache is not None:  # keys of all positions so far; query i sees key j iff j <= positions[i]
            k, v = cache.update(positions, k, v)  # (B, K, S, D)
            mask = positions[:, None] >= torch.arange(k.shape[2], device=x.device)  # (T, S)
        if self.uneven:  # kv head g serves the next q_per_kv[g] query heads: copy it to each, then plain attention
            k, v = repeat_kv(k, self.q_per_kv), repeat_kv(v, self.q_per_kv)  # (B, H, T or S, D)
        # grouped-query attention: query head h reads kv head h // (H / K) (SDPA broadcasts the kv heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_heads != k.shape[1])  # (B, H, T, D)
        if self.head_mask is not None:  # Eq. 13: a masked query head (or all heads of a masked kv group) outputs 0
            y = y * self.head_mask[:, None, None].to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(y)  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = LoRALinear(dim, hidden_dim)  # gate
        self.w2 = LoRALinear(hidden_dim, dim)  # down
        self.w3 = LoRALinear(dim, hidden_dim)  # up
        self.register_buffer("channel_mask", None, persistent=False)  # Eq. 13: (F,) 0/1 per MLP channel

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.w1(x)) * self.w3(x)  # (B, T, F), SwiGLU
        if self.channel_mask is not None:
            h = h * self.channel_mask.to(h.dtype)
        return self.w2(h)  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, args.q_per_kv(layer_id))
        self.feed_forward = FeedForward(args.dim, args.layer_hidden_dims[layer_id])
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.compiled = None  # compile_blocks: {recompute: _forward compiled}

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, positions: Optional[Tensor] = None,
                recompute: bool = False) -> Tensor:
        if self.compiled is not None:  # compiled: what to recompute is Inductor's choice under a memory budget
            return self.compiled[recompute](x, cos, sin, cache, positions)
        if recompute:  # eager: keep only x, recompute the whole block in backward
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, cache, positions, use_reentrant=False)
        return self._forward(x, cos, sin, cache, positions)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache, positions: Optional[Tensor]):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, positions)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tok_embeddings.weight.requires_grad_(False)
        self.output.weight.requires_grad_(False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.checkpoint_activations = False  # recompute each block in backward (7B at 2048 tokens then fits one GPU)

    def forward(self, tokens: Tensor, start=0, caches: Optional[list] = None) -> Tensor:
        """tokens (B, T) int64 at positions start..start+T-1 -> logits (B, T, V). With `caches` (generate.kv_caches)
        attention also reads the earlier positions' keys and values. start: an int, or a (1,) int64 tensor (the
        compiled decode step: one graph for every position; the caller checks the length then)."""
        B, T = tokens.shape
        if isinstance(start, Tensor):
            positions = start + torch.arange(T, device=tokens.device)  # (T,)
        else:
            if start + T > self.args.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len={self.args.max_seq_len}")
            positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)  # (T, D/2)
        h = self.tok_embeddings(tokens)  # (B, T, C)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            h = layer(h, cos, sin, recompute=recompute) if cache is None else layer(h, cos, sin, cache, positions)
        return self.output(self.norm(h))  # (B, T, V)


RECOMPUTE_BUDGET = 0.05  # compiled checkpointed blocks keep ~5% of their activations (bench/RESULTS.md)


def compile_blocks(model: Transformer, backend: str = "inductor", recompute_budget: float = RECOMPUTE_BUDGET) -> int:
    """torch.compile every block in place (run.py --compile): Inductor fuses the norms, RoPE, SwiGLU, LoRA dropout
    and residual adds around the matmuls. A recomputing block has graphs of its own, compiled with the partitioner's
    activation memory budget set to `recompute_budget` (only while it compiles): backward recomputes all but that
    fraction of the activations, the cheapest first. Blocks of one shape share a graph per mode (train or eval, grad,
    recompute, masks or none; block 0 once more with grad); new mask values reuse it. Static shapes: each shape and
    mode is a graph of its own, hence the raised recompile limit. Returns the number of block shapes."""
    shapes = {(layer.attention.q_per_kv, layer.feed_forward.w1.out_features) for layer in model.layers}
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(shapes))  # the limit counts every shape and mode
    compile_graph = torch._dynamo.lookup_backend(backend)

    def under_budget(gm, example_inputs):  # one function for every block, so they share its graphs
        with torch._functorch.config.patch(activation_memory_budget=recompute_budget):
            return compile_graph(gm, example_inputs)
    for layer in model.layers:
        layer.compiled = {False: torch.compile(layer._forward, dynamic=False, backend=backend),
                          True: torch.compile(layer._forward, dynamic=False, backend=under_budget)}
    return len(shapes)


# names of the seven projections LoRA may sit on (the paper's q, k, v, o, gate, down, up)
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def projections(model: Transformer, layer_id: int) -> dict:
    """{'wq': LoRALinear, ...} for one block."""
    layer = model.layers[layer_id]
    a, f = layer.attention, layer.feed_forward
    return {"wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "w1": f.w1, "w2": f.w2, "w3": f.w3}


def add_lora(model: Transformer, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
             targets: tuple = PROJECTIONS, seed: int = 0) -> list:
    """Attach LoRA of rank r to the `targets` projections of every block; returns the trainable parameters.
    Defaults are the official script's (r 8, alpha 16, dropout 0.05, all seven projections)."""
    bad = sorted(set(targets) - set(PROJECTIONS))
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; expected a subset of {PROJECTIONS}")
    if r <= 0:
        return []
    g = torch.Generator().manual_seed(seed)
    params = []
    for i in range(model.args.n_layers):
        for name, lin in projections(model, i).items():
            if name in targets:
                lin.add_lora(r, alpha, dropout, generator=g)
                params += [lin.lora_A, lin.lora_B]
    return params


def count_params(model: nn.Module) -> int:
    """Parameters as a checkpoint counts them: a tied head once, LoRA adapters included, int8 weights by element."""
    return sum(p.numel() for p in model.parameters())


def quantize_model(model: Transformer) -> Transformer:
    """int8 W for the seven projections of every block, in place (LoRA merged in float32 first: LoRALinear.quantize_).
    The embedding, head and norms stay float. On the meta device, this prepares an int8 model for loading."""
    for l in range(model.args.n_layers):
        for lin in projections(model, l).values():
            lin.quantize_()
    return model
