"""Tests for generate.py: cached logits equal a full forward, cached greedy decoding equals the no-cache argmax loop
(for GQA, MHA and pruned shapes), EOS and length checks, seeded sampling, the sampling distribution by hand, and the
compiled decode (one graph, replayed). Tiny models on CPU, float32, seeded, no network."""
import pytest
import torch

import generate
import llama
from conftest import greedy, our_logits, tiny_model, tokens

# ----------------------------------------------------------------------------------------------
# generation with a KV cache

PRUNED_SHAPES = {  # n_heads 4 over 2 kv heads (n_rep 2) unless pruned
    "gqa": {},
    "mha": {"n_kv_heads": 4},
    "pruned": {"layer_kv_heads": [2, 1], "layer_hidden_dims": [96, 40], "layer_q_per_kv": [[2, 1], [1]]},
    "pruned_even": {"layer_kv_heads": [1, 2], "layer_hidden_dims": [8, 96]},
}


@pytest.mark.parametrize("shape", PRUNED_SHAPES)
def test_cached_logits_equal_full_forward(shape):
    """Prefill 5 tokens, then feed 7 one at a time through the caches: every position's logits equal one forward
    over the whole sequence (so the cache, its per-layer sizes and the RoPE positions are right)."""
    model = tiny_model(seed=20, **PRUNED_SHAPES[shape])
    ids = tokens(128, T=12, B=1, seed=3)
    full = our_logits(model, ids)[0]  # (12, V)
    caches = [generate.KVCache(1, layer.attention.n_kv_heads, 12, 16, torch.float32) for layer in model.layers]
    with torch.no_grad():
        got = [model(ids[:, :5], 0, caches)[0]] + [model(ids[:, t:t + 1], t, caches)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", PRUNED_SHAPES)
def test_cached_greedy_equals_the_no_cache_argmax_loop(shape):
    model = tiny_model(seed=21, **PRUNED_SHAPES[shape])
    prompt = [5, 17, 99]
    assert generate.generate(model, prompt, 20, temperature=0) == greedy(model, prompt, 20)


def test_generate_stops_after_eos_and_checks_lengths():
    model = tiny_model(seed=22)
    ids = generate.generate(model, [3], 30, temperature=0)
    eos = ids[6]
    first = ids.index(eos)
    assert generate.generate(model, [3], 30, temperature=0, eos_id=eos) == ids[:first + 1]
    assert generate.generate(model, [3], 0) == []
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate.generate(model, [3] * 60, 5)
    with pytest.raises(ValueError, match="prompt"):
        generate.generate(model, [], 5)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model(seed=23)
    draw = lambda seed, **kw: generate.generate(model, [1, 2], 25, temperature=1.0,
                                                generator=torch.Generator().manual_seed(seed), **kw)
    a = draw(0)
    assert draw(0) == a and draw(1) != a  # reproducible, and really random
    assert a != generate.generate(model, [1, 2], 25, temperature=0)
    assert draw(0, top_k=1) == generate.generate(model, [1, 2], 25, temperature=0)
    assert draw(0, top_p=1e-6) == generate.generate(model, [1, 2], 25, temperature=0)  # only the most likely token


def test_sample_probs_temperature_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.2, 0.05, 0.15]))
    p = lambda **kw: generate.sample_probs(logits, **kw)
    torch.testing.assert_close(p(temperature=1.0), torch.tensor([0.1, 0.5, 0.2, 0.05, 0.15]))
    sharp = torch.tensor([0.1, 0.5, 0.2, 0.05, 0.15]) ** 2
    torch.testing.assert_close(p(temperature=0.5), sharp / sharp.sum())  # softmax(log p / 0.5) ~ p^2
    torch.testing.assert_close(p(temperature=1.0, top_k=2), torch.tensor([0.0, 0.5, 0.2, 0.0, 0.0]) / 0.7)
    # top_p: the smallest set of most likely tokens (0.5, 0.2, 0.15, 0.1, 0.05) whose probability reaches p
    for top_p, kept in [(0.3, [1]), (0.6, [1, 2]), (0.75, [1, 2, 4]), (0.9, [1, 2, 4, 0]), (0.99, [0, 1, 2, 3, 4])]:
        expected = torch.zeros(5)
        expected[kept] = torch.tensor([0.1, 0.5, 0.2, 0.05, 0.15])[kept]
        torch.testing.assert_close(p(temperature=1.0, top_p=top_p), expected / expected.sum(), msg=str(top_p))
    # top_k first, then top_p within what is left: (0.5, 0.2) / 0.7 -> 0.714 reaches 0.7 alone
    torch.testing.assert_close(p(temperature=1.0, top_k=2, top_p=0.7), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------------------------
# compiled blocks and the compiled decode


def test_generate_on_compiled_blocks_compiles_prefill_and_decode_once_per_shape():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_model(seed=42, layer_q_per_kv=[[2, 1], [2, 2]])
    expected = generate.generate(model, [1, 2, 3], 12, temperature=0)
    assert llama.compile_blocks(model, backend="eager") == 2
    counters.clear()
    assert generate.generate(model, [1, 2, 3], 12, temperature=0) == expected
    assert counters["stats"]["unique_graphs"] == 2 * 2, dict(counters["stats"])  # 2 shapes x (prefill, decode)
    torch._dynamo.reset()


def test_compiled_decode_equals_eager_and_replays_one_graph():
    """generate(compiled=True) runs each one-token step as one compiled graph (a CUDA graph on a GPU): same tokens
    as the eager loop, greedy and seeded sampling, and a second call on the same caches compiles nothing new."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_model(seed=43, **PRUNED_SHAPES["pruned"]).eval()
    draw = lambda **kw: generate.generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50,
                                          generator=torch.Generator().manual_seed(5), **kw)
    greedy_ids, sampled = generate.generate(model, [1, 2, 3], 20, temperature=0), draw()
    caches = generate.kv_caches(model, 40)
    assert generate.generate(model, [1, 2, 3], 20, temperature=0, compiled=True, caches=caches) == greedy_ids
    counters.clear()
    assert draw(compiled=True, caches=caches) == sampled
    assert generate.generate(model, [4, 5], 9, temperature=0, compiled=True, caches=caches) == \
        generate.generate(model, [4, 5], 9, temperature=0)  # another prompt length: the same decode graph
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    with pytest.raises(ValueError, match="caches of 40 positions; this generation needs 43"):
        generate.generate(model, [1, 2, 3], 40, compiled=True, caches=caches)
    torch._dynamo.reset()
