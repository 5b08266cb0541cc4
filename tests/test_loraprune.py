"""The paper's method against independent references: autograd gradients, brute-force group loops, hand counts, the
masked model vs its sliced copy (per kv group, and per query head as saved models may have it), and a real model where
Eq. 10 must beat random pruning. What is not in the paper is tested in test_variants.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
import formats
import llama
import loraprune as lp
from conftest import (GQA, GQA_UNIFORM, MHA, UNEVEN, brute_force_group_scores, group_scores, kept_query_heads,
                      loss_and_grads, pruned_counts, query_masks, random_kv_masks, random_model, shared_file)

# ----------------------------------------------------------------------------------------------
# the two exact facts of Eq. 7-10, with gradients from real autograd


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
    # and the criteria the Pruner calls reduce the same maps to the same sums
    rows, cols = lp.lora_sums(lin)
    torch.testing.assert_close(rows, eq3.sum(1), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(cols, eq3.sum(0), rtol=1e-4, atol=1e-12)
    rows, cols = lp.vanilla_sums(lin)
    torch.testing.assert_close(rows, eq3.sum(1), rtol=1e-4, atol=1e-12)
    assert lin.weight.grad is None  # read once, then freed


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
# Eq. 4: group sums (Pruner.score) against a brute-force loop over groups


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa-per-layer-sizes"])
@pytest.mark.parametrize("criterion", ["lora", "magnitude"])
def test_group_sums_match_brute_force(args, criterion):
    model = random_model(args)
    loss_and_grads(model)
    for l in range(args.n_layers):  # 'lora' is the Pruner's default criterion
        heads, channels = group_scores(model, l, None if criterion == "lora" else lp.magnitude_sums)
        bh, bc = brute_force_group_scores(model, l, criterion)
        assert heads.shape == (args.layer_kv_heads[l],) and channels.shape == (args.layer_hidden_dims[l],)
        torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(channels.double(), bc, rtol=1e-5, atol=1e-10)


def test_chunked_projection_sums_equal_unchunked():
    model = random_model(MHA)
    loss_and_grads(model)
    lin = llama.projections(model, 0)["w1"]
    rows1, cols1 = lp.lora_sums(lin, chunk_rows=5)
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


def test_query_head_masks_by_hand():
    q_per_kv = [2, 1, 3]  # kv head 0 serves query heads 0-1, kv head 1 head 2, kv head 2 heads 3-5
    assert lp.kv_of_heads(q_per_kv).tolist() == [0, 0, 1, 2, 2, 2]
    assert lp.query_keep(torch.tensor([True, False, True]), q_per_kv).tolist() == [True, True, False, True, True, True]
    q_keep = torch.tensor([True, False, False, True, True, False])
    assert lp.query_keep(q_keep, q_per_kv) is q_keep
    assert lp.query_heads_left(q_keep, q_per_kv).tolist() == [1, 0, 2]  # kv head 1 is emptied
    with pytest.raises(ValueError, match="3 kv heads and 6 query heads"):
        lp.query_keep(torch.ones(4, dtype=torch.bool), q_per_kv)


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa"])
def test_masked_model_equals_sliced_model(args):
    model = random_model(args).double()
    g = torch.Generator().manual_seed(5)
    masks = random_kv_masks(args, g)  # layer 0 keeps a single group
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


@pytest.mark.parametrize("channel_multiple", [1, 16])
def test_prune_counts_uniform_gives_one_shape(channel_multiple):
    """uniform=True: every layer loses the same counts (no carried rounding), so pruning all layers leaves one
    shape per layer (what transformers' LlamaForCausalLM holds); the total is within a multiple per layer of the
    target. Without it the carried rounding gives the same layers different counts. (run.py refuses --uniform with
    --head-unit query: test_run.py.)"""
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
    pruner = lp.Pruner(model, ratio=ratio, total_steps=1, criterion=lp.RandomSums(0), layers=layers)
    pruner.update(0)  # random scores
    sliced = lp.slice_model(model, pruner.next_masks(counts))
    assert sliced.args.layer_kv_heads == [2 - counts[0][0]] * 4
    assert sliced.args.layer_hidden_dims == [96 - counts[0][1]] * 4
    assert llama.count_params(sliced) == after  # LoRA merged away, nothing else left
    uneven = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96,
                             layer_hidden_dims=[96, 80])
    with pytest.raises(ValueError, match="pruned layers of one shape"):
        lp.prune_counts(uneven, 0.2, [0, 1], uniform=True)
    assert len(set(lp.prune_counts(uneven, 0.2, [1], uniform=True))) == 2  # one layer, and one left whole


# ----------------------------------------------------------------------------------------------
# the Pruner (Algorithm 1)


def test_pruner_default_is_eq10_as_written():
    """The paper's method unless asked otherwise: Eq. 10 squared (lora_sums), the projections' sums added as Eq. 4
    says (no normalisation), kv groups; run.py's defaults are the same."""
    import run
    model = random_model(GQA, r=4)
    pruner = lp.Pruner(model, ratio=0.1, total_steps=4)
    assert pruner.criterion is lp.lora_sums and pruner.normalize is None and isinstance(pruner.unit, lp.KVGroups)
    args = run.build_parser().parse_args(["--ckpt", "x"])
    assert (args.criterion, args.normalize, args.square, args.head_unit) == ("lora", False, True, "kv")
    assert run.CRITERIA[args.criterion] is lp.lora_sums and isinstance(run.HEAD_UNITS[args.head_unit], lp.KVGroups)
    loss_and_grads(model)  # and its scores are Eq. 10's plain group sums
    heads, channels = pruner.score(1)
    bh, bc = brute_force_group_scores(model, 1, "lora")
    torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(channels.double(), bc, rtol=1e-5, atol=1e-10)


def test_pruner_reaches_exact_target_per_layer():
    model = random_model(GQA)
    ratio, steps = 0.3, 24
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion=lp.RandomSums(1), every=3, layers=[0, 1, 3])
    history = []
    for step in range(1, steps + 1):
        pruner.update(step)
        history.append(pruned_counts(pruner))
    assert history[-1] == pruner.final_counts
    assert history[0] == [(0, 0)] * GQA.n_layers  # warm-up: nothing pruned yet
    for a, b in zip(history, history[1:]):  # monotone: a pruned group never comes back
        assert all(hb >= ha and cb >= ca for (ha, ca), (hb, cb) in zip(a, b))
    for h, c in pruner.masks:
        assert h.any() and c.any()  # never a whole layer
    assert pruned_counts(pruner)[2] == (0, 0)  # layer 2 was not in `layers`
    assert pruner.sparsity() == pytest.approx(ratio, abs=0.02)


def by_hand_threshold(scores: list, keep: list, n_pruned: int) -> list:
    """Eq. 12 with an exact count, written out: switch off the kept group of lowest score (the first on a tie) until
    n_pruned groups are off; off stays off."""
    keep = list(keep)
    while keep.count(False) < n_pruned:
        kept = [g for g in range(len(keep)) if keep[g]]
        keep[min(kept, key=lambda g: (scores[g], g))] = False
    return keep


@pytest.mark.parametrize("lam", [0.9, 0.5])
def test_pruner_masks_follow_the_scores_as_eq4_eq11_eq12_say(lam):
    """Algorithm 1 step by step against a reference written from the equations: each step's group scores by brute
    force (every weight's Eq. 10 summed over each group's index set, Eq. 4), smoothed by hand (Eq. 11, from zero),
    and at every mask update the lowest kept groups switched off one by one (Eq. 12) to the schedule's count. The
    Pruner's moving averages and masks must equal the reference's at every step: final counts alone would not tell
    whether the scores were used at all."""
    model = random_model(GQA)
    layers, steps, every = [1, 3], 12, 2
    pruner = lp.Pruner(model, ratio=0.3, total_steps=steps, every=every, layers=layers, lam=lam)
    smoothed = {l: (torch.zeros(GQA.layer_kv_heads[l], dtype=torch.float64),
                    torch.zeros(GQA.layer_hidden_dims[l], dtype=torch.float64)) for l in layers}
    keep = {l: ([True] * GQA.layer_kv_heads[l], [True] * GQA.layer_hidden_dims[l]) for l in layers}
    changes = 0
    for step in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        loss_and_grads(model, seed=100 + step)  # a new batch, new scores
        for l in layers:
            new = brute_force_group_scores(model, l, "lora")  # (K,), (F,) float64
            smoothed[l] = tuple(lam * old + (1 - lam) * n for old, n in zip(smoothed[l], new))
        fraction = lp.cubic_schedule(step, steps)
        if step % every == 0 or fraction == 1:
            counts = lp.counts_at(pruner.final_counts, fraction)
            for l in layers:
                keep[l] = tuple(by_hand_threshold(smoothed[l][i].tolist(), keep[l][i], counts[l][i]) for i in (0, 1))
        changes += pruner.update(step)
        for l in layers:
            for mine, ref in zip(pruner.scores[l], smoothed[l]):
                torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-9)
            assert [m.tolist() for m in pruner.masks[l]] == [list(k) for k in keep[l]], (step, l)
    assert pruned_counts(pruner) == pruner.final_counts and changes >= 3


def test_pruner_lora_needs_adapters_and_vanilla_needs_float():
    model = random_model(MHA, r=0)
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10)  # Eq. 10 reads A and B: one line saying so, at the first score
    with pytest.raises(ValueError, match="needs LoRA and its gradients on every projection.*without LoRA"):
        pruner.update(1)
    with pytest.raises(ValueError, match="vanilla criterion reads dL/dW; found no W.grad"):
        lp.vanilla_sums(llama.projections(model, 1)["w1"])
    llama.quantize_model(model)
    with pytest.raises(ValueError, match="vanilla criterion needs dL/dW, which an int8 weight does not have"):
        lp.require_weight_grads(model, [1])
    import run  # names are run.py's: an unknown one is argparse's error
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["--ckpt", "x", "--criterion", "nope"])


def test_vanilla_pruner_uses_weight_grads_and_frees_them():
    model = random_model(MHA)
    lp.require_weight_grads(model, [1])
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10, criterion=lp.vanilla_sums, layers=[1], lam=0.0)
    lin = llama.projections(model, 1)["w1"]
    assert lin.weight.requires_grad and not llama.projections(model, 0)["w1"].weight.requires_grad
    loss_and_grads(model)
    heads, channels = brute_force_group_scores(model, 1, "vanilla")
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[1][1].double(), channels, rtol=1e-5, atol=1e-10)  # lam = 0: the latest
    torch.testing.assert_close(pruner.scores[1][0].double(), heads, rtol=1e-5, atol=1e-10)
    assert lin.weight.grad is None


def test_pruner_state_resumes_exactly():
    def fresh():
        return lp.Pruner(random_model(GQA_UNIFORM), ratio=0.3, total_steps=12, criterion=lp.RandomSums(4), every=2,
                         layers=[1, 2])
    a, b = fresh(), fresh()
    for step in range(1, 7):
        a.update(step)
        b.update(step)
    c = fresh()
    c.load_state_dict(b.state_dict())  # scores, masks and the criterion's generator
    for step in range(7, 13):
        a.update(step)
        c.update(step)
    assert all(torch.equal(x, y) for ma, mc in zip(a.masks, c.masks) for x, y in zip(ma, mc))
    assert all(torch.equal(x, y) for sa, sc in zip(a.scores, c.scores) for x, y in zip(sa, sc))


# ----------------------------------------------------------------------------------------------
# masks per query head, as saved models may have them: masked model == sliced model, exact counts, a kv head's rows
# going with its last query head


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
        lp.apply_masks(model, kept_query_heads(args))
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
    masks = kept_query_heads(args)
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
    assert lp.head_params(args) == 2 * 4 * 16  # one query head or one kv head
    assert lp.group_params(args) == (4 * 4 * 16 + 2 * 4 * 16, 48)  # one kv group: 2 query heads + 1 kv head


def test_kv_rows_go_exactly_with_the_last_query_head():
    args = GQA_UNIFORM
    model = random_model(args).double()
    D, l = args.head_dim, 1
    wk = llama.projections(model, l)["wk"].merged_weight()  # (K*D, C)
    x = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    masks = kept_query_heads(args)
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
# a real model: stories260K (8 heads / 4 kv heads) sliced by query heads, saved and reloaded


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
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion=criterion, every=2)
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
    lora_ppl, lora_n = short_prune_run(lp.lora_sums)  # Eq. 10 as written, the Pruner's default
    random_ppl, random_n = short_prune_run(lp.RandomSums(0))
    assert lora_n == random_n  # the same parameter budget
    assert math.isfinite(lora_ppl) and lora_ppl < random_ppl, (lora_ppl, random_ppl)
