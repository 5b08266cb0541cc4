"""Tests for the GGUF loader (llama.gguf_readers) and the GGUF / tiktoken tokenizer backends (data.py).
A tiny llama GGUF is written here with the `gguf` package's own writer, from a transformers LlamaForCausalLM
whose q/k rows are permuted the way llama.cpp's converter permutes them; loading it must give transformers'
logits, which checks the q/k row layout against RoPE independently of llama.py. Tiny, CPU, seeded, no network."""
import base64
import json
import math

import numpy as np
import pytest
import torch

import data
import llama
from conftest import shared_file
from data import Tokenizer

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=64)
ROPE_THETA = 100000.0  # SmolLM2's base, so a loader that ignored llama.rope.freq_base would fail
TEXT = "The cat sat on the mat. It was 1234 degrees!\nA dog ran 42 times around the garden."
CORPUS = [TEXT, "Once upon a time there was a little cat who liked the sun and the mat.",
          "The dog and the cat are friends; they sat in the garden for 3 hours, 17 minutes."] * 20

# ----------------------------------------------------------------------------------------------
# helpers


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv=None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: HF's rotate-half q/k rows back to interleaved pairs.
    Applied as permute(q, n_head, n_head) and permute(k, n_head, n_head_kv); rows only, so it works on
    quantized byte rows too."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    """transformers' parameter name -> llama.cpp's tensor name (written here, independently of llama.py)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, *rest = hf_name.split(".")
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
            "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    return f"blk.{i}.{part['.'.join(rest[:-1])]}.weight"


def train_bpe(pre: str):
    """A small byte-level BPE (vocab 300) trained on CORPUS, with two special tokens; `pre` 'smollm' splits
    digits one by one before GPT-2's regex, as SmolLM2's tokenizer.json does."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
    tok.pre_tokenizer, tok.decoder = split, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def add_bpe_metadata(writer, tok, pre: str, add_bos: bool):
    """tokenizer.ggml.* as llama.cpp's converter writes a GPT-2-style BPE: tokens by id, 'a b' merges, types."""
    import gguf
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    specials = {"<|endoftext|>", "<|im_start|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(add_bos)


def hf_model(vocab: int, tied: bool, seed: int = 0):
    """A float32 transformers LlamaForCausalLM, parameters large enough that a RoPE or row-order mistake moves
    the logits by O(1): matrices N(0, 1/in), norms in [0.5, 1.5]."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**CONFIG, vocab_size=vocab, rope_theta=ROPE_THETA, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied matrix is listed once
            p.copy_(0.5 + torch.rand(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def write_llama_gguf(path, hf, tok=None, arch: str = "llama", permute: bool = True, pre: str = "gpt-2",
                     add_bos: bool = True, extra=None, rope_theta: float = ROPE_THETA):
    """Write `hf` as llama.cpp would: q/k permuted, a mix of tensor types (Q8_0, Q4_1, F16, F32; norms F32;
    a row length that is not a multiple of the 32-value block stays F32). Each matrix is also written back into
    `hf` as the file holds it (dequantized), so transformers computes with the file's values."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    types = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "ffn_gate": Q.Q4_1,
             "attn_v": Q.F16, "ffn_up": Q.F16, "output": Q.F16}
    cfg = hf.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(H)
    writer.add_head_count_kv(K)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(cfg.hidden_size // H)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    if tok is not None:
        add_bpe_metadata(writer, tok, pre, add_bos)
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    with torch.no_grad():
        for name, w in state.items():
            gname = gguf_name(name)
            qtype = types.get(gname.split(".")[-2], Q.F32) if w.ndim == 2 and w.shape[1] % 32 == 0 else Q.F32
            data = gguf.quants.quantize(w.numpy(), qtype)  # (out, in) floats, or (out, bytes per row) blocks
            w.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype)))  # transformers gets what the file holds
            if permute and gname.endswith("attn_q.weight"):
                data = llama_cpp_permute(data, H, H)
            elif permute and gname.endswith("attn_k.weight"):
                data = llama_cpp_permute(data, H, K)
            writer.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer_gguf(path, tok, pre: str = "gpt-2", add_bos: bool = True):
    """A GGUF holding only metadata: the architecture and a tokenizer."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    add_bpe_metadata(writer, tok, pre, add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits_both(hf, ours, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits, ours(ids)  # (B, T, V) each


# ----------------------------------------------------------------------------------------------
# the model: same logits as transformers on the same (dequantized) weights


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_logits_match_transformers(tmp_path, tied):
    tok = train_bpe("gpt-2")
    hf = hf_model(tok.get_vocab_size(), tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, tok)
    ours = llama.load_checkpoint(path, dtype=torch.float32).eval()
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
    hf = hf_model(300, tied=True)
    ours = llama.load_checkpoint(write_llama_gguf(tmp_path / "hf-rows.gguf", hf, permute=False),
                                 dtype=torch.float32).eval()
    theirs, mine = logits_both(hf, ours, torch.arange(24).view(2, 12))
    assert (mine - theirs).abs().max() > 0.1


def test_real_model_through_gguf_tells_the_same_story(tmp_path):
    """stories260K (a llama2.c model trained on TinyStories, GQA 8/4 heads) written as llama.cpp would write its
    HF form: greedy text through the GGUF loader equals transformers' on the same weights, and reads as English."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    src = llama.load_checkpoint(shared_file("stories260K.bin"), dtype=torch.float32)
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
    ours = llama.load_checkpoint(write_llama_gguf(tmp_path / "stories260K.gguf", hf, rope_theta=a.rope_theta),
                                 dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
        ids = list(prompt)
        for _ in range(40):  # greedy, recomputing the whole prefix (no KV cache to get wrong)
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert ids == theirs
    assert tok.decode(ids).startswith("Once upon a time, there was a little")


def test_gguf_int8_and_bf16_load(tmp_path):
    hf = hf_model(300, tied=False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf)
    ids = torch.arange(16).view(1, 16)
    theirs, _ = logits_both(hf, llama.load_checkpoint(path, dtype=torch.float32), ids)
    int8 = llama.load_checkpoint(path, dtype=torch.float32, int8=True)
    assert int8.layers[0].attention.wq.weight.dtype == torch.int8
    assert (logits_both(hf, int8, ids)[1] - theirs).abs().max() < 0.2
    assert llama.load_checkpoint(path).tok_embeddings.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# the GGUF tokenizer


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_gguf_tokenizer_matches_its_source(tmp_path, pre):
    tok = train_bpe(pre)
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", tok, pre=pre)
    ours = Tokenizer(path)
    bos, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|endoftext|>")
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (300, bos, eos)
    for text in [TEXT, "  leading spaces, ümlauts and ünïcode: 東京 2024\t tabs", "<|endoftext|>the cat"]:
        expected = tok.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, bos=False) == expected
        assert ours.decode(expected) == tok.decode(expected, skip_special_tokens=True)
    assert ours.decode(ours.encode(TEXT, bos=True, eos=True)) == TEXT  # specials dropped on decode
    assert len(ours.encode(TEXT, bos=False)) < 0.6 * len(TEXT)  # the merges are used
    if pre == "smollm":
        assert ours.encode("1234", bos=False) == [tok.token_to_id(d) for d in "1234"]


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_tokenizer_honours_add_bos(tmp_path, add_bos):
    tok = train_bpe("gpt-2")
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", tok, add_bos=add_bos)
    ours = Tokenizer(path)
    body = tok.encode("the cat", add_special_tokens=False).ids
    assert ours.add_bos == add_bos
    assert ours.encode("the cat") == ([ours.bos_id] if add_bos else []) + body
    assert ours.encode("the cat", bos=True)[0] == ours.bos_id  # an explicit request still wins


# ----------------------------------------------------------------------------------------------
# tiktoken (Llama 3's tokenizer.model)


def write_tiktoken_file(path, merged: list) -> dict:
    """Llama 3's format: one '<base64 bytes> <rank>' line per token, the 256 bytes first, then `merged`."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({m: 256 + i for i, m in enumerate(merged)})
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    merged = [b"th", b"he", b"the", b" the", b"at", b" c", b" cat", b"\xc3\xbc"]
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model", merged)
    tok = Tokenizer(tmp_path / "tokenizer.model")
    n = len(ranks)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (n + 256, n, n + 1, True)
    assert tok.encode("the cat", eos=True) == [n, ranks[b"the"], ranks[b" cat"], n + 1]
    for text in [TEXT, "über  naïve\n\n 東京 <|begin_of_text|> 12345"]:
        ids = tok.encode(text)
        assert ids[0] == n and max(ids[1:]) < n  # special-token names in the text are plain text
        assert tok.decode(ids) == text
    assert "ü" in tok.decode([ranks[b"\xc3\xbc"]])


def test_tiktoken_file_errors(tmp_path):
    pytest.importorskip("tiktoken")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"line 2.*base64 token"):
        Tokenizer(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match=r"ranks 0\.\.1"):
        Tokenizer(bad)


# ----------------------------------------------------------------------------------------------
# errors


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    hf = hf_model(300, tied=True)
    with pytest.raises(ValueError, match=r"architecture 'gpt2', expected 'llama'"):
        llama.load_checkpoint(write_llama_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2"))
    scaled = write_llama_gguf(tmp_path / "scaled.gguf", hf, extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match=r"RoPE scaling.*'linear'"):
        llama.load_checkpoint(scaled)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model is None, expected 'gpt2'"):
        Tokenizer(scaled)  # a GGUF without tokenizer metadata
    qwen = write_tokenizer_gguf(tmp_path / "qwen.gguf", train_bpe("gpt-2"), pre="qwen2")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'qwen2' is not supported"):
        Tokenizer(qwen)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(10))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        llama.load_checkpoint(broken)


def test_find_tokenizer_of_a_gguf_is_the_file_itself(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert data.find_tokenizer(path) == path


@pytest.mark.parametrize("ckpt_format", ["gguf", "own"])
def test_run_on_a_gguf_saves_a_tokenizer_that_is_found_again(tmp_path, ckpt_format):
    """run.py with a GGUF checkpoint (its own tokenizer), or our own format with the GGUF passed as --tokenizer:
    the saved model's folder holds tokenizer.gguf, which find_tokenizer picks and which reads as the original."""
    import run
    tok = train_bpe("smollm")
    src = write_llama_gguf(tmp_path / "tiny.gguf", hf_model(tok.get_vocab_size(), tied=True), tok, pre="smollm")
    argv = ["--ckpt", str(src)]
    if ckpt_format == "own":
        argv = ["--ckpt", str(llama.save_checkpoint(llama.load_checkpoint(src, dtype=torch.float32), tmp_path / "own")),
                "--tokenizer", str(src)]
    assert run.main(argv + ["--ratio", "0", "--steps", "0", "--eval", "", "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "model"
    found = data.find_tokenizer(folder, llama.load_checkpoint(folder).args.vocab_size)
    assert found == folder / "tokenizer.gguf"
    assert Tokenizer(found).encode(TEXT, eos=True) == Tokenizer(src).encode(TEXT, eos=True)
