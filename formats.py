"""Checkpoint formats at the edge of the project, as llama2.c keeps export.py beside model.py: readers for
Hugging Face folders, llama2.c legacy exports and llama.cpp GGUF files (weights and tokenizer metadata), `load`
that reads every format we know, and the exporters. llama.py itself reads only Meta's original folders and our own.

Every reader returns (ModelArgs, {our tensor name: zero-argument reader}) for llama.build_from_readers, so tensors
are read one at a time straight to the target dtype and device. Optional packages (safetensors, gguf, numpy) are
imported inside the functions that need them.
"""
import math
import struct
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import llama

# ----------------------------------------------------------------------------------------------
# Hugging Face folder (config.json + *.safetensors or pytorch_model*.bin)

HF_NAMES = {  # Hugging Face name -> ours ({} is the layer index)
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


def hf_to_meta_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's q/k row permutation: HF stores each head's rows as [evens..., odds...] for rotate-half RoPE,
    Meta interleaves them as pairs. (out, in) -> (out, in)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def hf_config_to_args(cfg: dict, source: str) -> llama.ModelArgs:
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {cfg.get('model_type')!r}, expected 'llama'")
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 moves rope_theta (and any scaling) in here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_parameters={rope!r} is not supported (expected rope_type 'default')")
    return llama.ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                           n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                           vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                           head_dim=cfg.get("head_dim"), norm_eps=cfg["rms_norm_eps"],
                           rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                           max_seq_len=cfg.get("max_position_embeddings", 2048),
                           tie_embeddings=cfg.get("tie_word_embeddings", False))


def hf_readers(folder: Path):
    args = hf_config_to_args(llama._read_json(folder / "config.json"), str(folder / "config.json"))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: config.json found but no *.safetensors or pytorch_model*.bin")
    sources = {}  # hf name -> zero-argument reader
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            handle = safe_open(str(f), framework="pt")  # lazy: a tensor is read when asked for
            sources.update({k: (lambda h=handle, k=k: h.get_tensor(k)) for k in handle.keys()})
        else:
            sd = llama._torch_load(f)
            sources.update({k: (lambda sd=sd, k=k: sd[k]) for k in sd})
    rename = {}
    for i in range(args.n_layers):
        rename.update({hf.format(i): ours.format(i) for hf, ours in HF_NAMES.items()})
    readers = {}
    for hf, read in sources.items():
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        if hf not in rename:
            raise ValueError(f"{folder}: unexpected tensor {hf}")
        name = rename[hf]
        if name.endswith(("wq.weight", "wk.weight")):
            heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
            read = (lambda read=read, heads=heads: hf_to_meta_rows(read(), heads))
        readers[name] = read
    if args.tie_embeddings:
        readers.pop("output.weight", None)
    return args, readers


# ----------------------------------------------------------------------------------------------
# llama2.c legacy export (*.bin)


def llama2c_readers(path: Path):
    """llama2.c 'version 0' export: 7 int32 (dim, hidden, layers, heads, kv heads, vocab, seq len), then float32
    weights in a fixed order; a negative vocab size means the classifier follows, unshared."""
    import numpy as np
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) < 28:
        raise ValueError(f"{path}: {len(head)} bytes, too short for a llama2.c header (28 bytes)")
    if struct.unpack("I", head[:4])[0] == 0x616B3432:
        raise ValueError(f"{path}: a llama2.c version 1/2 export; only the legacy (version 0) layout is read")
    dim, hidden, L, H, K, vocab, seq_len = struct.unpack("7i", head)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, L, H, K, vocab, seq_len) <= 0 or dim % H:
        raise ValueError(f"{path}: not a llama2.c export (header {dim, hidden, L, H, K, vocab, seq_len})")
    D = dim // H
    shapes = [("tok_embeddings.weight", (vocab, dim)), ("attention_norm", (L, dim)), ("wq", (L, H * D, dim)),
              ("wk", (L, K * D, dim)), ("wv", (L, K * D, dim)), ("wo", (L, dim, H * D)), ("ffn_norm", (L, dim)),
              ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("norm.weight", (dim,)),
              ("freq_cis_real", (seq_len, D // 2)), ("freq_cis_imag", (seq_len, D // 2))]
    if not shared:
        shapes.append(("output.weight", (vocab, dim)))
    n_floats = sum(math.prod(s) for _, s in shapes)
    size = path.stat().st_size
    if size != 28 + 4 * n_floats:
        raise ValueError(f"{path}: {size} bytes, but header {dim, hidden, L, H, K, vocab, seq_len} "
                         f"implies {28 + 4 * n_floats}")
    data = np.memmap(path, dtype=np.float32, mode="r", offset=28)
    arrays, offset = {}, 0
    for name, shape in shapes:
        arrays[name] = data[offset: offset + math.prod(shape)].reshape(shape)
        offset += math.prod(shape)
    where = {"attention_norm": "layers.{}.attention_norm.weight", "ffn_norm": "layers.{}.ffn_norm.weight",
             "wq": "layers.{}.attention.wq.weight", "wk": "layers.{}.attention.wk.weight",
             "wv": "layers.{}.attention.wv.weight", "wo": "layers.{}.attention.wo.weight",
             "w1": "layers.{}.feed_forward.w1.weight", "w2": "layers.{}.feed_forward.w2.weight",
             "w3": "layers.{}.feed_forward.w3.weight"}
    readers = {}
    for name, arr in arrays.items():
        if name in where:
            for i in range(L):
                readers[where[name].format(i)] = lambda arr=arr, i=i: torch.from_numpy(np.array(arr[i]))
        elif not name.startswith("freq_cis"):  # RoPE tables: recomputed (they equal theta=10000)
            readers[name] = lambda arr=arr: torch.from_numpy(np.array(arr))
    args = llama.ModelArgs(dim=dim, n_layers=L, n_heads=H, n_kv_heads=K, vocab_size=vocab, hidden_dim=hidden,
                           max_seq_len=seq_len, tie_embeddings=shared)
    return args, readers


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp): weights and tokenizer metadata

GGUF_NAMES = {  # GGUF name -> ours ({} is the layer index); no output.weight means a tied head
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}


def _open_gguf(path: Path):
    """(the gguf module, a GGUFReader of `path`): the one place a GGUF file is opened for reading."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"{path}: reading GGUF needs the optional extra: pip install gguf") from e
    try:
        return gguf, gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # bad magic or version, or a truncated file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_tokenizer(path) -> dict:
    """The tokenizer metadata of a GGUF file as {key: value} with the 'tokenizer.ggml.' prefix dropped, e.g.
    'model' ('gpt2', 'llama'), 'pre', 'tokens', 'merges', 'scores', 'token_type', 'bos_token_id', 'add_bos_token'.
    Empty when the file holds no tokenizer. data.py builds its tokenizer from this."""
    _, reader = _open_gguf(Path(path))
    prefix = "tokenizer.ggml."
    return {name[len(prefix):]: field.contents() for name, field in reader.fields.items() if name.startswith(prefix)}


def gguf_readers(path: Path):
    """A llama.cpp GGUF file of architecture 'llama': config from its metadata, each tensor dequantized to float32
    when read (any type the `gguf` package knows: F16, Q8_0, Q4_1, ...). q/k rows are used as stored: llama.cpp's
    converter undoes HF's rotate-half permutation (LlamaModel.permute in convert_hf_to_gguf.py), which leaves
    Meta's interleaved pairs, the convention of apply_rope."""
    import numpy as np
    gguf, reader = _open_gguf(path)

    def meta(key: str, default=...):
        """One metadata value; without a default the key is required."""
        field = reader.get_field(key)
        if field is None and default is ...:
            raise ValueError(f"{path}: GGUF metadata has no {key}")
        value = default if field is None else field.contents()
        if isinstance(value, list):  # some architectures store per-layer head counts; llama has one of each
            raise ValueError(f"{path}: GGUF metadata {key} holds a list {value[:4]}..., expected one number")
        return value

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r}, expected 'llama'")
    tensors = {t.name: t for t in reader.tensors}
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:  # rope_freqs: Llama 3.1's per-frequency factors
        raise ValueError(f"{path}: RoPE scaling (type {scaling!r}, rope_freqs.weight "
                         f"{'present' if 'rope_freqs.weight' in tensors else 'absent'}) is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    dim, vocab = (int(n) for n in tensors["token_embd.weight"].shape)  # GGUF lists dims fastest first: (C, V)
    if meta("llama.vocab_size", vocab) != vocab:
        raise ValueError(f"{path}: llama.vocab_size {meta('llama.vocab_size')} but token_embd.weight has "
                         f"{vocab} rows")
    n_heads = meta("llama.attention.head_count")
    head_dim = meta("llama.attention.key_length", meta("llama.embedding_length") // n_heads)
    if meta("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {meta('llama.rope.dimension_count')}, expected "
                         f"RoPE over the whole head (head_dim {head_dim})")
    args = llama.ModelArgs(dim=meta("llama.embedding_length"), n_layers=meta("llama.block_count"),
                           n_heads=n_heads, n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
                           vocab_size=vocab, hidden_dim=meta("llama.feed_forward_length"), head_dim=head_dim,
                           norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
                           rope_theta=meta("llama.rope.freq_base", 10000.0), max_seq_len=meta("llama.context_length"),
                           tie_embeddings="output.weight" not in tensors)
    if args.dim != dim:
        raise ValueError(f"{path}: llama.embedding_length {args.dim} but token_embd.weight has width {dim}")

    def reader_of(t):
        def read() -> Tensor:
            values = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 numpy, fastest dim last
            shape = [int(n) for n in reversed(t.shape)]  # GGUF (in, out) -> torch (out, in)
            return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy off the mmap
        return read

    rename = {}
    for i in range(args.n_layers):
        rename.update({g.format(i): ours.format(i) for g, ours in GGUF_NAMES.items()})
    unknown = sorted(set(tensors) - set(rename))
    if unknown:
        raise ValueError(f"{path}: unexpected GGUF tensor(s) {unknown[:8]} for a llama of {args.n_layers} layers")
    return args, {rename[name]: reader_of(t) for name, t in tensors.items()}


# ----------------------------------------------------------------------------------------------
# load: every format


FORMATS = ("our own (params.json with format 'loraprune' + model.safetensors)",
           "Meta (params.json + consolidated.*.pth)",
           "Hugging Face (config.json + *.safetensors or pytorch_model*.bin)",
           "llama2.c legacy export (*.bin)", "GGUF (*.gguf)")


def load(path, device="cpu", dtype: Optional[torch.dtype] = None, int8: bool = False) -> llama.Transformer:
    """Read a checkpoint of any format in FORMATS into a Transformer on `device`, chosen by what the path is: a folder
    with params.json (ours or Meta's, through llama.load_checkpoint), a folder with config.json (Hugging Face), a
    *.gguf file, a *.bin file (llama2.c). Weights go to `dtype` (None: as stored; GGUF dequantizes to float32);
    int8=True quantizes the seven projections of every block on the way in (quant8.py)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "params.json").exists():
        return llama.load_checkpoint(path, device=device, dtype=dtype, int8=int8)
    if path.is_dir() and (path / "config.json").exists():
        args, readers = hf_readers(path)
    elif path.is_file() and path.suffix == ".gguf":
        args, readers = gguf_readers(path)
    elif path.is_file() and path.suffix == ".bin":
        args, readers = llama2c_readers(path)
    else:
        raise ValueError(f"{path}: no known checkpoint format; looked for: " + "; ".join(FORMATS))
    return llama.build_from_readers(args, readers, device, dtype, int8, source=str(path))
