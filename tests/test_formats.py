"""Tests for formats.py: every reader gives transformers' logits (Hugging Face folders, GGUF files as llama.cpp
writes them), the real files in shared/data (llama2.c's stories260K, tiny-random-llama-2), formats.load's choice of
reader, and the readers' error messages. Tiny models on CPU, float32, seeded, no network."""
import json
import struct

import pytest
import torch

import formats
import llama
from conftest import (ROPE_THETA, hf_model, hf_to_meta_rows_by_index, meta_to_hf_rows, shared_file, train_bpe,
                      write_llama_gguf)
from data import Tokenizer
from llama import Transformer

# ----------------------------------------------------------------------------------------------
# helpers


def tokens(vocab: int, T: int = 12, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def greedy(model: Transformer, prompt: list, n: int) -> list:
    """n greedy tokens after `prompt`, recomputing the whole prefix each step (no KV cache to get wrong)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)  # (B, T, V)


def gguf_hf_model(vocab: int, tied: bool, seed: int = 0):
    """The GGUF tests' transformers model: the tiny GQA config with SmolLM2's RoPE base."""
    return hf_model(seed, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=ROPE_THETA)


def logits_both(hf, ours, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits, ours(ids)  # (B, T, V) each


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
    # greedy decoding yields these ids exactly when each is the argmax after its own prefix; a causal model
    # gives every prefix's logits in one forward (40 recomputed prefixes would cost 40 forwards)
    logits = our_logits(model, torch.tensor([[1] + STORIES_GREEDY[:-1]]))[0]  # (40, V)
    ids = logits.argmax(-1).tolist()
    assert ids == STORIES_GREEDY
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


def test_llama_load_checkpoint_points_to_formats_load(tmp_path):
    """llama.py reads only folders with params.json (ours, Meta's); for anything else it names formats.load."""
    hf_model().save_pretrained(tmp_path / "hf", safe_serialization=True)
    for path in (tmp_path / "hf", shared_file("stories260K.bin")):
        with pytest.raises(ValueError, match="formats.load"):
            llama.load_checkpoint(path)


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
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope"),
    ({"model_type": "mistral"}, "mistral"),
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
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="q_proj.bias"):
        formats.load(tmp_path)


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    hf = gguf_hf_model(300, tied=True)
    with pytest.raises(ValueError, match=r"architecture 'gpt2', expected 'llama'"):
        formats.load(write_llama_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2"))
    scaled = write_llama_gguf(tmp_path / "scaled.gguf", hf, extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match=r"RoPE scaling.*'linear'"):
        formats.load(scaled)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(10))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        formats.load(broken)
