"""Every byte on disk, at the edge of the project as llama2.c keeps export.py beside model.py. Readers for Meta's
original shards, our own folders, Hugging Face folders, llama2.c legacy exports and llama.cpp GGUF files (weights
and tokenizer metadata); `load`, the one entry that reads them all; the atomic writes every file and folder the
project saves goes through (resume.pt and report.json too); our own format's writer, the pruned model folder with
its tokenizer; and the exporters to Hugging Face and GGUF.

Every reader returns (ModelArgs, {our tensor name: zero-argument reader}) for build_from_readers, so tensors are
read one at a time (from mmap or lazy safetensors reads) straight to the target dtype and device. Optional packages
(safetensors, gguf, numpy, sentencepiece) are imported inside the functions that need them.
"""
import contextlib
import errno
import importlib
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import llama
import quant8

# ----------------------------------------------------------------------------------------------
# reading helpers, and the one import of an optional extra


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra of pyproject.toml that installs it."""


def import_extra(module: str, extra: Optional[str], needed_by: str):
    """`module`, imported; without it a one-line MissingExtra naming what needs it and the pip command of the extra
    that installs it (None: a core dependency, `pip install -e .`). Every optional import goes through here."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        install = f"pip install -e '.[{extra}]'" if extra else "pip install -e ."
        raise MissingExtra(f"{needed_by} needs {module}, which does not import ({e}): {install}") from None


def error_words(e: BaseException) -> str:
    """A library's exception in a one-line message about a corrupt or foreign file: its type and first line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _read_json(path: Path) -> dict:
    """A JSON object (a config file); anything else is a ValueError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def _safetensors(path: Path):
    """A lazy handle of a safetensors file (tensors are read when asked for); a truncated or foreign file is a
    ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({error_words(e)})") from None


def _model_args(params: dict, source: str) -> llama.ModelArgs:
    """ModelArgs from a config dict; an unknown key or a value of the wrong kind is a ValueError naming the file."""
    known = {f.name for f in fields(llama.ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model parameter(s) {unknown}; known: {sorted(known)}")
    try:
        return llama.ModelArgs(**params)
    except (TypeError, ZeroDivisionError) as e:  # e.g. "dim": "4096", or a zero head count
        raise ValueError(f"{source}: not a model config ({error_words(e)})") from None


def _torch_load(path: Path) -> dict:
    """Pickled weights, only ever with weights_only=True; mmap so the file is not copied into RAM."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a corrupt or non-torch file: say which one
        raise ValueError(f"{path}: not a readable torch checkpoint ({error_words(e)})") from None


# ----------------------------------------------------------------------------------------------
# Meta's original folder (params.json + consolidated.*.pth)


def meta_shard_dim(name: str) -> Optional[int]:
    """The dim Meta's model-parallel layers split `name` on: 0 for column-parallel (wq wk wv w1 w3 output),
    1 for row-parallel (wo w2) and the embedding (ParallelEmbedding splits the model dim), None if replicated."""
    if name.endswith("norm.weight"):
        return None
    if name.startswith("tok_embeddings.") or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return 0


def meta_readers(folder: Path):
    """Meta's folder: each tensor is the concatenation of its shards on meta_shard_dim, read one layer at a time."""
    params = _read_json(folder / "params.json")
    shard_paths = sorted(folder.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FileNotFoundError(f"{folder}: params.json found but no consolidated.*.pth shards")
    shards = [_torch_load(p) for p in shard_paths]  # mmap: nothing is read until a tensor is used
    for p, s in zip(shard_paths, shards):
        if set(s) - {"rope.freqs"} != set(shards[0]) - {"rope.freqs"}:
            raise ValueError(f"{p}: holds different tensor names than {shard_paths[0]}")
    mapped = {"layer": None}

    def current_shards(name):
        # Re-map the shards when the reader moves to the next layer: dropping the old mappings returns the file
        # pages read so far, so the host holds at most one layer of the files on top of the model itself.
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer != mapped["layer"]:
            mapped["layer"] = layer
            shards[:] = [None] * len(shards)
            shards[:] = [_torch_load(p) for p in shard_paths]
        return shards

    def reader(name):
        dim = meta_shard_dim(name)

        def read():
            parts = [s[name] for s in current_shards(name)]
            return parts[0].clone() if dim is None else torch.cat(parts, dim=dim)  # a copy: no mapping kept
        return read

    readers = {name: reader(name) for name in shards[0] if name != "rope.freqs"}  # rope.freqs: recomputed
    vocab = shards[0]["tok_embeddings.weight"].shape[0]
    if params.get("vocab_size", -1) not in (-1, vocab):
        raise ValueError(f"{folder}/params.json: vocab_size {params['vocab_size']} but the embedding has {vocab} rows")
    params["vocab_size"] = vocab  # Meta leaves -1 here and takes it from the tokenizer; the tensor is the truth
    factor, high = params.pop("rope_scaling_factor", None), params.pop("rope_high_freq_factor", None)
    if params.pop("use_scaled_rope", False):  # Llama 3.1+: Meta's apply_scaling (factor 8 unless params.json says)
        params["rope_scaling"] = {**llama.LLAMA3_ROPE, "factor": factor or 8.0, "high_freq_factor": high or 4.0}
    args = _model_args(params, str(folder / "params.json"))
    hidden = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
    if hidden != args.hidden_dim:
        raise ValueError(f"{folder}: MLP width from params.json (dim {args.dim}, multiple_of {args.multiple_of}, "
                         f"ffn_dim_multiplier {args.ffn_dim_multiplier}) is {args.hidden_dim}, the tensors have {hidden}")
    return args, readers


# ----------------------------------------------------------------------------------------------
# our own folder: model.safetensors + params.json {"format": "loraprune", "version", "kind", "dtype", "int8", "args"}


def own_readers(folder: Path):
    """Our own folder (written by save_checkpoint): tensors as saved, int8 stores with their scales."""
    meta = _read_json(folder / "params.json")
    if meta.get("format") != "loraprune" or meta.get("version") != 1:
        raise ValueError(f"{folder}/params.json: format {meta.get('format')!r} version {meta.get('version')!r}, "
                         "expected 'loraprune' version 1")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: params.json found but no model.safetensors")
    if not isinstance(meta.get("args"), dict):
        raise ValueError(f"{folder}/params.json: expected the model's args as an object, found {meta.get('args')!r}")
    handle = _safetensors(weights)
    readers = {k: (lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
    return _model_args(meta["args"], str(folder / "params.json")), readers


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
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",  # Qwen2
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",  # Qwen3
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
ROTATED = ("wq.weight", "wk.weight", "wq.bias", "wk.bias", "q_norm.weight", "k_norm.weight")  # RoPE's row order


def hf_to_meta_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's q/k row permutation: HF stores each head's rows as [evens..., odds...] for rotate-half RoPE,
    Meta interleaves them as pairs. (out, ...) -> (out, ...): a weight, a bias, or a q/k norm (n_heads = 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotated_heads(name: str, args: llama.ModelArgs, layer: int) -> int:
    """The heads whose rows `name` (one of ROTATED) holds in RoPE's order: the layer's query or kv heads, or 1 for a
    q/k norm (one head's D values)."""
    if "norm" in name:
        return 1
    return args.layer_n_heads[layer] if ".wq." in name else args.layer_kv_heads[layer]


def hf_rope(cfg: dict, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, ModelArgs.rope_scaling) of a Hugging Face config: transformers 5 nests both in rope_parameters,
    4.x wrote rope_theta and rope_scaling at the top level. Scaling other than rope_type 'llama3' is refused."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: RoPE scaling {rope!r} is not supported (expected rope_type 'default' or "
                         "'llama3')")
    return theta, {key: rope.get(key, default) for key, default in llama.LLAMA3_ROPE.items()}


HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
               "rms_norm_eps")  # the config.json keys without a default here


def hf_config_to_args(cfg: dict, source: str) -> llama.ModelArgs:
    """ModelArgs of a Hugging Face config.json of model_type 'llama', 'mistral', 'qwen2' or 'qwen3', each read as
    transformers' modeling file for it computes: Qwen2 adds q/k/v biases, Qwen3 q/k norms. A sliding window is the
    same model for sequences no longer than it, so max_seq_len is capped at the window."""
    family = cfg.get("model_type", "llama")
    if family not in llama.FAMILIES:
        raise ValueError(f"{source}: model_type {family!r}, expected one of {', '.join(llama.FAMILIES)}")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(key, ok) != ok:  # (Qwen2 has q/k/v biases whatever attention_bias says)
            raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    missing = [key for key in HF_REQUIRED if key not in cfg]
    if missing:
        raise ValueError(f"{source}: expected a Hugging Face config.json of a {family} model, found no "
                         f"{', '.join(missing)}")
    theta, scaling = hf_rope(cfg, source)
    max_seq_len = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")  # Mistral v0.1: 4096; Qwen: used only with use_sliding_window
    sliding = "sliding_attention" in (cfg.get("layer_types") or []) or (
        cfg.get("use_sliding_window", False) if family.startswith("qwen") else window is not None)
    if sliding and window:
        max_seq_len = min(max_seq_len, window)
    return llama.ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                           n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                           vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                           head_dim=cfg.get("head_dim"), norm_eps=cfg["rms_norm_eps"], rope_theta=theta,
                           rope_scaling=scaling, max_seq_len=max_seq_len,
                           tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=family == "qwen2",
                           qk_norm=family == "qwen3", family=family)


def hf_readers(folder: Path):
    args = hf_config_to_args(_read_json(folder / "config.json"), str(folder / "config.json"))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: config.json found but no *.safetensors or pytorch_model*.bin")
    sources = {}  # hf name -> zero-argument reader
    for f in files:
        if f.suffix == ".safetensors":
            handle = _safetensors(f)
            sources.update({k: (lambda h=handle, k=k: h.get_tensor(k)) for k in handle.keys()})
        else:
            sd = _torch_load(f)
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
        if name.endswith(ROTATED):
            heads = rotated_heads(name, args, int(name.split(".")[1]))
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
    "blk.{}.attn_q.bias": "layers.{}.attention.wq.bias",  # Qwen2
    "blk.{}.attn_k.bias": "layers.{}.attention.wk.bias",
    "blk.{}.attn_v.bias": "layers.{}.attention.wv.bias",
    "blk.{}.attn_q_norm.weight": "layers.{}.attention.q_norm.weight",  # Qwen3
    "blk.{}.attn_k_norm.weight": "layers.{}.attention.k_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}


GGUF_FAMILIES = {"llama": "llama", "deci": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # architecture -> family
GGUF_NEOX = ("qwen2", "qwen3")  # llama.cpp's rotate-half RoPE (LLAMA_ROPE_TYPE_NEOX): q/k rows stay in HF's order


def rope_factors(D: int, theta: float, scaling: dict) -> Tensor:
    """What each RoPE frequency is divided by under `scaling` (D/2,) float32: llama.cpp's rope_freqs.weight, as its
    converter writes it for rope_type 'llama3' (LlamaModel.generate_extra_tensors)."""
    return llama.rope_frequencies(D, theta) / llama.rope_frequencies(D, theta, scaling)


def llama3_rope_of_factors(factors: Tensor, D: int, theta: float, source: str) -> dict:
    """ModelArgs.rope_scaling behind a GGUF's rope_freqs.weight (D/2,): the largest divisor is `factor`, the others
    are Meta's Llama 3.1 values (LLAMA3_ROPE); ValueError unless that reproduces every divisor."""
    scaling = {**llama.LLAMA3_ROPE, "factor": float(factors.max())}
    if factors.shape != (D // 2,) or not torch.allclose(factors, rope_factors(D, theta, scaling), rtol=1e-4):
        raise ValueError(f"{source}: rope_freqs.weight {factors.tolist()[:4]}... is not Llama 3's RoPE scaling with "
                         f"low_freq_factor 1, high_freq_factor 4 and an original context of 8192")
    return scaling


def _open_gguf(path: Path):
    """(the gguf module, a GGUFReader of `path`): the one place a GGUF file is opened for reading."""
    gguf = import_extra("gguf", "gguf", f"reading {path}")
    try:
        return gguf, gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # bad magic or version, or a truncated file
        raise ValueError(f"{path}: not a readable GGUF file ({error_words(e)})") from None


def gguf_quantized(path) -> bool:
    """Whether a file is a GGUF whose matrices are stored in a block type (Q8_0, Q4_K, ...), not F32/F16/BF16."""
    if Path(path).suffix != ".gguf":
        return False
    gguf, reader = _open_gguf(Path(path))
    Q = gguf.GGMLQuantizationType
    return any(t.tensor_type not in (Q.F32, Q.F16, Q.BF16) for t in reader.tensors if len(t.shape) == 2)


def gguf_tokenizer(path) -> dict:
    """The tokenizer metadata of a GGUF file as {key: value} with the 'tokenizer.ggml.' prefix dropped, e.g.
    'model' ('gpt2', 'llama'), 'pre', 'tokens', 'merges', 'scores', 'token_type', 'bos_token_id', 'add_bos_token'.
    Empty when the file holds no tokenizer. data.py builds its tokenizer from this."""
    _, reader = _open_gguf(Path(path))
    prefix = "tokenizer.ggml."
    return {name[len(prefix):]: field.contents() for name, field in reader.fields.items() if name.startswith(prefix)}


def gguf_readers(path: Path):
    """A llama.cpp GGUF file of architecture 'llama' (Llama 1-3, Mistral), 'deci' (per-layer head counts and MLP
    widths, what export_gguf writes for a pruned model), 'qwen2' or 'qwen3': config from its metadata, each tensor
    dequantized to float32 when read (any type the `gguf` package knows: F16, Q8_0, Q4_1, ...). llama.cpp's converter
    permutes q/k rows of 'llama' into Meta's interleaved pairs (LlamaModel.permute), the convention of apply_rope,
    and leaves those of the rotate-half architectures (GGUF_NEOX) in HF's order, which is undone here. Llama 3.1's
    rope_freqs.weight becomes ModelArgs.rope_scaling; q/k/v biases make a Qwen2, q/k norms a Qwen3."""
    import numpy as np
    gguf, reader = _open_gguf(path)

    def meta(key: str, default=..., per_layer: bool = False):
        """One metadata value (a list of one per layer if per_layer and the file is 'deci'); without a default the
        key is required."""
        field = reader.get_field(key)
        if field is None and default is ...:
            raise ValueError(f"{path}: GGUF metadata has no {key}")
        value = default if field is None else field.contents()
        if isinstance(value, list) and not (per_layer and arch == "deci"):
            raise ValueError(f"{path}: GGUF metadata {key} holds a list {value[:4]}..., expected one number")
        return value

    arch = meta("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"{path}: GGUF architecture {arch!r}, expected one of {', '.join(GGUF_FAMILIES)}")
    tensors = {t.name: t for t in reader.tensors}
    scaling = meta(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: RoPE scaling type {scaling!r} is not supported (Llama 3's rope_freqs.weight is)")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    dim, vocab = (int(n) for n in tensors["token_embd.weight"].shape)  # GGUF lists dims fastest first: (C, V)
    if meta(f"{arch}.vocab_size", vocab) != vocab:
        raise ValueError(f"{path}: {arch}.vocab_size {meta(f'{arch}.vocab_size')} but token_embd.weight has "
                         f"{vocab} rows")
    n_layers = meta(f"{arch}.block_count")

    def per_layer(key: str, default=...) -> list:
        value = meta(f"{arch}.{key}", default, per_layer=True)
        value = [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers
        if len(value) != n_layers or min(value) < 1:  # deci's 0 heads / 0 width (no-op layers) are not read
            raise ValueError(f"{path}: {arch}.{key} = {value}, expected {n_layers} positive sizes")
        return value

    heads = per_layer("attention.head_count")
    kv_heads = per_layer("attention.head_count_kv", heads)
    widths = per_layer("feed_forward_length")
    bad = [l for l in range(n_layers) if heads[l] % kv_heads[l]]
    if bad:
        raise ValueError(f"{path}: layer {bad[0]} has {heads[bad[0]]} query heads over {kv_heads[bad[0]]} kv heads")
    rep = [h // k for h, k in zip(heads, kv_heads)]  # every kv head of a layer serves rep[l] query heads
    head_dim = meta(f"{arch}.attention.key_length", meta(f"{arch}.embedding_length") // heads[0])
    if meta(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count {meta(f'{arch}.rope.dimension_count')}, expected "
                         f"RoPE over the whole head (head_dim {head_dim})")

    def reader_of(t):
        def read() -> Tensor:
            values = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 numpy, fastest dim last
            shape = [int(n) for n in reversed(t.shape)]  # GGUF (in, out) -> torch (out, in)
            return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy off the mmap
        return read

    theta = meta(f"{arch}.rope.freq_base", 10000.0)
    rope_scaling = None
    if "rope_freqs.weight" in tensors:  # Llama 3.1: what each RoPE frequency is divided by
        rope_scaling = llama3_rope_of_factors(reader_of(tensors.pop("rope_freqs.weight"))(), head_dim, theta, path)
    biases, norms = "blk.0.attn_q.bias" in tensors, "blk.0.attn_q_norm.weight" in tensors
    family = "qwen2" if biases and arch != "qwen3" else GGUF_FAMILIES[arch]  # q/k/v biases: only Qwen2 has them
    n_rep, n_kv = max(rep), max(kv_heads)  # the unpruned shape that holds every layer
    args = llama.ModelArgs(dim=meta(f"{arch}.embedding_length"), n_layers=n_layers, n_heads=n_kv * n_rep,
                           n_kv_heads=n_kv, vocab_size=vocab, hidden_dim=max(widths), head_dim=head_dim,
                           norm_eps=meta(f"{arch}.attention.layer_norm_rms_epsilon"), rope_theta=theta,
                           rope_scaling=rope_scaling, max_seq_len=meta(f"{arch}.context_length"),
                           tie_embeddings="output.weight" not in tensors, qkv_bias=biases, qk_norm=norms,
                           family=family, layer_kv_heads=kv_heads, layer_hidden_dims=widths,
                           layer_q_per_kv=[[r] * k for r, k in zip(rep, kv_heads)])
    if args.dim != dim:
        raise ValueError(f"{path}: {arch}.embedding_length {args.dim} but token_embd.weight has width {dim}")

    rename = {}
    for i in range(args.n_layers):
        rename.update({g.format(i): ours.format(i) for g, ours in GGUF_NAMES.items()})
    unknown = sorted(set(tensors) - set(rename))
    if unknown:
        raise ValueError(f"{path}: unexpected GGUF tensor(s) {unknown[:8]} for a {arch} of {args.n_layers} layers")
    readers = {}
    for name, t in tensors.items():
        ours, read = rename[name], reader_of(t)
        if arch in GGUF_NEOX and ours.endswith(ROTATED):
            heads_of = rotated_heads(ours, args, int(ours.split(".")[1]))
            read = (lambda read=read, heads_of=heads_of: hf_to_meta_rows(read(), heads_of))
        readers[ours] = read
    return args, readers


# ----------------------------------------------------------------------------------------------
# load: every format


FORMATS = ("our own (params.json with format 'loraprune' + model.safetensors)",
           "Meta (params.json + consolidated.*.pth)",
           "Hugging Face (config.json + *.safetensors or pytorch_model*.bin)",
           "llama2.c legacy export (*.bin)", "GGUF (*.gguf)")


def load(path, device="cpu", dtype: Optional[torch.dtype] = None, int8: bool = False) -> llama.Transformer:
    """Read a checkpoint of any format in FORMATS into a Transformer on `device`, chosen by what the path is: a folder
    with params.json (ours, or Meta's), a folder with config.json (Hugging Face), a *.gguf file, a *.bin file
    (llama2.c). Weights go to `dtype` (None: as stored, except Meta's shards, which become bfloat16; GGUF dequantizes
    to float32); int8=True quantizes the seven projections of every block on the way in (quant8.py), one tensor at a
    time. Our own int8 folders load as int8 whatever int8 says."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "params.json").exists():
        params = _read_json(path / "params.json")
        if "format" in params:  # our own; its params.json says whether the projections are int8
            args, readers = own_readers(path)
            int8 = int8 or params.get("int8", False)
        else:  # Meta's
            args, readers = meta_readers(path)
            dtype = dtype or torch.bfloat16
    elif path.is_dir() and (path / "config.json").exists():
        args, readers = hf_readers(path)
    elif path.is_file() and path.suffix == ".gguf":
        args, readers = gguf_readers(path)
    elif path.is_file() and path.suffix == ".bin":
        args, readers = llama2c_readers(path)
    elif (path / "model" / "params.json").is_file():  # run.py's --out
        raise ValueError(f"{path}: the output folder of a run, not a checkpoint; its pruned model is {path / 'model'}")
    else:
        raise ValueError(f"{path}: no known checkpoint format; looked for: " + "; ".join(FORMATS))
    return build_from_readers(args, readers, device, dtype, int8, source=str(path))


def build_from_readers(args: llama.ModelArgs, readers: dict, device, dtype: Optional[torch.dtype], int8: bool,
                       source: str) -> llama.Transformer:
    """Build on the meta device, read each tensor once, check its shape, cast, place (and quantize), assign."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    if int8:
        llama.quantize_model(model)  # on meta: empty int8 stores for the projections
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(".scales")}
    if args.tie_embeddings:
        expected.pop("output.weight")
    scales = {k for k in readers if k.endswith(".scales")}  # present only in our own int8 files
    missing, unexpected = sorted(set(expected) - set(readers)), sorted(set(readers) - set(expected) - scales)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    state = {}
    for name, meta in expected.items():
        t = readers[name]()
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(meta.shape)}")
        if meta.dtype == torch.int8 and t.is_floating_point():  # quantize from the file's precision, not bf16
            state[name], state[name[: -len("weight")] + "scales"] = quant8.quantize(t.to(device))
        else:
            state[name] = t.to(device, dtype or t.dtype) if t.is_floating_point() else t.to(device)  # None: as saved
    state.update({k: readers[k]().to(device) for k in scales})
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():  # assign=True takes the loaded tensors' flags: the base weights are frozen
        p.requires_grad_(False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


# ----------------------------------------------------------------------------------------------
# writing: a file or a folder appears whole or not at all, with the modes the umask gives; a write the system refuses
# (a full disk, a file size limit, a read-only file system) is one OSError naming the file, its earlier copy kept


def file_mode(folder: bool = False) -> int:
    """The mode open() gives a new file (mkdir a new folder with folder=True): 0o666 (0o777) less the umask."""
    umask = os.umask(0)  # the only way to read it: set it, then put it back
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples: about what torch.save writes of it."""
    if isinstance(obj, Tensor):
        return obj.nbytes
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(x) for x in items)


def _human(n: float) -> str:
    """A byte count for people: 512 B, 96.2 kB, 13.5 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _system_errno(error: Exception, written: list) -> Optional[int]:
    """The errno behind a failed write: the OSError's own, or the one a Rust library (safetensors) names in its
    message; else what the system says of the largest file written so far: at the file size limit (EFBIG), or the
    error of 1 MiB more appended to it (torch.save and numpy report a refused write in their own words, without the
    errno). None when the system takes the bytes: the write failed for another reason."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    named = re.search(r"\(os error (\d+)\)", str(error))
    if named:
        return int(named.group(1))
    files = [p for p in written if p.is_file()]
    if not files:
        return None
    largest = max(files, key=lambda p: p.stat().st_size)
    limit, size = resource.getrlimit(resource.RLIMIT_FSIZE)[0], largest.stat().st_size
    if limit != resource.RLIM_INFINITY and size >= limit:
        return errno.EFBIG
    try:
        with open(largest, "ab") as f:
            f.write(bytes(2**20 if limit == resource.RLIM_INFINITY else min(2**20, limit - size)))  # never EFBIG
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno
    return None


def _not_written(path: Path, error: Exception, written: list, size: Optional[int], existed: bool) -> Exception:
    """What a failed write of `path` raises: for a write the system refused, one OSError naming the file, the reason,
    the bytes the write needs (`size`, where the caller knows them) and what is free or allowed; else `error`."""
    code = _system_errno(error, written)
    if code is None:
        return error
    facts = [f"it needs about {_human(size)}"] if size else []
    if code == errno.ENOSPC:
        with contextlib.suppress(OSError):
            facts.append(f"{_human(shutil.disk_usage(path.parent).free)} free")
    elif code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        facts.append(f"the file size limit (ulimit -f) is {_human(limit)}" if limit != resource.RLIM_INFINITY
                     else "more than the file system holds in one file")
    reason = os.strerror(code) + (": " + ", ".join(facts) if facts else "")
    kept = f"the earlier {path.name} is unchanged" if existed else "nothing was left behind"
    return OSError(code, f"not written ({reason}); {kept}", str(path))


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held back until the block ends, then raised again for the handlers there were: renames that
    belong together all happen. (Python runs handlers in the main thread only, where this holds them.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


def atomic_write(path, write: Callable, size: Optional[int] = None) -> Path:
    """write(tmp_path) into a temporary file beside `path`, then os.replace: a reader sees the old file or the new
    one, whole. The file gets file_mode() (mkstemp makes it 0600). A write the system refuses raises one OSError
    naming `path`, the reason and `size` (the bytes it needs, where the caller knows them); the temporary file is
    removed and an earlier `path` stays as it was."""
    path, tmp = Path(path), None
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except Exception as e:
        raise _not_written(path, e, [Path(tmp)] if tmp else [], size, existed) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_folder(folder, write: Callable, size: Optional[int] = None) -> Path:
    """write(tmp) fills a temporary folder beside `folder`, which then takes its place by renames: a reader sees the
    old folder or the new one, whole. The folder and its files get file_mode() (mkdtemp makes the folder 0700).
    Errors as atomic_write's: the temporary folder is removed and an earlier `folder` stays as it was."""
    folder, tmp = Path(folder), None
    existed = folder.exists()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        write(tmp)
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
        os.chmod(tmp, file_mode(folder=True))
        with _signals_held():  # an interrupt cannot fall between the renames
            if existed:
                old = folder.with_name(folder.name + f".old-{os.getpid()}")
                os.replace(folder, old)
                try:
                    os.replace(tmp, folder)
                except OSError:
                    os.replace(old, folder)  # the earlier folder back in its place
                    raise
                shutil.rmtree(old)
            else:
                os.replace(tmp, folder)
    except Exception as e:
        raise _not_written(folder, e, list(tmp.iterdir()) if tmp and tmp.exists() else [], size, existed) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)
    return folder


# ----------------------------------------------------------------------------------------------
# our own format: save (what own_readers reads), and the pruned model folder with its tokenizer


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int8: "I8"}


def write_safetensors(path: Path, specs: dict, read) -> None:
    """A safetensors file written as a stream: the header from specs {name: (shape, dtype)}, then read(name) for one
    tensor at a time, so the host never holds more than one tensor of the model (the format: 8-byte little-endian
    header length, a JSON header of dtype, shape and byte offsets, then the raw little-endian bytes)."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:  # plain open(): the file follows the umask
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in specs.items():
            t = read(name).detach().to("cpu").contiguous()
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, tuple(t.shape), dtype, shape)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t  # before the next read: one tensor at a time


def _write_own(model: llama.Transformer, folder: Path, kind: str) -> None:
    """model.safetensors and params.json into `folder`: LoRA merged into W on the way out, one tensor at a time;
    int8 stores as int8 + scales. `kind` tags what the weights are ('dense' or 'pruned')."""
    state = {name: t for name, t in model.state_dict().items()
             if ".lora_" not in name and not (name == "output.weight" and model.args.tie_embeddings)}
    merged = {name + ".weight": m for name, m in model.named_modules() if isinstance(m, llama.LoRALinear) and m.r}
    int8 = any(t.dtype == torch.int8 for t in state.values())
    if int8 and merged:
        raise ValueError(f"{next(iter(merged))}: an int8 model with unmerged LoRA; make a float model with "
                         "loraprune.slice_model (and llama.quantize_model for int8) first")
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}  # a merged W keeps W's shape and dtype
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, dtype in specs.values() if dtype != torch.int8})
    args = asdict(model.args)
    if args["layer_q_per_kv"] is None:  # written only when uneven: a uniform model's params.json stays as it was
        del args["layer_q_per_kv"]
    meta = {"format": "loraprune", "version": 1, "kind": kind, "int8": int8, "dtype": ",".join(dtypes), "args": args}
    write_safetensors(folder / "model.safetensors", specs,
                      lambda name: merged[name].merged_weight() if name in merged else state[name])
    (folder / "params.json").write_text(json.dumps(meta, indent=2))


def _own_bytes(model: llama.Transformer) -> int:
    """About the bytes of the model.safetensors _write_own writes (LoRA merged away)."""
    return sum(t.nbytes for name, t in model.state_dict().items() if ".lora_" not in name)


def save_checkpoint(model: llama.Transformer, out_dir, kind: str = "dense") -> Path:
    """Our own folder at out_dir (what load reads back), written atomically (atomic_write_folder)."""
    return atomic_write_folder(out_dir, lambda tmp: _write_own(model, tmp, kind), size=_own_bytes(model))


def save_model(sliced: llama.Transformer, tokenizer_path: Path, folder) -> Path:
    """The pruned model in our own format plus its tokenizer (save_tokenizer: a name data.find_tokenizer looks for,
    a GGUF's vocabulary without the source's weights), atomically."""
    def write(tmp: Path) -> None:
        _write_own(sliced, tmp, kind="pruned")
        save_tokenizer(tokenizer_path, tmp)
    return atomic_write_folder(folder, write, size=_own_bytes(sliced))  # and a small tokenizer


# ----------------------------------------------------------------------------------------------
# export: shared helpers


def _check_exportable(model: llama.Transformer, target: str) -> None:
    """ValueError unless the model's weights are what it computes: no pruning masks still set (Eq. 13's masked
    forward is not a shape another program can hold; loraprune.slice_model makes the kept heads and channels real)."""
    for l, layer in enumerate(model.layers):
        if layer.attention.head_mask is not None or layer.feed_forward.channel_mask is not None:
            raise ValueError(f"{target}: layer {l} still has pruning masks set; slice the model first "
                             "(loraprune.slice_model) so the file holds only the kept heads and channels")


def _float32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def kv_repeat(q_per_kv: list) -> list:
    """Kv head of each kv slot after repeating kv heads so that every slot serves the same number g = gcd(q_per_kv)
    of consecutive query heads, the only grouping llama.cpp and transformers compute: [3, 1] -> [0, 0, 0, 1]."""
    g = math.gcd(*q_per_kv)
    return [j for j, c in enumerate(q_per_kv) for _ in range(c // g)]


def layer_shapes(model: llama.Transformer) -> list:
    """(query heads, kv heads after kv_repeat, MLP width) of every layer, as an exported file states them."""
    a = model.args
    return [(a.layer_n_heads[l], len(kv_repeat(a.q_per_kv(l))), a.layer_hidden_dims[l]) for l in range(a.n_layers)]


def _layer_weights(model: llama.Transformer, l: int, dtype: torch.dtype = torch.float32) -> dict:
    """{name: zero-argument reader of the tensor in `dtype`, on the CPU} for layer l: the seven projections' (out, in)
    weights by our names ('wq', ...), LoRA merged (W + s B@A, in float32), int8 stores dequantized; Qwen2's biases
    ('wq.bias', 'wk.bias', 'wv.bias') and Qwen3's 'q_norm' / 'k_norm'. wk / wv rows and biases are repeated per
    kv_repeat; q/k rows stay in Meta's interleaved RoPE layout."""
    D = model.args.head_dim
    rows = torch.tensor([j * D + d for j in kv_repeat(model.args.q_per_kv(l)) for d in range(D)])  # (K' * D,)
    attention, readers = model.layers[l].attention, {}
    for name, lin in llama.projections(model, l).items():
        pick = rows if name in ("wk", "wv") else slice(None)
        readers[name] = lambda lin=lin, pick=pick: lin.merged_weight(dtype).detach().cpu()[pick].contiguous()
        if lin.bias is not None:
            readers[name + ".bias"] = lambda lin=lin, pick=pick: lin.bias.detach().to("cpu", dtype)[pick].contiguous()
    if attention.q_norm is not None:
        for name in ("q_norm", "k_norm"):
            readers[name] = lambda norm=getattr(attention, name): norm.weight.detach().to("cpu", dtype).contiguous()
    return readers


# ----------------------------------------------------------------------------------------------
# export: GGUF (llama.cpp)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what export_gguf writes the matrices as; norms are always F32
PROJECTION_GGUF = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
                   "w2": "ffn_down", "w3": "ffn_up", "wq.bias": "attn_q", "wk.bias": "attn_k", "wv.bias": "attn_v",
                   "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}


def gguf_architecture(args: llama.ModelArgs, shapes: list, target: str) -> str:
    """The llama.cpp architecture export_gguf writes for a model of these per-layer (query heads, kv heads, MLP
    width) shapes, as llama.cpp's loader and graph builder read them (src/models/*.cpp):
    - Llama, Mistral: 'llama' for one shape (models/llama.cpp reads the sizes of layer 0 only), else 'deci'
      (models/deci.cpp reads hparams.n_head(il), n_head_kv(il), n_ff(il) per layer, tensors and graph alike);
    - Qwen2: 'qwen2' while every layer keeps its full attention width (models/qwen2.cpp sizes attn_q and
      attn_output as n_embd x n_embd), else the same network as 'llama' / 'deci', whose loader takes q/k/v biases
      (llama_model_base::create_tensor_qkv) and whose graph adds them (build_qkv);
    - Qwen3: 'qwen3' (q/k norms; layer 0's sizes for every layer), so one shape only: else a one-line ValueError."""
    uniform = len(set(shapes)) == 1
    if args.family == "qwen3":
        if not uniform:
            l = next(l for l, shape in enumerate(shapes) if shape != shapes[0])
            raise ValueError(f"{target}: layer {l} has {shapes[l][0]} query heads, {shapes[l][1]} kv heads and "
                             f"{shapes[l][2]} MLP channels where layer 0 has {shapes[0][0]}, {shapes[0][1]} and "
                             f"{shapes[0][2]}; llama.cpp's qwen3 holds one shape for every layer: prune with "
                             "--uniform over every layer (--layers)")
        return "qwen3"
    if args.family == "qwen2" and uniform and shapes[0][0] * args.head_dim == args.dim:
        return "qwen2"
    return "llama" if uniform else "deci"


def export_gguf(model: llama.Transformer, out_path, ftype: str = "f16", tokenizer_path=None) -> Path:
    """Write the model as a llama.cpp GGUF file at out_path (atomically: a temporary file, then a rename), of the
    architecture gguf_architecture picks: 'llama' or, with per-layer sizes, 'deci' (llama.cpp's per-layer arrays of
    head_count, head_count_kv and feed_forward_length, as for Llama-3.1-Nemotron-51B), 'qwen2', 'qwen3'. Matrices
    are written as `ftype` (GGUF_TYPES; q8_0 keeps F16 for a matrix whose rows are not a multiple of 32), norms,
    biases and Llama 3's rope_freqs as F32. q/k rows go as llama.cpp's converter writes them: Meta's interleaved
    pairs for 'llama' / 'deci', HF's rotate-half rows for Qwen's architectures. Uneven query-head groups
    (--head-unit query) are written exactly by repeating kv heads (kv_repeat). The tokenizer: a SentencePiece .model
    as tokenizer.ggml.model 'llama', a byte-level tokenizer.json as 'gpt2', a GGUF's metadata copied as it was."""
    out_path = Path(out_path)
    if ftype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; expected one of {', '.join(GGUF_TYPES)}")
    _check_exportable(model, str(out_path))
    gguf = import_extra("gguf", "gguf", "GGUF export")
    import numpy as np
    Q, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
    qtype, file_type = {"f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16),
                        "bf16": (Q.BF16, FT.MOSTLY_BF16), "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0)}[ftype]
    a = model.args
    shapes = layer_shapes(model)
    arch = gguf_architecture(a, shapes, str(out_path))

    # tensors: (GGUF name, torch shape, zero-argument reader of a float32 tensor), in llama.cpp's order
    tensors = [("token_embd.weight", tuple(model.tok_embeddings.weight.shape),
                lambda: _float32(model.tok_embeddings.weight))]
    if a.rope_scaling is not None:  # Llama 3.1: what each RoPE frequency is divided by, as llama.cpp's converter
        tensors.append(("rope_freqs.weight", (a.head_dim // 2,),
                        lambda: rope_factors(a.head_dim, a.rope_theta, a.rope_scaling)))
    for l, (H, K, F) in enumerate(shapes):
        weights = _layer_weights(model, l)
        if arch in GGUF_NEOX:  # rotate-half RoPE: HF's q/k rows, as the converter leaves them for Qwen
            for name, heads in (("wq", H), ("wk", K), ("wq.bias", H), ("wk.bias", K), ("q_norm", 1), ("k_norm", 1)):
                if name in weights:
                    weights[name] = lambda read=weights[name], heads=heads: meta_to_hf_rows(read(), heads)
        C, D = a.dim, a.head_dim
        shape = {"wq": (H * D, C), "wk": (K * D, C), "wv": (K * D, C), "wo": (C, H * D), "w1": (F, C),
                 "w2": (C, F), "w3": (F, C), "wq.bias": (H * D,), "wk.bias": (K * D,), "wv.bias": (K * D,),
                 "q_norm": (D,), "k_norm": (D,)}
        tensors.append((f"blk.{l}.attn_norm.weight", (C,), lambda l=l: _float32(model.layers[l].attention_norm.weight)))
        tensors += [(f"blk.{l}.{PROJECTION_GGUF[n]}.{'bias' if n.endswith('bias') else 'weight'}", shape[n],
                     weights[n]) for n in PROJECTION_GGUF if n in weights]
        tensors.append((f"blk.{l}.ffn_norm.weight", (C,), lambda l=l: _float32(model.layers[l].ffn_norm.weight)))
    tensors.append(("output_norm.weight", (a.dim,), lambda: _float32(model.norm.weight)))
    if not a.tie_embeddings:  # tied: no output.weight, and llama.cpp uses token_embd for the head
        tensors.append(("output.weight", tuple(model.output.weight.shape), lambda: _float32(model.output.weight)))

    def type_of(shape: tuple):
        if len(shape) == 1:  # norms, biases, rope_freqs
            return Q.F32
        if qtype == Q.Q8_0 and shape[-1] % 32:  # rows that do not split into Q8_0's blocks of 32 values
            return Q.F16
        return qtype

    tokenizer_fields = gguf_tokenizer_fields(tokenizer_path, a.vocab_size)  # refused before anything is written

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(out_path.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(a.max_seq_len)
        writer.add_embedding_length(a.dim)
        writer.add_block_count(a.n_layers)
        heads, kv_heads, widths = ([s[i] for s in shapes] for i in range(3))
        uniform = arch != "deci"  # 'deci' reads these three as arrays of one value per layer (get_key_or_arr)
        writer.add_head_count(heads[0] if uniform else heads)
        writer.add_head_count_kv(kv_heads[0] if uniform else kv_heads)
        writer.add_feed_forward_length(widths[0] if uniform else widths)
        writer.add_key_length(a.head_dim)  # stated: llama.cpp would derive dim / head_count, wrong once pruned
        writer.add_value_length(a.head_dim)
        writer.add_rope_dimension_count(a.head_dim)
        writer.add_rope_freq_base(a.rope_theta)
        writer.add_layer_norm_rms_eps(a.norm_eps)
        writer.add_vocab_size(a.vocab_size)
        for key, value, kind, item in tokenizer_fields:
            writer.add_key_value(key, value, kind, sub_type=item)
        for name, shape, _ in tensors:
            t = type_of(shape)
            if t in (Q.F32, Q.F16):
                dtype = np.float32 if t == Q.F32 else np.float16
                writer.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
            else:  # block types are written as raw bytes, (out, bytes per row)
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, read in tensors:  # one tensor in memory at a time
            w = read()
            assert tuple(w.shape) == shape, f"{name}: {tuple(w.shape)} != {shape}"
            writer.write_tensor_data(gguf.quants.quantize(w.numpy(), type_of(shape)))
        writer.close()
    size = sum(math.prod(shape) // gguf.GGML_QUANT_SIZES[type_of(shape)][0] * gguf.GGML_QUANT_SIZES[type_of(shape)][1]
               for _, shape, _ in tensors)  # the tensors' bytes; the metadata adds a little
    return atomic_write(out_path, write, size=size)


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _proto_field(number: int, value) -> bytes:
    """One protobuf field: bytes/str length-delimited, float as 32-bit, bool/int as varint."""
    if isinstance(value, (bytes, str)):
        value = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3 | 0) + _varint(int(value))


def sentencepiece_proto(pieces: list, scores: list, types: list, bos_id: int, eos_id: int, unk_id: int,
                        add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False) -> bytes:
    """A SentencePiece BPE ModelProto (sentencepiece_model.proto) from a GGUF 'llama' vocabulary, the inverse of
    llama.cpp's converter: pieces (bytes), scores (merge priority), token types (GGUF's numbering is
    SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), byte fallback where byte
    pieces exist, and an identity normalizer with the GGUF's add_space_prefix / remove_extra_whitespaces."""
    body = b"".join(_proto_field(1, _proto_field(1, p) + _proto_field(2, float(s)) + _proto_field(3, t))
                    for p, s, t in zip(pieces, scores, types))  # ModelProto.pieces
    trainer = (_proto_field(3, 2) + _proto_field(4, len(pieces)) + _proto_field(35, 6 in types)  # BPE, byte_fallback
               + b"".join(_proto_field(n, i) for n, i in ((40, unk_id), (41, bos_id), (42, eos_id)) if i >= 0))
    normalizer = (_proto_field(1, "identity") + _proto_field(3, add_dummy_prefix)
                  + _proto_field(4, remove_extra_whitespaces) + _proto_field(5, True))
    return body + _proto_field(2, trainer) + _proto_field(3, normalizer)


def _proto_fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: varints as int, 32/64-bit fields and
    length-delimited ones as bytes (enough to read SentencePiece's normalizer spec without protobuf)."""
    i = 0

    def varint():
        nonlocal i
        n = shift = 0
        while True:
            byte = buf[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return n
    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
            continue
        size = varint() if wire == 2 else {1: 8, 5: 4}[wire]
        yield number, buf[i:i + size]
        i += size


def sentencepiece_normalizer(proto: bytes) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a serialized SentencePiece model: ModelProto field 3
    (NormalizerSpec), its fields 3 and 4, both true unless the model says otherwise (proto2 defaults)."""
    spec = dict(_proto_fields(dict(_proto_fields(proto)).get(3, b"")))
    return bool(spec.get(3, 1)), bool(spec.get(4, 1))


# ----------------------------------------------------------------------------------------------
# tokenizers on disk: byte-level BPE vocabularies as GGUF metadata (llama.cpp) and as tokenizer.json (Hugging Face)

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's tokenizer.json
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: digits one at a time


@dataclass(frozen=True)
class BpePre:
    """How a byte-level BPE splits text before merging: what llama.cpp's tokenizer.ggml.pre names, written as
    tokenizer.json spells it (llama-vocab.cpp keeps the same regexes, adapted to its engine)."""
    split: Optional[str] = None  # a regex split first; None: byte-level's own GPT-2 regex
    digits: bool = False  # every digit its own piece, then GPT-2's regex (SmolLM2, StarCoder)
    nfc: bool = False  # NFC-normalise the text first (Qwen)
    ignore_merges: bool = False  # a word that is a token is taken whole (Llama 3; llama.cpp: ignore_merges)
    add_bos: bool = False  # llama.cpp's default when the GGUF has no tokenizer.ggml.add_bos_token


BPE_PRE = {"gpt-2": BpePre(), "smollm": BpePre(digits=True), "llama-bpe": BpePre(LLAMA3_SPLIT, ignore_merges=True,
                                                                                   add_bos=True),
           "qwen2": BpePre(QWEN2_SPLIT, nfc=True), "llama3": BpePre(LLAMA3_SPLIT, ignore_merges=True, add_bos=True),
           "starcoder": BpePre(digits=True), "refact": BpePre(digits=True), "codeshell": BpePre(digits=True)}
GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 3, 4, 5  # gguf.TokenType (SentencePiece's numbering)


def bpe_tokenizer(tokens: list, merges: list, types: list, pre: str, bos_id: int = -1, add_bos: bool = False):
    """A `tokenizers` byte-level BPE from a vocabulary as GGUF holds it: tokens by id (byte-level strings), merges
    ('a b'), token types (control tokens become special added tokens, user-defined ones added tokens: both matched
    whole in the text), the split llama.cpp uses for `pre` (BPE_PRE) and, if add_bos, BOS put first by the
    post-processor, as a tokenizer.json that adds BOS does."""
    tokenizers = import_extra("tokenizers", "tokenizers", "a byte-level BPE vocabulary")
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    if pre not in BPE_PRE:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported; known: {list(BPE_PRE)}")
    rule = BPE_PRE[pre]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)},
                                                     [tuple(m.split(" ", 1)) for m in merges],
                                                     ignore_merges=rule.ignore_merges))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rule.split is None)]  # bytes -> printable
    if rule.split is not None:
        steps.insert(0, pre_tokenizers.Split(tokenizers.Regex(rule.split), behavior="isolated"))
    if rule.digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    if rule.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([tokenizers.AddedToken(t, special=kind == GGUF_CONTROL, normalized=False)
                    for t, kind in zip(tokens, types) if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)])
    if add_bos and bos_id >= 0:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def _split_signature(tokenizer_json: dict) -> tuple:
    """What decides how a tokenizer.json splits text: normalizer, pre-tokenizer steps, ignore_merges."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return ((tokenizer_json.get("normalizer") or {}).get("type"),
            tuple((p.get("type"), (p.get("pattern") or {}).get("Regex"), p.get("individual_digits"),
                   p.get("use_regex")) for p in steps),
            bool(tokenizer_json.get("model", {}).get("ignore_merges")))


def bpe_pre_of(tokenizer_json: dict, source) -> str:
    """The tokenizer.ggml.pre (BPE_PRE) that splits as a byte-level tokenizer.json does; ValueError if none."""
    if tokenizer_json.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(
            tokenizer_json.get("pre_tokenizer")):
        raise ValueError(f"{source}: GGUF export reads a byte-level BPE tokenizer.json (Llama 3, Qwen, SmolLM2); "
                         "this one is not (export a SentencePiece tokenizer.model instead)")
    for name in BPE_PRE:
        probe = json.loads(bpe_tokenizer(["a"], [], [1], name).to_str())
        if _split_signature(probe) == _split_signature(tokenizer_json):
            return name
    raise ValueError(f"{source}: its pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}... is "
                     f"none of llama.cpp's {list(BPE_PRE)}")


def hf_tokenizer_specials(path) -> tuple[int, int, bool]:
    """(BOS id, EOS id, whether BOS is put first) of a tokenizer.json, as transformers reads them: the special
    tokens named in the tokenizer_config.json beside it (else LLaMA's or Llama 3's names where the vocabulary has
    them), and BOS first exactly when the tokenizer's own post-processor adds it (transformers 5 then encodes with
    it, whatever add_bos_token says). -1 for a token the vocabulary lacks."""
    path = Path(path)
    tok = import_extra("tokenizers", "tokenizers", f"reading {path}").Tokenizer.from_file(str(path))
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        names = [config.get("bos_token"), config.get("eos_token")]
        names = [n["content"] if isinstance(n, dict) else n for n in names]  # AddedToken or str
    else:
        known = [("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>")]
        names = next(([b, e] for b, e in known if tok.token_to_id(b) is not None), [None, None])
    bos, eos = (-1 if n is None or tok.token_to_id(n) is None else tok.token_to_id(n) for n in names)
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    return bos, eos, bos >= 0 and full[:1] == [bos] and plain[:1] != [bos]


def tokenizer_json_gguf_fields(path: Path, vocab_size: int) -> list:
    """GGUF tokenizer metadata for a byte-level BPE tokenizer.json, as llama.cpp's converter writes it (model
    'gpt2', its pre, tokens by id padded with unused [PAD<i>] up to the embedding's rows, 'a b' merges, control
    and user-defined types, BOS/EOS ids, add_bos_token as the tokenizer adds BOS)."""
    gguf = import_extra("gguf", "gguf", "GGUF export")
    spec = _read_json(path)
    pre = bpe_pre_of(spec, path)
    tok = import_extra("tokenizers", "tokenizers", f"reading {path}").Tokenizer.from_file(str(path))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"{path}: token id {max(by_id)}, but the model's embedding has only {vocab_size} rows")
    added = {a["id"]: a["special"] for a in spec.get("added_tokens", [])}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [GGUF_UNUSED if i not in by_id else (GGUF_CONTROL if added[i] else GGUF_USER_DEFINED) if i in added
             else 1 for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    bos, eos, add_bos = hf_tokenizer_specials(path)
    K, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
    fields = [(K.MODEL, "gpt2", V.STRING, None), (K.PRE, pre, V.STRING, None),
              (K.LIST, [t.encode("utf-8") for t in tokens], V.ARRAY, V.STRING),
              (K.TOKEN_TYPE, types, V.ARRAY, V.INT32), (K.MERGES, [m.encode("utf-8") for m in merges], V.ARRAY, V.STRING)]
    fields += [(key, i, V.UINT32, None) for key, i in ((K.BOS_ID, bos), (K.EOS_ID, eos)) if i >= 0]
    return fields + [(K.ADD_BOS, add_bos, V.BOOL, None)]


def gguf_tokenizer_fields(tokenizer_path, vocab_size: int) -> list:
    """The tokenizer.* metadata export_gguf writes, as [(key, value, GGUF value type, array item type or None)]:
    copied from a GGUF file as it was (strings byte for byte), or built the way llama.cpp's converter does from a
    SentencePiece .model (pieces, scores, token types, BOS/EOS/UNK/PAD ids; unused [PAD<i>] pieces up to a larger
    model vocab) or a byte-level BPE tokenizer.json (tokenizer_json_gguf_fields). Without a tokenizer the file says 'none' (llama.cpp then has no vocabulary). Cheap: run.py can call it
    to refuse a tokenizer before any training."""
    gguf = import_extra("gguf", "gguf", "GGUF export")
    V = gguf.GGUFValueType
    if tokenizer_path is None:
        return [("tokenizer.ggml.model", "none", V.STRING, None)]
    path = Path(tokenizer_path)
    if path.suffix == ".gguf":
        _, reader = _open_gguf(path)
        fields = []
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            kind, item = field.types[0], (field.types[-1] if field.types[0] == V.ARRAY else None)
            if item == V.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            elif kind == V.STRING:
                value = bytes(field.parts[field.data[0]])
            else:
                value = field.contents()
            fields.append((key, value, kind, item))
        return fields
    if path.suffix == ".json":
        return tokenizer_json_gguf_fields(path, vocab_size)
    if path.suffix != ".model":
        raise ValueError(f"{path}: GGUF export takes its tokenizer from a SentencePiece .model, a byte-level "
                         f"tokenizer.json or a .gguf file, found {path.suffix!r}")
    sentencepiece = import_extra("sentencepiece", None, f"reading {path}")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: GGUF export needs a SentencePiece model here ({e})") from None
    n = sp.vocab_size()
    if n > vocab_size:
        raise ValueError(f"{path}: {n} tokens, but the model's embedding has only {vocab_size} rows")
    TT = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else
                     TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL)
    for i in range(n, vocab_size):  # a padded embedding: rows no text maps to
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TT.UNUSED)
    K = gguf.Keys.Tokenizer
    fields = [(K.MODEL, "llama", V.STRING, None), (K.PRE, "default", V.STRING, None),
              (K.LIST, tokens, V.ARRAY, V.STRING), (K.SCORES, scores, V.ARRAY, V.FLOAT32),
              (K.TOKEN_TYPE, [int(t) for t in types], V.ARRAY, V.INT32)]
    for key, token_id in ((K.BOS_ID, sp.bos_id()), (K.EOS_ID, sp.eos_id()), (K.UNK_ID, sp.unk_id()),
                          (K.PAD_ID, sp.pad_id())):
        if token_id >= 0:  # sentencepiece says -1 for none
            fields.append((key, token_id, V.UINT32, None))
    add_prefix, remove_spaces = sentencepiece_normalizer(sp.serialized_model_proto())  # as llama.cpp's converter
    return fields + [(K.ADD_BOS, True, V.BOOL, None), (K.ADD_EOS, False, V.BOOL, None),
                     (K.ADD_PREFIX, add_prefix, V.BOOL, None), (K.REMOVE_EXTRA_WS, remove_spaces, V.BOOL, None)]


def save_tokenizer(tokenizer_path, folder) -> Path:
    """Put a model's tokenizer into `folder` under a name data.find_tokenizer looks for, keeping the suffix that says
    how to read it: a .model copied (tokenizer.model or tok*.model), a tokenizer.json with its tokenizer_config.json,
    a GGUF's vocabulary as tokenizer.gguf, a GGUF file of its tokenizer metadata alone (megabytes, not the weights).
    Returns the tokenizer's path in `folder`."""
    src, folder = Path(tokenizer_path), Path(folder)
    name = src.name
    if not (name in ("tokenizer.model", "tokenizer.json") or (name.startswith("tok") and name.endswith(".model"))):
        name = {".json": "tokenizer.json", ".gguf": "tokenizer.gguf"}.get(src.suffix, "tokenizer.model")
    if src.suffix != ".gguf":
        shutil.copyfile(src, folder / name)
        if name == "tokenizer.json" and (src.parent / "tokenizer_config.json").is_file():  # BOS/EOS
            shutil.copyfile(src.parent / "tokenizer_config.json", folder / "tokenizer_config.json")
        return folder / name
    gguf = import_extra("gguf", "gguf", f"saving the vocabulary of {src}")
    writer = gguf.GGUFWriter(str(folder / name), "llama")  # every GGUF names an architecture; no tensors follow
    for key, value, kind, item in gguf_tokenizer_fields(src, 0):
        writer.add_key_value(key, value, kind, sub_type=item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / name


# ----------------------------------------------------------------------------------------------
# export: Hugging Face (transformers' LlamaForCausalLM)


def meta_to_hf_rows(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half rows per head (transformers' convert_llama_weights_to_hf
    permute; the inverse of hf_to_meta_rows). (out, ...) -> (out, ...): a weight, a bias, or a q/k norm."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


HF_PROJECTIONS = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
                  "wo": "self_attn.o_proj.weight", "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight",
                  "w3": "mlp.up_proj.weight", "wq.bias": "self_attn.q_proj.bias", "wk.bias": "self_attn.k_proj.bias",
                  "wv.bias": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
                  "k_norm": "self_attn.k_norm.weight"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}  # model_type -> class


def check_hf_shapes(shapes: list, args: llama.ModelArgs, target: str) -> str:
    """The model_type export_hf writes for these per-layer (query heads, kv heads, MLP width) shapes, or a one-line
    ValueError: Hugging Face's classes hold one shape for every layer. The family's own class, except for a Llama
    whose head count does not divide the width: transformers' LlamaConfig (5.x) refuses that, while MistralConfig
    (the same network when sliding_window is null) takes an explicit head_dim, and vLLM runs MistralForCausalLM with
    its LlamaForCausalLM code, head_dim from the config. run.py calls it with the shapes pruning will leave."""
    for l, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(f"{target}: layer {l} has {shape[0]} query heads, {shape[1]} kv heads and {shape[2]} MLP "
                             f"channels where layer 0 has {shapes[0][0]}, {shapes[0][1]} and {shapes[0][2]}; Hugging "
                             f"Face's {HF_CLASSES[args.family]} holds one shape for every layer: export GGUF instead "
                             "(--gguf)")
    return "mistral" if args.family == "llama" and args.dim % shapes[0][0] else args.family


def hf_config(args: llama.ModelArgs, model_type: str, shape: tuple, dtype: torch.dtype, special: dict) -> dict:
    """config.json of a `model_type` (HF_CLASSES) model of one (query heads, kv heads, MLP width) shape. RoPE and
    the window in transformers 4's spelling, which transformers 5 and vLLM read too; no sliding window anywhere."""
    H, K, F = shape
    rope_scaling = None if args.rope_scaling is None else {"rope_type": "llama3", **args.rope_scaling}
    config = {"architectures": [HF_CLASSES[model_type]], "model_type": model_type, "hidden_size": args.dim,
              "intermediate_size": F, "num_hidden_layers": args.n_layers, "num_attention_heads": H,
              "num_key_value_heads": K, "head_dim": args.head_dim, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "rope_scaling": rope_scaling, "max_position_embeddings": args.max_seq_len,
              "vocab_size": args.vocab_size, "tie_word_embeddings": args.tie_embeddings,
              "torch_dtype": str(dtype).removeprefix("torch."), **special}
    if model_type in ("llama", "qwen3"):
        config.update(attention_bias=False)  # Llama: on all four projections; Qwen3: also o_proj
    if model_type == "llama":
        config.update(mlp_bias=False)
    if model_type != "llama":
        config.update(sliding_window=None)  # MistralConfig's default is 4096
    if model_type.startswith("qwen"):
        config.update(use_sliding_window=False, max_window_layers=args.n_layers)
    return config


def export_hf(model: llama.Transformer, out_dir, tokenizer_path=None) -> Path:
    """Write the model as a Hugging Face folder (atomically: a temporary folder, then a rename) of its family's class
    (check_hf_shapes: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM): config.json,
    model.safetensors (q/k rows, biases and norms permuted to HF's rotate-half layout, LoRA merged, the model's
    float dtype), generation_config.json, and the tokenizer (hf_tokenizer_files). One shape for every layer; other
    models are refused (GGUF holds them: export_gguf)."""
    out_dir = Path(out_dir)
    _check_exportable(model, str(out_dir))
    shapes = layer_shapes(model)
    model_type = check_hf_shapes(shapes, model.args, str(out_dir))
    tokenizer_files, special = hf_tokenizer_files(tokenizer_path)
    from safetensors.torch import save_file
    a = model.args
    H, K, F = shapes[0]
    dtype = model.tok_embeddings.weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not a.tie_embeddings:
        state["lm_head.weight"] = model.output.weight
    for l in range(a.n_layers):
        weights = {n: read() for n, read in _layer_weights(model, l, dtype).items()}
        for name, heads in (("wq", H), ("wk", K), ("wq.bias", H), ("wk.bias", K), ("q_norm", 1), ("k_norm", 1)):
            if name in weights:
                weights[name] = meta_to_hf_rows(weights[name], heads)
        state.update({f"model.layers.{l}.{HF_PROJECTIONS[n]}": w for n, w in weights.items()})
        state[f"model.layers.{l}.input_layernorm.weight"] = model.layers[l].attention_norm.weight
        state[f"model.layers.{l}.post_attention_layernorm.weight"] = model.layers[l].ffn_norm.weight
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    config = hf_config(a, model_type, shapes[0], dtype, special)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
        for name, content in tokenizer_files.items():
            (tmp / name).write_bytes(content)
    size = sum(t.nbytes for t in state.values()) + sum(map(len, tokenizer_files.values()))
    return atomic_write_folder(out_dir, write, size=size)


def hf_tokenizer_files(tokenizer_path) -> tuple:
    """({file name in the export: its bytes}, {bos_token_id, eos_token_id} where known) for a SentencePiece .model
    (with a tokenizer_config.json written for it), a tokenizer.json (with the tokenizer_config.json beside it), or a
    GGUF file's vocabulary: a byte-level one as tokenizer.json (bpe_tokenizer, BOS first where the GGUF adds it), a
    SentencePiece one as the tokenizer.model it came from (sentencepiece_proto). Cheap: run.py can call it to
    refuse a tokenizer before any training."""
    if tokenizer_path is None:
        return {}, {}
    path = Path(tokenizer_path)
    if path.suffix == ".json":
        files = {"tokenizer.json": path.read_bytes()}
        if (path.parent / "tokenizer_config.json").is_file():
            files["tokenizer_config.json"] = (path.parent / "tokenizer_config.json").read_bytes()
        bos, eos, _ = hf_tokenizer_specials(path)
        return files, {f"{k}_token_id": i for k, i in (("bos", bos), ("eos", eos)) if i >= 0}
    if path.suffix == ".gguf":
        return _gguf_hf_tokenizer_files(path)
    if path.suffix != ".model":
        raise ValueError(f"{path}: Hugging Face export takes a SentencePiece .model, a tokenizer.json or a GGUF "
                         f"file's vocabulary, found {path.suffix!r}")
    return _sentencepiece_hf_files(path.read_bytes(), path)


def _sentencepiece_hf_files(proto: bytes, source) -> tuple:
    """tokenizer.model and a LlamaTokenizer tokenizer_config.json for a serialized SentencePiece model."""
    sentencepiece = import_extra("sentencepiece", None, f"reading {source}")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise ValueError(f"{source}: Hugging Face export needs a SentencePiece model here ({e})") from None
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    special = {}
    for key, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if token_id >= 0:
            config[f"{key}_token"] = sp.id_to_piece(token_id)
            if key != "unk":
                special[f"{key}_token_id"] = token_id
    files = {"tokenizer.model": proto, "tokenizer_config.json": json.dumps(config, indent=2).encode()}
    return files, special


def _gguf_hf_tokenizer_files(path: Path) -> tuple:
    """hf_tokenizer_files of a GGUF file's vocabulary (gguf_tokenizer)."""
    meta = gguf_tokenizer(path)
    model = meta.get("model")
    if model == "llama":
        tokens = [t.encode("utf-8") for t in meta["tokens"]]
        return _sentencepiece_hf_files(sentencepiece_proto(
            tokens, meta["scores"], meta["token_type"], meta.get("bos_token_id", -1), meta.get("eos_token_id", -1),
            meta.get("unknown_token_id", -1), meta.get("add_space_prefix", True),
            meta.get("remove_extra_whitespaces", False)), path)
    if model != "gpt2":
        raise ValueError(f"{path}: Hugging Face export reads a GGUF vocabulary of tokenizer.ggml.model 'gpt2' or "
                         f"'llama', found {model!r}")
    pre = meta.get("pre", "gpt-2")
    bos, eos = meta.get("bos_token_id", -1), meta.get("eos_token_id", -1)
    add_bos = bool(meta.get("add_bos_token", BPE_PRE[pre].add_bos if pre in BPE_PRE else False))
    tok = bpe_tokenizer(meta["tokens"], meta["merges"], meta.get("token_type", []), pre, bos, add_bos)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
              "bos_token": meta["tokens"][bos] if bos >= 0 else None,
              "eos_token": meta["tokens"][eos] if eos >= 0 else None}
    special = {f"{k}_token_id": i for k, i in (("bos", bos), ("eos", eos)) if i >= 0}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}, \
        special
