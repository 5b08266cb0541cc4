"""Tests for llama.py: RoPE against Meta's complex form, LoRA (fresh adapters, merge, dropout, targets), Meta's MLP
width, activation checkpointing and compiled blocks, slicing in place, ModelArgs' per-layer query heads, and attention
with uneven groups against a per-head reference. Tiny models on CPU, float32, seeded, no network. Loading and saving
are tested in test_formats.py, generation in test_generate.py."""
import ast
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama
from conftest import (lora_linears, our_logits, random_model, randomize_lora_B_, saved_for_backward, tiny_model,
                      tokens)
from llama import ModelArgs


def test_llama_imports_nothing_of_the_project_but_quant8():
    """llama.py is the model only: every file format is formats.py's, generation generate.py's (no import cycle)."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "llama.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    project = {p.stem for p in (Path(__file__).resolve().parent.parent).glob("*.py")}
    assert imported & project == {"quant8"}, sorted(imported & project)


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
# the run's peak is the training peak: slicing in place


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


# ----------------------------------------------------------------------------------------------
# LoRA


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
        for p in params:
            p.grad = None
        loss, saved = saved_for_backward(lambda: F.cross_entropy(model(ids)[:, :-1].flatten(0, 1),
                                                                 ids[:, 1:].flatten()))
        wide = [tuple(t.shape) for t in saved if t.dim() == 3 and t.shape[-1] == F_dim]
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


def test_compiled_checkpointed_blocks_recompute_under_a_budget_scoped_to_their_graphs(monkeypatch):
    """compile_blocks: a checkpointed block with grad compiles without a checkpoint call, its partitioner run under
    RECOMPUTE_BUDGET while that graph compiles and nowhere else (the process-wide setting is untouched), and the loss
    and LoRA gradients equal the eager checkpointed path's; without checkpointing the partitioner keeps budget 1
    (save what is fastest). aot_eager: the partitioner Inductor uses, without its code generation."""
    import torch._functorch.partitioners as partitioners
    budgets = []
    choose = partitioners.choose_saved_values_set

    def spy(*args, memory_budget=1.0, **kwargs):
        budgets.append(memory_budget)
        return choose(*args, memory_budget=memory_budget, **kwargs)
    monkeypatch.setattr(partitioners, "choose_saved_values_set", spy)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    torch._dynamo.reset()
    model = tiny_model(seed=17)
    params = llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)  # no dropout: compiled RNG differs from eager
    randomize_lora_B_(model, 5)
    model.train()
    model.checkpoint_activations = True
    ids = tokens(128, T=16)

    def run():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    loss_eager, grads_eager = run()
    assert len(calls) == model.args.n_layers  # the eager path checkpoints every block
    default = torch._functorch.config.activation_memory_budget
    llama.compile_blocks(model, backend="aot_eager")
    calls.clear()
    loss, grads = run()
    assert not calls, "a compiled block called torch.utils.checkpoint"
    assert budgets and set(budgets) == {llama.RECOMPUTE_BUDGET}, budgets
    assert torch._functorch.config.activation_memory_budget == default
    torch.testing.assert_close(loss, loss_eager, atol=1e-6, rtol=1e-6)
    for g, g_eager in zip(grads, grads_eager):
        assert g_eager.abs().sum() > 0
        torch.testing.assert_close(g, g_eager, atol=1e-6, rtol=1e-5)
    budgets.clear()
    model.checkpoint_activations = False
    run()
    assert budgets and set(budgets) == {default}, budgets
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


def test_sequence_longer_than_max_seq_len():
    model = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="9 tokens"):
        model(tokens(128, T=9))


# ----------------------------------------------------------------------------------------------
# ModelArgs: uneven query heads per kv head (--head-unit query)


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


def test_llama3_rope_frequencies_match_transformers():
    """Llama 3.1's frequency scaling at the real head dim (128, theta 500000) for Llama 3.1's factor 8 and 3.2's 32:
    transformers' own llama3 RoPE initialisation is the oracle; the slow frequencies do move."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for factor in (8.0, 32.0):
        scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        ours = llama.rope_frequencies(128, 500000.0, scaling)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        plain = llama.rope_frequencies(128, 500000.0)
        assert (ours < plain).sum() > 20 and torch.equal(ours[:10], plain[:10])
