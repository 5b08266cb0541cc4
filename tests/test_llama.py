"""Tests for llama.py: logits against transformers' LlamaForCausalLM through every loader (Hugging Face
folder, Meta shards), the real files in shared/data, our own save/load round trip, LoRA, activation
checkpointing and the loaders' error messages. Tiny models on CPU, float32, seeded, no network."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import llama
from conftest import hf_model, hf_to_meta_rows_by_index, randomize_
from llama import ModelArgs, Transformer

# ----------------------------------------------------------------------------------------------
# helpers


def tiny_args(**overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads over 2 kv heads (GQA), MLP 96, vocab 128."""
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=64)
    return ModelArgs(**{**kw, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return randomize_(Transformer(tiny_args(**overrides)), seed).eval()


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
# real files in shared/data


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

    import safetensors.torch

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        llama.save_checkpoint(first, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the failed write left nothing behind...
    assert_same_state(second, llama.load_checkpoint(tmp_path / "ckpt", dtype=torch.float32))  # ...and kept the old


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
