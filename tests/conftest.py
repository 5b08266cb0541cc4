"""Shared test helpers. `from conftest import shared_file` works in every test file: pytest puts tests/ on
sys.path (there is no tests/__init__.py), and the repo root is added below so the modules under test import."""
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `import data`, `import llama`

import llama  # noqa: E402  (after the path above)


def shared_file(name: str) -> Path:
    """data_dir()/name; if it is missing, fail under CI=true (never skip there), otherwise skip."""
    from data import data_dir  # imported here so a broken data.py breaks only the tests that use it

    path = data_dir() / name
    if not path.exists():
        message = f"shared data file {path} not found (set LORAPRUNE_DATA to the folder holding {name})"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """The shared_file helper as a fixture: `def test_x(shared): path = shared("tok512.model")`."""
    return shared_file


@pytest.fixture(scope="module")
def one_thread():
    """Whole-run tests on the 260K-parameter model gain nothing from threads, and on a busy 2-core machine
    they cost 10x: one thread for the module, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def terminal_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal, whatever pytest was started under: a process started with
    nohup or `&` inherits SIGINT ignored (run.py then rightly leaves it ignored) and so do its children."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# checkpoint helpers, written independently of llama.py and formats.py (test_llama, test_formats, test_data,
# test_run): seeded weights, a tiny transformers LLaMA, the published q/k row permutations, GGUF files as llama.cpp
# writes them.


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded values large enough that attention is far from uniform (so a RoPE
    or head-order mistake moves the logits by O(1), not by 1e-6): matrices N(0, 1/in), norms in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # a tied matrix is listed once
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return module


def hf_model(seed: int = 0, **config):
    """A randomly initialised float32 transformers LlamaForCausalLM (default: the tiny GQA config)."""
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
              max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)  # transformers' own init draws from the global generator; we overwrite it anyway
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **config}))
    return randomize_(model, seed).float().eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # Llama 3.2 1B/3B's
FAMILIES = {  # each family's real switches (transformers' config class + the fields that differ), on a tiny GQA shape
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                   max_position_embeddings=131072)),
    "mistral": ("MistralConfig", dict(sliding_window=None, max_position_embeddings=32768,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, use_sliding_window=False, max_position_embeddings=32768)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960)),
}  # qwen3: head_dim 32 with 4 heads over a width of 64, as Qwen3-0.6B has 16 heads of 128 over 1024
FAMILY_T = {"llama3": 1024}  # tokens to compare over: llama3 scaling moves only the slow RoPE frequencies


def family_model(family: str, seed: int = 0, **config):
    """A randomly initialised float32 transformers model of `family` (FAMILIES), 2 layers of width 64, 4 query heads
    over 2 kv heads, MLP 96, vocab 128 unless `config` says otherwise; biases and q/k norms random too."""
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128)
    name, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**{**kw, **fields, **config}))
    return randomize_(model, seed).float().eval()


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf permute: Meta's interleaved q/k rows -> rotate-half rows."""
    d1, *rest = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows_by_index(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of meta_to_hf_rows, found by pushing row indices through it: HF row i is Meta row idx[i]."""
    idx = meta_to_hf_rows(torch.arange(w.shape[0])[:, None], n_heads)[:, 0]  # (out,)
    meta = torch.empty_like(w)
    meta[idx] = w
    return meta


ROPE_THETA = 100000.0  # the GGUF helpers' RoPE base (SmolLM2's), so a loader that ignored llama.rope.freq_base fails
TEXT = "The cat sat on the mat. It was 1234 degrees!\nA dog ran 42 times around the garden."

CORPUS = [TEXT, "Once upon a time there was a little cat who liked the sun and the mat.",
          "The dog and the cat are friends; they sat in the garden for 3 hours, 17 minutes."] * 20



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
            "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    return f"blk.{i}.{part['.'.join(rest[:-1])]}.{rest[-1]}"



LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # the "pattern" of Llama 3's tokenizer.json
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2.5's


def train_bpe(pre: str):
    """A small byte-level BPE (vocab 300) trained on CORPUS, with two special tokens, split as the tokenizer.json
    of each kind does: 'gpt-2' GPT-2's regex, 'smollm' digits one by one first (SmolLM2), 'llama-bpe' Llama 3's regex
    (and ignore_merges), 'qwen2' Qwen's regex after NFC."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    if pre == "smollm":
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
    if pre in ("llama-bpe", "qwen2"):
        regex = tokenizers.Regex(LLAMA3_REGEX if pre == "llama-bpe" else QWEN2_REGEX)
        split = pre_tokenizers.Sequence([pre_tokenizers.Split(regex, behavior="isolated"), split])
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer, tok.decoder = split, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if pre == "llama-bpe":
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
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



def write_llama_gguf(path, hf, tok=None, arch: str = "llama", permute: Optional[bool] = None, pre: str = "gpt-2",
                     add_bos: bool = True, extra=None, rope_theta: Optional[float] = None):
    """Write `hf` as llama.cpp's converter would: q/k rows (and biases) permuted for 'llama' (permute=None: for
    'llama' only; Qwen's rotate-half architectures keep HF's rows), head_dim as key_length, Llama 3's rope_freqs
    factors, a mix of tensor types (Q8_0, Q4_1, F16, F32; norms and biases F32; a row length that is not a multiple of
    the 32-value block stays F32). Each tensor is also written back into `hf` as the file holds it (dequantized), so
    transformers computes with the file's values. rope_theta: the config's unless given."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    types = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "ffn_gate": Q.Q4_1,
             "attn_v": Q.F16, "ffn_up": Q.F16, "output": Q.F16}
    cfg = hf.config
    permute = arch == "llama" if permute is None else permute
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", 10000.0) if rope_theta is None else rope_theta
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(H)
    writer.add_head_count_kv(K)
    writer.add_key_length(D)
    writer.add_value_length(D)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(D)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    if tok is not None:
        add_bpe_metadata(writer, tok, pre, add_bos)
    if rope.get("rope_type") == "llama3":  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        freqs = 1.0 / (rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        factor, L = rope["factor"], rope["original_max_position_embeddings"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < L / high:
                factors.append(1)
            elif wavelen > L / low:
                factors.append(factor)
            else:
                smooth = (L / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    with torch.no_grad():
        for name, w in state.items():
            gname = gguf_name(name)
            qtype = types.get(gname.split(".")[-2], Q.F32) if w.ndim == 2 and w.shape[1] % 32 == 0 else Q.F32
            if gname.endswith(".bias"):
                qtype = Q.F32
            data = gguf.quants.quantize(w.numpy(), qtype)  # (out, in) floats, or (out, bytes per row) blocks
            w.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype)))  # transformers gets what the file holds
            if permute and gname.endswith(("attn_q.weight", "attn_q.bias")):
                data = llama_cpp_permute(data, H, H)
            elif permute and gname.endswith(("attn_k.weight", "attn_k.bias")):
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


# tiny models (test_llama, test_generate, test_formats, test_loraprune, test_variants), brute-force group sums and
# random masks (test_loraprune, test_variants; loraprune is imported inside each helper, as data is above)

MHA = llama.ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=64)
GQA = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                      layer_kv_heads=[3, 2, 1, 3], layer_hidden_dims=[40, 24, 7, 33])  # per-layer sizes
GQA_UNIFORM = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40,
                              max_seq_len=64)  # 6 heads over 3 kv heads (n_rep 2), every layer the same shape
UNEVEN = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                         layer_kv_heads=[3, 2, 1, 3], layer_q_per_kv=[[2, 1, 2], [1, 2], [1], [2, 2, 2]],
                         layer_hidden_dims=[40, 24, 7, 33])  # query heads per kv head differ within a layer


def tiny_args(**overrides) -> llama.ModelArgs:
    """dim 64, 2 layers, 4 heads over 2 kv heads (GQA), MLP 96, vocab 128."""
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=64)
    return llama.ModelArgs(**{**kw, **overrides})


def tiny_model(seed: int = 0, **overrides) -> llama.Transformer:
    """A tiny_args model with randomize_'s weights, in eval mode, no LoRA."""
    return randomize_(llama.Transformer(tiny_args(**overrides)), seed).eval()


def lora_linears(model) -> dict:
    """{module name: LoRALinear} of every projection."""
    return {n: m for n, m in model.named_modules() if isinstance(m, llama.LoRALinear)}


def randomize_lora_B_(model, seed: int):
    """Every adapter's B drawn N(0, 0.2^2) (fresh adapters have B = 0, which hides every LoRA term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_linears(model).values():
            if m.r:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def saved_for_backward(fn):
    """(fn(), [every tensor autograd saved for its backward, in order]): a saved_tensors_hooks probe."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def random_model(args, r=4, seed=0, lora_b=0.1):
    """A model with random weights and LoRA whose B is nonzero (so every term of Eq. 10 is exercised)."""
    torch.manual_seed(seed)
    model = llama.Transformer(args)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    for layer in model.layers:
        layer.attention_norm.weight.data.fill_(1.0)
        layer.ffn_norm.weight.data.fill_(1.0)
    if r:
        llama.add_lora(model, r=r, alpha=2 * r, dropout=0.0, seed=seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, lora_b)
    return model


def random_batch(model, seed=1, T=16, B=2):
    """(B, T+1) random tokens from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (B, T + 1), generator=g).to(next(model.parameters()).device)


def loss_and_grads(model, seed=1, T=16, B=2):
    """Mean next-token cross-entropy of a random batch, backpropagated (gradients accumulate)."""
    import torch.nn.functional as F
    x = random_batch(model, seed, T, B)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    return loss


def full_importance(model, l, criterion):
    """Every projection's whole (out, in) importance map of layer l: Eq. 10 ('lora'), Eq. 3 from W.grad ('vanilla',
    of the merged weight) or (W + s B A)^2 ('magnitude')."""
    import loraprune as lp
    full = {}
    for name, lin in llama.projections(model, l).items():
        if criterion == "lora":
            full[name] = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad,
                                                   lin.lora_B.grad, lin.scaling)
        elif criterion == "vanilla":
            full[name] = lp.vanilla_importance(lin.merged_weight(), lin.weight.grad)
        else:
            full[name] = lin.merged_weight().float().square()
    return full


def brute_force_group_scores(model, l, criterion):
    """Form every projection's full (out, in) importance and sum it over each group's explicit index set:
    (K,) kv groups and (F,) channels, float64."""
    args, full = model.args, full_importance(model, l, criterion)
    D, n_rep, K = args.head_dim, args.n_rep, args.layer_kv_heads[l]
    heads = torch.zeros(K, dtype=torch.float64)
    for g in range(K):
        for qh in range(g * n_rep, (g + 1) * n_rep):  # the query heads that share kv head g
            heads[g] += full["wq"][qh * D:(qh + 1) * D].sum() + full["wo"][:, qh * D:(qh + 1) * D].sum()
        heads[g] += full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()
    Fw = args.layer_hidden_dims[l]
    channels = torch.tensor([(full["w1"][c].sum() + full["w3"][c].sum() + full["w2"][:, c].sum()).item()
                             for c in range(Fw)], dtype=torch.float64)
    return heads, channels


def group_scores(model, l, criterion=None, unit=None, normalize=None):
    """Pruner.score(l) of a Pruner that prunes nothing (ratio 0) with this criterion (default: the Pruner's), unit
    (default: the Pruner's) and normalisation: the group scores the Pruner forms from one backward."""
    import loraprune as lp
    kw = {k: v for k, v in (("criterion", criterion), ("unit", unit)) if v is not None}
    return lp.Pruner(model, ratio=0.0, total_steps=1, normalize=normalize, **kw).score(l)


def pruned_counts(pruner) -> list:
    """[(units off, channels off)] per layer of a Pruner's masks."""
    return [(int((~h).sum()), int((~c).sum())) for h, c in pruner.masks]


def kept_query_heads(args) -> list:
    """Keep-everything masks with one flag per query head: [((H_l,) bool, (F_l,) bool)] per layer."""
    return [(torch.ones(h, dtype=torch.bool), torch.ones(f, dtype=torch.bool))
            for h, f in zip(args.layer_n_heads, args.layer_hidden_dims)]


def random_kv_masks(args, g, single_group_layer: int = 0):
    """Random masks per kv group and channel, at least one of each kept per layer; `single_group_layer` keeps only its
    last kv group."""
    masks = []
    for l, (K, Fw) in enumerate(zip(args.layer_kv_heads, args.layer_hidden_dims)):
        heads = torch.rand(K, generator=g) > 0.5
        channels = torch.rand(Fw, generator=g) > 0.5
        heads[torch.randint(K, (1,), generator=g)] = True
        channels[torch.randint(Fw, (1,), generator=g)] = True
        if l == single_group_layer:
            heads[:] = False
            heads[K - 1] = True
        masks.append((heads, channels))
    return masks


def query_masks(args, g, keep_whole_layer: int = 0):
    """Random per-query-head masks: in every layer but `keep_whole_layer`, kv head 0 loses all its query heads
    (when the layer has another kv head), kv head 1 keeps one, the last (from 2 on) keeps all, others a random
    nonempty subset; random channels."""
    masks = []
    for l in range(args.n_layers):
        counts = args.q_per_kv(l)
        heads = torch.ones(sum(counts), dtype=torch.bool)
        if l != keep_whole_layer:
            start = 0
            for g_kv, n in enumerate(counts):
                part = torch.rand(n, generator=g) < 0.5
                if g_kv == 1 or not part.any():
                    part[:] = False
                    part[torch.randint(n, (1,), generator=g)] = True
                if g_kv == 0 and len(counts) > 1:
                    part[:] = False  # an emptied kv head
                if g_kv >= 2 and g_kv == len(counts) - 1:
                    part[:] = True
                heads[start:start + n] = part
                start += n
        channels = torch.rand(args.layer_hidden_dims[l], generator=g) < 0.5
        channels[0] = True
        masks.append((heads, channels))
    return masks


# ----------------------------------------------------------------------------------------------
# logits and greedy tokens of our model and of transformers' (tests/test_llama.py, tests/test_formats.py)


def tokens(vocab: int, T: int = 12, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def greedy(model, prompt: list, n: int) -> list:
    """n greedy tokens after `prompt`, recomputing the whole prefix each step (no KV cache to get wrong)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)  # (B, T, V)
