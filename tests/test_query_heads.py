"""Query-head pruning (head_unit 'query', issue 10): uneven kv groups in the model and its params.json, the
attention against a per-head reference, the masked model against its sliced copy (float and int8), hand-counted
parameters, a kv head's rows going exactly with its last query head, scores against brute force, and the ratio."""
import json
import math
import re

import pytest
import torch

import formats
import llama
import loraprune as lp
import quant8
from conftest import shared_file
from test_loraprune import loss_and_grads, random_model

GQA = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64)
UNEVEN = llama.ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=40, max_seq_len=64,
                         layer_kv_heads=[3, 2, 1, 3], layer_q_per_kv=[[2, 1, 2], [1, 2], [1], [2, 2, 2]],
                         layer_hidden_dims=[40, 24, 7, 33])


def query_masks(args, g, keep_whole_layer: int = 0):
    """Random per-query-head masks: in every layer but `keep_whole_layer`, kv head 0 loses all its query heads
    (when the layer has another kv head), kv head 1 keeps one, the last (from 2 on) keeps all, others a random
    nonempty subset; random channels."""
    masks = []
    for l in range(args.n_layers):
        counts = args.q_per_kv(l)
        heads = torch.ones(sum(counts), dtype=torch.bool)
        if l != keep_whole_layer:
            start = 0
            for g_kv, n in enumerate(counts):
                part = torch.rand(n, generator=g) < 0.5
                if g_kv == 1 or not part.any():
                    part[:] = False
                    part[torch.randint(n, (1,), generator=g)] = True
                if g_kv == 0 and len(counts) > 1:
                    part[:] = False  # an emptied kv head
                if g_kv >= 2 and g_kv == len(counts) - 1:
                    part[:] = True
                heads[start:start + n] = part
                start += n
        channels = torch.rand(args.layer_hidden_dims[l], generator=g) < 0.5
        channels[0] = True
        masks.append((heads, channels))
    return masks


# ----------------------------------------------------------------------------------------------
# ModelArgs and params.json


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
    model = random_model(GQA, r=0)
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
    assert loaded.args == GQA and loaded.args.layer_q_per_kv is None
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------------------------
# attention with uneven groups against an explicit per-head softmax


def reference_attention(att, x, freqs_cis, q_per_kv):
    """Each query head on its own: softmax(q_h k_g^T / sqrt(D) + causal) v_g with g its kv head, then wo."""
    B, T, _ = x.shape
    D = att.head_dim
    q = llama.apply_rope(att.wq(x).view(B, T, -1, D), freqs_cis)  # (B, T, H, D)
    k = llama.apply_rope(att.wk(x).view(B, T, -1, D), freqs_cis)  # (B, T, K, D)
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
    freqs = llama.rope_frequencies(11, args.head_dim, args.rope_theta)
    with torch.no_grad():
        torch.testing.assert_close(att(x, freqs), reference_attention(att, x, freqs, q_per_kv), rtol=1e-10,
                                   atol=1e-10)


# ----------------------------------------------------------------------------------------------
# masks: masked model == sliced model, exact counts, kv rows with the last query head


@pytest.mark.parametrize("args", [GQA, UNEVEN], ids=["from-uniform", "from-uneven"])
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
    model = random_model(GQA, r=0)
    quant8.quantize_model(model)
    llama.add_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l in range(GQA.n_layers):
            for lin in llama.projections(model, l).values():
                assert isinstance(lin, quant8.Int8LoRALinear)
                lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.1)
    masks = query_masks(GQA, g)
    lp.apply_masks(model, masks)
    x = torch.randint(0, GQA.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        masked = model(x)
        sliced = lp.slice_model(model, masks, dtype=torch.float32)
        out = sliced(x)
    assert sliced.args.layer_q_per_kv is not None
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    assert llama.count_params(sliced) == lp.masked_param_count(GQA, masks)


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
    args = GQA
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
    from test_loraprune import brute_force_group_scores
    model = random_model(GQA)
    loss_and_grads(model)
    D, n_rep = GQA.head_dim, GQA.n_rep
    for l in range(GQA.n_layers):
        heads, channels, kv = lp.layer_query_scores(model, l, criterion)
        p = llama.projections(model, l)
        full = {n: (lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad, lin.lora_B.grad,
                                              lin.scaling) if criterion == "lora"
                    else lp.magnitude_importance(lin.merged_weight())) for n, lin in p.items()}
        bh = torch.tensor([(full["wq"][h * D:(h + 1) * D].sum() + full["wo"][:, h * D:(h + 1) * D].sum()).item()
                           for h in range(GQA.n_heads)], dtype=torch.float64)
        bkv = torch.tensor([(full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()).item()
                            for g in range(GQA.n_kv_heads)], dtype=torch.float64)
        torch.testing.assert_close(heads.double(), bh, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(kv.double(), bkv, rtol=1e-5, atol=1e-10)
        # with every head live, a group's shares add up to the kv-group score of head_unit 'kv'
        keep = torch.ones(GQA.n_heads, dtype=torch.bool)
        shared = lp.query_head_scores(heads, kv, keep, GQA.q_per_kv(l))
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
        return lp.Pruner(random_model(GQA), ratio=0.3, total_steps=12, criterion="random", every=2,
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
    assert len(a.scores[1]) == 3 and a.masks[1][0].shape == (GQA.n_heads,)
    kv = lp.Pruner(random_model(GQA), ratio=0.3, total_steps=12, criterion="random", layers=[1, 2])
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
        quant8.quantize_model(sliced)
    out = llama.save_checkpoint(sliced, tmp_path / "uneven", kind="pruned")
    meta = json.loads((out / "params.json").read_text())
    assert meta["args"]["layer_q_per_kv"] == sliced.args.layer_q_per_kv
    assert any(len(set(c)) > 1 for c in meta["args"]["layer_q_per_kv"])
    loaded = llama.load_checkpoint(out, dtype=torch.float32)
    assert loaded.args == sliced.args
    with torch.no_grad():
        assert torch.equal(loaded(x), sliced(x))
    assert llama.count_params(loaded) == llama.count_params(sliced)
