"""Tests for llama.py: logits against transformers' LlamaForCausalLM through every loader (Hugging Face
folder, Meta shards), the real files in shared/data, our own save/load round trip, LoRA, activation
checkpointing and the loaders' error messages. Tiny models on CPU, float32, seeded, no network. Generation is
tested in test_generate.py."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import llama
from conftest import hf_logits, hf_model, hf_to_meta_rows_by_index, our_logits, random_model, tiny_model, tokens
from llama import ModelArgs, Transformer

# ----------------------------------------------------------------------------------------------
# helpers


# --- Hugging Face -> Meta, written independently of llama.py's tables

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
# logits equal transformers' LlamaForCausalLM


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_meta_two_shards_match_transformers(tmp_path, rope_theta):
    # dim 64, multiple_of 32: int(2 * 256 / 3) = 170 -> 192, the MLP width Meta derives
    hf = hf_model(seed=2, intermediate_size=192, rope_theta=rope_theta)
    state = hf_state_to_meta(hf, n_heads=4, n_kv_heads=2)
    write_meta_folder(tmp_path, state, 2, meta_params(64, 2, 4, 2, multiple_of=32, rope_theta=rope_theta),
                      rope_freqs=True)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    ours = llama.load_checkpoint(tmp_path, dtype=torch.float32)
    assert (ours.args.hidden_dim, ours.args.vocab_size) == (192, 128)
    ids = tokens(128, T=20)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_ffn_dim_multiplier_matches_transformers(tmp_path):
    # int(0.5 * 170) = 85 -> 96 with multiple_of 32: the Llama-2-70B / Llama-3 path of Meta's derivation
    hf = hf_model(seed=4, intermediate_size=96)
    write_meta_folder(tmp_path, hf_state_to_meta(hf, 4, 2), 2,
                      meta_params(64, 2, 4, 2, multiple_of=32, ffn_dim_multiplier=0.5))
    ours = llama.load_checkpoint(tmp_path, dtype=torch.float32)
    ids = tokens(128, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_three_shards_match_transformers(tmp_path):
    # every split size divides by 3: dim 96, 6 heads / 3 kv heads of 16, vocab 126,
    # MLP int(2 * 384 / 3) = 256 -> 288 with multiple_of 48
    hf = hf_model(seed=5, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=288,
                  vocab_size=126)
    write_meta_folder(tmp_path, hf_state_to_meta(hf, 6, 3), 3, meta_params(96, 2, 6, 3, multiple_of=48))
    ours = llama.load_checkpoint(tmp_path, dtype=torch.float32)
    assert (ours.args.dim, ours.args.hidden_dim, ours.args.vocab_size) == (96, 288, 126)
    ids = tokens(126, T=16)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_meta_shard_dim_rule_and_fake_shards_concatenate_back(tmp_path):
    model = tiny_model(seed=6, hidden_dim=192, multiple_of=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in state:
        assert llama.meta_shard_dim(name) == expected_shard_dim(name), name
    write_meta_folder(tmp_path, state, 2, meta_params(64, 2, 4, 2, multiple_of=32))
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # really split, on the right dim
    assert shard["tok_embeddings.weight"].shape == (128, 32)
    assert shard["output.weight"].shape == (64, 64)
    loaded = llama.load_checkpoint(tmp_path, dtype=torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name


# ----------------------------------------------------------------------------------------------
# RoPE in real arithmetic equals Meta's complex form


def complex_rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's precompute_freqs_cis + apply_rotary_emb (meta-llama/llama model.py): pairs (x[2j], x[2j+1]) as complex
    numbers times e^(i * position * theta^(-2j/D)). x (B, T, H, D)."""
    D = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2)[: D // 2].float() / D))  # (D/2,)
    freqs_cis = torch.polar(torch.ones(len(positions), D // 2), torch.outer(positions.float(), freqs))  # (T, D/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, D/2)
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(3).type_as(x)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_equals_the_complex_form(theta, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 16, generator=g).to(dtype)  # (B, T, H, D)
    positions = torch.arange(37) + 1000  # far positions: large angles, where pairing or sign errors show most
    cos, sin = llama.rope_cos_sin(positions, 16, theta)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (37, 8)
    got, expected = llama.apply_rope(x, cos, sin), complex_rope_reference(x, positions, theta)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # measured 2.4e-7: float32 rounding
    else:  # both round the same float32 result to bf16: at most one bf16 step apart
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert (got.float() - x.float()).abs().max() > 0.5  # it does rotate


def test_compiled_block_has_no_complex_tensors():
    """Inductor falls back to eager (and warns 'does not support code generation for complex operators') for any
    complex tensor in a graph: a block's traced graph holds none. A graph-inspecting backend, no code generation."""
    def complex_values(fn, *inputs) -> list:
        found = []
        def backend(gm, example_inputs):
            for node in gm.graph.nodes:
                v = node.meta.get("example_value")
                if isinstance(v, torch.Tensor) and v.is_complex():
                    found.append(node.name)
            return gm.forward
        torch._dynamo.reset()
        torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
        torch._dynamo.reset()
        return found

    block = tiny_model().layers[0]
    x = torch.randn(1, 6, 64)
    positions = torch.arange(6)
    assert complex_values(lambda x: complex_rope_reference(x, positions, 1e4), x.view(1, 6, 4, 16))  # control
    cos, sin = llama.rope_cos_sin(positions, 16, 1e4)
    with torch.no_grad():
        assert complex_values(block, x, cos, sin) == []


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
    out = llama.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((out / "params.json").read_text())
    assert meta["format"] == "loraprune" and meta["kind"] == "dense"
    loaded = llama.load_checkpoint(out, dtype=dtype).eval()
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
    llama.save_checkpoint(first, tmp_path / "ckpt")
    llama.save_checkpoint(second, tmp_path / "ckpt")  # overwrite an existing folder
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or .old folders left behind
    assert_same_state(second, llama.load_checkpoint(tmp_path / "ckpt", dtype=torch.float32))

    write = llama.write_safetensors

    def disk_full_after_three_tensors(path, specs, read):
        count = []
        def read_or_fail(name):
            count.append(name)
            if len(count) > 3:
                raise OSError("disk full")
            return read(name)
        write(path, specs, read_or_fail)

    monkeypatch.setattr(llama, "write_safetensors", disk_full_after_three_tensors)
    with pytest.raises(OSError, match="disk full"):
        llama.save_checkpoint(first, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the failed write left nothing behind...
    assert_same_state(second, llama.load_checkpoint(tmp_path / "ckpt", dtype=torch.float32))  # ...and kept the old


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = llama.save_checkpoint(tiny_model(), tmp_path / "ckpt")
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
    llama.write_safetensors(tmp_path / "x.safetensors", {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
                            tensors.__getitem__)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_own_checkpoint_keeps_its_dtype_unless_asked(tmp_path, dtype):
    model = tiny_model(seed=7).to(dtype)
    out = llama.save_checkpoint(model, tmp_path / "ckpt")
    loaded = llama.load_checkpoint(out)  # dtype=None: as saved
    assert_same_state(model, loaded)
    assert {t.dtype for t in loaded.state_dict().values()} == {dtype}
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert {t.dtype for t in llama.load_checkpoint(out, dtype=other).state_dict().values()} == {other}


def test_other_formats_default_to_bfloat16(tmp_path):
    folder = meta_folder(tmp_path)  # float32 shards
    assert torch.load(folder / "consolidated.00.pth", weights_only=True)["norm.weight"].dtype == torch.float32
    assert {t.dtype for t in llama.load_checkpoint(folder).state_dict().values()} == {torch.bfloat16}


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
    llama.save_checkpoint(model, tmp_path / "ckpt")
    loaded = llama.load_checkpoint(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert all(m.r == 0 and m.lora_A is None for m in loaded.modules() if isinstance(m, llama.LoRALinear))
    torch.testing.assert_close(loaded.layers[0].attention.wq.weight.double(), by_hand, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(loaded.layers[0].attention.wq.weight, wq.weight)  # B mattered
    torch.testing.assert_close(our_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# the run's peak is the training peak: slicing in place and streamed saving


def is_meta(module: torch.nn.Module) -> bool:
    return all(t.is_meta for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("in_place", [False, True])
def test_slice_in_place_frees_each_old_block_before_slicing_the_next(monkeypatch, in_place):
    import loraprune
    model = tiny_model(seed=30, n_layers=3, layer_q_per_kv=[[2, 1], [1, 2], [2, 2]])
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)
    randomize_lora_B_(model, 6)
    masks = [(torch.tensor([True, False, True]), torch.arange(96) % 3 > 0),
             (torch.tensor([False, True, True]), torch.arange(96) < 40),
             (torch.tensor([True, True, True, False]), torch.ones(96, dtype=torch.bool))]
    loraprune.apply_masks(model, masks)
    ids = tokens(128)
    masked = our_logits(model, ids)
    old_layers = list(model.layers)
    seen = []  # per merged projection: which old blocks are still alive
    merged_weight = llama.LoRALinear.merged_weight

    def recording(self, *args, **kwargs):
        seen.append((next(l for l, layer in enumerate(old_layers) if self in layer.modules()),
                     [not is_meta(layer) for layer in old_layers]))
        return merged_weight(self, *args, **kwargs)

    monkeypatch.setattr(llama.LoRALinear, "merged_weight", recording)
    sliced = loraprune.slice_model(model, masks, in_place=in_place)
    assert len(seen) == 7 * 3
    for l, alive in seen:
        assert alive == [not in_place or i >= l for i in range(3)], (l, alive)  # in place: blocks < l are freed
    assert all(is_meta(layer) for layer in old_layers) == in_place
    assert is_meta(model) == in_place
    assert not is_meta(sliced)
    torch.testing.assert_close(our_logits(sliced, ids), masked, atol=1e-5, rtol=1e-5)
    assert sliced.args.layer_q_per_kv == [[1, 1], [2], [2, 1]]


def test_save_holds_one_merged_tensor_at_a_time(tmp_path, monkeypatch):
    """Every merged LoRA weight is made when the writer asks for it and dropped before the next one is made."""
    import weakref
    model = tiny_model(seed=31)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)
    randomize_lora_B_(model, 7)
    expected = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_linears(model).items():
        expected[name + ".weight"] = m.merged_weight()
    write, made = llama.write_safetensors, []

    def watching(path, specs, read):
        def read_and_watch(name):
            assert all(ref() is None for ref in made), "an earlier merged tensor is still alive"
            t = read(name)
            if name.endswith(".weight") and name.rsplit(".", 1)[0] in lora_linears(model):
                made.append(weakref.ref(t.untyped_storage()))  # dies with the memory, not with this view
            return t
        write(path, specs, read_and_watch)

    monkeypatch.setattr(llama, "write_safetensors", watching)
    out = llama.save_checkpoint(model, tmp_path / "ckpt")
    assert len(made) == 7 * 2
    from safetensors.torch import load_file
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() == expected.keys()
    for k, t in expected.items():
        assert torch.equal(stored[k], t), k


# ----------------------------------------------------------------------------------------------
# LoRA


def lora_linears(model: Transformer) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, llama.LoRALinear)}


def randomize_lora_B_(model: Transformer, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_linears(model).values():
            if m.r:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def test_fresh_lora_equals_base_model_exactly():
    model = tiny_model(seed=11)
    ids = tokens(128)
    base = our_logits(model, ids)
    llama.add_lora(model, r=4, alpha=16.0, dropout=0.1)
    model.train()  # dropout active: B = 0 must still contribute exactly nothing
    assert all(m.r == 4 and torch.count_nonzero(m.lora_B) == 0 for m in lora_linears(model).values())
    assert torch.equal(our_logits(model, ids), base)


def test_adapters_off_gives_exactly_the_base_output():
    model = tiny_model(seed=11)
    ids = tokens(128)
    base = our_logits(model, ids)
    llama.add_lora(model, r=4, alpha=16.0, dropout=0.1)
    randomize_lora_B_(model, 5)
    model.train()  # dropout would draw if the branch ran
    assert not torch.allclose(our_logits(model, ids), base)  # the adapters matter when on
    for m in lora_linears(model).values():
        m.adapters_on = False
    assert torch.equal(our_logits(model, ids), base)
    for m in lora_linears(model).values():
        m.adapters_on = True
    assert not torch.allclose(our_logits(model, ids), base)


def test_merged_weight_and_merge_match_hand_computation():
    model = tiny_model(seed=12)
    llama.add_lora(model, r=4, alpha=6.0, dropout=0.0)
    randomize_lora_B_(model, 3)
    ids = tokens(128)
    unmerged = our_logits(model, ids)
    for name, m in lora_linears(model).items():
        by_hand = m.weight.double() + (6.0 / 4) * (m.lora_B.double() @ m.lora_A.double())
        torch.testing.assert_close(m.merged_weight().double(), by_hand, atol=1e-6, rtol=1e-6, msg=name)
    for m in lora_linears(model).values():
        m.merge()
        assert m.r == 0 and m.lora_A is None and not m.weight.requires_grad
    torch.testing.assert_close(our_logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_add_lora_targets_and_trainable_parameters():
    model = tiny_model(seed=13)
    params = llama.add_lora(model, r=2, targets=("wq", "wv"))
    with_lora = {n for n, m in lora_linears(model).items() if m.r}
    assert with_lora == {f"layers.{i}.attention.{p}" for i in range(2) for p in ("wq", "wv")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in with_lora for ab in ("lora_A", "lora_B")}
    assert len(params) == 8 and all(p.requires_grad for p in params)

    full = tiny_model(seed=13)
    llama.add_lora(full, r=2)
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_" in n for n in trainable)  # base weights frozen

    with pytest.raises(ValueError, match="wqkv"):
        llama.add_lora(tiny_model(), targets=("wq", "wqkv"))


def test_lora_dropout_applies_only_to_the_adapter_input():
    torch.manual_seed(0)
    lin = llama.LoRALinear(16, 8)
    torch.nn.init.normal_(lin.weight)
    lin.add_lora(r=4, alpha=4.0, dropout=0.5, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 16)
    lin.train()
    torch.manual_seed(123)
    y = lin(x)
    torch.manual_seed(123)
    x_dropped = F.dropout(x, 0.5, training=True)  # the same draw the module makes
    assert not torch.equal(x_dropped, x)
    expected = x @ lin.weight.T + (x_dropped @ lin.lora_A.T @ lin.lora_B.T) * 1.0
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    lin.eval()  # no dropout, and no weight rewriting either
    w_before = lin.weight.clone()
    torch.testing.assert_close(lin(x), x @ lin.weight.T + x @ lin.lora_A.T @ lin.lora_B.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(lin.weight, w_before)


# ----------------------------------------------------------------------------------------------
# Meta's MLP width


@pytest.mark.parametrize("dim, multiple_of, mult, expected", [
    (4096, 256, None, 11008),  # LLaMA-7B / Llama-2-7B
    (5120, 256, None, 13824),  # LLaMA-13B
    (8192, 4096, 1.3, 28672),  # Llama-2-70B
    (4096, 1024, 1.3, 14336),  # Llama-3-8B
    (64, 32, None, 192),  # int(2 * 256 / 3) = 170, rounded up
])
def test_meta_hidden_dim(dim, multiple_of, mult, expected):
    assert llama.meta_hidden_dim(dim, multiple_of, mult) == expected
    assert ModelArgs(dim=dim, n_heads=32, multiple_of=multiple_of, ffn_dim_multiplier=mult).hidden_dim == expected


# ----------------------------------------------------------------------------------------------
# activation checkpointing


def test_activation_checkpointing_gives_same_loss_and_lora_grads(monkeypatch):
    model = tiny_model(seed=14)
    params = llama.add_lora(model, r=4, alpha=8.0, dropout=0.1)
    randomize_lora_B_(model, 4)
    model.train()
    ids = tokens(128, T=16)

    def loss_and_grads():
        for p in params:
            p.grad = None
        torch.manual_seed(0)  # the same dropout draws in both runs
        logits = model(ids)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    loss_plain, grads_plain = loss_and_grads()
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    model.checkpoint_activations = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == model.args.n_layers  # the checkpointed path really ran
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, atol=1e-6, rtol=1e-5)


def test_compiled_blocks_match_eager_and_checkpointing_drops_activations():
    """llama.compile_blocks: the same loss and LoRA gradients as eager, with and without activation checkpointing;
    checkpointed, a compiled block saves no MLP-wide (B, T, F) activation for backward (a checkpoint wrapped around
    a compiled block from outside once saved everything)."""
    model = tiny_model(seed=16)
    params = llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)  # no dropout: compiled RNG differs from eager
    randomize_lora_B_(model, 4)
    model.train()
    ids = tokens(128, T=16)
    F_dim = model.args.hidden_dim

    def run():
        wide = []
        def pack(t):
            if t.dim() == 3 and t.shape[-1] == F_dim:
                wide.append(tuple(t.shape))
            return t
        for p in params:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params], wide

    loss_eager, grads_eager, _ = run()
    llama.compile_blocks(model)
    for ckpt in (False, True):
        model.checkpoint_activations = ckpt
        run()  # compiles
        loss, grads, wide = run()
        torch.testing.assert_close(loss, loss_eager, atol=1e-5, rtol=1e-5)
        for g, g_eager in zip(grads, grads_eager):
            assert g_eager.abs().sum() > 0
            torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-4)
        assert bool(wide) != ckpt, f"ckpt={ckpt}: MLP-wide tensors saved: {wide}"
    torch._dynamo.reset()


def test_compile_blocks_compiles_each_block_shape_once_and_not_again_when_masks_change():
    """Dynamo's own counters: a sliced model with three layers of two shapes compiles two graphs, and a model whose
    masks change value (kept as tensors) compiles nothing more. The 'eager' backend: guards and recompiles are
    Dynamo's, the same with Inductor, without its code generation."""
    import loraprune
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_model(seed=40, n_layers=3, layer_q_per_kv=[[2, 1], [1, 2], [2, 1]], layer_hidden_dims=[40, 96, 40])
    assert llama.compile_blocks(model, backend="eager") == 2
    ids = tokens(128)
    counters.clear()
    with torch.no_grad():
        out = model(ids)
        model(ids)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch.testing.assert_close(out, our_logits(tiny_model(seed=40, n_layers=3, layer_q_per_kv=[[2, 1], [1, 2], [2, 1]],
                                                          layer_hidden_dims=[40, 96, 40]), ids))

    torch._dynamo.reset()
    model = tiny_model(seed=41)
    llama.add_lora(model, r=2, alpha=4.0, dropout=0.0)
    model.train()
    masks = loraprune.full_masks(model.args)
    loraprune.apply_masks(model, masks, clear_kept=False)
    llama.compile_blocks(model, backend="eager")
    counters.clear()
    model(ids).sum().backward()
    first = counters["stats"]["unique_graphs"]
    assert first == 2, dict(counters["stats"])  # one shape, but block 0's input (the embedding) needs no grad
    for step in range(3):  # the pruner switching heads and channels off, one by one
        masks[step % 2][0][0] = False
        masks[1][1][step * 7] = False
        loraprune.apply_masks(model, masks, clear_kept=False)
        model(ids).sum().backward()
    assert counters["stats"]["unique_graphs"] == first, dict(counters["stats"])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# bad inputs


def meta_folder(tmp_path, **param_overrides):
    """A valid two-shard Meta folder of the tiny model (MLP 192 = Meta's width for dim 64, multiple_of 32)."""
    model = tiny_model(seed=15, hidden_dim=192)
    params = {**meta_params(64, 2, 4, 2, multiple_of=32), **param_overrides}
    return write_meta_folder(tmp_path / "meta", dict(model.state_dict()), 2, params)


def test_meta_folder_fixture_loads(tmp_path):
    llama.load_checkpoint(meta_folder(tmp_path), dtype=torch.float32)  # so the failures below are the edits


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        llama.load_checkpoint(tmp_path / "nowhere")


def test_params_json_unknown_key(tmp_path):
    with pytest.raises(ValueError, match="use_scaled_rope"):
        llama.load_checkpoint(meta_folder(tmp_path, use_scaled_rope=True))
    out = llama.save_checkpoint(tiny_model(), tmp_path / "own")
    meta = json.loads((out / "params.json").read_text())
    meta["args"]["n_experts"] = 8
    (out / "params.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_experts"):
        llama.load_checkpoint(out)


def test_shard_with_wrong_shaped_tensor(tmp_path):
    folder = meta_folder(tmp_path)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wo.weight"] = shard["layers.1.attention.wo.weight"][:, :24].clone()  # 32 -> 24 columns
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="layers.1.attention.wo.weight") as e:
        llama.load_checkpoint(folder)
    assert "(64, 56)" in str(e.value) and "(64, 64)" in str(e.value)


def test_meta_hidden_dim_mismatch(tmp_path):
    with pytest.raises(ValueError, match="MLP width") as e:
        llama.load_checkpoint(meta_folder(tmp_path, multiple_of=256))  # derives 256, the tensors have 192
    assert "256" in str(e.value) and "192" in str(e.value)


def test_meta_shards_with_different_names(tmp_path):
    folder = meta_folder(tmp_path)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        llama.load_checkpoint(folder)


def test_corrupt_pth(tmp_path):
    folder = meta_folder(tmp_path)
    (folder / "consolidated.00.pth").write_bytes(b"not a zip archive, not a pickle" * 10)
    with pytest.raises(ValueError, match="consolidated.00.pth"):
        llama.load_checkpoint(folder)


def test_sequence_longer_than_max_seq_len():
    model = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="9 tokens"):
        model(tokens(128, T=9))


# ----------------------------------------------------------------------------------------------
# ModelArgs and params.json: uneven query heads per kv head (--head-unit query)

GQA_UNIFORM = ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64)


def test_q_per_kv_is_validated_and_uniform_is_none():
    base = dict(dim=32, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=10, hidden_dim=16, layer_kv_heads=[3, 2])
    args = llama.ModelArgs(**base, layer_q_per_kv=[[2, 1, 2], (1, 2)])
    assert args.layer_q_per_kv == [[2, 1, 2], [1, 2]] and args.layer_n_heads == [5, 3]
    assert args.q_per_kv(1) == [1, 2]
    assert llama.ModelArgs(**base, layer_q_per_kv=[[2, 2, 2], [2, 2]]).layer_q_per_kv is None  # uniform = None
    assert llama.ModelArgs(**base).q_per_kv(1) == [2, 2]
    bad = {"one list per layer": [[2, 2, 2]], "kv heads (layer_kv_heads[1])": [[2, 2, 2], [2]],
           "integer in [1, n_rep=2], found [0]": [[2, 2, 2], [0, 2]],
           "integer in [1, n_rep=2], found [3]": [[2, 2, 2], [3, 1]],
           "found [1.5]": [[2, 2, 2], [1.5, 1]]}
    for words, value in bad.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            llama.ModelArgs(**base, layer_q_per_kv=value)


def test_old_params_json_without_the_field_loads(tmp_path):
    model = random_model(GQA_UNIFORM, r=0)
    out = llama.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((out / "params.json").read_text())
    assert "layer_q_per_kv" not in meta["args"]  # a uniform model writes params.json as before the field
    # the params.json of the version before this field, written out key by key
    meta["args"] = {"dim": 48, "n_layers": 4, "n_heads": 6, "n_kv_heads": 3, "vocab_size": 64, "hidden_dim": 40,
                    "multiple_of": 256, "ffn_dim_multiplier": None, "head_dim": 8, "norm_eps": 1e-5,
                    "rope_theta": 10000.0, "max_seq_len": 64, "tie_embeddings": False,
                    "layer_kv_heads": [3, 3, 3, 3], "layer_hidden_dims": [40, 40, 40, 40]}
    (out / "params.json").write_text(json.dumps(meta))
    loaded = llama.load_checkpoint(out, dtype=torch.float32)
    assert loaded.args == GQA_UNIFORM and loaded.args.layer_q_per_kv is None
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------------------------
# attention with uneven groups against an explicit per-head softmax


def reference_attention(att, x, cos, sin, q_per_kv):
    """Each query head on its own: softmax(q_h k_g^T / sqrt(D) + causal) v_g with g its kv head, then wo."""
    B, T, _ = x.shape
    D = att.head_dim
    q = llama.apply_rope(att.wq(x).view(B, T, -1, D), cos, sin)  # (B, T, H, D)
    k = llama.apply_rope(att.wk(x).view(B, T, -1, D), cos, sin)  # (B, T, K, D)
    v = att.wv(x).view(B, T, -1, D)
    owner = []
    for g, n in enumerate(q_per_kv):
        owner += [g] * n
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h, g in enumerate(owner):
        s = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        heads.append(s.masked_fill(future, -math.inf).softmax(-1) @ v[:, :, g])  # (B, T, D)
    return att.wo(torch.cat(heads, dim=-1))  # (B, T, C)


@pytest.mark.parametrize("q_per_kv", [[2, 1, 2], [1, 3], [3, 1, 1, 2], [1, 1], [3, 3]])
def test_uneven_attention_equals_per_head_reference(q_per_kv):
    args = llama.ModelArgs(dim=48, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=16, hidden_dim=8,
                           layer_kv_heads=[len(q_per_kv)], layer_q_per_kv=[q_per_kv])
    model = random_model(args, r=2).double()
    att = model.layers[0].attention
    assert att.n_heads == sum(q_per_kv) and att.uneven == (len(set(q_per_kv)) > 1)
    x = torch.randn(2, 11, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = llama.rope_cos_sin(torch.arange(11), args.head_dim, args.rope_theta)  # (T, D/2) each
    with torch.no_grad():
        torch.testing.assert_close(att(x, cos, sin), reference_attention(att, x, cos, sin, q_per_kv), rtol=1e-10,
                                   atol=1e-10)
