"""The CLI end to end on stories260K (CPU): the saved pruned model reloads in one call and matches the report,
a killed-and-resumed run equals an uninterrupted one bit for bit, and every bad input fails with exit code 2,
one clear line and nothing half-written in --out."""
import copy
import json
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import formats
import llama
import loraprune
import run
from conftest import shared_file


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def cli(out, **overrides) -> list:
    """Flags of a small, fast run on stories260K; overrides map flag names (underscores) to values (None drops)."""
    flags = {"ckpt": shared_file("stories260K.bin"), "ratio": 0.5, "steps": 8, "batch_size": 8,
             "micro_batch_size": 4, "seq_len": 64, "prune_every": 2, "lr": 1e-3,
             "data": shared_file("tinystories-train.txt"), "eval": shared_file("tinystories-valid.txt"),
             "eval_seq_len": 256, "eval_tokens": 2048, "out": out, **overrides}
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append("--" + name.replace("_", "-"))
        elif value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def eval_tokens(n: int) -> torch.Tensor:
    """The eval protocol of run.py, written out: each story with its own BOS, concatenated, first n tokens."""
    tokenizer = data.Tokenizer(shared_file("tok512.model"))
    stories = data.read_documents(shared_file("tinystories-valid.txt"))
    return torch.tensor([t for story in stories for t in tokenizer.encode(story, bos=True)])[:n]


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    assert run.main(cli(out, steps=24)) == 0
    return out, json.loads((out / "report.json").read_text())


def test_saved_model_reloads_and_matches_report(finished):
    out, report = finished
    model = formats.load(out / "model", dtype=torch.float32)
    assert llama.count_params(model) == report["params_after"]
    # no --criterion, no --normalize: the paper's method, Eq. 10 as written
    assert report["args"]["criterion"] == "lora" and report["args"]["normalize"] is False
    assert report["ratio_achieved"] == pytest.approx(1 - report["params_after"] / report["params_before"])
    assert abs(report["ratio_achieved"] - 0.5) < 0.01
    # the per-layer sizes the pruner chose are the saved model's, and unpruned layers are whole
    assert model.args.layer_kv_heads == report["kv_heads_per_layer"]
    assert model.args.layer_hidden_dims == report["channels_per_layer"]
    full = formats.load(shared_file("stories260K.bin"), dtype=torch.float32).args
    assert report["pruned_layers"] == loraprune.default_pruned_layers(full.n_layers)
    for l in range(full.n_layers):
        pruned = l in report["pruned_layers"]
        assert (model.args.layer_kv_heads[l] < full.n_kv_heads) == pruned
        assert (model.args.layer_hidden_dims[l] < full.hidden_dim) == pruned
    # the report's perplexity is the reloaded model's under the same protocol
    label = "tinystories-valid.txt"
    ppl = data.perplexity(model, eval_tokens(2048), seq_len=256, batch_size=1)
    assert torch.isfinite(torch.tensor(ppl))
    assert report["ppl_after"][label] == pytest.approx(ppl, rel=1e-6)
    assert report["steps_done"] == 24 and report["peak_gpu_memory_gib"] is None
    # the tokenizer travels with the model
    assert data.find_tokenizer(out / "model", model.args.vocab_size).name == "tok512.model"
    assert (out / "log.txt").read_text().count("step 20/24") == 1


def test_out_with_a_run_is_refused(finished, capsys):
    out, _ = finished
    before = sorted(p.name for p in out.iterdir())
    assert run.main(cli(out, steps=24)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run.main(cli(out, steps=24, resume=True)) == 2
    assert "has finished" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_unreadable_resume_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"not a checkpoint")
    assert run.main(cli(out, resume=True)) == 2
    assert "not a readable resume checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["resume.pt"]


def killed_after(step: int, argv: list, monkeypatch) -> int:
    """run.main(argv) stopped after optimizer step `step` as if killed there (LORAPRUNE_STOP_AFTER, read by
    run.hooks_from_env)."""
    with monkeypatch.context() as m:
        m.setenv("LORAPRUNE_STOP_AFTER", str(step))
        return run.main(argv)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run.main(cli(a, save_every=50)) == 0
    assert killed_after(5, cli(b, save_every=2), monkeypatch) == 0  # killed after step 5, last save at 5
    assert (b / "resume.pt").exists() and not (b / "model").exists() and not (b / "report.json").exists()
    # a resume that would change the run is refused, naming what differs
    assert run.main(cli(b, save_every=2, lr=1e-2, resume=True)) == 2
    assert "lr: 0.001 there, 0.01 here" in capsys.readouterr().err
    # a resume.pt missing a key (as written before a flag existed) is refused in one line naming the file, never
    # filled in with a default; nothing in --out changes
    good = (b / "resume.pt").read_bytes()
    state = torch.load(b / "resume.pt", weights_only=True)
    for drop, words in ((lambda s: s["config"].pop("head_unit"), "head_unit: missing there, 'kv' here"),
                        (lambda s: s["config"].pop("distill"), "distill: missing there, 0.0 here"),
                        (lambda s: s.pop("tasks_before"), "found no tasks_before"),
                        (lambda s: s["sampler"].pop("pos"), "found no 'pos'")):
        broken = copy.deepcopy(state)
        drop(broken)
        torch.save(broken, b / "resume.pt")
        assert run.main(cli(b, save_every=2, resume=True)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(b / "resume.pt") in err and words in err, err
    assert sorted(p.name for p in b.iterdir()) == ["log.txt", "resume.pt"]
    (b / "resume.pt").write_bytes(good)
    assert run.main(cli(b, save_every=2, resume=True)) == 0
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for key in ("kv_heads_per_layer", "channels_per_layer", "params_after", "ppl_before", "ppl_after", "final_loss"):
        assert ra[key] == rb[key], key
    masks_a, masks_b = (torch.load(d / "resume.pt", weights_only=True)["pruner"]["masks"] for d in (a, b))
    assert all(torch.equal(x, y) for ma, mb in zip(masks_a, masks_b) for x, y in zip(ma, mb))
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_query_heads_killed_and_resumed_run_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run.main(cli(a, head_unit="query", save_every=50)) == 0
    assert killed_after(5, cli(b, head_unit="query", save_every=2), monkeypatch) == 0
    assert run.main(cli(b, save_every=2, resume=True)) == 2  # the default, kv groups, would be another run
    assert "head_unit: 'query' there, 'kv' here" in capsys.readouterr().err
    assert run.main(cli(b, head_unit="query", save_every=2, resume=True)) == 0
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for key in ("kv_heads_per_layer", "q_per_kv_per_layer", "channels_per_layer", "params_after", "ppl_after",
                "final_loss"):
        assert ra[key] == rb[key], key
    masks_a, masks_b = (torch.load(d / "resume.pt", weights_only=True)["pruner"]["masks"] for d in (a, b))
    assert all(torch.equal(x, y) for ma, mb in zip(masks_a, masks_b) for x, y in zip(ma, mb))
    assert masks_a[1][0].shape == (8,)  # one flag per query head of stories260K
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the report and the saved model agree, and the ratio counts the kv rows exactly
    assert ra["args"]["head_unit"] == "query" and abs(ra["ratio_achieved"] - 0.5) < 0.01
    model = formats.load(a / "model", dtype=torch.float32)
    assert llama.count_params(model) == ra["params_after"]
    assert [model.args.q_per_kv(l) for l in range(model.args.n_layers)] == ra["q_per_kv_per_layer"]
    assert model.args.layer_kv_heads == ra["kv_heads_per_layer"]
    assert sum(map(sum, ra["q_per_kv_per_layer"])) < 8 * 5  # query heads went


def test_ratio_zero_steps_zero_only_evaluates(tmp_path):
    out = tmp_path / "out"
    assert run.main(cli(out, ratio=0, steps=0, eval_seq_len=4096, seq_len=4096)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ppl_before"] == report["ppl_after"]
    assert report["params_before"] == report["params_after"] and report["steps_done"] == 0
    assert report["compile_warmup_s"] is None and report["step_time_s"] is None
    assert not (out / "resume.pt").exists()
    # evaluated at the model's length, and said so; not training, so nothing said about --seq-len
    log = (out / "log.txt").read_text()
    assert "--eval-seq-len 4096 capped at the model's max_seq_len 512" in log and "--seq-len" not in log


def test_files_follow_the_umask_and_notices_only_for_what_runs(tmp_path):
    """report.json and resume.pt (written through a temporary file) get the mode open() gives log.txt, 0o666 less
    the umask, not mkstemp's 0600; without eval sets the eval-seq-len cap is not mentioned."""
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert run.main(cli(out, ratio=0, steps=2, eval="", eval_seq_len=4096)) == 0
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("report.json", "resume.pt", "log.txt")}
    assert modes == dict.fromkeys(modes, 0o640), modes
    assert "capped" not in (out / "log.txt").read_text()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(cli(out, lr=1e30, save_every=1)) == 1  # Adam moves B by ~lr: step 2 overflows
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "at step 2" in err and "holds step 1" in err
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 1
    assert not (out / "model").exists() and not (out / "report.json").exists()


def test_help_mentions_every_flag(capsys):
    assert run.main(["--help"]) == 0
    text = capsys.readouterr().out
    flags = [s for a in run.build_parser()._actions if a.help != "==SUPPRESS==" for s in a.option_strings]
    assert len(flags) > 30 and all(f in text for f in flags), [f for f in flags if f not in text]
    assert "--stop-after" not in text and "--trace" not in text  # test hooks are environment variables


def test_compiled_by_default_on_cuda_only():
    def resolved(device, *argv):
        args = run.build_parser().parse_args(["--ckpt", "x", *argv])
        run.resolve_defaults(args, torch.device(device))
        return args.compile, args.checkpoint_activations, args.dtype
    assert resolved("cuda") == (True, True, "bfloat16") and resolved("cpu") == (False, False, "float32")
    assert resolved("cuda", "--no-compile")[0] is False and resolved("cpu", "--compile")[0] is True
    assert resolved("cuda", "--criterion", "exact")[0] is True  # its sums come from the compiled backward too


def test_batch_must_split_over_the_processes():
    def args(*argv):
        return run.build_parser().parse_args(["--ckpt", "x", *argv])
    run.check_args(args("--batch-size", "8", "--micro-batch-size", "2"), world=2)  # 4 each, 2 x 2 accumulated
    run.check_args(args("--batch-size", "6", "--micro-batch-size", "2"))  # fine for one process ...
    with pytest.raises(ValueError, match="over 2 processes is 3 sequences each, which must be a multiple of "
                                         "--micro-batch-size, found 2"):
        run.check_args(args("--batch-size", "6", "--micro-batch-size", "2"), world=2)  # ... not for two
    with pytest.raises(ValueError, match="split evenly over the 2 processes torchrun started, found 5"):
        run.check_args(args("--batch-size", "5", "--micro-batch-size", "1"), world=2)


# ----------------------------------------------------------------------------------------------
# bad input: exit code 2, one line naming the problem, --out untouched


def _write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


BAD = {  # name -> (overrides built from tmp_path, words the message must hold)
    "missing checkpoint": (lambda d: {"ckpt": d / "nope.bin"}, "does not exist"),
    "unknown format": (lambda d: {"ckpt": d}, "no known checkpoint format"),
    "not a checkpoint": (lambda d: {"ckpt": _write(d / "x.bin", bytes(100))}, "llama2.c"),
    "vocab mismatch": (lambda d: {"tokenizer": shared_file("tokenizer.model")}, "has only 512 rows"),
    "ratio 1": (lambda d: {"ratio": 1.0}, "--ratio must be in [0, 1), found 1.0"),
    "ratio negative": (lambda d: {"ratio": -0.1}, "--ratio must be in [0, 1)"),
    "every head": (lambda d: {"ratio": 0.9}, "every kv head"),
    "empty data": (lambda d: {"data": _write(d / "empty.txt", "")}, "found none"),
    "too-short data": (lambda d: {"data": _write(d / "short.txt", "Once upon a time.")}, "need at least"),
    "batch multiple": (lambda d: {"batch_size": 6}, "multiple of --micro-batch-size, found 6 and 4"),
    "resume nothing": (lambda d: {"resume": True}, "resume.pt"),
    "bad layers": (lambda d: {"layers": "1,7"}, "expected ids in [0, 5)"),
    "int8 vanilla": (lambda d: {"int8": True, "criterion": "vanilla"}, "vanilla criterion needs dL/dW"),
    "uniform query heads": (lambda d: {"uniform": True, "head_unit": "query"}, "--uniform needs --head-unit kv"),
    "distill range": (lambda d: {"distill": 1.5}, "--distill must be in [0, 1], found 1.5"),
    "missing eval set": (lambda d: {"eval": d / "valid.txt"}, "no file"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, capsys):
    make, words = BAD[case]
    out = tmp_path / "out"
    assert run.main(cli(out, **make(tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not out.exists()


def test_int8_abs_magnitude_chosen_layers_no_eval(tmp_path):
    """The other branches a user can pick: int8 base weights, the official code's |.|, a baseline criterion,
    explicit layers, exact channel counts, no eval sets, self-distillation (its teacher the int8 W0)."""
    out = tmp_path / "out"
    argv = cli(out, steps=3, int8=True, abs=True, criterion="magnitude", layers="1,3", ratio=0.2,
               channel_multiple=1, eval="", distill=0.5, distill_temperature=2.0)
    assert run.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["args"]["distill"] == 0.5 and report["args"]["distill_temperature"] == 2.0
    assert "self-distillation from the frozen weights, alpha 0.5, T 2.0" in (out / "log.txt").read_text()
    assert report["pruned_layers"] == [1, 3] and report["ppl_after"] == {}
    assert abs(report["ratio_achieved"] - 0.2) < 0.01
    assert report["kv_heads_per_layer"][0] == report["kv_heads_per_layer"][2] == 4
    assert llama.count_params(formats.load(out / "model")) == report["params_after"]


@pytest.mark.parametrize("ckpt_format", ["gguf", "own"])
def test_run_on_a_gguf_saves_a_tokenizer_that_is_found_again(tmp_path, ckpt_format):
    """run.py with a GGUF checkpoint (its own tokenizer), or our own format with the GGUF passed as --tokenizer:
    the saved model's folder holds tokenizer.gguf (the vocabulary alone, not a copy of the weights), which
    find_tokenizer picks and which reads as the original."""
    from conftest import ROPE_THETA, TEXT, hf_model, train_bpe, write_llama_gguf
    from data import Tokenizer
    tok = train_bpe("smollm")
    hf = hf_model(vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, rope_theta=ROPE_THETA)
    src = write_llama_gguf(tmp_path / "tiny.gguf", hf, tok, pre="smollm")
    argv = ["--ckpt", str(src)]
    if ckpt_format == "own":
        argv = ["--ckpt", str(formats.save_checkpoint(formats.load(src, dtype=torch.float32), tmp_path / "own")),
                "--tokenizer", str(src)]
    assert run.main(argv + ["--ratio", "0", "--steps", "0", "--eval", "", "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "model"
    found = data.find_tokenizer(folder, formats.load(folder).args.vocab_size)
    assert found == folder / "tokenizer.gguf"
    assert Tokenizer(found).encode(TEXT, eos=True) == Tokenizer(src).encode(TEXT, eos=True)
    assert formats.gguf_tokenizer(found) == formats.gguf_tokenizer(src)
    import gguf
    assert not gguf.GGUFReader(found).tensors and found.stat().st_size < src.stat().st_size / 2
    saved = json.loads((folder / "params.json").read_text())["dtype"]  # a quantized GGUF's weights go out as bf16
    assert saved == ("bfloat16" if ckpt_format == "gguf" else "float32")



# ----------------------------------------------------------------------------------------------
# the pruned model leaves the project: GGUF and Hugging Face exports, sampling, lm-eval tasks


def test_conversion_command_writes_a_gguf_with_the_same_logits(tmp_path):
    """The README's one-line conversion (--ratio 0 --steps 0 --gguf): model.gguf beside model/, same logits."""
    out = tmp_path / "out"
    assert run.main(["--ckpt", str(shared_file("stories260K.bin")), "--ratio", "0", "--steps", "0", "--eval", "",
                     "--gguf", "f32", "--dtype", "float32", "--out", str(out)]) == 0
    assert formats.gguf_tokenizer(out / "model.gguf")["model"] == "llama"  # the SentencePiece vocabulary went along
    x = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = formats.load(out / "model", dtype=torch.float32)(x)
        theirs = formats.load(out / "model.gguf", dtype=torch.float32)(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_hf_export_of_a_uniform_run_loads_in_transformers(tmp_path):
    """--uniform over all layers gives one layer shape; --hf writes a folder transformers reads with our logits."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert run.main(cli(out, eval="", uniform=True, layers="0,1,2,3,4", channel_multiple=4, hf=True,
                        dtype="float32")) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(set(report["kv_heads_per_layer"])) == 1 and len(set(report["channels_per_layer"])) == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, formats.load(out / "model", dtype=torch.float32)(x), rtol=0, atol=1e-4)


def test_hf_export_of_uneven_layers_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(cli(out, hf=True)) == 2  # default layers: the first stays whole, the rounding differs per layer
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gguf" in err[0] and not out.exists()
    assert run.main(cli(out, gguf="q4")) == 2
    assert "--gguf must be one of" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_family_folder_pruned_by_one_command_runs_in_transformers_and_llama_cpp(tmp_path, capsys, family):
    """A Qwen2 / Qwen3 / Llama 3.2 Hugging Face folder (tiny, random, the family's switches, a byte-level
    tokenizer.json; Qwen's embedding padded past the tokenizer, as Qwen's is) pruned by run.py with --hf and --gguf:
    the saved model, transformers' reading of out/hf and llama.cpp's of out/model.gguf give the same logits, and
    --sample decodes greedily what the saved model predicts."""
    transformers = pytest.importorskip("transformers")
    from conftest import CORPUS, family_model, train_bpe
    from test_formats import CppModel
    folder = tmp_path / family
    family_model(family, vocab_size=300 if family == "llama3" else 320).save_pretrained(folder, safe_serialization=True)
    train_bpe({"llama3": "llama-bpe"}.get(family, "qwen2")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    (tmp_path / "train.txt").write_text("\n".join(CORPUS * 4))
    out = tmp_path / "out"
    assert run.main(cli(out, ckpt=folder, data=tmp_path / "train.txt", eval="", ratio=0.3, steps=2, batch_size=4,
                        micro_batch_size=4, seq_len=32, prune_every=1, uniform=True, layers="0,1", hf=True,
                        gguf="f32", dtype="float32")) == 0
    model = formats.load(out / "model").eval()
    assert model.args.family == {"llama3": "llama"}.get(family, family)
    assert model.args.layer_kv_heads == [1, 1]  # one of the two kv groups went in both layers
    x = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours, rtol=0, atol=1e-4)
    with CppModel(out / "model.gguf") as cpp:
        torch.testing.assert_close(cpp.logits(x[0].tolist()), ours[0], rtol=0, atol=1e-3)
    tokenizer = data.Tokenizer(out / "model" / "tokenizer.json")
    ids = tokenizer.encode("The cat")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    capsys.readouterr()
    assert run.main(["--ckpt", str(out / "model"), "--sample", "The cat", "--temperature", "0",
                     "--max-new-tokens", "6", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().endswith(tokenizer.decode(ids))


def test_qwen3_gguf_of_uneven_layers_is_refused_before_training(tmp_path, capsys):
    from conftest import CORPUS, family_model, train_bpe
    folder = tmp_path / "qwen3"
    family_model("qwen3", vocab_size=300, num_hidden_layers=3).save_pretrained(folder, safe_serialization=True)
    train_bpe("qwen2").save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    (tmp_path / "train.txt").write_text("\n".join(CORPUS * 4))
    out = tmp_path / "out"
    capsys.readouterr()
    assert run.main(cli(out, ckpt=folder, data=tmp_path / "train.txt", eval="", ratio=0.3, steps=2, batch_size=4,
                        micro_batch_size=4, seq_len=32, layers="0,1", gguf="f32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp's qwen3 holds one shape for every layer" in err[0] and not out.exists()


@pytest.mark.parametrize("compile", [False, True])
def test_sample_prints_the_published_greedy_story(capsys, compile):
    argv = ["--ckpt", str(shared_file("stories260K.bin")), "--sample", "Once upon a time", "--temperature", "0",
            "--max-new-tokens", "30"] + (["--compile"] if compile else [])  # compiled: generate.decode_graph
    assert run.main(argv) == 0
    assert "Once upon a time, there was a little girl named Lily. She loved to play outside in the park." in \
        capsys.readouterr().out  # stories260K.md's greedy sample (MANIFEST.md)


STORY_DOCS = [
    {"question": "Once upon a time, there was a little girl named Lily. She loved to play",
     "choices": [" outside in the park.", " with the big truck.", " the piano at night."], "label": 0},
    {"question": "Tom had a red ball. He threw the ball to his", "choices": [" friend.", " car.", " moon."], "label": 0},
    {"question": "The cat was very hungry. It wanted to eat some", "choices": [" fish.", " shoes.", " trees."],
     "label": 0},
    {"question": "Lily saw a big dog in the park. She was", "choices": [" scared.", " blue.", " a table."], "label": 0},
]


def story_task(folder):
    """A local lm-eval multiple-choice task (no download) in folder: stories_mc.yaml over stories_mc.jsonl."""
    folder.mkdir()
    (folder / "stories_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in STORY_DOCS))
    (folder / "stories_mc.yaml").write_text(
        f"task: stories_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'stories_mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


def test_tasks_scored_before_and_after_pruning(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import harness
    from lm_eval.tasks import TaskManager

    tasks_dir, out = story_task(tmp_path / "tasks"), tmp_path / "out"
    assert run.main(cli(out, steps=4, eval="", tasks="stories_mc", tasks_include_path=tasks_dir)) == 0
    report = json.loads((out / "report.json").read_text())
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tokenizer = data.Tokenizer(shared_file("tok512.model"))
    for key, ckpt in (("tasks_before", shared_file("stories260K.bin")), ("tasks_after", out / "model")):
        model = formats.load(ckpt, dtype=torch.float32)
        assert report[key] == harness.evaluate_tasks(model, tokenizer, ["stories_mc"], task_manager=manager), key
    assert set(report["tasks_after"]["stories_mc"]) == {"acc", "acc_norm"}
    table = capsys.readouterr().out
    assert "lm-eval task" in table and "stories_mc" in table


def test_tasks_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run.main(cli(out, tasks="boolq,no_such_task")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task" in err[0] and not out.exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "harness", raising=False)
    assert run.main(cli(out, tasks="boolq")) == 2
    assert capsys.readouterr().err.strip() == "error: --tasks needs lm-eval: pip install -e '.[eval]'"
    assert not out.exists()
