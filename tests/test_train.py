"""train.py: the learning-rate schedule, the data order, the loop (its call order, many runs on one model equal to
fresh runs, resume in process, NaN), self-distillation's loss and teacher, and data-parallel training under torchrun
(two CPU processes, gloo) against one process on the same global batch: the same loss every step, the same masks on
both ranks and as one process, and only rank 0 writing --out. Plus the pieces: digests, and ranks that disagree fail
loudly."""
import copy
import errno
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
from conftest import randomize_, shared_file

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


# ----------------------------------------------------------------------------------------------
# the loop: its call order, one model for many runs, resume, NaN


LOOP = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=32)
ROWS = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(3))  # (N, T+1) training rows


def loaded_model() -> llama.Transformer:
    """A model as loaded: seeded random weights, no adapters, no masks."""
    return randomize_(llama.Transformer(LOOP), seed=0)


def start_run(model, criterion: str, seed: int, **settings):
    """Fresh adapters (dropout on) and a fresh Pruner (a mask change every step) on `model`; the run at step 0."""
    args = train.TrainArgs(**{"steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "seed": seed,
                              "save_every": 2, **settings})
    lora = llama.add_lora(model, r=4, alpha=8, dropout=0.1, seed=seed)
    criterion = run.make_criterion(criterion, model, [0, 1], seed=seed)  # run.py's --criterion names
    pruner = loraprune.Pruner(model, ratio=0.4, total_steps=args.steps, criterion=criterion, every=1, layers=[0, 1],
                              channel_multiple=1)
    return train.Training.start(model, lora, pruner, args, ROWS), args


def outcome(t: train.Training, losses: list) -> dict:
    """What a run leaves: every step's loss, its adapters, masks and moving-average scores."""
    return {"losses": losses, "lora": [p.detach().clone() for p in t.lora_params], "masks": t.masks(),
            "scores": [s.clone() for layer in t.pruner.scores for s in layer]}


def train_run(t: train.Training, args: train.TrainArgs, **kwargs) -> dict:
    losses = []
    train.train_loop(t, ROWS, args, "cpu", observe=lambda t, norm: losses.append(t.loss), **kwargs)
    return outcome(t, losses)


def assert_same(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    for key in ("lora", "masks", "scores"):
        assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key


def test_loop_calls_in_the_official_order(monkeypatch):
    """Each step: backward of the whole batch, clipping, Pruner.update (it sees the clipped batch gradients and
    the step's lr), the observer, AdamW's step; save() every save_every steps and at the last."""
    model = loaded_model()
    t, args = start_run(model, "lora", seed=0, grad_clip=0.05)  # small enough that every step is clipped
    calls, seen = [], []
    backward, clip, update, step = train.backward_batch, torch.nn.utils.clip_grad_norm_, t.pruner.update, \
        t.optimizer.step
    monkeypatch.setattr(train, "backward_batch", lambda *a, **k: calls.append("backward") or backward(*a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append("clip") or clip(*a, **k))

    def spy_update(s):
        calls.append("update")
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.lora_params]))
        seen.append((s, norm.item(), t.optimizer.param_groups[0]["lr"]))
        return update(s)
    t.pruner.update = spy_update
    t.optimizer.step = lambda *a, **k: calls.append("adamw") or step(*a, **k)
    train.train_loop(t, ROWS, args, "cpu", save=lambda: calls.append("save"),
                     observe=lambda t, norm: calls.append("observe"))
    per_step = ["backward", "clip", "update", "observe", "adamw"]
    assert calls == (per_step * 2 + ["save"]) * 3
    assert [s for s, _, _ in seen] == list(range(1, 7))
    assert all(norm == pytest.approx(0.05, rel=1e-4) for _, norm, _ in seen)  # clipped before the Pruner scores
    assert [lr for _, _, lr in seen] == [train.lr_at(s - 1, 6, 1e-2) for s in range(1, 7)]


def test_many_runs_on_one_model_equal_fresh_runs():
    """A study keeps one model and runs configuration after configuration on it (fresh adapters, a fresh Pruner,
    close() in between): each ends exactly as it does on a freshly loaded model. vanilla switches on dL/dW and
    exact hooks the backward: close() takes both off again."""
    configs = [("vanilla", 0, {}), ("exact", 1, {}), ("lora", 2, {"distill": 0.5, "distill_temperature": 2.0})]
    shared, fresh = [], []
    model = loaded_model()
    for criterion, seed, settings in configs:
        t, args = start_run(model, criterion, seed, **settings)
        shared.append(train_run(t, args))
        assert t.pruner.sparsity() > 0  # the masks really changed
        t.close()
        assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    for criterion, seed, settings in configs:
        fresh.append(train_run(*start_run(loaded_model(), criterion, seed, **settings)))
    for a, b in zip(shared, fresh):
        assert_same(a, b)
    assert shared[0]["losses"] != shared[1]["losses"] != shared[2]["losses"]  # three different runs


def test_a_compiled_model_runs_many_configurations_without_compiling_again():
    """One model, its blocks compiled once ('eager' backend: Dynamo's guards and recompiles, the same as with
    Inductor): the first configuration compiles its graphs (training, the distillation teacher, the masks alone under
    adapters_off); new adapters, a new Pruner and new settings after it compile nothing more, and every run equals
    the same run uncompiled on a freshly loaded model."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = loaded_model()
    llama.compile_blocks(model, backend="eager")
    counters.clear()
    graphs = []
    for criterion, seed, settings in (("lora", 0, {"distill": 0.5}), ("magnitude", 1, {"lr": 1e-3}), ("lora", 2, {})):
        t, args = start_run(model, criterion, seed, **settings)
        compiled = train_run(t, args)
        with torch.no_grad(), train.adapters_off(model):
            model.eval()(ROWS[:2, :-1])  # the masks alone
        t.close()
        graphs.append(counters["stats"]["unique_graphs"])
        eager = train_run(*start_run(loaded_model(), criterion, seed, **settings))
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(compiled["masks"], eager["masks"]))
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, graphs
    torch._dynamo.reset()


def test_resume_in_process_equals_uninterrupted(tmp_path):
    """Six steps in one go, or three (as if killed: `until`), then a resume on a fresh model: the same run."""
    config = {"run": "test"}
    t, args = start_run(loaded_model(), "lora", seed=0)
    whole = train_run(t, args)
    t, args = start_run(loaded_model(), "lora", seed=0)
    path, ranks = tmp_path / "resume.pt", train.Ranks()
    first = train_run(t, args, until=3, save=lambda: t.save(path, config, ranks, torch.device("cpu"), note=t.step))
    assert t.step == 3 and torch.load(path, weights_only=True)["step"] == 3
    t, args = start_run(loaded_model(), "lora", seed=0)
    assert t.resume(path, config, ranks, torch.device("cpu"), extra=("note",)) == {"note": 3}
    rest = train_run(t, args)
    assert_same(whole, {**rest, "losses": first["losses"] + rest["losses"]})


def test_stop_saves_the_step_in_flight_and_resume_finishes_the_same_run(tmp_path):
    """stop() (run.py's SIGINT / SIGTERM) asked during step 3: the step finishes, save() writes it (though 3 is not
    a multiple of save_every) and the loop returns; a resume from that file ends as the uninterrupted run."""
    config, ranks, cpu = {"run": "test"}, train.Ranks(), torch.device("cpu")
    whole = train_run(*start_run(loaded_model(), "lora", seed=0))
    t, args = start_run(loaded_model(), "lora", seed=0)
    path, saves, losses = tmp_path / "resume.pt", [], []
    train.train_loop(t, ROWS, args, "cpu", stop=lambda: len(losses) >= 3,  # asked mid-step 3, before AdamW's step
                     save=lambda: saves.append(t.step) or t.save(path, config, ranks, cpu),
                     observe=lambda t, norm: losses.append(t.loss))
    assert saves == [2, 3] and t.step == 3 and torch.load(path, weights_only=True)["step"] == 3
    t, args = start_run(loaded_model(), "lora", seed=0)
    t.resume(path, config, ranks, cpu)
    rest = train_run(t, args)
    assert_same(whole, {**rest, "losses": losses + rest["losses"]})


def test_resume_refuses_an_incomplete_or_other_checkpoint(tmp_path):
    """A missing key, anywhere, or another run's config: a one-line ValueError naming the file, never a default."""
    t, args = start_run(loaded_model(), "lora", seed=0)
    path, cpu, ranks = tmp_path / "resume.pt", torch.device("cpu"), train.Ranks()
    train_run(t, args, until=1, save=lambda: t.save(path, {"lr": 0.1, "seed": 0}, ranks, cpu, before=1.0))
    state = torch.load(path, weights_only=True)
    cases = [  # (change the file, the config asked for, words of the error)
        (lambda s: s.pop("sampler"), {"lr": 0.1, "seed": 0}, "found no sampler"),
        (lambda s: s.pop("before"), {"lr": 0.1, "seed": 0}, "found no before"),
        (lambda s: s["config"].pop("seed"), {"lr": 0.1, "seed": 0}, "seed: missing there, 0 here"),
        (lambda s: None, {"lr": 0.2, "seed": 0}, "lr: 0.1 there, 0.2 here"),
        (lambda s: None, {"lr": 0.1, "seed": 0, "new": 1}, "new: missing there, 1 here"),
        (lambda s: s["sampler"].pop("pos"), {"lr": 0.1, "seed": 0}, "found no 'pos'"),
        (lambda s: s["lora"].update({k: v[:1] for k, v in s["lora"].items()}), {"lr": 0.1, "seed": 0},
         "a part does not fit this run (ValueError: adapter layers.0.attention.wq.lora_A: expected shape (4, 32), "
         "found (1, 32)"),  # a foreign file with the right keys
        (lambda s: s.update(rng="x"), {"lr": 0.1, "seed": 0}, "a part does not fit this run (TypeError"),
    ]
    for change, config, words in cases:
        broken = copy.deepcopy(state)
        change(broken)
        torch.save(broken, path)
        t, _ = start_run(loaded_model(), "lora", seed=0)
        with pytest.raises(ValueError) as e:
            t.resume(path, config, ranks, cpu, extra=("before",))
        assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_nan_stops_before_the_step_and_nothing_is_written(tmp_path, monkeypatch):
    """Without save() the loop writes no file; a NaN/inf loss stops it before AdamW applies that step."""
    monkeypatch.chdir(tmp_path)
    t, args = start_run(loaded_model(), "lora", seed=0, lr=1e30)  # Adam moves B by ~lr: step 2 overflows
    with pytest.raises(train.TrainingDiverged, match="at step 2; stopped before applying it") as e:
        train.train_loop(t, ROWS, args, "cpu")
    assert e.value.saved_step is None and t.step == 1
    assert all(torch.isfinite(p).all() for p in t.lora_params)  # step 2's NaN/inf never reached the adapters
    assert max(p.abs().max() for p in t.lora_params) > 1e20  # ... while step 1's huge update did
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("criterion", ["lora", "vanilla", "exact"])  # vanilla, exact: DDP all-reduces dL/dW of the
# pruned layers, the exact criterion's probes' gradients, too
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


def test_adapters_off_is_the_masks_alone():
    """adapters_off: a run's masks without its fine-tuning, i.e. the plain weights under the same masks."""
    plain, student = frozen_and_student(int8=False)
    loraprune.apply_masks(plain, [(torch.tensor([True, False]), torch.arange(48) % 3 > 0) for _ in range(TINY.n_layers)])
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with train.adapters_off(student.eval()) as model:
            assert model is student
            torch.testing.assert_close(student(x), plain.eval()(x), rtol=0, atol=0)
        assert not torch.allclose(student(x), plain(x), atol=1e-3)  # the adapters are back


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


def test_out_lock_tidies_what_a_killed_run_left(tmp_path, monkeypatch):
    """Under the lock no other run writes --out: temporaries go, a folder caught mid-swap gets its earlier version."""
    out = tmp_path / "out"
    for folder in ("model.tmp-x1", "model.old-7", "hf", "hf.old-7"):
        (out / folder).mkdir(parents=True)
        (out / folder / "w").write_text(folder)
    (out / "resume.pt.tmp-x2").write_text("half")
    (out / "resume.pt").write_text("whole")
    lock = train.OutLock(out)
    lock.take()
    try:
        assert sorted(p.name for p in out.iterdir()) == [".lock", "hf", "model", "resume.pt"]
        assert (out / "model" / "w").read_text() == "model.old-7" and (out / "hf" / "w").read_text() == "hf"
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"--out {out} is in use by another run \\(process {os.getpid()}\\)"):
            train.OutLock(out).take()
    finally:
        lock.release()
    again = train.OutLock(out)
    again.take()  # released: free again
    again.release()

    def no_flock(file, operation):  # as on a file system mounted without flock
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(train.fcntl, "flock", no_flock)
    with pytest.raises(OSError, match="cannot lock it \\(No locks available\\); use an --out on a file system with "
                                      "flock") as e:
        train.OutLock(out).take()
    assert e.value.filename == str(out / ".lock")
