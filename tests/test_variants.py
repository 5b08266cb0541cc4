"""What is not in the paper (variants.py), against independent references: the direction-aware estimate against
exact autograd gradients, L2 normalisation by hand, criterion 'exact' against W.grad (one micro-batch or several,
activation checkpointing, int8, compiled blocks, and its sampled form's expectation), and the query-head unit
(brute-force scores, thresholds by hand, the ratio counted with emptied kv heads, resume)."""
import copy
import math

import pytest
import torch

import llama
import loraprune as lp
import variants
from conftest import (GQA, GQA_UNIFORM, MHA, UNEVEN, brute_force_group_scores, full_importance, group_scores,
                      loss_and_grads, pruned_counts, random_model)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, and threads only contend

# ----------------------------------------------------------------------------------------------
# the direction-aware LoRA estimate (criterion 'lora-directional') against exact autograd gradients


def one_projection_with_lora(target, r_of, seed=3, s=1.0):
    """A tiny model whose only LoRA sits on `target`, with rank r_of(lin) and scaling s, W.grad switched on."""
    args = llama.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=24, max_seq_len=32)
    model = random_model(args, r=0, seed=seed)
    lin = llama.projections(model, 1)[target]
    r = r_of(lin)
    llama.add_lora(model, r=r, alpha=s * r, dropout=0.0, targets=(target,))  # s = alpha / r
    lin.weight.requires_grad_(True)
    return model, lin


@pytest.mark.parametrize("target", ["wq", "w2"])
def test_directional_rows_are_exact_with_square_orthogonal_A_and_B_zero(target):
    model, lin = one_projection_with_lora(target, lambda lin: lin.in_features)
    n = lin.in_features
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4)))
    lin.lora_A.data.copy_(Q)  # A.T @ A = I, and B = 0: s * gB @ A = G exactly
    loss_and_grads(model)
    rows, cols = variants.directional_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad,
                                                 lin.lora_B.grad, 1.0)
    exact = lp.vanilla_importance(lin.weight, lin.weight.grad)
    assert exact.sum() > 0
    torch.testing.assert_close(rows, exact, rtol=1e-4, atol=1e-12)
    assert cols.abs().max() == 0  # B = 0: nothing is known of the columns yet
    row_sums, _ = variants.directional_sums(lin, chunk_rows=5)
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
    rows, cols = variants.directional_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad,
                                                 lin.lora_B.grad, 1.0)
    exact = lp.vanilla_importance(lin.merged_weight(), lin.weight.grad)  # (G ⊙ (W + s B A))^2
    torch.testing.assert_close(cols, exact, rtol=1e-4, atol=1e-12)
    _, col_sums = variants.directional_sums(lin, chunk_rows=3)
    torch.testing.assert_close(col_sums, exact.sum(0), rtol=1e-4, atol=1e-12)
    # Eq. 10 as written mixes the rows into every column here (its gB @ A term): not exact
    eq10 = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad, 1.0)
    assert not torch.allclose(eq10.sum(0), exact.sum(0), rtol=1e-2)


def only(lin, criterion):
    """A criterion that scores `lin` with `criterion` and every other projection as zeros (they have no LoRA)."""
    def sums(other):
        if other is lin:
            return criterion(other)
        zero = torch.zeros((), device=other.weight.device)
        return zero.expand(other.out_features).clone(), zero.expand(other.in_features).clone()
    return sums


@pytest.mark.parametrize("normalize", [None, variants.l2_normalized], ids=["plain", "l2"])
def test_directional_with_scaling_is_s4_times_eq3(normalize):
    """With s = alpha / r = 3: gB = s G A^T and gA = s B^T G, so with square orthogonal A and B = 0 the row map is
    (s gB @ A ⊙ W)^2 = s^4 (G ⊙ W)^2, and with square orthogonal B the column map is (s B @ gA ⊙ M)^2 = s^4 (G ⊙ M)^2,
    M = W + s B @ A. Through Pruner.score the channel scores of w1 (rows) and w2 (columns) are then s^4 times Eq. 3's
    without normalisation, and Eq. 3's normalised with it."""
    s = 3.0
    for target, r_of in (("w1", lambda lin: lin.in_features), ("w2", lambda lin: lin.out_features)):
        model, lin = one_projection_with_lora(target, r_of, s=s)
        n = r_of(lin)
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(8)))
        with torch.no_grad():
            if target == "w1":
                lin.lora_A.copy_(Q)  # A.T @ A = I, B = 0
            else:
                lin.lora_B.copy_(Q)  # B @ B.T = I
                lin.lora_A.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
        assert lin.scaling == s
        loss_and_grads(model)
        exact = lp.vanilla_importance(lin.merged_weight(), lin.weight.grad)  # (G ⊙ (W + s B A))^2
        rows, cols = variants.directional_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad,
                                                     lin.lora_B.grad, lin.scaling)
        torch.testing.assert_close(rows if target == "w1" else cols, s ** 4 * exact, rtol=1e-4, atol=1e-12)
        _, channels = group_scores(model, 1, only(lin, variants.directional_sums), normalize=normalize)
        reference = exact.sum(1) if target == "w1" else exact.sum(0)  # (F,)
        reference = s ** 4 * reference if normalize is None else reference / reference.norm()
        torch.testing.assert_close(channels, reference, rtol=1e-4, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# L2 normalisation (the official code's) of each projection's per-unit vector, in Pruner.score


def test_l2_normalised_unit_scores_by_hand():
    g = torch.Generator().manual_seed(7)
    D, H, K, Fw, C = 2, 4, 2, 5, 8
    shapes = {"wq": (H * D, C), "wk": (K * D, C), "wv": (K * D, C), "wo": (C, H * D), "w1": (Fw, C), "w3": (Fw, C),
              "w2": (C, Fw)}
    sums = {name: (torch.rand(o, generator=g), torch.rand(i, generator=g)) for name, (o, i) in shapes.items()}
    sums["wv"] = (torch.zeros(K * D), sums["wv"][1])  # an all-zero part (B = 0) must add nothing, not NaN
    model = llama.Transformer(llama.ModelArgs(dim=C, n_layers=1, n_heads=H, n_kv_heads=K, vocab_size=16,
                                              hidden_dim=Fw))
    name_of = {lin: name for name, lin in llama.projections(model, 0).items()}
    for lin, name in name_of.items():
        assert (lin.out_features, lin.in_features) == shapes[name]

    def given(lin):  # a criterion that hands over the sums above
        return sums[name_of[lin]]

    def unit(v):  # a list divided by its Euclidean length
        norm = math.sqrt(sum(float(x) ** 2 for x in v))
        return [float(x) / norm for x in v]
    q = unit([float(sums["wq"][0][h * D:(h + 1) * D].sum()) for h in range(H)])
    o = unit([float(sums["wo"][1][h * D:(h + 1) * D].sum()) for h in range(H)])
    k = unit([float(sums["wk"][0][j * D:(j + 1) * D].sum()) for j in range(K)])
    v = [0.0] * K  # wv's all-zero part
    w1, w3, w2 = unit(sums["w1"][0].tolist()), unit(sums["w3"][0].tolist()), unit(sums["w2"][1].tolist())
    query = variants.QueryHeads()  # its scores keep the query heads' (H,) and the kv heads' (K,) sums apart
    att, channels = group_scores(model, 0, given, query, normalize=variants.l2_normalized)
    torch.testing.assert_close(att[:H].double(), torch.tensor(q, dtype=torch.float64) + torch.tensor(o))
    torch.testing.assert_close(att[H:].double(), torch.tensor(k, dtype=torch.float64) + torch.tensor(v))
    torch.testing.assert_close(channels.double(), torch.tensor(w1, dtype=torch.float64) + torch.tensor(w3)
                               + torch.tensor(w2))
    _, raw = group_scores(model, 0, given, query)  # and without normalize, the plain sums of Eq. 4
    torch.testing.assert_close(raw, sums["w1"][0] + sums["w3"][0] + sums["w2"][1])


@pytest.mark.parametrize("criterion", ["lora", "lora-directional"])
def test_pruner_scores_with_normalize_are_layer_scores(criterion):
    model = random_model(GQA)
    sums = {"lora": lp.lora_sums, "lora-directional": variants.directional_sums}[criterion]
    pruner = lp.Pruner(model, ratio=0.2, total_steps=10, criterion=sums, layers=[1, 3], lam=0.0,
                       normalize=variants.l2_normalized)
    loss_and_grads(model)
    att, channels = group_scores(model, 3, sums, variants.QueryHeads(), variants.l2_normalized)
    H = GQA.layer_n_heads[3]
    pruner.update(1)
    torch.testing.assert_close(pruner.scores[3][0], lp.KVGroups().scores(att[:H], att[H:], GQA.q_per_kv(3)))
    torch.testing.assert_close(pruner.scores[3][1], channels)
    assert 1 - 1e-5 <= channels.norm() <= 3 + 1e-5  # a sum of three unit vectors of non-negative entries


# ----------------------------------------------------------------------------------------------
# criterion 'exact': Eq. 3's sums from each projection's own backward (eager and compiled), against W.grad


EXACT = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=32)


def float_twin(model):
    """A copy of `model` whose every W is a float32 Parameter that can take a gradient: an int8 W dequantized (its
    values exactly), so Eq. 3 from W.grad is the reference for an int8 model too."""
    twin = copy.deepcopy(model)
    for lin in (m for m in twin.modules() if isinstance(m, llama.LoRALinear)):
        lin.weight = torch.nn.Parameter(lin.dense_weight().float().clone(), requires_grad=False)
        lin.scales = None
    return twin


def per_micro_batch_eq3(twin, layers, seeds):
    """{(l, name): (row sums, column sums)} of Eq. 3 (W.grad ⊙ (W + s B A))^2 of each micro-batch alone, added over
    the micro-batches: what the exact criterion must give under accumulation (the sum of each one's Eq. 3; with
    one micro-batch, Eq. 3 of the batch)."""
    lp.require_weight_grads(twin, layers)
    total = {}
    for seed in seeds:
        twin.zero_grad(set_to_none=True)
        loss_and_grads(twin, seed=seed)
        for l in layers:
            for name, lin in llama.projections(twin, l).items():
                rows, cols = lp.vanilla_sums(lin)
                old = total.get((l, name), (0, 0))
                total[l, name] = (old[0] + rows, old[1] + cols)
    return total


def assert_exact_sums(criterion, expected, layers, both: bool = False):
    """The side Eq. 4 reads of every projection (rows; columns of wo and w2) equals `expected`, the other is zero
    (`both`: both sides equal it)."""
    for l in layers:
        got = criterion.take(l)
        assert set(got) == set(llama.PROJECTIONS)
        for name, pair in got.items():
            kept = 1 if name in ("wo", "w2") else 0
            for side in (0, 1) if both else (kept,):
                ref = expected[l, name][side]
                assert ref.abs().sum() > 0
                torch.testing.assert_close(pair[side], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
            assert both or pair[1 - kept].abs().sum() == 0
        assert all(p.abs().sum() == 0 for pair in criterion.take(l).values() for p in pair)  # take() zeroed them


def exact_model(int8: bool):
    model = random_model(EXACT, r=0 if int8 else 4)
    if int8:
        llama.quantize_model(model)
        llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
        for lin in (m for m in model.modules() if isinstance(m, llama.LoRALinear)):
            lin.lora_B.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_exact_scores_equal_eq3_from_w_grad(micro_batches, checkpoint, int8):
    """Eager: the probes' sums equal Eq. 3 from W.grad of a float twin, per micro-batch added (one micro-batch: Eq.
    3 of the batch). Activation checkpointing recomputes the probes' forward, and the sums are counted once."""
    model = exact_model(int8)
    twin = float_twin(model)
    model.checkpoint_activations = checkpoint
    layers, seeds = [1], [1, 2][:micro_batches]
    criterion = variants.ExactSums(model, layers)
    for seed in seeds:
        loss_and_grads(model, seed=seed)
    assert not any(lin.weight.requires_grad for lin in llama.projections(model, 1).values())  # no dL/dW kept
    assert_exact_sums(criterion, per_micro_batch_eq3(twin, layers, seeds), layers)
    with torch.no_grad():  # an eval forward adds nothing
        model(torch.randint(0, EXACT.vocab_size, (1, 8)))
    assert all(r.abs().sum() == 0 for r, _ in criterion.take(1).values())
    criterion.remove()
    loss_and_grads(model, seed=3)
    assert all(lin.probe is None for lin in llama.projections(model, 1).values())
    assert not any("probe" in name for name, _ in model.named_parameters())  # removed: nothing left to add to


def test_exact_probes_asked_for_both_sides_give_both():
    """ExactProbe.by_rows = None (bench_scale's `both` knob) keeps the row and the column sums, each Eq. 3 from W.grad."""
    model = exact_model(False)
    twin = float_twin(model)
    criterion = variants.ExactSums(model, [1])
    for lin in criterion.linears.values():
        lin.probe.by_rows = None
    loss_and_grads(model, seed=1)
    assert_exact_sums(criterion, per_micro_batch_eq3(twin, [1], [1]), [1], both=True)


@pytest.mark.parametrize("int8, checkpoint, sample", [(False, False, None), (False, True, None), (True, True, None),
                                                      (False, True, 3)],
                         ids=["float", "float-checkpointing", "int8-checkpointing", "sampled-checkpointing"])
def test_exact_scores_in_compiled_blocks(int8, checkpoint, sample):
    """Blocks compiled with Inductor (the probes' backward traced into the block's graph, no graph break): two
    micro-batches a step for three steps equal Eq. 3 from W.grad per micro-batch added, as eager does; the sampled
    form equals its eager run draw for draw, and new draws compile nothing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = exact_model(int8)
    twin, eager = float_twin(model), copy.deepcopy(model)
    model.checkpoint_activations = checkpoint
    layers = [1]
    criterion = variants.ExactSums(model, layers, sample=sample, seed=4)
    reference = variants.ExactSums(eager, layers, sample=sample, seed=4) if sample else None
    llama.compile_blocks(model)
    counters.clear()
    for step in range(3):
        seeds = [10 * step + 1, 10 * step + 2]
        for seed in seeds:
            loss_and_grads(model, seed=seed)
        if sample:
            for seed in seeds:
                loss_and_grads(eager, seed=seed)
            got, want = criterion.take(1), reference.take(1)
            for name in llama.PROJECTIONS:
                side = 1 if name in ("wo", "w2") else 0
                assert want[name][side].abs().sum() > 0
                torch.testing.assert_close(got[name][side], want[name][side], rtol=1e-4,
                                           atol=1e-6 * want[name][side].abs().max().item())
        else:
            assert_exact_sums(criterion, per_micro_batch_eq3(twin, layers, seeds), layers)
        model.zero_grad(set_to_none=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # block 0 (its input needs no grad) and block 1, compiled once
    torch._dynamo.reset()


def record_inputs_and_grads(lin) -> tuple[list, object]:
    """[(x, dL/dy)] of every forward/backward of `lin`, and the hook's handle."""
    recorded = []

    def hook(module, inputs, output):
        entry = [inputs[0].detach(), None]
        recorded.append(entry)
        output.register_hook(lambda g: entry.__setitem__(1, g))
    return recorded, lin.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["w1", "wo", "w2"])
def test_sampled_exact_sums_are_unbiased_under_accumulation(name):
    """--exact-sample k: the groups' side of each projection (rows of w1, columns of wo and w2) from k sampled
    columns (rows) of the gradient accumulated over two micro-batches, importance-weighted. The mean over many
    draws is Eq. 3's sums of the accumulated gradient (W.grad), which the plain sums (each micro-batch's Eq. 3
    added) are not. Each draw's accumulated gradient is what the probe's backward would give (sampled_gradient)."""
    model = random_model(MHA).double()
    lin = llama.projections(model, 1)[name]
    lin.weight.requires_grad_(True)
    recorded, handle = record_inputs_and_grads(lin)
    loss_and_grads(model, seed=1)
    loss_and_grads(model, seed=2)  # accumulated: W.grad is the batch's
    handle.remove()
    side = 1 if name in ("wo", "w2") else 0  # where Eq. 4 reads this projection
    exact = lp.vanilla_sums(lin)[side]
    criterion = variants.ExactSums(model, [1], sample=4, seed=0)
    probe, draws = lin.probe, 3000
    mean = torch.zeros_like(exact, dtype=torch.float64)
    for _ in range(draws):
        parts = [variants.sampled_gradient(x, dy, probe.idx, probe.by_rows) for x, dy in recorded]
        probe.sums.grad = torch.cat([sum(p for p, _ in parts).flatten(), sum(n for _, n in parts)]).float()
        estimate = criterion(lin)  # and the next draw
        assert estimate[1 - side].abs().sum() == 0  # the other side is not estimated
        mean += estimate[side].double() / draws
    torch.testing.assert_close(mean, exact.double(), rtol=0.08, atol=0)  # 3000 draws of 4 columns of 32
    per_micro = sum(variants.gradient_sums(x, dy, lambda r: lp.merged_rows(lin, r))[side] for x, dy in recorded)
    assert (per_micro - exact).abs().max() > 0.2 * exact.abs().max()  # what the plain sums would have said


def test_pruner_with_sampled_exact_scores_prunes_to_target():
    model = random_model(GQA)
    criterion = variants.ExactSums(model, [1, 3], sample=3)
    pruner = lp.Pruner(model, ratio=0.3, total_steps=4, criterion=criterion, every=1, layers=[1, 3])
    for step in range(1, 5):
        loss_and_grads(model, seed=step, B=1)
        loss_and_grads(model, seed=10 + step, B=1)  # two micro-batches a step
        pruner.update(step)
        model.zero_grad(set_to_none=True)
    assert pruned_counts(pruner) == pruner.final_counts
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for l in (1, 3) for s in pruner.scores[l])


def test_sampled_exact_state_resumes_exactly():
    """The sampled criterion's generator, draws and last-step norms travel with the Pruner's state: a pruner restored
    from it draws the columns an unbroken one draws."""
    def fresh():
        model = random_model(GQA)
        criterion = variants.ExactSums(model, [1, 3], sample=3, seed=5)
        return model, lp.Pruner(model, ratio=0.3, total_steps=6, criterion=criterion, every=1, layers=[1, 3])

    def step(model, pruner, i):
        loss_and_grads(model, seed=i, B=1)
        loss_and_grads(model, seed=10 + i, B=1)
        pruner.update(i)
        model.zero_grad(set_to_none=True)
    (ma, a), (mb, b), (mc, c) = fresh(), fresh(), fresh()
    for i in range(1, 4):
        step(ma, a, i)
        step(mb, b, i)
    c.load_state_dict(b.state_dict())
    for i in range(4, 7):
        step(ma, a, i)
        step(mc, c, i)
    assert all(torch.equal(x, y) for sa, sc in zip(a.scores, c.scores) for x, y in zip(sa, sc))
    assert all(torch.equal(x, y) for sa, sc in zip(a.masks, c.masks) for x, y in zip(sa, sc))


def test_exact_criterion_prunes_int8_weights_to_target():
    model = random_model(GQA, r=0)
    llama.quantize_model(model)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    pruner = lp.Pruner(model, ratio=0.3, total_steps=4, criterion=variants.ExactSums(model, [1, 3]), every=1,
                       layers=[1, 3], lam=0.0)
    for step in range(1, 5):
        loss_and_grads(model, seed=step)
        pruner.update(step)
        model.zero_grad(set_to_none=True)
    assert pruned_counts(pruner) == pruner.final_counts
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for l in (1, 3) for s in pruner.scores[l])


# ----------------------------------------------------------------------------------------------
# the query-head unit: scores (Eq. 4 with query heads) and thresholds


@pytest.mark.parametrize("criterion", ["lora", "magnitude"])
def test_query_scores_match_brute_force_and_sum_to_kv_groups(criterion):
    model = random_model(GQA_UNIFORM)
    loss_and_grads(model)
    D, n_rep, H = GQA_UNIFORM.head_dim, GQA_UNIFORM.n_rep, GQA_UNIFORM.n_heads
    sums = {"lora": lp.lora_sums, "magnitude": lp.magnitude_sums}[criterion]
    for l in range(GQA_UNIFORM.n_layers):
        att, channels = group_scores(model, l, sums, variants.QueryHeads())
        heads, kv = att[:H], att[H:]
        full = full_importance(model, l, criterion)
        bh = torch.tensor([(full["wq"][h * D:(h + 1) * D].sum() + full["wo"][:, h * D:(h + 1) * D].sum()).item()
                           for h in range(GQA_UNIFORM.n_heads)], dtype=torch.float64)
        bkv = torch.tensor([(full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()).item()
                            for g in range(GQA_UNIFORM.n_kv_heads)], dtype=torch.float64)
        torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(kv.double(), bkv, rtol=1e-5, atol=1e-10)
        # with every head live, a group's shares add up to the kv-group score of the paper's unit
        keep = torch.ones(GQA_UNIFORM.n_heads, dtype=torch.bool)
        shared = variants.query_head_scores(heads, kv, keep, GQA_UNIFORM.q_per_kv(l))
        groups, _ = brute_force_group_scores(model, l, criterion)
        torch.testing.assert_close(shared.double().view(-1, n_rep).sum(1), groups, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(channels.double(), brute_force_group_scores(model, l, criterion)[1],
                                   rtol=1e-5, atol=1e-10)


def test_query_head_scores_share_the_kv_rows_among_live_heads():
    heads = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kv = torch.tensor([6.0, 10.0])
    q_per_kv = [3, 2]
    keep = torch.tensor([True, False, True, True, True])
    assert variants.query_head_scores(heads, kv, keep, q_per_kv).tolist() == [4.0, 5.0, 6.0, 9.0, 10.0]
    keep[2] = False  # head 0 is the last of kv head 0: it carries the whole kv score
    assert variants.query_head_scores(heads, kv, keep, q_per_kv)[0].item() == 7.0
    # one head at a time, re-sharing after each: scores [1+3, 2+3, 5+1, 4.5+1] drop head 0; then head 1 is the
    # last of kv head 0 (2 + 6 = 8), so head 3 (5.5) goes, not head 1 (a one-shot threshold would take 0 and 1)
    heads, kv = torch.tensor([1.0, 2.0, 5.0, 4.5]), torch.tensor([6.0, 2.0])
    all_kept = torch.ones(4, dtype=torch.bool)
    assert lp.threshold_mask(variants.query_head_scores(heads, kv, all_kept, [2, 2]), all_kept, 2).tolist() == \
        [False, False, True, True]
    keep = variants.threshold_query_heads(heads, kv, all_kept, [2, 2], 2)
    assert keep.tolist() == [False, True, True, False]
    keep = variants.threshold_query_heads(heads, kv, keep, [2, 2], 3)  # last heads now: 2 + 6 = 8 vs 5 + 2 = 7
    assert keep.tolist() == [False, True, False, False]
    # the unit's threshold reads the same two parts from its (H + K,) scores
    unit = variants.QueryHeads()
    assert torch.equal(unit.threshold(unit.scores(heads, kv, [2, 2]), all_kept, [2, 2], 2),
                       variants.threshold_query_heads(heads, kv, all_kept, [2, 2], 2))


# ----------------------------------------------------------------------------------------------
# the query-head unit: the ratio, the Pruner and its state


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
    pruner = lp.Pruner(model, ratio=ratio, total_steps=steps, criterion=lp.magnitude_sums, every=2, layers=layers,
                       unit=variants.QueryHeads())
    nominal = pruner.final_counts
    for step in range(1, steps + 1):
        pruner.update(step)
    per_kv = lp.head_params(args)
    per_channel = 3 * args.dim
    emptied = [int((lp.query_heads_left(h, args.q_per_kv(l)) == 0).sum()) for l, (h, _) in enumerate(pruner.masks)]
    assert [emptied[l] for l in layers] == [1] * 4  # kv head 0 went with its two query heads
    assert all(not pruner.masks[l][0][:2].any() for l in layers)
    assert [c[0] for c in pruned_counts(pruner)] == [h for h, _ in nominal]
    total = lp.masked_param_count(args, lp.full_masks(args))
    removed = total - lp.masked_param_count(args, pruner.masks)
    assert abs(removed - ratio * total) <= 2 * per_channel  # within two channels of the target...
    # ...which the nominal channel counts (the emptied kv heads' rows not given back to the MLP) overshoot
    heads_left = [lp.query_heads_left(h, args.q_per_kv(l)) for l, (h, _) in enumerate(pruner.masks)]
    kv_kept, q_kept = [int((n > 0).sum()) for n in heads_left], [int(n.sum()) for n in heads_left]
    nominal_removed = total - lp.count_base_params(args, kv_kept, [96 - c for _, c in nominal], q_kept)
    assert nominal_removed - ratio * total > 4 * per_kv - 2 * per_channel
    assert sum(c for _, c in pruned_counts(pruner)) < sum(c for _, c in nominal)  # the MLP gave them back
    # unpruned layers stay whole
    assert pruned_counts(pruner)[0] == pruned_counts(pruner)[5] == (0, 0)


def test_prune_counts_query_unit_and_errors():
    args = RATIO_ARGS
    kv = lp.prune_counts(args, 0.3, [1, 2, 3, 4])
    query = lp.prune_counts(args, 0.3, [1, 2, 3, 4], unit=variants.QueryHeads())
    assert kv != query and all(h < 8 for h, _ in query)
    with pytest.raises(ValueError, match="every query head of layer"):
        lp.prune_counts(args, 0.95, [1, 2], unit=variants.QueryHeads())
    import run  # unit names are run.py's: an unknown one is argparse's error
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["--ckpt", "x", "--head-unit", "heads"])
    with pytest.raises(ValueError, match=r"uneven kv groups \[2, 1, 2\].*--head-unit query"):
        lp.prune_counts(UNEVEN, 0.2, [0])
    assert lp.prune_counts(UNEVEN, 0.2, [0, 1], unit=variants.QueryHeads())[0][0] >= 1  # an uneven model prunes again


def test_query_pruner_state_resumes_exactly():
    def fresh():
        return lp.Pruner(random_model(GQA_UNIFORM), ratio=0.3, total_steps=12, criterion=lp.RandomSums(4), every=2,
                         layers=[1, 2], unit=variants.QueryHeads())
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
    H, K = GQA_UNIFORM.n_heads, GQA_UNIFORM.n_kv_heads  # query heads' and kv heads' scores, each smoothed apart
    assert a.scores[1][0].shape == (H + K,) and a.masks[1][0].shape == (H,)
    kv = lp.Pruner(random_model(GQA_UNIFORM), ratio=0.3, total_steps=12, criterion=lp.RandomSums(), layers=[1, 2])
    with pytest.raises(ValueError, match="unit 'query', this pruner's is 'kv'"):
        kv.load_state_dict(state)
