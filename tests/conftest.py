"""Shared test helpers. `from conftest import shared_file` works in every test file: pytest puts tests/ on
sys.path (there is no tests/__init__.py), and the repo root is added below so the modules under test import."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `import data`, `import llama`


def shared_file(name: str) -> Path:
    """data_dir()/name; if it is missing, fail under CI=true (never skip there), otherwise skip."""
    from data import data_dir  # imported here so a broken data.py breaks only the tests that use it

    path = data_dir() / name
    if not path.exists():
        message = f"shared data file {path} not found (set LORAPRUNE_DATA to the folder holding {name})"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """The shared_file helper as a fixture: `def test_x(shared): path = shared("tok512.model")`."""
    return shared_file


@pytest.fixture(scope="module")
def one_thread():
    """Whole-run tests on the 260K-parameter model gain nothing from threads, and on a busy 2-core machine
    they cost 10x: one thread for the module, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# tiny models with gradients, and brute-force group sums (test_loraprune.py; llama and loraprune are imported
# inside each helper, as data is above)


def random_model(args, r=4, seed=0, lora_b=0.1):
    """A model with random weights and LoRA whose B is nonzero (so every term of Eq. 10 is exercised)."""
    import llama
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


def random_batch(model, seed=1, T=16, B=2):
    """(B, T+1) random tokens from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (B, T + 1), generator=g)


def loss_and_grads(model, seed=1, T=16, B=2):
    """Mean next-token cross-entropy of a random batch, backpropagated (gradients accumulate)."""
    import torch.nn.functional as F
    x = random_batch(model, seed, T, B)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    return loss


def full_importance(model, l, criterion):
    """Every projection's whole (out, in) importance map of layer l: Eq. 10 ('lora') or W^2 ('magnitude')."""
    import llama
    import loraprune as lp
    full = {}
    for name, lin in llama.projections(model, l).items():
        if criterion == "lora":
            full[name] = lp.lora_guided_importance(lin.weight, lin.lora_A, lin.lora_B, lin.lora_A.grad,
                                                   lin.lora_B.grad, lin.scaling)
        else:
            full[name] = lp.magnitude_importance(lin.merged_weight())
    return full


def brute_force_group_scores(model, l, criterion):
    """Form every projection's full (out, in) importance and sum it over each group's explicit index set:
    (K,) kv groups and (F,) channels, float64."""
    args, full = model.args, full_importance(model, l, criterion)
    D, n_rep, K = args.head_dim, args.n_rep, args.layer_kv_heads[l]
    heads = torch.zeros(K, dtype=torch.float64)
    for g in range(K):
        for qh in range(g * n_rep, (g + 1) * n_rep):  # the query heads that share kv head g
            heads[g] += full["wq"][qh * D:(qh + 1) * D].sum() + full["wo"][:, qh * D:(qh + 1) * D].sum()
        heads[g] += full["wk"][g * D:(g + 1) * D].sum() + full["wv"][g * D:(g + 1) * D].sum()
    Fw = args.layer_hidden_dims[l]
    channels = torch.tensor([(full["w1"][c].sum() + full["w3"][c].sum() + full["w2"][:, c].sum()).item()
                             for c in range(Fw)], dtype=torch.float64)
    return heads, channels


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
