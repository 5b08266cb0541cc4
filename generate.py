"""Text generation with a KV cache, beside the model as gpt-fast keeps generate.py beside model.py: the sampling
distribution (temperature, top-k, top-p), one KVCache per layer, the one-token decode step (compiled into one CUDA
graph on request) and `generate`, which prefills the prompt in one forward and then decodes token by token.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from llama import Transformer

# ----------------------------------------------------------------------------------------------
# KV caches (Attention.forward writes each new position's keys and values into its layer's)


class KVCache:
    """Keys and values of one layer for positions [0, S) of a generation, as gpt-fast's KVCache: two (B, K, S, D)
    tensors, K that layer's kv heads (a pruned layer has its own)."""

    def __init__(self, B: int, K: int, S: int, D: int, dtype: torch.dtype, device=None):
        self.k = torch.zeros(B, K, S, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, K, S, D, dtype=dtype, device=device)

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, T, D) at positions (T,); return the whole cache (B, K, S, D), unwritten slots too."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


def kv_caches(model: Transformer, S: int, B: int = 1) -> list:
    """One KVCache of S positions per layer, in the model's dtype and device, each with its layer's kv heads. Pass the
    same list to several `generate(..., compiled=True)` calls: a CUDA graph replays on fixed addresses, so new
    caches would make it record again."""
    emb = model.tok_embeddings.weight
    return [KVCache(B, layer.attention.n_kv_heads, S, model.args.head_dim, emb.dtype, emb.device)
            for layer in model.layers]


# ----------------------------------------------------------------------------------------------
# sampling


def sample_probs(logits: Tensor, temperature: float, top_k: Optional[int] = None,
                 top_p: Optional[float] = None) -> Tensor:
    """Next-token distribution (V,) from logits (V,): softmax(logits / temperature), cut to the top_k most likely
    tokens, then to the smallest set of most likely tokens whose probability reaches top_p; renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_k is not None:
        kth = torch.topk(probs, min(top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
    if top_p is not None:
        p, order = probs.sort(descending=True)  # (V,)
        p[p.cumsum(0) - p >= top_p] = 0.0  # the more likely tokens before it already reach top_p
        probs = torch.zeros_like(probs).scatter_(0, order, p)
    return probs / probs.sum()


# ----------------------------------------------------------------------------------------------
# one decode step


def decode_step(model: Transformer, token: Tensor, position: Tensor, caches: list) -> Tensor:
    """One token (1, 1) at position (1,) through the caches -> the next position's logits (V,)."""
    return model(token, position, caches)[0, -1]


@functools.cache
def decode_graph():
    """decode_step compiled as one graph for the whole model and replayed as a CUDA graph (gpt-fast's
    decode_one_token). Decoding one token of a large model is launch-bound: compiled blocks alone still launch each
    block's kernels from Python and check each block's guards, more of them when a pruned model has several block
    shapes (bench/RESULTS.md). Static shapes: the position is a tensor and the caches keep their length, so every
    token replays the same graph."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------------------------
# generate: prefill, then one token at a time


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, temperature: float = 0.8,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, compiled: bool = False,
             caches: Optional[list] = None) -> list:
    """Up to max_new_tokens token ids sampled after `prompt` (new tokens only; the last one is eos_id if that was
    drawn). One forward over the prompt fills the per-layer KV caches, then one token per forward. temperature 0 is
    greedy; `generator` (on the model's device) seeds the sampling. Call model.eval() first (LoRA dropout).
    compiled: each one-token step runs decode_graph (one CUDA graph on a GPU); the caches then default to a length
    rounded up to a multiple of 256, so that prompts of other lengths reuse the graph. caches: kv_caches of at
    least len(prompt) + max_new_tokens positions, to reuse across calls (their old contents are overwritten or
    masked). Compiled blocks (compile_blocks) compile the prefill once per prompt length and cache length."""
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token (e.g. BOS)")
    S, max_len = len(prompt) + max_new_tokens, model.args.max_seq_len
    if S > max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {S} tokens is longer than "
                         f"max_seq_len={max_len}")
    if max_new_tokens == 0:
        return []
    if caches is None:
        caches = kv_caches(model, min(max_len, -(-S // 256) * 256) if compiled else S)
    elif caches[0].k.shape[2] < S:
        raise ValueError(f"caches of {caches[0].k.shape[2]} positions; this generation needs {S}")
    step = decode_graph() if compiled else decode_step
    if compiled:  # the graph writes into the caches in place: they must be inputs at fixed addresses
        for cache in caches:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
    device = model.tok_embeddings.weight.device
    logits = model(torch.tensor([prompt], device=device), 0, caches)[0, -1]  # (V,) for the next position
    new = []
    while True:
        if temperature == 0:
            new.append(int(logits.argmax()))
        else:
            probs = sample_probs(logits, temperature, top_k, top_p)
            new.append(int(torch.multinomial(probs, 1, generator=generator)))
        if new[-1] == eos_id or len(new) == max_new_tokens:
            return new
        position = torch.tensor([len(prompt) + len(new) - 1], device=device)  # (1,)
        logits = step(model, torch.tensor([[new[-1]]], device=device), position, caches)  # (V,)
