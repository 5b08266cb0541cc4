"""train.py: the learning-rate schedule, the data order, self-distillation's loss and teacher, and data-parallel
training under torchrun (two CPU processes, gloo) against one process on the same global batch: the same loss every
step, the same masks on both ranks and as one process, and only rank 0 writing --out. Plus the pieces: digests, and
ranks that disagree fail loudly."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import llama
import loraprune
import run
import train
from conftest import shared_file

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------------------------
# learning rate and data order


def test_lr_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(s, 100, 1.0) for s in range(101)]
    warmup = 3  # 3% of 100 steps
    assert lrs[:warmup] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # monotone after the warmup
    assert lrs[100] == pytest.approx(0.0, abs=1e-12) and lrs[99] > 0
    assert train.lr_at(0, 1, 1e-4) == 1e-4  # a one-step run still takes a step


def test_row_sampler_visits_each_row_once_per_epoch_and_resumes():
    sampler = train.RowSampler(10, seed=0)
    first = torch.cat([sampler.next(3) for _ in range(3)] + [sampler.next(1)])
    assert sorted(first.tolist()) == list(range(10))
    crossing = sampler.next(4)  # three into epoch 1 already
    state = sampler.state_dict()
    expected = [sampler.next(7) for _ in range(3)]
    again = train.RowSampler(10, seed=123)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next(7) for _ in range(3)]))
    assert crossing.unique().numel() == 4 and sampler.epoch == 3


def test_compile_warmup_is_the_first_step_beyond_the_median():
    assert train.compile_warmup([30.0, 1.0, 3.0, 2.0]) == pytest.approx(28.0)  # median of the later steps: 2
    assert train.compile_warmup([30.0, 1.0, 3.0]) == pytest.approx(28.0)  # even count: (1 + 3) / 2
    assert train.compile_warmup([30.0]) is None



def flags(out: Path, criterion: str) -> list:
    """Six optimizer steps of 4 sequences (micro-batch 1), pruning at every step, no dropout (its draws would differ
    between one process and two)."""
    return ["--ckpt", str(shared_file("stories260K.bin")), "--ratio", "0.5", "--steps", "6", "--prune-every", "1",
            "--batch-size", "4", "--micro-batch-size", "1", "--seq-len", "32", "--lr", "1e-3", "--lora-dropout", "0",
            "--criterion", criterion, "--data", str(shared_file("tinystories-train.txt")),
            "--eval", str(shared_file("tinystories-valid.txt")), "--eval-seq-len", "256", "--eval-tokens", "1024",
            "--out", str(out)]


def torchrun(argv: list, trace: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N run.py ...` (a free port, one thread per process), as users run it,
    each rank tracing every step to trace.<rank> (LORAPRUNE_TRACE, run.hooks_from_env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"], env["LORAPRUNE_TRACE"] = "1", str(trace)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(ROOT / "run.py"), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def read_trace(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def flat(masks) -> list:
    return [m for layer in masks for m in layer]


# ----------------------------------------------------------------------------------------------
# data parallel: two processes = one process on the combined batch


@pytest.mark.parametrize("criterion", ["lora", "vanilla"])  # vanilla: DDP all-reduces dL/dW of the pruned layers too
def test_two_processes_equal_one_on_the_combined_batch(criterion, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    with monkeypatch.context() as m:
        m.setenv("LORAPRUNE_TRACE", str(tmp_path / "one-trace"))
        assert run.main(flags(one, criterion)) == 0
    done = torchrun(flags(two, criterion), trace=tmp_path / "two-trace")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    # both ranks saw the same all-reduced loss and gradient norm and hold the same masks, bit for bit, every step
    single, rank0, rank1 = (read_trace(tmp_path / name) for name in ("one-trace.0", "two-trace.0", "two-trace.1"))
    assert len(rank0) == 6 and rank0 == rank1
    # ... and one process on the whole batch got the same masks and, up to float summation order, the same numbers
    assert [t["masks"] for t in rank0] == [t["masks"] for t in single]
    assert len({t["masks"] for t in single}) >= 4  # the masks really changed along the way
    for key in ("loss", "grad_norm"):
        assert [t[key] for t in rank0] == pytest.approx([t[key] for t in single], rel=1e-5), key

    # the moving-average importance and the adapters rank 0 saved agree with the one-process run
    s1, s2 = (torch.load(d / "resume.pt", weights_only=True) for d in (one, two))
    assert all(torch.equal(a, b) for a, b in zip(flat(s1["pruner"]["masks"]), flat(s2["pruner"]["masks"])))
    for a, b in zip(flat(s1["pruner"]["scores"]), flat(s2["pruner"]["scores"])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * a.abs().max().item())
    for name, a in s1["lora"].items():  # AdamW scales a near-zero gradient's rounding up to a full step (lr 1e-3)
        torch.testing.assert_close(s2["lora"][name], a, rtol=1e-3, atol=2e-5)
    assert len(s2["rng_per_rank"]) == 2 and "rng_per_rank" not in s1

    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for key in ("kv_heads_per_layer", "channels_per_layer", "params_after", "ppl_before", "steps_done"):
        assert r2[key] == r1[key], key
    assert r2["ppl_after"] == pytest.approx(r1["ppl_after"], rel=1e-4)
    assert r2["args"]["world_size"] == 2 and "world_size" not in r1["args"]

    # rank 0 alone wrote --out and printed; rank 1 left only its trace
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("step 6/6") == 1 and done.stdout.count("perplexity before") == 1
    assert "on each of 2 processes" in (two / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------
# the data-parallel pieces


def test_digest_tells_values_shapes_and_dtypes_apart():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert train.digest([x]) == train.digest([x.clone()])
    assert train.digest([x]) != train.digest([x.flip(0)])
    assert train.digest([x]) != train.digest([x.view(2, 2)])
    assert train.digest([x]) != train.digest([x.double()])
    assert train.digest([torch.tensor([True, False])]) != train.digest([torch.tensor([False, True])])


def _compare_on_ranks(rank: int, world: int, init_file: str, results) -> None:
    """One process of test_ranks_that_disagree_fail_loudly (spawned: module level, so it pickles by name)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train.same_on_all_ranks([torch.ones(3), torch.tensor([True])], "equal tensors")  # passes on every rank
        try:
            train.same_on_all_ranks([torch.ones(3) * (1 + rank)], "masks after step 7")
            results.put((rank, None))
        except RuntimeError as e:
            results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_fail_loudly(tmp_path):
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_compare_on_ranks, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    errors = dict(results.get() for _ in range(2))
    for rank in (0, 1):  # every rank raises, so no rank runs on with other masks
        assert errors[rank] and "masks after step 7 differ between processes: rank(s) [1]" in errors[rank]


# ----------------------------------------------------------------------------------------------
# self-distillation from the frozen weights


def test_distill_loss_equals_the_full_size_reference():
    """Chunked (with recomputation) against F.cross_entropy and F.kl_div on the whole (tokens x vocab) logits:
    the loss and its gradient."""
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 37, 11, generator=g)).requires_grad_()  # (B, T, V): 37 = 4 chunks of 10, 7 left
    teacher = 3 * torch.randn(2, 37, 11, generator=g)
    targets = torch.randint(0, 11, (2, 37), generator=g)
    for alpha, T in ((0.3, 2.0), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)):
        s, t = student.flatten(0, 1), teacher.flatten(0, 1)  # (N, V)
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
        reference = (1 - alpha) * F.cross_entropy(s, targets.flatten()) + alpha * T ** 2 * kl
        (expected,) = torch.autograd.grad(reference, student)
        loss = train.distill_loss(student, teacher, targets, alpha, T, chunk=10)
        (got,) = torch.autograd.grad(loss, student)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    # alpha = 0 is the plain cross-entropy and needs no teacher
    torch.testing.assert_close(train.distill_loss(student.detach(), None, targets, 0.0, chunk=5),
                               F.cross_entropy(student.detach().flatten(0, 1), targets.flatten()))


TINY = llama.ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=32)


def frozen_and_student(int8: bool):
    """(plain, student): a random model with no masks and no LoRA, and a copy of it with LoRA (B != 0, dropout on)
    and masks that drop a kv group and some channels in every layer, so the two disagree."""
    torch.manual_seed(0)
    plain = llama.Transformer(TINY)
    for p in plain.parameters():
        p.data.normal_(0, 0.2)
    if int8:
        llama.quantize_model(plain)
    student = copy.deepcopy(plain)
    llama.add_lora(student, r=4, alpha=8, dropout=0.1, seed=0)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    masks = [(torch.tensor([True, False]), torch.arange(48) % 3 > 0) for _ in range(TINY.n_layers)]
    loraprune.apply_masks(student, masks)
    return plain, student


@pytest.mark.parametrize("int8", [False, True])
def test_teacher_is_the_frozen_weights_unmasked_without_lora(int8):
    plain, student = frozen_and_student(int8)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    student.train()  # LoRA dropout live: the teacher must not see it either
    with torch.no_grad():
        expected = plain(x)
        masked = student.eval()(x)
        assert not torch.allclose(masked, expected, atol=1e-3)  # LoRA and masks change the logits
        with train.frozen_teacher(student.train()) as teacher:
            assert teacher is student  # the same modules and weights: no second copy
            torch.testing.assert_close(teacher(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(student.eval()(x), masked, rtol=0, atol=0)  # adapters and masks are back
    heads = [layer.attention.head_mask for layer in student.layers]
    assert all(h is not None and h.sum() == 2 for h in heads)


def test_backward_batch_distills_against_a_reference_and_alpha_zero_is_plain_ce():
    """backward_batch's gradients of the adapters with --distill 0.4 at T 2 equal those of the full-size reference
    loss against the plain frozen model's logits; with 0, those of the plain cross-entropy."""
    plain, student = frozen_and_student(int8=False)
    for layer in student.modules():
        if isinstance(layer, llama.LoRALinear):
            layer.lora_dropout = torch.nn.Identity()  # the reference below draws no dropout
    rows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))  # (b, T+1)
    lora = [p for p in student.parameters() if p.requires_grad]

    def grads_of(loss_fn) -> list:
        student.zero_grad(set_to_none=True)
        loss_fn()
        return [p.grad.clone() for p in lora]

    def reference(alpha, T):
        with torch.no_grad():
            t = plain(rows[:, :-1]).flatten(0, 1)  # (N, V)
        s = student(rows[:, :-1]).flatten(0, 1)
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
        ((1 - alpha) * F.cross_entropy(s, rows[:, 1:].flatten()) + alpha * T ** 2 * kl).backward()

    for alpha in (0.4, 0.0):
        got = grads_of(lambda: train.backward_batch(student, rows, 2, "cpu", distill=alpha, temperature=2.0))
        expected = grads_of(lambda: reference(alpha, 2.0))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
