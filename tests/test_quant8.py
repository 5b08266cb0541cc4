"""Tests for quant8.py: the int8 round trip, the int8 linear's gradients and memory, and int8 models end to end
(perplexity of a real tiny LLaMA, masking vs slicing, save/load). CPU, seeded, a few seconds."""
import json

import pytest
import torch
from safetensors import safe_open

import formats
import llama
import loraprune
import quant8
from conftest import random_kv_masks, saved_for_backward, shared_file
from llama import LoRALinear
from quant8 import Int8Matmul, dequantize, int8_linear, int8_matmul, quantization_error, quantize


def _max_error_bound(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |W - dequantize(quantize(W))|: half a step, plus float32 rounding of W / scale and
    q * scale (each at most a few ulps of the row's largest value, so 1e-6 of it is ample)."""
    return (scale / 2 + 1e-6 * W.float().abs().amax(dim=1))[:, None]  # (out, 1)


# ----------------------------------------------------------------------------------------------
# the quantizer


def test_quant8_imports_only_torch():
    """quant8.py is pure functions over tensors: it imports no module of this project (no import cycle)."""
    import ast
    tree = ast.parse(open(quant8.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"torch"}, imported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 33), (257, 128)])
def test_round_trip_error_is_at_most_half_a_step(shape, dtype):
    g = torch.Generator().manual_seed(1000 * shape[0] + shape[1])
    W = (torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]).to(dtype)  # rows of many sizes
    q, scale = quantize(W)
    assert q.dtype == torch.int8 and q.shape == W.shape
    assert scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert (q.abs().amax(dim=1) == 127).all(), "the largest entry of every row should use the full range"
    err = (W.double() - dequantize(q, scale).double()).abs()  # (out, in)
    assert (err <= _max_error_bound(W, scale).double()).all(), f"worst error / scale: {(err / scale[:, None]).max()}"
    assert quantization_error(W, q, scale) <= 0.5 + 1e-5
    assert dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_and_constant_rows(dtype):
    c = torch.tensor([0.0, 0.0, 3.0, -0.37, 1e-3, -250.0])
    W = c[:, None].expand(6, 9).to(dtype)  # row i is the constant c[i]
    q, scale = quantize(W)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q[:2] == 0).all()
    assert torch.equal(q[2:], torch.sign(c[2:])[:, None].expand(4, 9).to(torch.int8) * 127)
    Wd = dequantize(q, scale)
    assert torch.equal(Wd[:2], torch.zeros(2, 9))  # a zero row comes back exactly zero
    torch.testing.assert_close(Wd, W.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_on_the_int8_grid_round_trip_exactly(dtype):
    g = torch.Generator().manual_seed(1)
    k = torch.randint(-127, 128, (40, 24), generator=g)
    k[torch.arange(40), torch.randint(0, 24, (40,), generator=g)] = 127 * (1 - 2 * (torch.arange(40) % 2))  # max |k| = 127
    s = 2.0 ** torch.randint(-12, 4, (40,), generator=g).float()  # a power of two per row
    W = (k * s[:, None]).to(dtype)  # exact in bf16 too: |k| <= 127 needs 7 bits
    q, scale = quantize(W)
    assert torch.equal(q, k.to(torch.int8))
    assert torch.equal(scale, s)
    assert torch.equal(dequantize(q, scale, dtype), W)
    assert quantization_error(W, q, scale) == 0.0


def test_quantization_error_is_relative_to_the_largest_scale():
    W = torch.tensor([[127.0, 0.5, -2.0], [12.7, 0.0, 0.0]])  # scales 1 and 0.1; 0.5 rounds to 0 (half to even)
    q, scale = quantize(W)
    assert torch.equal(q, torch.tensor([[127, 0, -2], [127, 0, 0]], dtype=torch.int8))
    assert quantization_error(W, q, scale) == pytest.approx(0.5, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# the int8 linear


def _int8_and_float_pair(in_features=48, out_features=80, r=4, seed=0):
    """An int8 LoRALinear and a float32 LoRALinear with W = dequantize(q, scale) and the same random nonzero A, B."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize(torch.randn(out_features, in_features, generator=g))
    lin8 = LoRALinear(in_features, out_features)
    lin8.weight = torch.nn.Parameter(q, requires_grad=False)
    lin8.scales = scale
    lin = LoRALinear(in_features, out_features)
    lin.weight = torch.nn.Parameter(dequantize(q, scale), requires_grad=False)
    A, B = torch.randn(r, in_features, generator=g) * 0.2, torch.randn(out_features, r, generator=g) * 0.2
    for m in (lin8, lin):
        m.add_lora(r, alpha=2.0 * r)
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
    return lin8, lin, g


def test_int8_lora_linear_gradients_match_the_dequantized_float_layer():
    lin8, lin, g = _int8_and_float_pair()
    x = torch.randn(3, 5, 48, generator=g)
    w_out = torch.randn(3, 5, 80, generator=g)  # a random linear loss, so every output matters
    grads = []
    for m in (lin8, lin):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * w_out).sum().backward()
        grads.append((y.detach(), xi.grad, m.lora_A.grad, m.lora_B.grad))
    for a, b, name in zip(grads[0], grads[1], ("y", "x.grad", "lora_A.grad", "lora_B.grad")):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert lin8.weight.dtype == torch.int8
    assert not lin8.weight.requires_grad and lin8.weight.grad is None
    assert lin8.scales.grad is None


def test_int8_matmul_backward_saves_no_float_copy_of_w():
    lin8, lin, g = _int8_and_float_pair()
    out_features, in_features = lin8.weight.shape
    x = torch.randn(2, 7, in_features, generator=g, requires_grad=True)

    def saved_by(fn):
        y, saved = saved_for_backward(fn)
        y.sum().backward()  # the saved tensors are usable
        return saved

    def float_w_shaped(saved):  # W or W.T (F.linear saves the transposed view)
        return [t for t in saved if t.is_floating_point()
                and tuple(t.shape) in ((out_features, in_features), (in_features, out_features))]

    # positive control: a float layer keeps W (out, in) for dL/dx, so the hook does see it
    assert float_w_shaped(saved_by(lambda: lin(x)))

    # ... and so does autograd through the plain int8_linear: the cast of q, a float W (why Int8Matmul exists)
    assert float_w_shaped(saved_by(lambda: int8_linear(x, lin8.weight, lin8.scales)))

    # the bare int8 matmul saves exactly the int8 q and the float32 scales (and at most the input), and gives the
    # float layer's dL/dx (the same W, dequantized), to float32 rounding of a float64 reference
    W = dequantize(lin8.weight, lin8.scales).double()
    expected = torch.autograd.grad(torch.nn.functional.linear(x.double(), W).square().sum(), x)[0]
    for matmul in (Int8Matmul.apply, int8_matmul):
        saved = saved_by(lambda: matmul(x, lin8.weight, lin8.scales))
        assert saved
        for t in saved:
            ok = ((t.dtype == torch.int8 and t.shape == lin8.weight.shape)
                  or (t.dtype == torch.float32 and t.shape == (out_features,))
                  or (t.shape == x.shape and t.data_ptr() == x.data_ptr()))
            assert ok, f"unexpected saved tensor {t.dtype} {tuple(t.shape)}"
        assert any(t.dtype == torch.int8 for t in saved)
        got = torch.autograd.grad(matmul(x, lin8.weight, lin8.scales).square().sum(), x)[0]
        assert (got - expected).norm() / expected.norm() < 1e-6

    # the whole LoRA layer: the adapters' small tensors, but never a float W
    assert not float_w_shaped(saved_by(lambda: lin8(x)))


def test_int8_merge_refuses_with_a_message():
    lin8, _, _ = _int8_and_float_pair()
    with pytest.raises(ValueError, match=r"int8.*quantize_"):
        lin8.merge()
    assert lin8.r == 4 and lin8.weight.dtype == torch.int8  # nothing changed


# ----------------------------------------------------------------------------------------------
# whole int8 models on the real tiny LLaMA (stories260K: dim 64, 5 layers, 8 heads in 4 kv groups)

FP32_PPL = 6.929  # measured: fp32 6.9292, int8 6.9102 on the first 16384 tokens of tinystories-valid.txt
N_TOKENS = 16384  # 32 windows of 512; the whole file (71519 tokens) gives fp32 7.991, int8 7.965


def _load(int8: bool) -> llama.Transformer:
    return formats.load(shared_file("stories260K.bin"), dtype=torch.float32, int8=int8)


def _is_int8(model: llama.Transformer) -> bool:
    lins = [lin for l in range(model.args.n_layers) for lin in llama.projections(model, l).values()]
    return all(lin.weight.dtype == torch.int8
               and lin.scales.dtype == torch.float32 for lin in lins)


def test_int8_perplexity_matches_float32():
    data = pytest.importorskip("data")
    tok = data.Tokenizer(shared_file("tok512.model"))
    text = shared_file("tinystories-valid.txt").read_text(encoding="utf-8")
    tokens = torch.tensor(tok.encode(text, bos=True), dtype=torch.int64)[:N_TOKENS]
    assert tokens.numel() == N_TOKENS
    ppl = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dim-64 matmuls gain nothing from threads, and lose a lot on a busy machine
    try:
        for int8 in (False, True):
            model = _load(int8)
            assert _is_int8(model) == int8
            ppl[int8] = data.perplexity(model, tokens, seq_len=512, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    print(f"perplexity on {N_TOKENS} tokens: fp32 {ppl[False]:.4f}, int8 {ppl[True]:.4f}")
    assert ppl[True] != ppl[False], "int8 loading did not change the weights at all"
    assert abs(ppl[True] / ppl[False] - 1) < 0.01, ppl
    for p in ppl.values():
        assert abs(p / FP32_PPL - 1) < 0.02, ppl


def test_masked_int8_model_equals_sliced_model_and_requantizes():
    model = _load(int8=True)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in range(model.args.n_layers):
            for lin in llama.projections(model, l).values():
                lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.05)
    masks = random_kv_masks(model.args, g, single_group_layer=1)
    assert int(masks[1][0].sum()) == 1 and not all(h.all() and c.all() for h, c in masks)
    loraprune.apply_masks(model, masks)
    model.eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        masked = model(tokens)
        int8_sliced = loraprune.slice_model(model, masks)  # the default for an int8 model: int8 again, block by block
        sliced_model = loraprune.slice_model(model, masks, dtype=torch.float32, in_place=True, int8=False)  # tied head
        sliced = sliced_model(tokens)
    assert all(t.is_meta for t in model.state_dict().values())  # the int8 model was consumed
    assert sliced_model.output.weight is sliced_model.tok_embeddings.weight
    assert sliced_model.args.layer_kv_heads == [int(h.sum()) for h, _ in masks]
    assert all(lin.weight.dtype == torch.float32 for l in range(5) for lin in llama.projections(sliced_model, l).values())
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)

    # the masks and the LoRA both matter here, so the equality above is not vacuous
    with torch.no_grad():
        plain = _load(int8=True)(tokens)
    assert (plain - masked).abs().max() > 1e-1

    float_weights = {k: v.clone() for k, v in sliced_model.state_dict().items()}
    llama.quantize_model(sliced_model)
    assert _is_int8(sliced_model)
    state = sliced_model.state_dict()
    for k, W in float_weights.items():
        if k.startswith("layers.") and "norm" not in k:
            q, scale = quantize(W)
            assert torch.equal(state[k], q) and torch.equal(state[k[: -len("weight")] + "scales"], scale), k
        else:
            assert torch.equal(state[k], W), k  # embeddings, head and norms stay float
    # slicing an int8 model straight to int8 equals slicing to float32, then quantizing: the same q and scales
    assert _is_int8(int8_sliced) and int8_sliced.state_dict().keys() == state.keys()
    for k, t in int8_sliced.state_dict().items():
        assert torch.equal(t, state[k].to(t.dtype)), k
    with torch.no_grad():
        requantized = sliced_model(tokens)
    assert not torch.equal(requantized, sliced)
    rel = (requantized - sliced).abs().max() / sliced.abs().max()
    # measured 3.9% here (the plain int8 vs fp32 model differ by 2.0%: dim 64 leaves little to average out)
    assert rel < 0.06, f"re-quantized logits moved by {rel:.3%} of the largest logit"


@pytest.mark.parametrize("int8", [False, True])
def test_quantize_model_merges_lora_in_float32(int8):
    """quantize_model quantizes W + s * B @ A as computed in float32, not a bf16 rounding of it (which would add up
    to a quarter step of error), for a bf16 float model and for an int8 model being re-quantized."""
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.bfloat16, int8=int8)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(3)
    expected = {}
    with torch.no_grad():
        for l in range(model.args.n_layers):
            for name, lin in llama.projections(model, l).items():
                lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.05)
                expected[l, name] = quantize(lin.merged_weight(torch.float32))
    llama.quantize_model(model)
    assert _is_int8(model)
    for (l, name), (q, scale) in expected.items():
        lin = llama.projections(model, l)[name]
        assert lin.r == 0 and lin.lora_A is None  # merged, adapters gone
        assert torch.equal(lin.weight, q) and torch.equal(lin.scales, scale), (l, name)


def test_save_and_load_int8_checkpoint(tmp_path):
    model = _load(int8=True)
    out = formats.save_checkpoint(model, tmp_path / "int8", kind="dense")
    meta = json.loads((out / "params.json").read_text())
    assert meta["int8"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["layers.2.feed_forward.w2.weight"].dtype == torch.int8
    assert stored["layers.2.feed_forward.w2.scales"].dtype == torch.float32
    n_proj = 7 * model.args.n_layers
    assert sum(t.dtype == torch.int8 for t in stored.values()) == n_proj
    assert sum(k.endswith(".scales") for k in stored) == n_proj

    loaded = formats.load(out, dtype=torch.float32)
    assert _is_int8(loaded)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, model.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))

    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match="int8"):
        formats.save_checkpoint(model, tmp_path / "int8-lora")
    assert not (tmp_path / "int8-lora").exists()


def test_compiled_int8_model_matches_eager_and_saves_no_float_w():
    """llama.compile_blocks on an int8 model: the same LoRA gradients as eager, and nothing W-shaped in a float
    dtype saved for backward (a compiled graph once merged the backward's dequantization with the forward's and
    kept every layer's bf16 W alive); checkpointed, no MLP-wide (B, T, F) activation either (torch 2.11 saved the
    outputs of the int8 matmul when it was an autograd.Function inside a checkpoint: 12.9 GiB at 7B)."""
    torch.manual_seed(0)
    args = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=96, max_seq_len=16)
    model = llama.Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.2)
    model = llama.quantize_model(model)
    params = llama.add_lora(model, r=4, alpha=8.0, dropout=0.0)
    for p in params:
        p.data.normal_(0, 0.1)  # B != 0: every LoRA gradient term is live
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, LoRALinear) and m.int8}
    x = torch.randint(0, args.vocab_size, (3, 8))  # B*T = 21: no activation has a weight's shape

    def grads_and_saved():
        for p in params:
            p.grad = None
        loss, saved = saved_for_backward(
            lambda: torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))
        w_shaped = [tuple(t.shape) for t in saved
                    if t.is_floating_point() and (tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes)]
        wide = [tuple(t.shape) for t in saved if t.dim() == 3 and t.shape[-1] == args.hidden_dim]
        loss.backward()
        return [p.grad.clone() for p in params], w_shaped, wide

    eager, saved, wide = grads_and_saved()
    assert not saved and wide  # positive control: eager without checkpointing keeps the (B, T, F) activations
    llama.compile_blocks(model)
    for ckpt in (False, True):
        model.checkpoint_activations = ckpt
        grads_and_saved()  # compiles
        compiled, saved, wide = grads_and_saved()
        assert not saved, f"ckpt={ckpt}: float W-shaped tensors saved for backward: {saved}"
        assert bool(wide) != ckpt, f"ckpt={ckpt}: MLP-wide tensors saved: {wide}"
        for a, b in zip(eager, compiled):
            assert a.abs().max() > 0
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
