"""The method against independent references: autograd gradients, brute-force group loops, hand counts,
the masked model vs its sliced copy, and a real model where the criterion must beat random pruning."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import formats
import llama
import loraprune as lp
from conftest import shared_file

MHA = llama.ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=64)
GQA = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                      layer_kv_heads=[3, 2, 1, 3], layer_hidden_dims=[40, 24, 7, 33])


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


def loss_and_grads(model, seed=1, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.args.vocab_size, (2, T + 1), generator=g)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    return loss


# ----------------------------------------------------------------------------------------------
# the two exact facts of EQUATIONS.md, with gradients from real autograd


def test_bracket_is_minus_one_sgd_step_of_BA():
    model = random_model(GQA)
    loss_and_grads(model)
    for name, lin in llama.projections(model, 1).items():
        A, B, s = lin.lora_A.detach(), lin.lora_B.detach(), lin.scaling
        gA, gB = lin.lora_A.grad, lin.lora_B.grad
        assert gA.abs().sum() > 0 and gB.abs().sum() > 0, name
        A1, B1 = A - 1.0 * gA, B - 1.0 * gB  # one plain SGD step, lr 1
        change = s * (B1.double() @ A1.double()) - s * (B.double() @ A.double())
        est = lp.lora_weight_gradient(A, B, gA, gB, s)
        torch.testing.assert_close(est.double(), -change, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", ["wq", "w2"])
def test_eq10_equals_eq3_with_square_orthogonal_A(target):
    args = llama.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=24,
                           max_seq_len=32)
    model = random_model(args, r=0)
    lin = llama.projections(model, 1)[target]
    n = lin.in_features
    llama.add_lora(model, r=n, alpha=n, dropout=0.0, targets=(target,))  # r = in, s = 1, B = 0
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3)))
    lin.lora_A.data.copy_(Q)  # square orthogonal A: A.T @ A = I
    lin.weight.requires_grad_(True)
    loss_and_grads(model)
    eq10 = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0)
    eq3 = lp.vanilla_importance(lin.weight, lin.weight.grad)
    assert eq3.sum() > 0
    torch.testing.assert_close(eq10, eq3, rtol=1e-4, atol=1e-12)
    # abs mode (the official code's) is the square root of the same thing
    abs10 = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0,
                                      square=False)
    torch.testing.assert_close(abs10.square(), eq3, rtol=1e-4, atol=1e-12)


def test_importance_is_float32_for_bf16_weights():
    W = torch.randn(8, 6).bfloat16()
    A, B, gA, gB = torch.randn(2, 6), torch.randn(8, 2), torch.randn(2, 6), torch.randn(8, 2)
    I = lp.lora_guided_importance(W, A, B, gA, gB, 2.0)
    assert I.dtype == torch.float32
    by_hand = (2.0 * (gB @ A + B @ gA - gB @ gA) * (W.float() + 2.0 * B @ A)) ** 2
    torch.testing.assert_close(I, by_hand)


# ----------------------------------------------------------------------------------------------
# Eq. 4: group sums against a brute-force loop over groups


def brute_force_group_scores(model, l, criterion):
    """Form every projection's full (out, in) importance and sum it over each group's explicit index set."""
    args, p = model.args, llama.projections(model, l)
    D, n_rep, K = args.head_dim, args.n_rep, args.layer_kv_heads[l]
    full = {}
    for name, lin in p.items():
        W = lin.weight
        if criterion == "lora":
            full[name] = lp.lora_guided_importance(W, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad,
                                                   lin.scaling)
        else:
            full[name] = lp.magnitude_importance(lin.merged_weight())
    heads = torch.zeros(K, dtype=torch.float64)
    for g in range(K):
        for qh in range(g * n_rep, (g + 1) * n_rep):  # the query heads that share kv head g
            heads[g] += full["wq"][qh * D:(qh + 1) * D].sum() + full["wo"][:, qh * D:(qh + 1) * D].sum()
        heads[g] += full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()
    Fw = args.layer_hidden_dims[l]
    channels = torch.tensor([(full["w1"][c].sum() + full["w3"][c].sum() + full["w2"][:, c].sum()).item()
                             for c in range(Fw)], dtype=torch.float64)
    return heads, channels


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa-per-layer-sizes"])
@pytest.mark.parametrize("criterion", ["lora", "magnitude"])
def test_group_sums_match_brute_force(args, criterion):
    model = random_model(args)
    loss_and_grads(model)
    for l in range(args.n_layers):
        heads, channels = lp.layer_group_scores(model, l, criterion)
        bh, bc = brute_force_group_scores(model, l, criterion)
        assert heads.shape == (args.layer_kv_heads[l],) and channels.shape == (args.layer_hidden_dims[l],)
        torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(channels.double(), bc, rtol=1e-5, atol=1e-10)


def test_chunked_projection_sums_equal_unchunked():
    model = random_model(MHA)
    loss_and_grads(model)
    lin = llama.projections(model, 0)["w1"]
    rows1, cols1 = lp.projection_sums(lin, "lora", chunk_rows=5)
    I = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, lin.scaling)
    torch.testing.assert_close(rows1, I.sum(1))
    torch.testing.assert_close(cols1, I.sum(0))


# ----------------------------------------------------------------------------------------------
# Eq. 11-13: moving average, thresholds, masks


def test_ema():
    prev, new = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(lp.ema(prev, new, 0.0), new)  # lam = 0: only the latest scores
    torch.testing.assert_close(lp.ema(prev, new, 1.0), prev)
    torch.testing.assert_close(lp.ema(prev, new, 0.9), torch.tensor([1.2, 2.3]))


def test_threshold_mask_exact_count_and_no_revival():
    scores = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    keep = torch.ones(6, dtype=torch.bool)
    m2 = lp.threshold_mask(scores, keep, 2)
    assert m2.tolist() == [True, False, True, False, True, True]
    m2[0] = False  # a group switched off earlier stays off even if its score is the highest
    m3 = lp.threshold_mask(scores, m2, 3)
    assert m3.tolist() == [False, False, True, False, True, True]
    m4 = lp.threshold_mask(scores, m3, 4)
    assert m4.tolist() == [False, False, True, False, True, False]
    ties = lp.threshold_mask(torch.zeros(5), torch.ones(5, dtype=torch.bool), 2)
    assert int((~ties).sum()) == 2


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa"])
def test_masked_model_equals_sliced_model(args):
    model = random_model(args).double()
    g = torch.Generator().manual_seed(5)
    masks = []
    for l, (K, Fw) in enumerate(zip(args.layer_kv_heads, args.layer_hidden_dims)):
        heads = torch.rand(K, generator=g) > 0.5
        channels = torch.rand(Fw, generator=g) > 0.5
        heads[torch.randint(K, (1,), generator=g)] = True
        channels[torch.randint(Fw, (1,), generator=g)] = True
        if l == 0:  # a layer that keeps a single group
            heads[:] = False
            heads[K - 1] = True
        masks.append((heads, channels))
    lp.apply_masks(model, masks)
    x = torch.randint(0, args.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        masked = model(x)
    sliced = lp.slice_model(model, masks)
    with torch.no_grad():
        out = sliced(x)
    torch.testing.assert_close(out, masked, rtol=1e-10, atol=1e-10)
    assert sliced.args.layer_kv_heads == [int(h.sum()) for h, _ in masks]
    assert llama.count_params(sliced) == lp.masked_param_count(args, masks)
    assert all(lin.r == 0 for l in range(args.n_layers) for lin in llama.projections(sliced, l).values())


def test_masked_group_contributes_nothing():
    model = random_model(GQA)
    masks = lp.full_masks(GQA)
    masks[0][0][1] = False  # kv group 1 of layer 0
    masks[0][1][3] = False  # channel 3 of layer 0
    lp.apply_masks(model, masks)
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(x)
        p = llama.projections(model, 0)
        D, n_rep = GQA.head_dim, GQA.n_rep
        p["wv"].weight[D:2 * D] += 10.0
        p["wv"].lora_B[D:2 * D] += 10.0
        p["wo"].weight[:, n_rep * D:2 * n_rep * D] += 10.0
        p["w2"].weight[:, 3] += 10.0
        p["w3"].lora_B[3] += 10.0
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the ratio and the schedule


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_prune_counts_meet_parameter_ratio(ratio):
    args = llama.ModelArgs(dim=64, n_layers=10, n_heads=8, n_kv_heads=4, vocab_size=100, hidden_dim=172)
    layers = lp.default_pruned_layers(args.n_layers)
    assert layers == list(range(1, 9))  # first int(0.1 * L) and the last layer are kept whole
    counts = lp.prune_counts(args, ratio, layers)
    before = lp.count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims)
    heads = [K - h for K, (h, _) in zip(args.layer_kv_heads, counts)]
    channels = [Fw - c for Fw, (_, c) in zip(args.layer_hidden_dims, counts)]
    after = lp.count_base_params(args, heads, channels)
    per_channel = 3 * args.dim
    assert abs((before - after) - ratio * before) <= per_channel  # within one channel of the target
    assert all(counts[l] == (0, 0) for l in range(args.n_layers) if l not in layers)
    assert all(h < K and c < Fw for (h, c), K, Fw in zip(counts, args.layer_kv_heads, args.layer_hidden_dims))


def test_prune_counts_errors_and_channel_multiple():
    args = llama.ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=10, hidden_dim=256)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        lp.prune_counts(args, 1.0, [1, 2])
    with pytest.raises(ValueError, match="every kv head of layer"):
        lp.prune_counts(args, 0.9, [1, 2])
    counts = lp.prune_counts(args, 0.3, [0, 1, 2], channel_multiple=64)
    assert all((256 - c) % 64 == 0 for h, c in counts[:3])
    total = lp.count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims)
    after = lp.count_base_params(args, [4 - h for h, _ in counts], [256 - c for _, c in counts])
    assert abs(1 - after / total - 0.3) < 0.05  # rounding moves whole blocks of 64 channels, carried over layers


def test_cubic_schedule():
    T = 100
    values = [lp.cubic_schedule(t, T) for t in range(T + 1)]
    assert values[0] == 0 and values[10] == 0 and values[T] == 1 and values[90] == 1
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[50] == pytest.approx(1 - (1 - 0.5) ** 3)  # halfway through the ramp
    assert lp.cubic_schedule(1, 1) == 1.0  # one-shot


def test_pruner_reaches_exact_target_per_layer():
    model = random_model(GQA)
    ratio, steps = 0.3, 24
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion="random", every=3, layers=[0, 1, 3], seed=1)
    history = []
    for step in range(1, steps + 1):
        pruner.update(step)
        history.append(pruner.pruned_counts())
    assert history[-1] == pruner.final_counts
    assert history[0] == [(0, 0)] * GQA.n_layers  # warm-up: nothing pruned yet
    for a, b in zip(history, history[1:]):  # monotone: a pruned group never comes back
        assert all(hb >= ha and cb >= ca for (ha, ca), (hb, cb) in zip(a, b))
    for h, c in pruner.masks:
        assert h.any() and c.any()  # never a whole layer
    assert pruner.pruned_counts()[2] == (0, 0)  # layer 2 was not in `layers`
    assert pruner.sparsity() == pytest.approx(ratio, abs=0.02)


def test_pruner_lora_needs_adapters_and_vanilla_needs_float():
    model = random_model(MHA, r=0)
    with pytest.raises(ValueError, match="needs LoRA"):
        lp.Pruner(model, ratio=0.2, total_steps=10, criterion="lora")
    with pytest.raises(ValueError, match="criterion 'nope'"):
        lp.Pruner(model, ratio=0.2, total_steps=10, criterion="nope")


def test_vanilla_pruner_uses_weight_grads_and_frees_them():
    model = random_model(MHA)
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10, criterion="vanilla", layers=[1], lam=0.0)
    lin = llama.projections(model, 1)["w1"]
    assert lin.weight.requires_grad and not llama.projections(model, 0)["w1"].weight.requires_grad
    loss_and_grads(model)
    expected = lp.layer_group_scores(model, 1, "vanilla")
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[1][1], expected[1])  # lam = 0: the latest scores
    assert lin.weight.grad is None


# ----------------------------------------------------------------------------------------------
# a real model: the criterion must carry signal


def short_prune_run(criterion, ratio=0.5, steps=40, seed=0):
    """LoRAPrune on stories260K for a few steps on CPU; returns the sliced model's perplexity on held-out text."""
    torch.manual_seed(seed)
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.float32)
    tok = data.Tokenizer(shared_file("tok512.model"))
    rows = data.training_tokens([shared_file("tinystories-train.txt")], tok, seq_len=128)
    params = llama.add_lora(model, r=8, alpha=16, dropout=0.0, seed=seed)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion=criterion, every=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        batch = rows[torch.randint(len(rows), (16,), generator=g)]
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        pruner.update(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sliced = lp.slice_model(model, pruner.masks)
    valid = torch.tensor(tok.encode(open(shared_file("tinystories-valid.txt")).read()[:60000], bos=True))
    return data.perplexity(sliced, valid, seq_len=256), llama.count_params(sliced)


def test_lora_criterion_beats_random_on_stories260k():
    lora_ppl, lora_n = short_prune_run("lora")
    random_ppl, random_n = short_prune_run("random")
    assert lora_n == random_n  # the same parameter budget
    assert math.isfinite(lora_ppl) and lora_ppl < random_ppl, (lora_ppl, random_ppl)


@pytest.mark.parametrize("channel_multiple", [1, 16])
def test_prune_counts_uniform_gives_one_shape(channel_multiple):
    """uniform=True: every layer loses the same counts (no carried rounding), so pruning all layers leaves one
    shape per layer (what transformers' LlamaForCausalLM holds); the total is within a multiple per layer of the
    target. Without it the carried rounding gives the same layers different counts."""
    args = llama.ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96, max_seq_len=32)
    layers = list(range(args.n_layers))
    ratio = 0.35
    carried = lp.prune_counts(args, ratio, layers, channel_multiple=channel_multiple)
    counts = lp.prune_counts(args, ratio, layers, channel_multiple=channel_multiple, uniform=True)
    assert len(set(counts)) == 1 and counts[0][0] >= 1 and counts[0][1] >= 1
    assert channel_multiple == 16 or len(set(carried)) > 1  # the flag is what makes them equal
    assert (args.hidden_dim - counts[0][1]) % channel_multiple == 0
    before = lp.count_base_params(args, args.layer_kv_heads, args.layer_hidden_dims)
    after = lp.count_base_params(args, [2 - h for h, _ in counts], [96 - c for _, c in counts])
    assert abs((before - after) - ratio * before) <= args.n_layers * channel_multiple * 3 * args.dim / 2
    # the masks the Pruner makes from these counts slice to a model of one layer shape
    model = random_model(args)
    pruner = lp.Pruner(model, ratio=ratio, total_steps=1, criterion="random", layers=layers, seed=0)
    pruner.update(0)  # random scores
    sliced = lp.slice_model(model, pruner.next_masks(counts))
    assert sliced.args.layer_kv_heads == [2 - counts[0][0]] * 4
    assert sliced.args.layer_hidden_dims == [96 - counts[0][1]] * 4
    assert llama.count_params(sliced) == after  # LoRA merged away, nothing else left
    with pytest.raises(ValueError, match="uniform counts need head_unit 'kv'"):
        lp.prune_counts(args, ratio, layers, head_unit="query", uniform=True)
    uneven = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96,
                             layer_hidden_dims=[96, 80])
    with pytest.raises(ValueError, match="pruned layers of one shape"):
        lp.prune_counts(uneven, 0.2, [0, 1], uniform=True)
    assert len(set(lp.prune_counts(uneven, 0.2, [1], uniform=True))) == 2  # one layer, and one left whole
