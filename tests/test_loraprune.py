"""The method against independent references: autograd gradients, brute-force group loops, hand counts,
the masked model vs its sliced copy, and a real model where the criterion must beat random pruning. The query-head
unit (head_unit 'query'; uneven kv groups in the model and its params.json, the attention against a per-head
reference, a kv head's rows going exactly with its last query head) has its own sections below."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
import formats
import llama
import loraprune as lp
from conftest import (GQA_UNIFORM, brute_force_group_scores, full_importance, loss_and_grads, query_masks,
                      random_model, shared_file)

MHA = llama.ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=64)
GQA = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                      layer_kv_heads=[3, 2, 1, 3], layer_hidden_dims=[40, 24, 7, 33])
UNEVEN = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                         layer_kv_heads=[3, 2, 1, 3], layer_q_per_kv=[[2, 1, 2], [1, 2], [1], [2, 2, 2]],
                         layer_hidden_dims=[40, 24, 7, 33])


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


def test_eq10_merged_weight_includes_s_BA():
    """Eq. 10 multiplies the bracket by the merged weight W + s * B @ A, not by W alone: with B != 0 the two differ,
    and the result must be the former (by hand, float64)."""
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(8, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(8, 3, generator=g)
    gA, gB, s = torch.randn(3, 6, generator=g), torch.randn(8, 3, generator=g), 2.0
    bracket = s * (gB.double() @ A.double() + B.double() @ gA.double() - gB.double() @ gA.double())
    with_BA = (bracket * (W.double() + s * B.double() @ A.double())) ** 2
    without_BA = (bracket * W.double()) ** 2
    assert (with_BA - without_BA).abs().max() > 0.1 * with_BA.abs().max()  # the test can tell them apart
    I = lp.lora_guided_importance(W, A, B, gA, gB, s)
    torch.testing.assert_close(I.double(), with_BA, rtol=1e-5, atol=1e-6)


def test_importance_is_float32_for_bf16_weights():
    W = torch.randn(8, 6).bfloat16()
    A, B, gA, gB = torch.randn(2, 6), torch.randn(8, 2), torch.randn(2, 6), torch.randn(8, 2)
    I = lp.lora_guided_importance(W, A, B, gA, gB, 2.0)
    assert I.dtype == torch.float32
    by_hand = (2.0 * (gB @ A + B @ gA - gB @ gA) * (W.float() + 2.0 * B @ A)) ** 2
    torch.testing.assert_close(I, by_hand)


# ----------------------------------------------------------------------------------------------
# the direction-aware LoRA estimate (criterion 'lora-directional') against exact autograd gradients


def one_projection_with_lora(target, r_of, seed=3):
    """A tiny model whose only LoRA sits on `target`, with rank r_of(lin) and s = 1, W.grad switched on."""
    args = llama.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=24, max_seq_len=32)
    model = random_model(args, r=0, seed=seed)
    lin = llama.projections(model, 1)[target]
    r = r_of(lin)
    llama.add_lora(model, r=r, alpha=r, dropout=0.0, targets=(target,))  # s = alpha / r = 1
    lin.weight.requires_grad_(True)
    return model, lin


@pytest.mark.parametrize("target", ["wq", "w2"])
def test_directional_rows_are_exact_with_square_orthogonal_A_and_B_zero(target):
    model, lin = one_projection_with_lora(target, lambda lin: lin.in_features)
    n = lin.in_features
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4)))
    lin.lora_A.data.copy_(Q)  # A.T @ A = I, and B = 0: s * gB @ A = G exactly
    loss_and_grads(model)
    rows, cols = lp.directional_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0)
    exact = lp.vanilla_importance(lin.weight, lin.weight.grad)
    assert exact.sum() > 0
    torch.testing.assert_close(rows, exact, rtol=1e-4, atol=1e-12)
    assert cols.abs().max() == 0  # B = 0: nothing is known of the columns yet
    row_sums, _ = lp.projection_sums(lin, "lora-directional", chunk_rows=5)
    torch.testing.assert_close(row_sums, exact.sum(1), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("target", ["wo", "w2"])
def test_directional_columns_are_exact_with_square_orthogonal_B(target):
    model, lin = one_projection_with_lora(target, lambda lin: lin.out_features)
    n = lin.out_features
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        lin.lora_B.copy_(Q)  # B @ B.T = I: s * B @ gA = B B^T G = G exactly, whatever A is
        lin.lora_A.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    loss_and_grads(model)
    rows, cols = lp.directional_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0)
    exact = lp.vanilla_importance(lin.merged_weight(), lin.weight.grad)  # (G ⊙ (W + s B A))^2
    torch.testing.assert_close(cols, exact, rtol=1e-4, atol=1e-12)
    _, col_sums = lp.projection_sums(lin, "lora-directional", chunk_rows=3)
    torch.testing.assert_close(col_sums, exact.sum(0), rtol=1e-4, atol=1e-12)
    # Eq. 10 as written mixes the rows into every column here (its gB @ A term): not exact
    eq10 = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0)
    assert not torch.allclose(eq10.sum(0), exact.sum(0), rtol=1e-2)


def test_l2_normalised_unit_scores_by_hand():
    g = torch.Generator().manual_seed(7)
    D, H, K, Fw, C = 2, 4, 2, 5, 8
    shapes = {"wq": (H * D, C), "wk": (K * D, C), "wv": (K * D, C), "wo": (C, H * D), "w1": (Fw, C), "w3": (Fw, C),
              "w2": (C, Fw)}
    sums = {name: (torch.rand(o, generator=g), torch.rand(i, generator=g)) for name, (o, i) in shapes.items()}
    sums["w2"] = (sums["w2"][0], torch.zeros(Fw))  # an all-zero part (B = 0) must add nothing, not NaN

    def unit(v):  # a list divided by its Euclidean length
        norm = math.sqrt(sum(float(x) ** 2 for x in v))
        return [float(x) / norm for x in v]
    q = unit([float(sums["wq"][0][h * D:(h + 1) * D].sum()) for h in range(H)])
    o = unit([float(sums["wo"][1][h * D:(h + 1) * D].sum()) for h in range(H)])
    k = unit([float(sums["wk"][0][j * D:(j + 1) * D].sum()) for j in range(K)])
    v = unit([float(sums["wv"][0][j * D:(j + 1) * D].sum()) for j in range(K)])
    w1, w3 = unit(sums["w1"][0].tolist()), unit(sums["w3"][0].tolist())
    heads, channels, kv = lp.unit_scores(sums, D, normalize=True)
    torch.testing.assert_close(heads.double(), torch.tensor(q, dtype=torch.float64) + torch.tensor(o))
    torch.testing.assert_close(kv.double(), torch.tensor(k, dtype=torch.float64) + torch.tensor(v))
    torch.testing.assert_close(channels.double(), torch.tensor(w1, dtype=torch.float64) + torch.tensor(w3))
    raw = lp.unit_scores(sums, D)  # and without normalize, the plain sums of Eq. 4
    torch.testing.assert_close(raw[1], sums["w1"][0] + sums["w3"][0])


@pytest.mark.parametrize("criterion", ["lora", "lora-directional"])
def test_pruner_scores_with_normalize_are_layer_scores(criterion):
    model = random_model(GQA)
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10, criterion=criterion, layers=[1, 3], lam=0.0,
                       normalize=True)
    loss_and_grads(model)
    query, channels, kv = lp.layer_scores(model, 3, criterion, normalize=True)
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[3][0], lp.kv_group_scores(query, kv, GQA.q_per_kv(3)))
    torch.testing.assert_close(pruner.scores[3][1], channels)
    assert 1 - 1e-5 <= channels.norm() <= 3 + 1e-5  # a sum of three unit vectors of non-negative entries


# ----------------------------------------------------------------------------------------------
# criterion 'exact': Eq. 3's sums from the backward pass, against W.grad


def vanilla_sums(model, layers):
    """{(l, name): (row sums, column sums)} of Eq. 3 from W.grad (the reference for 'exact')."""
    return {(l, name): lp.projection_sums(lin, "vanilla") for l in layers
            for name, lin in llama.projections(model, l).items()}


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "activation-checkpointing"])
def test_exact_scores_equal_vanilla_with_one_micro_batch(checkpoint):
    model = random_model(GQA).double()
    model.checkpoint_activations = checkpoint  # the taps' forward hooks fire again on recompute: counted once?
    layers = [1, 3]
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10, criterion="exact", layers=layers, lam=0.0)
    for l in layers:
        for lin in llama.projections(model, l).values():
            lin.weight.requires_grad_(True)  # the reference needs W.grad; the tap does not
    loss_and_grads(model)
    expected = vanilla_sums(model, layers)
    for l in layers:
        got = pruner.tap.take(l)
        for name, (rows, cols) in got.items():
            torch.testing.assert_close(rows, expected[l, name][0], rtol=1e-5, atol=0)  # float32 sums, both
            torch.testing.assert_close(cols, expected[l, name][1], rtol=1e-5, atol=0)
        assert all(r.abs().sum() == 0 for r, _ in pruner.tap.take(l).values())  # take() zeroed them
    model.zero_grad(set_to_none=True)
    loss_and_grads(model, seed=2)  # and the Pruner's own path: Eq. 4 of the same sums
    query, channels, kv = lp.layer_scores(model, 3, "vanilla")
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[3][0], lp.kv_group_scores(query, kv, GQA.q_per_kv(3)), rtol=1e-5, atol=0)
    torch.testing.assert_close(pruner.scores[3][1], channels, rtol=1e-5, atol=0)
    with torch.no_grad():  # an eval forward sets no tap and adds nothing
        model(torch.randint(0, GQA.vocab_size, (1, 8)))
    assert all(r.abs().sum() == 0 for r, _ in pruner.tap.take(1).values())


def test_exact_scores_with_accumulation_sum_each_micro_batch():
    """With two micro-batches the tap adds each one's Eq. 3 (its stated estimate), which differs from Eq. 3 of
    the accumulated gradient."""
    model = random_model(MHA).double()
    layers = [1]
    tap = lp.GradientTap(model, layers)
    for lin in llama.projections(model, 1).values():
        lin.weight.requires_grad_(True)
    per_micro = []
    for seed in (1, 2):
        model.zero_grad(set_to_none=True)
        loss_and_grads(model, seed=seed)
        per_micro.append(vanilla_sums(model, layers))
    got = tap.take(1)
    model.zero_grad(set_to_none=True)
    loss_and_grads(model, seed=1)
    loss_and_grads(model, seed=2)  # accumulated
    whole = vanilla_sums(model, layers)
    for name, (rows, cols) in got.items():
        torch.testing.assert_close(rows, per_micro[0][1, name][0] + per_micro[1][1, name][0], rtol=1e-5, atol=0)
        torch.testing.assert_close(cols, per_micro[0][1, name][1] + per_micro[1][1, name][1], rtol=1e-5, atol=0)
        assert not torch.allclose(rows, whole[1, name][0])
    tap.take(1)  # (the two backwards of `whole` went through the taps too)
    tap.remove()
    loss_and_grads(model, seed=3)
    assert all(r.abs().sum() == 0 for r, _ in tap.take(1).values())  # removed hooks add nothing


@pytest.mark.parametrize("name", ["w1", "wo"])
def test_sampled_exact_sums_are_unbiased_under_accumulation(name):
    """SampledSums with k of the columns (rows for wo), fed two micro-batches: the mean over many draws of its
    estimate is Eq. 3's row (column) sums of the accumulated gradient, which the plain tap does not give."""
    model = random_model(MHA).double()
    lin = llama.projections(model, 1)[name]
    lin.weight.requires_grad_(True)
    recorded = []
    handle = lin.register_forward_hook(lp.GradientTap._hook(lambda x, dy: recorded.append((x, dy))))
    loss_and_grads(model, seed=1)
    loss_and_grads(model, seed=2)  # accumulated: W.grad is the batch's
    handle.remove()
    by_rows = name != "wo"
    exact = lp.projection_sums(lin, "vanilla")[0 if by_rows else 1]
    g = torch.Generator().manual_seed(0)
    draws = 3000
    mean = torch.zeros_like(exact)
    for _ in range(draws):
        sampled = lp.SampledSums(lin, by_rows, k=4, square=True, generator=g)
        for x, dy in recorded:
            sampled.add(x, dy)
        mean += sampled.estimate()[0 if by_rows else 1] / draws
    torch.testing.assert_close(mean, exact, rtol=0.08, atol=0)  # 3000 draws of 4 columns of 32
    per_micro = sum(lp.gradient_sums(x, dy, lambda r: lp.merged_rows(lin, r))[0 if by_rows else 1]
                    for x, dy in recorded)
    assert (per_micro - exact).abs().max() > 0.2 * exact.abs().max()  # what the plain tap would have said


def test_pruner_with_sampled_exact_scores_prunes_to_target():
    model = random_model(GQA)
    pruner = lp.Pruner(model, ratio=0.3, total_steps=4, criterion="exact", every=1, layers=[1, 3], exact_sample=3)
    for step in range(1, 5):
        loss_and_grads(model, seed=step, B=1)
        loss_and_grads(model, seed=10 + step, B=1)  # two micro-batches a step
        pruner.update(step)
        model.zero_grad(set_to_none=True)
    assert pruner.pruned_counts() == pruner.final_counts
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for l in (1, 3) for s in pruner.scores[l])


def test_exact_criterion_runs_on_int8_weights():
    model = random_model(GQA, r=0)
    llama.quantize_model(model)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    pruner = lp.Pruner(model, ratio=0.3, total_steps=4, criterion="exact", every=1, layers=[1, 3], lam=0.0)
    for step in range(1, 5):
        loss_and_grads(model, seed=step)
        pruner.update(step)
        model.zero_grad(set_to_none=True)
    assert pruner.pruned_counts() == pruner.final_counts
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for l in (1, 3) for s in pruner.scores[l])


# ----------------------------------------------------------------------------------------------
# Eq. 4: group sums against a brute-force loop over groups


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa-per-layer-sizes"])
@pytest.mark.parametrize("criterion", ["lora", "magnitude"])
def test_group_sums_match_brute_force(args, criterion):
    model = random_model(args)
    loss_and_grads(model)
    for l in range(args.n_layers):
        query, channels, kv = lp.layer_scores(model, l, criterion)
        heads = lp.kv_group_scores(query, kv, args.q_per_kv(l))
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
    query, channels, kv = lp.layer_scores(model, 1, "vanilla")
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[1][1], channels)  # lam = 0: the latest scores
    torch.testing.assert_close(pruner.scores[1][0], lp.kv_group_scores(query, kv, MHA.q_per_kv(1)))
    assert lin.weight.grad is None


# ----------------------------------------------------------------------------------------------
# masks: masked model == sliced model, exact counts, kv rows with the last query head


@pytest.mark.parametrize("args", [GQA_UNIFORM, UNEVEN], ids=["from-uniform", "from-uneven"])
def test_masked_model_equals_sliced_model_query_heads(args):
    model = random_model(args).double()
    g = torch.Generator().manual_seed(5)
    masks = query_masks(args, g)
    lp.apply_masks(model, masks)
    x = torch.randint(0, args.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        masked = model(x)
        sliced = lp.slice_model(model, masks)
        out = sliced(x)
    torch.testing.assert_close(out, masked, rtol=1e-10, atol=1e-10)
    left = [lp.query_heads_left(h, args.q_per_kv(l)) for l, (h, _) in enumerate(masks)]
    assert sliced.args.layer_kv_heads == [int((n > 0).sum()) for n in left]
    assert [sliced.args.q_per_kv(l) for l in range(args.n_layers)] == [n[n > 0].tolist() for n in left]
    assert sliced.args.layer_q_per_kv is not None and any(a.uneven for a in (b.attention for b in sliced.layers))
    assert llama.count_params(sliced) == lp.masked_param_count(args, masks)
    with torch.no_grad():
        lp.apply_masks(model, lp.full_masks(args, head_unit="query"))
        assert (model(x) - masked).abs().max() > 1e-3  # the masks mattered


def test_masked_int8_model_equals_sliced_model_query_heads():
    model = random_model(GQA_UNIFORM, r=0)
    llama.quantize_model(model)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l in range(GQA_UNIFORM.n_layers):
            for lin in llama.projections(model, l).values():
                assert lin.weight.dtype == torch.int8
                lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.1)
    masks = query_masks(GQA_UNIFORM, g)
    lp.apply_masks(model, masks)
    x = torch.randint(0, GQA_UNIFORM.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        masked = model(x)
        sliced = lp.slice_model(model, masks, dtype=torch.float32, int8=False)  # float: exact against the masks
        out = sliced(x)
    assert sliced.args.layer_q_per_kv is not None
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    assert llama.count_params(sliced) == lp.masked_param_count(GQA_UNIFORM, masks)


def test_parameter_count_by_hand():
    # C = 16, 4 heads of D = 4, 2 kv heads (n_rep 2), MLP 8, vocab 10, 2 layers, untied head
    args = llama.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=10, hidden_dim=8)
    masks = lp.full_masks(args, head_unit="query")
    # embeddings + head, 5 norms, and per layer: 4 query heads (wq rows + wo columns, 2 * 4 * 16 each),
    # 2 kv heads (wk + wv rows, 2 * 4 * 16 each), 8 channels (3 * 16 each)
    full = 10 * 16 * 2 + 16 * 5 + 2 * (4 * 128 + 2 * 128 + 8 * 48)
    assert lp.masked_param_count(args, masks) == full == 2704
    masks[0][0][1] = False  # query head 1 (kv head 0 keeps head 0): its wq rows + wo columns, 128
    assert lp.masked_param_count(args, masks) == 2704 - 128
    masks[0][0][0] = False  # kv head 0's last query head: its 128, and kv head 0's wk/wv rows, 128
    assert lp.masked_param_count(args, masks) == 2704 - 128 - 256
    masks[0][1][:3] = False  # 3 channels of 48
    assert lp.masked_param_count(args, masks) == 2704 - 384 - 144 == 2176
    assert lp.count_base_params(args, [1, 2], [5, 8], [2, 4]) == 2176
    model = random_model(args)
    lp.apply_masks(model, masks)
    assert llama.count_params(lp.slice_model(model, masks)) == 2176
    assert lp.group_params(args) == (4 * 4 * 16 + 2 * 4 * 16, 48)  # one kv group: 2 query heads + 1 kv head


def test_kv_rows_go_exactly_with_the_last_query_head():
    args = GQA_UNIFORM
    model = random_model(args).double()
    D, l = args.head_dim, 1
    wk = llama.projections(model, l)["wk"].merged_weight()  # (K*D, C)
    x = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    masks = lp.full_masks(args, head_unit="query")
    for off in range(args.n_rep):  # switch off kv head 1's query heads (2 and 3) one at a time
        masks[l][0][args.n_rep + off] = False
        lp.apply_masks(model, masks)
        sliced = lp.slice_model(model, masks)
        kept_wk = sliced.layers[l].attention.wk.weight
        last = off == args.n_rep - 1
        assert sliced.args.layer_kv_heads[l] == (2 if last else 3)
        assert sliced.args.q_per_kv(l) == ([2, 2] if last else [2, 1, 2])
        expected = torch.cat([wk[:D], wk[2 * D:]]) if last else wk
        assert torch.equal(kept_wk, expected)
        assert sliced.layers[l].attention.wv.weight.shape == (kept_wk.shape[0], args.dim)
        # in the masked model kv head 1's rows matter while a query head reads them, and not after
        with torch.no_grad():
            before = model(x)
            wv = llama.projections(model, l)["wv"].weight
            wv[D:2 * D] += 1.0
            after = model(x)
            wv[D:2 * D] -= 1.0
        assert torch.equal(after, before) == last


# ----------------------------------------------------------------------------------------------
# scores (Eq. 4 with query heads) and thresholds


@pytest.mark.parametrize("criterion", ["lora", "magnitude"])
def test_query_scores_match_brute_force_and_sum_to_kv_groups(criterion):
    model = random_model(GQA_UNIFORM)
    loss_and_grads(model)
    D, n_rep = GQA_UNIFORM.head_dim, GQA_UNIFORM.n_rep
    for l in range(GQA_UNIFORM.n_layers):
        heads, channels, kv = lp.layer_scores(model, l, criterion)
        full = full_importance(model, l, criterion)
        bh = torch.tensor([(full["wq"][h * D:(h + 1) * D].sum() + full["wo"][:, h * D:(h + 1) * D].sum()).item()
                           for h in range(GQA_UNIFORM.n_heads)], dtype=torch.float64)
        bkv = torch.tensor([(full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()).item()
                            for g in range(GQA_UNIFORM.n_kv_heads)], dtype=torch.float64)
        torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(kv.double(), bkv, rtol=1e-5, atol=1e-10)
        # with every head live, a group's shares add up to the kv-group score of head_unit 'kv'
        keep = torch.ones(GQA_UNIFORM.n_heads, dtype=torch.bool)
        shared = lp.query_head_scores(heads, kv, keep, GQA_UNIFORM.q_per_kv(l))
        groups, _ = brute_force_group_scores(model, l, criterion)
        torch.testing.assert_close(shared.double().view(-1, n_rep).sum(1), groups, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(channels.double(), brute_force_group_scores(model, l, criterion)[1],
                                   rtol=1e-5, atol=1e-10)


def test_query_head_scores_share_the_kv_rows_among_live_heads():
    heads = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kv = torch.tensor([6.0, 10.0])
    q_per_kv = [3, 2]
    keep = torch.tensor([True, False, True, True, True])
    assert lp.query_head_scores(heads, kv, keep, q_per_kv).tolist() == [4.0, 5.0, 6.0, 9.0, 10.0]
    keep[2] = False  # head 0 is the last of kv head 0: it carries the whole kv score
    assert lp.query_head_scores(heads, kv, keep, q_per_kv)[0].item() == 7.0
    # one head at a time, re-sharing after each: scores [1+3, 2+3, 5+1, 4.5+1] drop head 0; then head 1 is the
    # last of kv head 0 (2 + 6 = 8), so head 3 (5.5) goes, not head 1 (a one-shot threshold would take 0 and 1)
    heads, kv = torch.tensor([1.0, 2.0, 5.0, 4.5]), torch.tensor([6.0, 2.0])
    all_kept = torch.ones(4, dtype=torch.bool)
    assert lp.threshold_mask(lp.query_head_scores(heads, kv, all_kept, [2, 2]), all_kept, 2).tolist() == \
        [False, False, True, True]
    keep = lp.threshold_query_heads(heads, kv, all_kept, [2, 2], 2)
    assert keep.tolist() == [False, True, True, False]
    keep = lp.threshold_query_heads(heads, kv, keep, [2, 2], 3)  # last heads now: 2 + 6 = 8 vs 5 + 2 = 7
    assert keep.tolist() == [False, True, False, False]


# ----------------------------------------------------------------------------------------------
# the ratio, the Pruner and its state


RATIO_ARGS = llama.ModelArgs(dim=64, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=50, hidden_dim=96,
                             max_seq_len=64)


def test_query_pruner_meets_the_ratio_counting_emptied_kv_heads():
    args, ratio, steps, layers = RATIO_ARGS, 0.3, 20, [1, 2, 3, 4]
    model = random_model(args, r=0)
    with torch.no_grad():  # kv head 0's weights tiny in every layer: magnitude empties it first
        D = args.head_dim
        for l in layers:
            p = llama.projections(model, l)
            for name in ("wq", "wk", "wv"):
                p[name].weight[:D * (args.n_rep if name == "wq" else 1)] *= 1e-3
            p["wo"].weight[:, :D * args.n_rep] *= 1e-3
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion="magnitude", every=2, layers=layers,
                       head_unit="query")
    nominal = pruner.final_counts
    for step in range(1, steps + 1):
        pruner.update(step)
    per_query, per_kv = lp.head_params(args)
    per_channel = 3 * args.dim
    emptied = [int((lp.query_heads_left(h, args.q_per_kv(l)) == 0).sum()) for l, (h, _) in enumerate(pruner.masks)]
    assert [emptied[l] for l in layers] == [1] * 4  # kv head 0 went with its two query heads
    assert all(not pruner.masks[l][0][:2].any() for l in layers)
    assert [c[0] for c in pruner.pruned_counts()] == [h for h, _ in nominal]
    total = lp.masked_param_count(args, lp.full_masks(args))
    removed = total - lp.masked_param_count(args, pruner.masks)
    assert abs(removed - ratio * total) <= 2 * per_channel  # within two channels of the target...
    # ...which the nominal channel counts (the emptied kv heads' rows not given back to the MLP) overshoot
    heads_left = [lp.query_heads_left(h, args.q_per_kv(l)) for l, (h, _) in enumerate(pruner.masks)]
    kv_kept, q_kept = [int((n > 0).sum()) for n in heads_left], [int(n.sum()) for n in heads_left]
    nominal_removed = total - lp.count_base_params(args, kv_kept, [96 - c for _, c in nominal], q_kept)
    assert nominal_removed - ratio * total > 4 * per_kv - 2 * per_channel
    assert sum(c for _, c in pruner.pruned_counts()) < sum(c for _, c in nominal)  # the MLP gave them back
    # unpruned layers stay whole
    assert pruner.pruned_counts()[0] == pruner.pruned_counts()[5] == (0, 0)


def test_prune_counts_query_unit_and_errors():
    args = RATIO_ARGS
    kv = lp.prune_counts(args, 0.3, [1, 2, 3, 4])
    query = lp.prune_counts(args, 0.3, [1, 2, 3, 4], head_unit="query")
    assert kv != query and all(h < 8 for h, _ in query)
    with pytest.raises(ValueError, match="every query head of layer"):
        lp.prune_counts(args, 0.95, [1, 2], head_unit="query")
    with pytest.raises(ValueError, match="head_unit 'heads'"):
        lp.prune_counts(args, 0.3, [1], head_unit="heads")
    with pytest.raises(ValueError, match=r"uneven kv groups \[2, 1, 2\].*head_unit 'query'"):
        lp.prune_counts(UNEVEN, 0.2, [0])
    assert lp.prune_counts(UNEVEN, 0.2, [0, 1], head_unit="query")[0][0] >= 1  # an uneven model prunes again


def test_query_pruner_state_resumes_exactly():
    def fresh():
        return lp.Pruner(random_model(GQA_UNIFORM), ratio=0.3, total_steps=12, criterion="random", every=2,
                         layers=[1, 2], head_unit="query", seed=4)
    a, b = fresh(), fresh()
    for step in range(1, 7):
        a.update(step)
        b.update(step)
    state = b.state_dict()
    c = fresh()
    c.load_state_dict(state)
    for step in range(7, 13):
        a.update(step)
        c.update(step)
    assert all(torch.equal(x, y) for ma, mc in zip(a.masks, c.masks) for x, y in zip(ma, mc))
    assert all(torch.equal(x, y) for sa, sc in zip(a.scores, c.scores) for x, y in zip(sa, sc))
    assert len(a.scores[1]) == 3 and a.masks[1][0].shape == (GQA_UNIFORM.n_heads,)
    kv = lp.Pruner(random_model(GQA_UNIFORM), ratio=0.3, total_steps=12, criterion="random", layers=[1, 2])
    with pytest.raises(ValueError, match="head_unit 'query', this pruner's is 'kv'"):
        kv.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# a real model: stories260K (8 heads / 4 kv heads) pruned by query heads, saved and reloaded


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_sliced_uneven_stories260k_saves_and_reloads_identically(tmp_path, int8):
    model = formats.load(shared_file("stories260K.bin"), dtype=torch.float32)
    args = model.args
    g = torch.Generator().manual_seed(0)
    masks = query_masks(args, g, keep_whole_layer=args.n_layers - 1)
    lp.apply_masks(model, masks)
    x = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        masked = model(x)
        sliced = lp.slice_model(model, masks)
        torch.testing.assert_close(sliced(x), masked, rtol=1e-5, atol=1e-5)
    if int8:
        llama.quantize_model(sliced)
    out = formats.save_checkpoint(sliced, tmp_path / "uneven", kind="pruned")
    meta = json.loads((out / "params.json").read_text())
    assert meta["args"]["layer_q_per_kv"] == sliced.args.layer_q_per_kv
    assert any(len(set(c)) > 1 for c in meta["args"]["layer_q_per_kv"])
    loaded = formats.load(out, dtype=torch.float32)
    assert loaded.args == sliced.args
    with torch.no_grad():
        assert torch.equal(loaded(x), sliced(x))
    assert llama.count_params(loaded) == llama.count_params(sliced)


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


def test_default_criterion_normalizes_only_the_lora_estimates_and_exact_refuses_compiled_blocks():
    model = random_model(GQA, r=4)
    assert lp.Pruner(model, ratio=0.1, total_steps=4).criterion == "lora-directional"
    assert lp.Pruner(model, ratio=0.1, total_steps=4).normalize is True
    assert lp.Pruner(model, ratio=0.1, total_steps=4, criterion="lora").normalize is True
    assert lp.Pruner(model, ratio=0.1, total_steps=4, criterion="vanilla").normalize is False
    assert lp.Pruner(model, ratio=0.1, total_steps=4, criterion="lora", normalize=False).normalize is False
    model.layers[1].compile(backend="eager")  # only marks the block; nothing compiles until it runs
    with pytest.raises(ValueError, match="compiled block"):
        lp.Pruner(model, ratio=0.1, total_steps=4, criterion="exact")
