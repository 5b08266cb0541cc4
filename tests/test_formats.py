"""Tests for formats.py: every reader gives transformers' logits (Meta's shards, Hugging Face folders, GGUF files as
llama.cpp writes them), the real files in shared/data (llama2.c's stories260K, tiny-random-llama-2), formats.load's
choice of reader, the readers' error messages, our own format's save -> load round trip, the atomic writes and the
umask, and the GGUF and Hugging Face exports read back by llama.cpp and transformers. Tiny models on CPU, float32,
seeded, no network."""
import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import formats
import generate
import llama
from conftest import (FAMILIES, FAMILY_T, GQA_UNIFORM, ROPE_THETA, family_model, greedy, hf_logits, hf_model,
                      hf_to_meta_rows_by_index, lora_linears, meta_to_hf_rows, our_logits, random_model,
                      randomize_lora_B_, shared_file, tiny_model, tokens, train_bpe, write_llama_gguf)
from data import Tokenizer
from llama import Transformer

# ----------------------------------------------------------------------------------------------
# helpers




def gguf_hf_model(vocab: int, tied: bool, seed: int = 0):
    """The GGUF tests' transformers model: the tiny GQA config with SmolLM2's RoPE base."""
    return hf_model(seed, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=ROPE_THETA)


def logits_both(hf, ours, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits, ours(ids)  # (B, T, V) each


# --- Hugging Face -> Meta, written independently of formats.py's tables

HF_TO_META_PARTS = [  # substring replacements, applied in order
    ("model.embed_tokens.", "tok_embeddings."), ("lm_head.", "output."), ("model.norm.", "norm."),
    ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
    ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm"),
]

# how Meta's model-parallel layers split each tensor (fairscale ColumnParallelLinear / RowParallelLinear /
# ParallelEmbedding in meta-llama/llama model.py); None = replicated on every shard
SHARD_DIM_BY_KIND = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                     "wo": 1, "w2": 1, "tok_embeddings": 1,
                     "attention_norm": None, "ffn_norm": None, "norm": None}


def expected_shard_dim(name: str):
    return SHARD_DIM_BY_KIND[name.split(".")[-2]]  # 'layers.0.attention.wq.weight' -> 'wq'


def hf_state_to_meta(hf, n_heads: int, n_kv_heads: int) -> dict:
    meta = {}
    for name, t in hf.state_dict().items():
        for old, new in HF_TO_META_PARTS:
            name = name.replace(old, new)
        if name.endswith("wq.weight"):
            t = hf_to_meta_rows_by_index(t, n_heads)
        elif name.endswith("wk.weight"):
            t = hf_to_meta_rows_by_index(t, n_kv_heads)
        meta[name] = t.detach().clone()
    return meta


def write_meta_folder(folder, state: dict, n_shards: int, params: dict, rope_freqs: bool = False):
    """consolidated.NN.pth shards split the way Meta's model-parallel ranks hold them, plus params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(n_shards):
        shard = {}
        for name, t in state.items():
            dim = expected_shard_dim(name)
            if dim is not None:
                assert t.shape[dim] % n_shards == 0, f"test setup: {name} {tuple(t.shape)} does not split {n_shards}"
            shard[name] = t.clone() if dim is None else t.chunk(n_shards, dim)[rank].clone()
        if rope_freqs:  # LLaMA-1 shards carry this buffer; the loader recomputes RoPE instead
            shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def meta_params(dim, n_layers, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier=None, rope_theta=10000.0):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=-1,
                multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=1e-5, rope_theta=rope_theta)


# ----------------------------------------------------------------------------------------------
# Meta's original shards: logits equal transformers' LlamaForCausalLM


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_meta_two_shards_match_transformers(tmp_path, rope_theta):
    # dim 64, multiple_of 32: int(2 * 256 / 3) = 170 -> 192, the MLP width Meta derives
    hf = hf_model(seed=2, intermediate_size=192, rope_theta=rope_theta)
    state = hf_state_to_meta(hf, n_heads=4, n_kv_heads=2)
    write_meta_folder(tmp_path, state, 2, meta_params(64, 2, 4, 2, multiple_of=32, rope_theta=rope_theta),
                      rope_freqs=True)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    ours = formats.load(tmp_path, dtype=torch.float32)
    assert (ours.args.hidden_dim, ours.args.vocab_size) == (192, 128)
    ids = tokens(128, T=20)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_ffn_dim_multiplier_matches_transformers(tmp_path):
    # int(0.5 * 170) = 85 -> 96 with multiple_of 32: the Llama-2-70B / Llama-3 path of Meta's derivation
    hf = hf_model(seed=4, intermediate_size=96)
    write_meta_folder(tmp_path, hf_state_to_meta(hf, 4, 2), 2,
                      meta_params(64, 2, 4, 2, multiple_of=32, ffn_dim_multiplier=0.5))
    ours = formats.load(tmp_path, dtype=torch.float32)
    ids = tokens(128, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_three_shards_match_transformers(tmp_path):
    # every split size divides by 3: dim 96, 6 heads / 3 kv heads of 16, vocab 126,
    # MLP int(2 * 384 / 3) = 256 -> 288 with multiple_of 48
    hf = hf_model(seed=5, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=288,
                  vocab_size=126)
    write_meta_folder(tmp_path, hf_state_to_meta(hf, 6, 3), 3, meta_params(96, 2, 6, 3, multiple_of=48))
    ours = formats.load(tmp_path, dtype=torch.float32)
    assert (ours.args.dim, ours.args.hidden_dim, ours.args.vocab_size) == (96, 288, 126)
    ids = tokens(126, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_shard_dim_rule_and_fake_shards_concatenate_back(tmp_path):
    model = tiny_model(seed=6, hidden_dim=192, multiple_of=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in state:
        assert formats.meta_shard_dim(name) == expected_shard_dim(name), name
    write_meta_folder(tmp_path, state, 2, meta_params(64, 2, 4, 2, multiple_of=32))
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # really split, on the right dim
    assert shard["tok_embeddings.weight"].shape == (128, 32)
    assert shard["output.weight"].shape == (64, 64)
    loaded = formats.load(tmp_path, dtype=torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name


# ----------------------------------------------------------------------------------------------
# Hugging Face folders: logits equal transformers' LlamaForCausalLM


def test_test_helpers_invert_the_published_permutation():
    w = torch.randn(32, 5)
    for heads in (1, 2, 4):
        assert torch.equal(meta_to_hf_rows(hf_to_meta_rows_by_index(w, heads), heads), w)
        assert torch.equal(formats.hf_to_meta_rows(w, heads), hf_to_meta_rows_by_index(w, heads))
    assert not torch.equal(hf_to_meta_rows_by_index(w, 4), w)  # the permutation does move rows


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_hf_safetensors_folder_matches_transformers(tmp_path, rope_theta):
    hf = hf_model(rope_theta=rope_theta)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = formats.load(tmp_path / "hf", dtype=torch.float32)
    assert ours.args.rope_theta == rope_theta
    ids = tokens(128, T=20)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_hf_transformers_4_config_layout_matches(tmp_path):
    """transformers 4.x wrote rope_theta at the top level (5.x nests it in rope_parameters); read both."""
    hf = hf_model(rope_theta=500000.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = formats.load(tmp_path, dtype=torch.float32)
    ids = tokens(128, T=20)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_hf_pytorch_model_bin_matches_transformers(tmp_path):
    hf = hf_model(seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = formats.load(tmp_path, dtype=torch.float32)
    ids = tokens(128, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_hf_tied_embeddings_match_transformers(tmp_path):
    hf = hf_model(seed=1, tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = formats.load(tmp_path, dtype=torch.float32)
    assert ours.args.tie_embeddings
    assert ours.output.weight is ours.tok_embeddings.weight
    ids = tokens(128, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)



# ----------------------------------------------------------------------------------------------
# the families: Llama 3.1/3.2, Mistral, Qwen2, Qwen3, each against transformers' own modeling file


SWITCHES = {"llama3": dict(rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}, tie_embeddings=True),
            "mistral": dict(rope_theta=1e6, tie_embeddings=False),
            "qwen2": dict(qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
            "qwen3": dict(qk_norm=True, head_dim=32, tie_embeddings=True, norm_eps=1e-6)}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_hf_folder_matches_transformers(tmp_path, family):
    """Each family's Hugging Face folder gives transformers' logits in float32 (1e-4), with the family's switches
    set: Llama 3.2's llama3 RoPE (compared over 1024 positions, where its slow frequencies turn) and tied head,
    Qwen2's q/k/v biases, Qwen3's q/k norms and a head_dim that is not width / heads."""
    hf = family_model(family)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = formats.load(tmp_path, dtype=torch.float32).eval()
    a = ours.args
    assert a.family == {"llama3": "llama"}.get(family, family)
    for key, value in SWITCHES[family].items():
        assert getattr(a, key) == value, key
    ids = tokens(128, T=FAMILY_T.get(family, 24), B=1)
    theirs = hf_logits(hf, ids)
    assert theirs.std() > 0.5
    torch.testing.assert_close(our_logits(ours, ids), theirs, atol=1e-4, rtol=0)
    if family == "llama3":  # the scaling matters over these positions: plain RoPE is far off
        ours.args.rope_scaling = None
        assert (our_logits(ours, ids) - theirs).abs().max() > 0.05


def test_mistral_sliding_window_caps_the_sequence_length(tmp_path):
    """Mistral 7B v0.1's 4096-token window: within it the model is plain causal attention, so max_seq_len is the
    window, and longer sequences are refused in one line."""
    hf = family_model("mistral", sliding_window=16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = formats.load(tmp_path, dtype=torch.float32).eval()
    assert ours.args.max_seq_len == 16
    ids = tokens(128, T=16, B=1)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than max_seq_len=16"):
        ours(tokens(128, T=17, B=1))


def test_meta_folder_with_scaled_rope(tmp_path):
    """Meta's Llama 3.1 folder says use_scaled_rope (Meta's apply_scaling: factor 8 unless params.json says
    rope_scaling_factor): the same logits as transformers' llama3 RoPE with those values."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf = family_model("llama3", rope_parameters=rope, tie_word_embeddings=False, intermediate_size=192)
    c = hf.config
    state = {}
    for name, w in hf.state_dict().items():
        ours = formats.HF_NAMES[name.replace(name.split(".")[2], "{}", 1) if ".layers." in name else name]
        ours = ours.format(name.split(".")[2]) if "{}" in ours else ours
        heads = {"wq.weight": 4, "wk.weight": 2}.get(".".join(ours.split(".")[-2:]))
        state[ours] = hf_to_meta_rows_by_index(w, heads) if heads else w
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(state, folder / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 32,
              "norm_eps": c.rms_norm_eps, "rope_theta": 500000.0, "use_scaled_rope": True}  # MLP: 2/3 * 4 * 64 -> 192
    (folder / "params.json").write_text(json.dumps(params))
    ours = formats.load(folder, dtype=torch.float32).eval()
    assert ours.args.rope_scaling["factor"] == 8.0
    ids = tokens(128, T=1024, B=1)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gguf_matches_transformers(tmp_path, family):
    """Each family's GGUF file as llama.cpp's converter writes it (architecture 'llama' with q/k rows permuted and
    Llama 3's rope_freqs.weight, or Qwen's 'qwen2' / 'qwen3' with HF's rows, biases and q/k norms): transformers'
    logits on the file's dequantized weights."""
    hf = family_model(family)
    arch = {"qwen2": "qwen2", "qwen3": "qwen3"}.get(family, "llama")
    path = write_llama_gguf(tmp_path / "model.gguf", hf, arch=arch)
    ours = formats.load(path, dtype=torch.float32).eval()
    for key, value in SWITCHES[family].items():
        assert getattr(ours.args, key) == pytest.approx(value), key  # GGUF holds norm_eps as float32
    assert ours.args.family == ("llama" if family in ("llama3", "mistral") else family)
    ids = tokens(128, T=FAMILY_T.get(family, 24), B=1)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_gguf_rope_freqs_other_than_llama3_are_refused(tmp_path):
    import gguf
    hf = family_model("llama3")
    path = write_llama_gguf(tmp_path / "model.gguf", hf)
    reader = gguf.GGUFReader(path, "r+")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors.data[1] = 3.0  # not on the llama3 curve
    del reader
    with pytest.raises(ValueError, match=r"rope_freqs\.weight .* is not Llama 3's RoPE scaling"):
        formats.load(path)


# ----------------------------------------------------------------------------------------------
# GGUF: same logits as transformers on the same (dequantized) weights


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_logits_match_transformers(tmp_path, tied):
    tok = train_bpe("gpt-2")
    hf = gguf_hf_model(tok.get_vocab_size(), tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, tok)
    ours = formats.load(path, dtype=torch.float32).eval()
    args = ours.args
    shape = (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim, args.head_dim)
    assert shape == (64, 2, 4, 2, 96, 16)
    assert (args.vocab_size, args.rope_theta, args.max_seq_len, args.tie_embeddings) == (300, ROPE_THETA, 64, tied)
    assert args.norm_eps == pytest.approx(1e-5)
    ids = torch.randint(300, (2, 24), generator=torch.Generator().manual_seed(0))  # (B, T)
    theirs, mine = logits_both(hf, ours, ids)
    assert theirs.std() > 0.5  # far from uniform, so a layout mistake would show
    torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=2e-4)
    if tied:
        assert ours.output.weight is ours.tok_embeddings.weight
    Tokenizer(path).check_vocab(args.vocab_size)  # one file holds both


def test_gguf_without_llama_cpp_permutation_does_not_match(tmp_path):
    """The comparison above is sensitive to the q/k row layout: the unpermuted (HF) rows give other logits."""
    hf = gguf_hf_model(300, tied=True)
    ours = formats.load(write_llama_gguf(tmp_path / "hf-rows.gguf", hf, permute=False),
                                 dtype=torch.float32).eval()
    theirs, mine = logits_both(hf, ours, torch.arange(24).view(2, 12))
    assert (mine - theirs).abs().max() > 0.1


def test_real_model_through_gguf_tells_the_same_story(tmp_path):
    """stories260K (a llama2.c model trained on TinyStories, GQA 8/4 heads) written as llama.cpp would write its
    HF form: greedy text through the GGUF loader equals transformers' on the same weights, and reads as English."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    src = formats.load(shared_file("stories260K.bin"), dtype=torch.float32)
    a = src.args
    cfg = transformers.LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                                   num_key_value_heads=a.n_kv_heads, intermediate_size=a.hidden_dim,
                                   vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                                   max_position_embeddings=a.max_seq_len, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    ours_of = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
               "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    state = src.state_dict()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # model.layers.N.<module>.weight, embed_tokens, norm
            if ".layers." in name:
                _, _, i, *module, _ = name.split(".")
                ours = ours_of[".".join(module)]
                w = state[f"layers.{i}.{ours}.weight"]
                if ours in ("attention.wq", "attention.wk"):  # Meta's interleaved pairs -> HF's halves, per head
                    heads = a.n_heads if ours == "attention.wq" else a.n_kv_heads
                    w = w.view(heads, -1, 2, a.dim).transpose(1, 2).reshape(w.shape)
            else:
                w = state["tok_embeddings.weight" if "embed_tokens" in name else "norm.weight"]
            p.copy_(w)
    tok = Tokenizer(shared_file("tok512.model"))
    prompt = tok.encode("Once upon a time")
    ours = formats.load(write_llama_gguf(tmp_path / "stories260K.gguf", hf, rope_theta=a.rope_theta),
                                 dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
        ids = list(prompt)
        for _ in range(40):  # greedy, recomputing the whole prefix (no KV cache to get wrong)
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert ids == theirs
    assert tok.decode(ids).startswith("Once upon a time, there was a little")


def test_gguf_int8_and_bf16_load(tmp_path):
    hf = gguf_hf_model(300, tied=False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf)
    ids = torch.arange(16).view(1, 16)
    theirs, _ = logits_both(hf, formats.load(path, dtype=torch.float32), ids)
    int8 = formats.load(path, dtype=torch.float32, int8=True)
    assert int8.layers[0].attention.wq.weight.dtype == torch.int8
    assert (logits_both(hf, int8, ids)[1] - theirs).abs().max() < 0.2
    assert formats.load(path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16
    assert formats.load(path).tok_embeddings.weight.dtype == torch.float32  # dtype None: as dequantized



# ----------------------------------------------------------------------------------------------
# real files in shared/data


def test_tiny_random_llama_2_matches_recorded_corpus():
    folder = shared_file("tiny-random-llama-2")
    corpus = json.loads((folder / "corpus.json").read_text())
    tol = corpus["logit_tolerance"]
    model = formats.load(folder, dtype=torch.float32).eval()
    assert (model.args.dim, model.args.vocab_size, model.args.n_layers) == (16, 3000, 2)
    assert len(corpus["model_cases"]) == 3
    for case in corpus["model_cases"]:
        last = our_logits(model, torch.tensor([case["input_ids"]]))[0, -1]  # (V,)
        ids = [int(i) for i in case["sampled_logits"]]
        expected = torch.tensor([case["sampled_logits"][str(i)] for i in ids])
        torch.testing.assert_close(last[ids], expected, atol=tol["absolute"], rtol=tol["relative"])
        assert int(last.argmax()) == case["greedy_token"]
        assert greedy(model, case["input_ids"], len(case["greedy_continuation"])) == case["greedy_continuation"]


STORIES_GREEDY = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
                  410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352]


def test_stories260k_greedy_story():
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.float32).eval()
    a = model.args
    assert (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (64, 172, 5, 8, 4, 512)
    assert a.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert llama.count_params(model) == 260032  # MANIFEST: parameters without the two RoPE tables
    ids = generate.generate(model, [1], 40, temperature=0)  # from BOS, with the KV cache
    assert ids == STORIES_GREEDY  # MANIFEST.md: llama2.c's run.c -t 0 gives the same story
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_file("tok512.model")))
    assert sp.decode(ids).startswith("Once upon a time, there was a little girl named Lily.")



# ----------------------------------------------------------------------------------------------
# bad inputs


def test_folder_with_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no known checkpoint format") as e:
        formats.load(tmp_path)
    assert "params.json" in str(e.value) and "config.json" in str(e.value) and "consolidated" in str(e.value)
    (tmp_path / "model.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="no known checkpoint format"):
        formats.load(tmp_path / "model.pt")  # a file is read by its extension: .gguf or .bin


def test_truncated_llama2c_bin(tmp_path):
    # a valid legacy header: dim 8, hidden 16, 1 layer, 2 heads, 2 kv heads, shared vocab 10, seq_len 4
    header = struct.pack("7i", 8, 16, 1, 2, 2, 10, 4)
    n_floats = 10 * 8 + 8 + 3 * 8 * 8 + 8 * 8 + 8 + 3 * 16 * 8 + 8 + 2 * 4 * 2
    path = tmp_path / "tiny.bin"
    path.write_bytes(header + struct.pack(f"{n_floats}f", *([0.5] * n_floats)))
    model = formats.load(path, dtype=torch.float32)  # the intact file loads
    assert model.args.hidden_dim == 16 and model.args.tie_embeddings
    path.write_bytes(path.read_bytes()[:-40])
    full = 28 + 4 * n_floats
    with pytest.raises(ValueError, match=f"{full - 40} bytes") as e:
        formats.load(path)
    assert str(full) in str(e.value)


@pytest.mark.parametrize("edit, words", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "RoPE scaling.*'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}}, "RoPE scaling.*'yarn'"),
    ({"model_type": "gemma"}, "model_type 'gemma', expected one of llama, mistral, qwen2, qwen3"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_hf_config(tmp_path, edit, words):
    hf = hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words):
        formats.load(tmp_path)


def test_hf_folder_with_unexpected_tensor(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a bias a Llama does not have (Qwen2's name)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.attention.wq.bias'\]"):
        formats.load(tmp_path)
    state["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(96)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.mlp.gate_proj.bias"):
        formats.load(tmp_path)


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    hf = gguf_hf_model(300, tied=True)
    with pytest.raises(ValueError, match=r"architecture 'gpt2', expected one of llama, deci, qwen2, qwen3"):
        formats.load(write_llama_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2"))
    scaled = write_llama_gguf(tmp_path / "scaled.gguf", hf, extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match=r"RoPE scaling.*'linear'"):
        formats.load(scaled)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(10))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        formats.load(broken)


def meta_folder(tmp_path, **param_overrides):
    """A valid two-shard Meta folder of the tiny model (MLP 192 = Meta's width for dim 64, multiple_of 32)."""
    model = tiny_model(seed=15, hidden_dim=192)
    params = {**meta_params(64, 2, 4, 2, multiple_of=32), **param_overrides}
    return write_meta_folder(tmp_path / "meta", dict(model.state_dict()), 2, params)


def test_meta_folder_fixture_loads(tmp_path):
    formats.load(meta_folder(tmp_path), dtype=torch.float32)  # so the failures below are the edits


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        formats.load(tmp_path / "nowhere")


def test_params_json_unknown_key(tmp_path):
    with pytest.raises(ValueError, match="use_qk_norm"):  # Llama 4's; Llama 3.1's use_scaled_rope is read
        formats.load(meta_folder(tmp_path, use_qk_norm=True))
    out = formats.save_checkpoint(tiny_model(), tmp_path / "own")
    meta = json.loads((out / "params.json").read_text())
    meta["args"]["n_experts"] = 8
    (out / "params.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_experts"):
        formats.load(out)


def test_shard_with_wrong_shaped_tensor(tmp_path):
    folder = meta_folder(tmp_path)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wo.weight"] = shard["layers.1.attention.wo.weight"][:, :24].clone()  # 32 -> 24 columns
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="layers.1.attention.wo.weight") as e:
        formats.load(folder)
    assert "(64, 56)" in str(e.value) and "(64, 64)" in str(e.value)


def test_meta_hidden_dim_mismatch(tmp_path):
    with pytest.raises(ValueError, match="MLP width") as e:
        formats.load(meta_folder(tmp_path, multiple_of=256))  # derives 256, the tensors have 192
    assert "256" in str(e.value) and "192" in str(e.value)


def test_meta_shards_with_different_names(tmp_path):
    folder = meta_folder(tmp_path)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        formats.load(folder)


def test_corrupt_pth(tmp_path):
    folder = meta_folder(tmp_path)
    (folder / "consolidated.00.pth").write_bytes(b"not a zip archive, not a pickle" * 10)
    with pytest.raises(ValueError, match="consolidated.00.pth"):
        formats.load(folder)


# ----------------------------------------------------------------------------------------------
# our own format: save -> load


def assert_same_state(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "per_layer_sizes", "tied"])
def test_save_load_round_trip_is_bit_identical(tmp_path, dtype, variant):
    extra = {"plain": {}, "tied": {"tie_embeddings": True},
             "per_layer_sizes": {"layer_kv_heads": [2, 1], "layer_hidden_dims": [96, 40]}}[variant]
    model = tiny_model(seed=7, **extra).to(dtype)
    out = formats.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((out / "params.json").read_text())
    assert meta["format"] == "loraprune" and meta["kind"] == "dense"
    loaded = formats.load(out, dtype=dtype).eval()
    assert loaded.args == model.args
    assert_same_state(model, loaded)
    ids = tokens(128)
    assert torch.equal(our_logits(loaded, ids), our_logits(model, ids))
    if variant == "per_layer_sizes":
        assert loaded.layers[1].attention.wq.weight.shape == (32, 64)  # 1 kv group of 2 query heads of 16
        assert loaded.layers[1].feed_forward.w2.weight.shape == (64, 40)
    if variant == "tied":
        assert loaded.output.weight is loaded.tok_embeddings.weight
        from safetensors import safe_open
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert "output.weight" not in f.keys()  # stored once
    assert not any(p.requires_grad for p in loaded.parameters())


def test_save_is_atomic_and_overwrites(tmp_path, monkeypatch):
    first, second = tiny_model(seed=8), tiny_model(seed=9)
    formats.save_checkpoint(first, tmp_path / "ckpt")
    formats.save_checkpoint(second, tmp_path / "ckpt")  # overwrite an existing folder
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or .old folders left behind
    assert_same_state(second, formats.load(tmp_path / "ckpt", dtype=torch.float32))

    write = formats.write_safetensors

    def disk_full_after_three_tensors(path, specs, read):
        count = []
        def read_or_fail(name):
            count.append(name)
            if len(count) > 3:
                raise OSError("disk full")
            return read(name)
        write(path, specs, read_or_fail)

    monkeypatch.setattr(formats, "write_safetensors", disk_full_after_three_tensors)
    with pytest.raises(OSError, match="disk full"):
        formats.save_checkpoint(first, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the failed write left nothing behind...
    assert_same_state(second, formats.load(tmp_path / "ckpt", dtype=torch.float32))  # ...and kept the old


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = formats.save_checkpoint(tiny_model(), tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"ckpt": 0o750, "model.safetensors": 0o640, "params.json": 0o640}, {k: oct(v) for k, v in modes.items()}


def test_streamed_safetensors_file_reads_back_with_the_safetensors_package(tmp_path):
    """Our own writer against the reference reader: every dtype we store, tensors of odd byte sizes."""
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randint(-127, 128, (2, 3), generator=g).to(torch.int8),
               "d": torch.randn(1, 3, generator=g).to(torch.float16), "e": torch.randn(2, generator=g).double()}
    formats.write_safetensors(tmp_path / "x.safetensors", {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
                            tensors.__getitem__)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_own_checkpoint_keeps_its_dtype_unless_asked(tmp_path, dtype):
    model = tiny_model(seed=7).to(dtype)
    out = formats.save_checkpoint(model, tmp_path / "ckpt")
    loaded = formats.load(out)  # dtype=None: as saved
    assert_same_state(model, loaded)
    assert {t.dtype for t in loaded.state_dict().values()} == {dtype}
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert {t.dtype for t in formats.load(out, dtype=other).state_dict().values()} == {other}


def test_other_formats_default_to_bfloat16(tmp_path):
    folder = meta_folder(tmp_path)  # float32 shards
    assert torch.load(folder / "consolidated.00.pth", weights_only=True)["norm.weight"].dtype == torch.float32
    assert {t.dtype for t in formats.load(folder).state_dict().values()} == {torch.bfloat16}


def test_lora_model_saves_merged(tmp_path):
    model = tiny_model(seed=10)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, llama.LoRALinear) and m.r:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    wq = model.layers[0].attention.wq
    by_hand = wq.weight.double() + 2.0 * wq.lora_B.double() @ wq.lora_A.double()  # s = alpha / r = 2
    ids = tokens(128)
    expected = our_logits(model, ids)
    formats.save_checkpoint(model, tmp_path / "ckpt")
    loaded = formats.load(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert all(m.r == 0 and m.lora_A is None for m in loaded.modules() if isinstance(m, llama.LoRALinear))
    torch.testing.assert_close(loaded.layers[0].attention.wq.weight.double(), by_hand, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(loaded.layers[0].attention.wq.weight, wq.weight)  # B mattered
    torch.testing.assert_close(our_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_save_holds_one_merged_tensor_at_a_time(tmp_path, monkeypatch):
    """Every merged LoRA weight is made when the writer asks for it and dropped before the next one is made."""
    import weakref
    model = tiny_model(seed=31)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)
    randomize_lora_B_(model, 7)
    expected = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_linears(model).items():
        expected[name + ".weight"] = m.merged_weight()
    write, made = formats.write_safetensors, []

    def watching(path, specs, read):
        def read_and_watch(name):
            assert all(ref() is None for ref in made), "an earlier merged tensor is still alive"
            t = read(name)
            if name.endswith(".weight") and name.rsplit(".", 1)[0] in lora_linears(model):
                made.append(weakref.ref(t.untyped_storage()))  # dies with the memory, not with this view
            return t
        write(path, specs, read_and_watch)

    monkeypatch.setattr(formats, "write_safetensors", watching)
    out = formats.save_checkpoint(model, tmp_path / "ckpt")
    assert len(made) == 7 * 2
    from safetensors.torch import load_file
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() == expected.keys()
    for k, t in expected.items():
        assert torch.equal(stored[k], t), k


def test_old_params_json_without_the_field_loads(tmp_path):
    model = random_model(GQA_UNIFORM, r=0)
    out = formats.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((out / "params.json").read_text())
    assert "layer_q_per_kv" not in meta["args"]  # a uniform model writes params.json as before the field
    # the params.json of the version before this field, written out key by key
    meta["args"] = {"dim": 48, "n_layers": 4, "n_heads": 6, "n_kv_heads": 3, "vocab_size": 64, "hidden_dim": 40,
                    "multiple_of": 256, "ffn_dim_multiplier": None, "head_dim": 8, "norm_eps": 1e-5,
                    "rope_theta": 10000.0, "max_seq_len": 64, "tie_embeddings": False,
                    "layer_kv_heads": [3, 3, 3, 3], "layer_hidden_dims": [40, 40, 40, 40]}
    (out / "params.json").write_text(json.dumps(meta))
    loaded = formats.load(out, dtype=torch.float32)
    assert loaded.args == GQA_UNIFORM and loaded.args.layer_q_per_kv is None
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------------------------
# atomic writes and the umask (every file and folder the project saves)


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    """The file appears with the mode open() would give it (0o666 less the umask, not mkstemp's 0600), replaces an
    older one, and a failed write leaves the older one and no temporary file; file_mode restores the umask it reads."""
    path = tmp_path / "sub" / "report.json"
    old = os.umask(0o027)
    try:
        assert (formats.file_mode(), formats.file_mode(folder=True)) == (0o640, 0o750)
        assert os.umask(0o027) == 0o027  # file_mode put the umask back
        formats.atomic_write(path, lambda tmp: Path(tmp).write_text("first"))
        assert formats.atomic_write(path, lambda tmp: Path(tmp).write_text("second")) == path
    finally:
        os.umask(old)
    assert path.read_text() == "second" and path.stat().st_mode & 0o777 == 0o640

    def half_then_full_disk(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        formats.atomic_write(path, half_then_full_disk)
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_atomic_write_folder_replaces_the_folder_whole_or_not_at_all(tmp_path):
    """A folder and its files get mkdir's and open()'s modes under the umask (mkdtemp makes the folder 0700); a new
    write replaces the whole old folder; a failed one leaves the old folder as it was and nothing beside it."""
    folder = tmp_path / "model"
    old = os.umask(0o027)
    try:
        formats.atomic_write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("a"))
        assert formats.atomic_write_folder(folder, lambda tmp: (tmp / "b.txt").write_text("b")) == folder
    finally:
        os.umask(old)
    assert [p.name for p in folder.iterdir()] == ["b.txt"] and (folder / "b.txt").read_text() == "b"
    assert folder.stat().st_mode & 0o777 == 0o750 and (folder / "b.txt").stat().st_mode & 0o777 == 0o640

    def half_then_full_disk(tmp):
        (tmp / "c.txt").write_text("c")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        formats.atomic_write_folder(folder, half_then_full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in folder.iterdir()] == ["b.txt"]


def test_a_full_disk_names_the_file_the_space_needed_and_what_is_free(tmp_path):
    """ENOSPC (faked: no mount in CI) as a writer raises it: one OSError naming the file, the bytes the caller said
    the write needs and the space free, the earlier file kept and no temporary file beside it."""
    path = formats.atomic_write(tmp_path / "resume.pt", lambda tmp: Path(tmp).write_text("step 1"))

    def disk_full(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as e:
        formats.atomic_write(path, disk_full, size=2_500_000)
    words = rf"not written \(No space left on device: it needs about 2\.5 MB, [\d.]+ [kMGT]?B free\); the earlier " \
            r"resume\.pt is unchanged"
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path) and re.fullmatch(words, e.value.strerror)
    assert path.read_text() == "step 1" and [p.name for p in tmp_path.iterdir()] == ["resume.pt"]
    with pytest.raises(OSError, match=r"not written \(No space left on device: [\d.]+ [kMGT]?B free\); nothing was "
                                      r"left behind"):
        formats.atomic_write_folder(tmp_path / "model", lambda tmp: disk_full(tmp / "model.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["resume.pt"]


REFUSED = """import json, resource, sys
from pathlib import Path
import numpy as np, torch
from safetensors.torch import save_file
import formats
folder = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
x = torch.zeros(50_000)
writes = {  # what the system refuses each writer reports in its own words: torch.save as 'unexpected pos', numpy
    # as 'requested and written', safetensors as '(os error 27)'; a bug is no refusal, even under the limit
    "torch.save": lambda: formats.atomic_write(folder / "a.pt", lambda tmp: torch.save({"x": x}, tmp), size=200_000),
    "numpy": lambda: formats.atomic_write(folder / "b.bin", lambda tmp: x.numpy().tofile(tmp)),
    "safetensors": lambda: formats.atomic_write_folder(folder / "c", lambda tmp: save_file({"x": x}, tmp / "x.st")),
    "a bug": lambda: formats.atomic_write(folder / "d.txt", lambda tmp: Path(tmp).write_text(str(1 / 0))),
}
results = {}
for name, write in writes.items():
    try:
        write()
    except Exception as e:
        results[name] = [type(e).__name__, getattr(e, "errno", None), str(e)]
print(json.dumps(results))
"""


def test_a_refused_write_is_told_apart_from_a_failed_one(tmp_path):
    """Under a file size limit (EFBIG in a subprocess) the errno behind every writer's failure is found and named;
    an error of the writer itself stays as it was."""
    result = subprocess.run([sys.executable, "-c", REFUSED, str(tmp_path)], cwd=Path(formats.__file__).parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    limit = "the file size limit (ulimit -f) is 20.0 kB); nothing was left behind"
    assert results.pop("a bug") == ["ZeroDivisionError", None, "division by zero"]
    assert results == {
        "torch.save": ["OSError", errno.EFBIG, f"[Errno 27] not written (File too large: it needs about 200.0 kB, "
                                               f"{limit}: '{tmp_path / 'a.pt'}'"],
        "numpy": ["OSError", errno.EFBIG, f"[Errno 27] not written (File too large: {limit}: '{tmp_path / 'b.bin'}'"],
        "safetensors": ["OSError", errno.EFBIG, f"[Errno 27] not written (File too large: {limit}: '{tmp_path / 'c'}'"]}
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_cannot_split_the_folder_swap(tmp_path, monkeypatch, terminal_sigint):
    """SIGINT arriving between the renames that put a new folder in place of the old one is held until both are
    done: the new folder is whole, nothing is left beside it, then the interrupt is raised."""
    folder = formats.atomic_write_folder(tmp_path / "model", lambda tmp: (tmp / "a.txt").write_text("old"))
    replace = os.replace

    def signal_on_first_rename(src, dst):
        monkeypatch.setattr(os, "replace", replace)
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # held: the handler runs once the swap is done
    monkeypatch.setattr(os, "replace", signal_on_first_rename)
    with pytest.raises(KeyboardInterrupt):
        formats.atomic_write_folder(folder, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in folder.iterdir()] == ["b.txt"]


# ----------------------------------------------------------------------------------------------
# GGUF export, run by a real llama.cpp (llama-cpp-python)

CPP_TOLERANCE = 1e-3  # max |logit difference| allowed for an f32 export (measured: about 3e-5 on logits of ~15)
CPP_TYPE_TOLERANCE = {"f16": 0.1, "bf16": 0.5, "q8_0": 1.0}  # measured 0.03, 0.16-0.26, 0.51-0.68 on stories260K


def llama_cpp_module():
    """llama_cpp, or a failure under CI=true (CI must run these tests), else a skip."""
    try:
        import llama_cpp
    except ImportError as e:
        message = f"llama-cpp-python is not installed ({e}): pip install llama-cpp-python"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    return llama_cpp


class CppModel:
    """A GGUF file opened in llama.cpp: every position's logits, float32 KV cache, 2 threads."""

    def __init__(self, path, n_ctx: int = 64):
        llama_cpp = llama_cpp_module()
        self.lm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lm.close()

    def logits(self, ids: list) -> torch.Tensor:
        self.lm.reset()
        self.lm.eval(ids)
        return torch.from_numpy(self.lm.scores[: len(ids)].copy())  # (T, V)

    def greedy(self, prompt: list, n: int) -> list:
        """n greedy tokens after `prompt`, decoded one at a time through llama.cpp's KV cache."""
        self.lm.reset()
        self.lm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(self.lm.scores[self.lm.n_tokens - 1].argmax()))
            self.lm.eval(out[-1:])
        return out


def stories(shape: str) -> Transformer:
    """stories260K (8 query heads over 4 kv heads, MLP 172) whole ('uniform') or sliced by fixed masks: 'pruned'
    removes 50% of the parameters by kv groups and channels in layers 0-3 of 5, so layers differ; 'query' drops query
    heads so that kv heads keep uneven numbers of them ([1, 2, 2], [1, 2, 2, 2], ...); 'uniform-pruned' drops two kv
    groups and 60 channels in every layer ('uniform-6-heads': one kv group); 'uniform-query' drops query heads 1, 4,
    5, 7 ([1, 2, 1]) and 60 channels in every layer."""
    import loraprune
    import variants
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.float32).eval()
    if shape == "uniform":
        return model
    g = torch.Generator().manual_seed(0)
    args = model.args
    layers = loraprune.default_pruned_layers(args.n_layers)
    unit = loraprune.KVGroups() if shape == "pruned" else variants.QueryHeads()
    counts = loraprune.prune_counts(args, 0.5, layers, unit=unit)
    if shape.startswith("uniform"):
        counts = [(1 if shape == "uniform-6-heads" else 2, 60)] * args.n_layers
    dropped_heads = {0: [1, 4, 5], 1: [1], 2: [0, 1, 2], 3: [3, 5, 7]}  # query heads; kv head j owns 2j, 2j + 1
    masks = []
    for l, ((h, f), (heads, channels)) in enumerate(zip(counts, loraprune.full_masks(args))):
        if shape.endswith("query"):
            heads = torch.ones(args.n_heads, dtype=torch.bool)
            heads[[1, 4, 5, 7] if shape == "uniform-query" else dropped_heads.get(l, [])] = False
        else:
            heads[torch.randperm(len(heads), generator=g)[:h]] = False
        channels[torch.randperm(len(channels), generator=g)[:f]] = False
        masks.append((heads, channels))
    return loraprune.slice_model(model, masks).eval()


def gguf_arch(path) -> str:
    import gguf
    return gguf.GGUFReader(path).get_field("general.architecture").contents()


PROMPT_IDS = [1, 403, 407, 261, 378]  # <s> "Once upon a time" in tok512.model


@pytest.mark.parametrize("shape", ["pruned", "uniform", "query"])
def test_gguf_export_runs_in_llama_cpp(tmp_path, shape):
    """The exported f32 file in llama.cpp: every position's logits equal ours within CPP_TOLERANCE, 20 greedy
    tokens identical; 'llama' for the uniform model, 'deci' (per-layer sizes) for the pruned ones; tied head."""
    model = stories(shape)
    if shape == "pruned":
        assert len(set(model.args.layer_kv_heads)) > 1 and len(set(model.args.layer_hidden_dims)) > 1
    if shape == "query":
        assert model.args.layer_q_per_kv[0] == [1, 2, 2] and model.args.layer_q_per_kv[3] == [2, 1, 1, 1]
    path = formats.export_gguf(model, tmp_path / "model.gguf", ftype="f32",
                               tokenizer_path=shared_file("tok512.model"))
    assert gguf_arch(path) == ("llama" if shape == "uniform" else "deci")
    ids = PROMPT_IDS + tokens(512, T=40, B=1, seed=1)[0].tolist()  # a story start, then random tokens
    ours = our_logits(model, torch.tensor([ids]))[0]  # (T, V)
    with CppModel(path) as cpp:
        theirs = cpp.logits(ids)
        assert ours.std() > 1.0  # far from uniform
        torch.testing.assert_close(theirs, ours, atol=CPP_TOLERANCE, rtol=0)
        assert cpp.greedy(PROMPT_IDS, 20) == greedy(model, PROMPT_IDS, 20)
    import gguf
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: the head is the embedding
    back = formats.load(path)  # our own reader of llama and deci files
    torch.testing.assert_close(our_logits(back, torch.tensor([ids]))[0], ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0"])
def test_gguf_export_types_in_llama_cpp(tmp_path, ftype):
    model = stories("pruned")
    path = formats.export_gguf(model, tmp_path / "model.gguf", ftype=ftype,
                               tokenizer_path=shared_file("tok512.model"))
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == ftype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    ids = PROMPT_IDS + tokens(512, T=40, B=1, seed=2)[0].tolist()
    ours = our_logits(model, torch.tensor([ids]))[0]  # (T, V)
    with CppModel(path) as cpp:
        theirs = cpp.logits(ids)
    assert (theirs - ours).abs().max() < CPP_TYPE_TOLERANCE[ftype]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_gguf_export_of_an_int8_model(tmp_path):
    """An int8 model (formats.load(int8=True)) goes out dequantized: llama.cpp computes what our int8 model does."""
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.float32, int8=True).eval()
    assert model.layers[0].attention.wq.weight.dtype == torch.int8
    path = formats.export_gguf(model, tmp_path / "model.gguf", ftype="f32")
    ids = PROMPT_IDS + tokens(512, T=20, B=1, seed=3)[0].tolist()
    with CppModel(path) as cpp:
        torch.testing.assert_close(cpp.logits(ids), our_logits(model, torch.tensor([ids]))[0], atol=CPP_TOLERANCE,
                                   rtol=0)


def test_gguf_export_tokenizer_in_llama_cpp(tmp_path):
    """A SentencePiece tokenizer written as tokenizer.ggml.model 'llama': llama.cpp tokenizes like sentencepiece."""
    path = formats.export_gguf(stories("uniform"), tmp_path / "model.gguf", ftype="f32",
                               tokenizer_path=shared_file("tok512.model"))
    tok = Tokenizer(shared_file("tok512.model"))
    meta = formats.gguf_tokenizer(path)
    assert (meta["model"], meta["bos_token_id"], meta["eos_token_id"], len(meta["tokens"])) == ("llama", 1, 2, 512)
    ours = Tokenizer(path)  # and data.py reads it back as the SentencePiece model it came from
    with CppModel(path) as cpp:
        for text in ["Once upon a time, there was a little girl named Lily.", "The cat sat on the mat. 42!"]:
            assert cpp.lm.tokenize(text.encode()) == tok.encode(text) == ours.encode(text)
            assert cpp.lm.detokenize(tok.encode(text)).decode() == text == tok.decode(tok.encode(text))


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_export_of_a_gguf_copies_its_tokenizer(tmp_path, tied):
    """A model read from a GGUF file (byte-level BPE tokenizer, RoPE base 100000, tied or untied head) exported again:
    the tokenizer metadata is the source's, RoPE theta and the head carry over, llama.cpp gives transformers'
    logits, and tokenizes as our reader of the source does."""
    tok = train_bpe("gpt-2")
    hf = gguf_hf_model(tok.get_vocab_size(), tied)
    src = write_llama_gguf(tmp_path / "src.gguf", hf, tok)
    out = formats.export_gguf(formats.load(src), tmp_path / "out.gguf", ftype="f32", tokenizer_path=src)
    assert formats.gguf_tokenizer(out) == formats.gguf_tokenizer(src)
    import gguf
    reader = gguf.GGUFReader(out)
    assert reader.get_field("llama.rope.freq_base").contents() == ROPE_THETA
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)
    ids = tokens(300, T=24, B=1)[0].tolist()
    with CppModel(out) as cpp:
        torch.testing.assert_close(cpp.logits(ids), hf_logits(hf, torch.tensor([ids]))[0], atol=CPP_TOLERANCE,
                                   rtol=0)
        text = "The cat sat on the mat."
        assert cpp.lm.tokenize(text.encode(), add_bos=False) == Tokenizer(src).encode(text, bos=False)


def test_gguf_export_is_atomic_and_follows_the_umask(tmp_path, monkeypatch):
    model = stories("uniform")
    old = os.umask(0o027)
    try:
        path = formats.export_gguf(model, tmp_path / "model.gguf", ftype="f16")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640
    before = path.read_bytes()
    import gguf

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", broken)
    with pytest.raises(OSError, match="disk full"):
        formats.export_gguf(model, path, ftype="f32")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and path.read_bytes() == before


def test_gguf_export_bad_input(tmp_path):
    """One-line ValueErrors, nothing written: an unknown type, a model with masks still set, a tokenizer GGUF
    cannot take, a tokenizer larger than the embedding."""
    import loraprune
    model = stories("uniform")
    out = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=r"unknown GGUF type 'q4_k'; expected one of f32, f16, bf16, q8_0") as e:
        formats.export_gguf(model, out, ftype="q4_k")
    assert "\n" not in str(e.value)
    masks = loraprune.full_masks(model.args)
    masks[2][1][:10] = False
    loraprune.apply_masks(model, masks)
    with pytest.raises(ValueError, match=r"layer 2 still has pruning masks set.*slice_model"):
        formats.export_gguf(model, out)
    loraprune.apply_masks(model, loraprune.full_masks(model.args))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"GGUF export reads a byte-level BPE tokenizer\.json"):
        formats.export_gguf(model, out, tokenizer_path=tmp_path / "tokenizer.json")
    (tmp_path / "tok.tiktoken").write_text("")
    with pytest.raises(ValueError, match=r"a byte-level tokenizer\.json or a \.gguf file, found '\.tiktoken'"):
        formats.export_gguf(model, out, tokenizer_path=tmp_path / "tok.tiktoken")
    with pytest.raises(ValueError, match=r"32000 tokens, but the model's embedding has only 512 rows"):
        formats.export_gguf(model, out, tokenizer_path=shared_file("tokenizer.model"))
    assert sorted(tmp_path.iterdir()) == [tmp_path / "tok.tiktoken", tmp_path / "tokenizer.json"]


# ----------------------------------------------------------------------------------------------
# Hugging Face export, read back by transformers

HF_TOLERANCE = 1e-4  # max |logit difference| allowed (measured: 1.4e-5 on stories260K's logits of ~15)


@pytest.mark.parametrize("source", ["tiny-random-llama-2", "uniform-pruned", "uniform-query"])
def test_hf_export_round_trips_through_transformers(tmp_path, source):
    """transformers.AutoModelForCausalLM.from_pretrained(export) gives our logits: tiny-random-llama-2 read by
    formats.load, and stories260K pruned to the same counts in every layer (by kv groups, and by query heads whose
    uneven groups kv_repeat evens out); the tokenizer files travel along."""
    transformers = pytest.importorskip("transformers")
    if source == "tiny-random-llama-2":
        model, tokenizer, vocab = formats.load(shared_file(source), dtype=torch.float32).eval(), None, 3000
    else:
        model, tokenizer, vocab = stories(source), shared_file("tok512.model"), 512
    out = formats.export_hf(model, tmp_path / "hf", tokenizer_path=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens(vocab, T=24)
    ours = our_logits(model, ids)
    torch.testing.assert_close(hf_logits(hf, ids), ours, atol=HF_TOLERANCE, rtol=0)
    config = json.loads((out / "config.json").read_text())
    if source == "tiny-random-llama-2":  # the original folder through transformers, too
        original = transformers.AutoModelForCausalLM.from_pretrained(shared_file(source), dtype=torch.float32)
        torch.testing.assert_close(hf_logits(original.eval(), ids), ours, atol=HF_TOLERANCE, rtol=0)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
        return
    assert ours.std() > 1.0
    expected = {"uniform-pruned": (4, 2, 112), "uniform-query": (4, 4, 112)}[source]  # H, K after kv_repeat, F
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == expected
    assert config["tie_word_embeddings"] and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert (out / "tokenizer.model").read_bytes() == shared_file("tok512.model").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    assert hf.generate(ids[:1, :5], max_new_tokens=20, do_sample=False)[0, 5:].tolist() == greedy(
        model, ids[0, :5].tolist(), 20)


def test_hf_export_refuses_per_layer_shapes_and_is_atomic(tmp_path):
    """A model whose layers differ gets a one-line ValueError naming the layer and pointing to GGUF; nothing is
    written, and an existing export is kept. The folder follows the umask."""
    old = os.umask(0o027)
    try:
        out = formats.export_hf(stories("uniform"), tmp_path / "hf")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o750
    assert all(os.stat(f).st_mode & 0o777 == 0o640 for f in out.iterdir())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    words = r"layer 1 has 2 query heads, 1 kv heads and 50 MLP channels where layer 0 has 2, 1 and 51.*GGUF"
    with pytest.raises(ValueError, match=words) as e:
        formats.export_hf(stories("pruned"), out)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"found '\.tiktoken'"):
        formats.export_hf(stories("uniform"), tmp_path / "other", tokenizer_path=tmp_path / "tok.tiktoken")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before



def test_hf_export_of_heads_that_do_not_divide_the_width_is_a_mistral(tmp_path):
    """stories260K with 6 of its 8 query heads in every layer: transformers' LlamaConfig refuses 64 / 6, so the
    export is a MistralForCausalLM (explicit head_dim, no sliding window), which transformers loads with our logits."""
    transformers = pytest.importorskip("transformers")
    model = stories("uniform-6-heads")
    out = formats.export_hf(model, tmp_path / "hf", tokenizer_path=shared_file("tok512.model"))
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_attention_heads"], config["head_dim"]) == (["MistralForCausalLM"], 6, 8)
    assert config["sliding_window"] is None
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):  # what we measured
        transformers.LlamaConfig(hidden_size=64, num_attention_heads=6, head_dim=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MistralForCausalLM"
    ids = tokens(512, T=40)
    torch.testing.assert_close(hf_logits(hf, ids), our_logits(model, ids), atol=HF_TOLERANCE, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_export_writes_tie_word_embeddings_as_it_is(tmp_path, tied):
    """tie_word_embeddings says what the file holds: an untied head written as tied would make transformers drop
    lm_head.weight and use the embedding (different logits), a tied one written as untied would miss lm_head."""
    transformers = pytest.importorskip("transformers")
    hf = hf_model(seed=2, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    model = formats.load(tmp_path / "src", dtype=torch.float32).eval()
    out = formats.export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    from safetensors import safe_open
    assert ("lm_head.weight" in safe_open(str(out / "model.safetensors"), "pt").keys()) is not tied
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens(128, T=16)
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=HF_TOLERANCE, rtol=0)


FAMILY_PRE = {"llama3": "llama-bpe", "mistral": "gpt-2", "qwen2": "qwen2", "qwen3": "qwen2"}  # tokenizers to pair


def family_folder(tmp_path, family: str):
    """A family_model (vocab 300) saved with a byte-level tokenizer.json split as the family's is: (model, folder)."""
    hf = family_model(family, vocab_size=300)
    folder = tmp_path / family
    hf.save_pretrained(folder, safe_serialization=True)
    train_bpe(FAMILY_PRE[family]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                              "eos_token": "<|endoftext|>"}))
    return hf, folder


@pytest.mark.parametrize("family", FAMILIES)
def test_family_hf_export_round_trips_through_transformers(tmp_path, family):
    """Read from a Hugging Face folder, written again: the family's class, transformers' logits, the tokenizer."""
    transformers = pytest.importorskip("transformers")
    hf, folder = family_folder(tmp_path, family)
    model = formats.load(folder, dtype=torch.float32).eval()
    out = formats.export_hf(model, tmp_path / "hf", tokenizer_path=folder / "tokenizer.json")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    ids = tokens(300, T=FAMILY_T.get(family, 24), B=1)
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=HF_TOLERANCE, rtol=0)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs("The cat sat 1234")["input_ids"] == Tokenizer(folder / "tokenizer.json").encode("The cat sat 1234")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gguf_export_runs_in_llama_cpp(tmp_path, family):
    """Read from a Hugging Face folder, exported as f32 GGUF with its tokenizer.json: llama.cpp's logits on every
    position (float32 KV cache; Llama 3 over 1024 positions, so that its rope_freqs matter) and 20 greedy tokens
    equal ours, the family's architecture, and llama.cpp tokenizes as the tokenizer.json does."""
    import gguf
    hf, folder = family_folder(tmp_path, family)
    model = formats.load(folder, dtype=torch.float32).eval()
    path = formats.export_gguf(model, tmp_path / "model.gguf", ftype="f32", tokenizer_path=folder / "tokenizer.json")
    assert gguf_arch(path) == {"qwen2": "qwen2", "qwen3": "qwen3"}.get(family, "llama")
    assert ("rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}) == (family == "llama3")
    T = FAMILY_T.get(family, 40)
    ids = tokens(300, T=T, B=1)[0].tolist()
    ours = our_logits(model, torch.tensor([ids]))[0]  # (T, V)
    with CppModel(path, n_ctx=T + 32) as cpp:
        torch.testing.assert_close(cpp.logits(ids), ours, atol=CPP_TOLERANCE, rtol=0)
        assert cpp.greedy(ids[:8], 20) == greedy(model, ids[:8], 20)
        text = "The cat sat on the mat. It's 1234 degrees!\n  Indented"
        assert cpp.lm.tokenize(text.encode(), add_bos=False) == Tokenizer(folder / "tokenizer.json").encode(text, bos=False)
    back = formats.load(path)  # our reader of what we wrote
    torch.testing.assert_close(our_logits(back, torch.tensor([ids]))[0], ours, atol=1e-5, rtol=0)


def test_sentencepiece_without_dummy_prefix_through_gguf(tmp_path):
    """A SentencePiece model trained with add_dummy_prefix = false, exported to GGUF (add_space_prefix false):
    llama.cpp and our reader of the GGUF tokenize as sentencepiece does (with the prefix, 'The' would gain a '▁')."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The cat sat on the mat.", "Once upon a time there was a dog.",
                                  "The dog and the cat are friends."] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                   model_type="bpe", add_dummy_prefix=False, byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert not sp.id_to_piece(sp.encode("The cat")[0]).startswith("▁")  # no dummy prefix before the first word
    model = stories("uniform")
    path = formats.export_gguf(model, tmp_path / "model.gguf", ftype="f32", tokenizer_path=tmp_path / "sp.model")
    assert formats.gguf_tokenizer(path)["add_space_prefix"] is False
    ours = Tokenizer(path)
    with CppModel(path) as cpp:
        for text in ["The cat sat on the mat.", "Once upon a time", "dog"]:
            assert cpp.lm.tokenize(text.encode(), add_bos=False) == sp.encode(text) == ours.encode(text, bos=False)


@pytest.mark.parametrize("pre, add_bos", [("smollm", False), ("qwen2", False), ("llama-bpe", True)])
def test_hf_export_of_a_gguf_writes_its_vocabulary_as_tokenizer_json(tmp_path, pre, add_bos):
    """--hf from a GGUF source: its byte-level vocabulary becomes a tokenizer.json that transformers' AutoTokenizer
    reads into the same ids as our reader of the GGUF, BOS first where the GGUF says so; the weights match too."""
    transformers = pytest.importorskip("transformers")
    tok = train_bpe(pre)
    hf = gguf_hf_model(tok.get_vocab_size(), tied=True)
    src = write_llama_gguf(tmp_path / "src.gguf", hf, tok, pre=pre, add_bos=add_bos)
    out = formats.export_hf(formats.load(src), tmp_path / "hf", tokenizer_path=src)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    theirs, ours = transformers.AutoTokenizer.from_pretrained(out), Tokenizer(src)
    for text in ["The cat sat on the mat. 1234 degrees!", "  ümlauts, 東京\n\nnew lines<|endoftext|>"]:
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert ours.add_bos == add_bos and theirs.eos_token_id == ours.eos_id
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens(300, T=24)
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=HF_TOLERANCE, rtol=0)


def family_masks(args, uneven: bool, seed: int = 0) -> list:
    """Masks that drop one of the 2 kv groups and a third of the channels in every layer, or (uneven) a different
    number of channels per layer and one kv group in layer 0 only."""
    import loraprune
    g = torch.Generator().manual_seed(seed)
    masks = loraprune.full_masks(args)
    for l, (heads, channels) in enumerate(masks):
        if not uneven or l == 0:
            heads[torch.randint(len(heads), (1,), generator=g)] = False
        channels[torch.randperm(len(channels), generator=g)[: len(channels) // 3 + (l if uneven else 0)]] = False
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_family_pruned_sliced_equals_masked_and_exports(tmp_path, family):
    """Pruned by kv groups and channels: the sliced model (Qwen2's biases cut with their rows, Qwen3's q/k norms
    kept) gives the masked model's logits; its HF export (one shape per layer) loads in transformers and its GGUF
    export (llama.cpp's architecture for the family: Qwen2 with fewer heads than its width holds goes out as
    'llama') runs in llama.cpp, both with those logits. With uneven layers, GGUF holds Llama, Mistral and Qwen2
    ('deci') and refuses Qwen3 in one line."""
    import loraprune
    transformers = pytest.importorskip("transformers")
    hf, folder = family_folder(tmp_path, family)
    ids = tokens(300, T=FAMILY_T.get(family, 40), B=1)
    for uneven in (False, True):
        model = formats.load(folder, dtype=torch.float32).eval()
        masks = family_masks(model.args, uneven)
        loraprune.apply_masks(model, masks)
        masked = our_logits(model, ids)
        sliced = loraprune.slice_model(model, masks).eval()
        assert llama.count_params(sliced) == loraprune.masked_param_count(model.args, masks)
        torch.testing.assert_close(our_logits(sliced, ids), masked, atol=1e-5, rtol=0)
        if family == "qwen3" and uneven:
            with pytest.raises(ValueError, match="llama.cpp's qwen3 holds one shape for every layer") as e:
                formats.export_gguf(sliced, tmp_path / "uneven.gguf")
            assert "\n" not in str(e.value) and not (tmp_path / "uneven.gguf").exists()
            continue
        path = formats.export_gguf(sliced, tmp_path / f"{uneven}.gguf", ftype="f32",
                                   tokenizer_path=folder / "tokenizer.json")
        arch = gguf_arch(path)
        assert arch == ("deci" if uneven else {"qwen3": "qwen3"}.get(family, "llama"))
        with CppModel(path, n_ctx=ids.shape[1] + 8) as cpp:
            torch.testing.assert_close(cpp.logits(ids[0].tolist()), masked[0], atol=CPP_TOLERANCE, rtol=0)
        if not uneven:
            out = formats.export_hf(sliced, tmp_path / "hf", tokenizer_path=folder / "tokenizer.json")
            back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            assert type(back).__name__ == type(hf).__name__
            torch.testing.assert_close(hf_logits(back, ids), masked, atol=HF_TOLERANCE, rtol=0)


def test_qwen2_biases_through_lora_int8_and_our_format(tmp_path):
    """Qwen2's biases: LoRA adapts W only, so merging (slice_model) leaves the biases and the logits as they were;
    in int8 mode W is int8 and the biases stay float (the logits within int8's error of float); our own format
    saves and reloads both exactly."""
    import loraprune
    hf, folder = family_folder(tmp_path, "qwen2")
    model = formats.load(folder, dtype=torch.float32).eval()
    llama.add_lora(model, r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = tokens(300, T=24, B=1)
    adapted = our_logits(model, ids)
    assert (adapted - hf_logits(hf, ids)).abs().max() > 1e-3  # the adapters do something
    merged = loraprune.slice_model(model, loraprune.full_masks(model.args)).eval()
    assert merged.layers[0].attention.wq.r == 0 and merged.layers[0].attention.wq.bias is not None
    torch.testing.assert_close(our_logits(merged, ids), adapted, atol=1e-5, rtol=0)
    q8 = formats.load(folder, dtype=torch.float32, int8=True).eval()
    wq = q8.layers[0].attention.wq
    assert wq.weight.dtype == torch.int8 and wq.bias.dtype == torch.float32
    assert (our_logits(q8, ids) - hf_logits(hf, ids)).abs().max() < 0.1  # measured 0.054
    no_bias = formats.load(folder, dtype=torch.float32, int8=True).eval()
    for layer in no_bias.layers:
        layer.attention.wv.bias.data.zero_()
    assert (our_logits(no_bias, ids) - hf_logits(hf, ids)).abs().max() > 0.2  # the biases are in use
    saved = formats.save_checkpoint(q8, tmp_path / "own")
    back = formats.load(saved).eval()
    assert back.layers[0].attention.wq.weight.dtype == torch.int8
    torch.testing.assert_close(our_logits(back, ids), our_logits(q8, ids), atol=0, rtol=0)
