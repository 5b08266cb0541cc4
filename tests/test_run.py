"""The CLI end to end on stories260K (CPU): the saved pruned model reloads in one call and matches the report,
a killed-and-resumed run equals an uninterrupted one bit for bit, and it fails like a tool: every bad input, missing
extra, corrupt file and refused write is one line on stderr and exit code 2 with nothing half-written in --out, a
SIGINT / SIGTERM stops at the next step (exit 130 / 143) and --resume finishes the same run, one run per --out."""
import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import formats
import llama
import loraprune
import run
import train
from conftest import shared_file

ROOT = Path(__file__).resolve().parent.parent

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


def only_line(err: str) -> str:
    """stderr's one line (asserting it is one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def listing(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir())


def assert_same_run(a, b) -> None:
    """Two finished runs in folders a and b: the same report numbers, final masks and saved weights."""
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for key in ("kv_heads_per_layer", "channels_per_layer", "params_after", "ppl_before", "ppl_after", "final_loss"):
        assert ra[key] == rb[key], key
    masks_a, masks_b = (torch.load(d / "resume.pt", weights_only=True)["pruner"]["masks"] for d in (a, b))
    assert all(torch.equal(x, y) for ma, mb in zip(masks_a, masks_b) for x, y in zip(ma, mb))
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 8-step run of cli(), in one go: what every interrupted and resumed run must equal."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert run.main(cli(out, save_every=50)) == 0
    return out


def killed_after(step: int, argv: list, monkeypatch) -> int:
    """run.main(argv) stopped after optimizer step `step` as if killed there (LORAPRUNE_STOP_AFTER, read by
    run.hooks_from_env)."""
    with monkeypatch.context() as m:
        m.setenv("LORAPRUNE_STOP_AFTER", str(step))
        return run.main(argv)


def test_killed_and_resumed_run_equals_uninterrupted(uninterrupted, tmp_path, capsys, monkeypatch):
    b = tmp_path / "b"
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
    assert listing(b) == [".lock", "log.txt", "resume.pt"]
    (b / "resume.pt").write_bytes(good)
    assert run.main(cli(b, save_every=2, resume=True)) == 0
    assert_same_run(uninterrupted, b)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _own(d, cut=None, weights=None):
    """stories260K saved in our own format in d/own, its model.safetensors cut to `cut` bytes or replaced."""
    folder = formats.save_checkpoint(formats.load(shared_file("stories260K.bin")), d / "own")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights if weights is not None else data[:cut])
    return folder


BINARY = bytes(range(256)) * 8  # ASCII up to offset 128, then 0x80: not UTF-8


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
    # what a careless user passes where a file of another kind is expected
    "out is a file": (lambda d: {"out": _write(d / "file", "x")}, "file is a file, expected a folder"),
    "out under a file": (lambda d: {"out": _write(d / "file", "x") / "sub"}, "file is a file, expected a folder"),
    "out empty": (lambda d: {"out": ""}, "--ckpt and --out must name a path, found ''"),
    "ckpt empty": (lambda d: {"ckpt": ""}, "--ckpt and --out must name a path, found ''"),
    "data is a folder": (lambda d: {"data": d}, f"document file {{d}} is a folder, expected a file"),
    "binary data": (lambda d: {"data": _write(d / "x.txt", BINARY)}, "x.txt: expected text in UTF-8, found byte 0x80 "
                    "at offset 128 (a binary file?)"),
    "binary jsonl": (lambda d: {"data": _write(d / "x.jsonl", BINARY)}, "x.jsonl: expected text in UTF-8"),
    "record types": (lambda d: {"data": _write(d / "x.json", json.dumps([{"instruction": "a", "output": 3}]))},
                     "x.json, record 0: expected text in 'output', found 3"),
    "binary eval set": (lambda d: {"eval": _write(d / "x.txt", BINARY)}, "eval set {d}/x.txt: expected text in UTF-8"),
    "eval set is a folder": (lambda d: {"eval": d}, "eval set {d} is a folder, expected a file"),
    "tokenizer is a folder": (lambda d: {"tokenizer": d}, "tokenizer {d} is a folder, expected a file"),
    "tokenizer is the checkpoint": (lambda d: {"tokenizer": shared_file("stories260K.bin")},
                                    "expected one of the extensions"),
    "not a tokenizer.json": (lambda d: {"tokenizer": _write(d / "tokenizer.json", BINARY)},
                             "expected a Hugging Face tokenizer.json"),
    "checkpoint is a tokenizer": (lambda d: {"ckpt": shared_file("tok512.model")}, "no known checkpoint format"),
    "checkpoint is a run": (lambda d: {"ckpt": _write(d / "run" / "model" / "params.json", "{}").parent.parent},
                            "the output folder of a run, not a checkpoint; its pruned model is {d}/run/model"),
    # corrupt or foreign checkpoint files
    "truncated safetensors": (lambda d: {"ckpt": _own(d, cut=5000)}, "{d}/own/model.safetensors: not a readable "
                              "safetensors file"),
    "foreign safetensors": (lambda d: {"ckpt": _own(d, weights=BINARY)}, "own/model.safetensors: not a readable"),
    "truncated llama2.c": (lambda d: {"ckpt": _write(d / "x.bin", shared_file("stories260K.bin").read_bytes()[:9999]),
                                      "tokenizer": shared_file("tok512.model")}, "x.bin: 9999 bytes, but header"),
    "foreign config.json": (lambda d: {"ckpt": _write(d / "hf" / "config.json", '{"model_type": "llama"}').parent},
                            "hf/config.json: expected a Hugging Face config.json of a llama model, found no "
                            "hidden_size"),
    "config.json a list": (lambda d: {"ckpt": _write(d / "hf" / "config.json", "[]").parent},
                           "expected a JSON object, found a list"),
    "params.json wrong types": (lambda d: {"ckpt": _write(_own(d) / "params.json", json.dumps(
        {"format": "loraprune", "version": 1, "args": {"dim": "64"}})).parent},
                                "own/params.json: not a model config (TypeError"),
    "truncated gguf": (lambda d: {"ckpt": _write(d / "x.gguf", b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little")
                                                 + bytes(8))}, "x.gguf: not a readable GGUF file"),
    "gguf without a tokenizer": (lambda d: {"ckpt": _write(d / "x.gguf", b"GGUF\x03\x00\x00\x00" + bytes(16))},
                                 "x.gguf: expected a tokenizer in the GGUF metadata, found no tokenizer.ggml.* keys"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, capsys):
    make, words = BAD[case]
    out, overrides = tmp_path / "out", make(tmp_path)
    assert run.main(cli(overrides.pop("out", out), **overrides)) == 2
    err = only_line(capsys.readouterr().err)
    assert err.startswith("error: ") and words.replace("{d}", str(tmp_path)) in err, err
    assert not out.exists()


def test_int8_abs_magnitude_chosen_layers_no_eval(tmp_path, capsys):
    """The other branches a user can pick: int8 base weights, the official code's |.|, a baseline criterion,
    explicit layers, exact channel counts, no eval sets, self-distillation (its teacher the int8 W0)."""
    out = tmp_path / "out"
    argv = cli(out, steps=3, int8=True, abs=True, criterion="magnitude", layers="1,3", ratio=0.2,
               channel_multiple=1, eval="", distill=0.5, distill_temperature=2.0)
    assert run.main(argv) == 0
    assert "ppl before" not in capsys.readouterr().out  # no eval sets, no table header
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


def test_tasks_bad_input_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(cli(out, tasks="boolq,no_such_task")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task" in err[0] and not out.exists()
    assert run.main(cli(out, tasks="boolq", tasks_include_path=tmp_path / "nothere")) == 2
    assert only_line(capsys.readouterr().err) == (f"error: --tasks-include-path {tmp_path / 'nothere'}: expected a "
                                                  "folder of task YAMLs, found nothing")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# corrupt state in --out: one line naming the file, nothing in --out changed


CORRUPT = {  # name -> ({file in --out: its bytes, from the uninterrupted run's folder}, flags, words of the error)
    "truncated resume.pt": ({"resume.pt": lambda a: (a / "resume.pt").read_bytes()[:20000]}, {"resume": True},
                            "resume.pt: not a readable resume checkpoint"),
    "foreign resume.pt": ({"resume.pt": lambda a: (a / "model" / "model.safetensors").read_bytes()}, {"resume": True},
                          "resume.pt: not a readable resume checkpoint"),
    "text as resume.pt": ({"resume.pt": lambda a: b"not a checkpoint"}, {"resume": True},
                          "resume.pt: not a readable resume checkpoint"),
    "truncated report.json": ({"report.json": lambda a: (a / "report.json").read_bytes()[:100]}, {},
                              "already holds a run (report.json); use --resume or another --out"),
    "report.json and --resume": ({"report.json": lambda a: BINARY, "resume.pt": lambda a: b"x"}, {"resume": True},
                                 "has finished"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_state_in_out(case, uninterrupted, tmp_path, capsys):
    files, flags, words = CORRUPT[case]
    out = tmp_path / "out"
    for name, content in files.items():
        _write(out / name, content(uninterrupted))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run.main(cli(out, **flags)) == 2
    err = only_line(capsys.readouterr().err)
    assert err.startswith(f"error: ") and words in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the modes say")
def test_unreadable_and_unwritable_files(tmp_path, capsys):
    text = _write(tmp_path / "data.txt", "Once upon a time. " * 500)
    text.chmod(0)
    assert run.main(cli(tmp_path / "out", data=text)) == 2
    assert only_line(capsys.readouterr().err) == f"error: {text}: Permission denied"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert run.main(cli(locked / "out")) == 2
    assert only_line(capsys.readouterr().err) == f"error: --out {locked / 'out'}: cannot write in {locked} (no write " \
                                                 "permission)"


# ----------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: the step in flight finishes and is saved, exit 128 + signal, --resume finishes the same run


def signals_during(step: int, *signums):
    """run.tracer's stand-in: an observer that sends this process `signums` while optimizer step `step` runs (after
    its backward, before AdamW's step)."""
    def tracer(path, rank):
        def observe(t, grad_norm):
            if t.step == step:
                for signum in signums:
                    os.kill(os.getpid(), signum)
        return observe
    return tracer


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_after_the_step_and_resume_equals_uninterrupted(signum, code, uninterrupted, tmp_path, capsys,
                                                                     monkeypatch, terminal_sigint):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(run, "tracer", signals_during(3, signum))
        assert run.main(cli(out, save_every=50)) == code
    assert only_line(capsys.readouterr().err) == "interrupted at step 3/8; continue with --resume"
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 3  # step 3 finished and saved
    assert listing(out) == [".lock", "log.txt", "resume.pt"]
    assert (out / "log.txt").read_text().splitlines()[-1] == "interrupted at step 3/8; continue with --resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main put the handlers back
    assert run.main(cli(out, save_every=50, resume=True)) == 0
    assert_same_run(uninterrupted, out)


def test_a_second_signal_stops_at_once_losing_nothing_saved(uninterrupted, tmp_path, capsys, monkeypatch,
                                                            terminal_sigint):
    """Two Ctrl-C during step 3: no waiting for the step; resume.pt keeps step 2 (save_every 2). A second Ctrl-C while
    resume.pt is being written: the write is dropped whole, resume.pt still holds step 2 and no temporary is left."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(run, "tracer", signals_during(3, signal.SIGINT, signal.SIGINT))
        assert run.main(cli(out, save_every=2)) == 130
    assert only_line(capsys.readouterr().err) == "interrupted at step 2/8; continue with --resume"
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 2

    save, asked = torch.save, []

    def save_then_signal(obj, f):  # the second Ctrl-C lands while the first one's save of step 5 is written
        save(obj, f)
        if asked:
            os.kill(os.getpid(), signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(run, "tracer", lambda path, rank: lambda t, norm: t.step == 5 and not asked and (
            asked.append(True) or os.kill(os.getpid(), signal.SIGINT)))
        m.setattr(torch, "save", save_then_signal)
        assert run.main(cli(out, save_every=2, resume=True)) == 130
    assert only_line(capsys.readouterr().err) == "interrupted at step 4/8; continue with --resume"
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 4
    assert listing(out) == [".lock", "log.txt", "resume.pt"]
    assert run.main(cli(out, save_every=2, resume=True)) == 0
    assert_same_run(uninterrupted, out)


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch):
    """Started under nohup or with `&`, a process has SIGINT ignored: run.py leaves it so for the whole run (a Ctrl-C
    meant for the terminal's foreground job must not stop it) and after."""
    seen = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with monkeypatch.context() as m:
            m.setattr(run, "tracer", lambda path, rank: lambda t, norm: seen.append(signal.getsignal(signal.SIGINT)))
            assert run.main(cli(tmp_path / "out", steps=2, eval="")) == 0
        assert seen == [signal.SIG_IGN] * 2 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_on_a_real_process(finished, tmp_path, terminal_sigint):
    """`python run.py` sent SIGINT as a terminal's Ctrl-C sends it, once training is under way: exit 130, one line on
    stderr, a notice on stdout, resume.pt of the step it stopped at; --resume then ends as the uninterrupted run."""
    out, trace = tmp_path / "out", tmp_path / "trace"
    proc = subprocess.Popen([sys.executable, "run.py", *cli(out, steps=24)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORAPRUNE_TRACE": str(trace), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (Path(f"{trace}.0").exists() and len(Path(f"{trace}.0").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    step = int(re.fullmatch(r"interrupted at step (\d+)/24; continue with --resume", only_line(stderr))[1])
    assert 2 <= step < 24 and torch.load(out / "resume.pt", weights_only=True)["step"] == step
    assert "SIGINT: the step in flight finishes, goes to resume.pt, and the run stops" in stdout
    assert listing(out) == [".lock", "log.txt", "resume.pt"]
    assert run.main(cli(out, steps=24, resume=True)) == 0
    assert_same_run(finished[0], out)


# ----------------------------------------------------------------------------------------------
# one run per --out


HOLD_LOCK = """import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("4242\\n")
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    """Another process holds --out's lock: one line naming it and exit 2, nothing written; killed (SIGKILL), it holds
    nothing (the OS drops a dead process's lock) and the run goes ahead."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        argv = cli(out, ratio=0, steps=0, eval="")
        assert run.main(argv) == 2
        assert only_line(capsys.readouterr().err) == (f"error: --out {out} is in use by another run (process 4242); "
                                                      "wait for it to end or use another --out")
        assert listing(out) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run.main(argv) == 0 and (out / "report.json").exists()

    # a run that creates --out takes the lock then: another run that got there first while it loaded stops it
    out, other = tmp_path / "new", train.OutLock(tmp_path / "new")
    load = run.load

    def load_while_another_run_starts(*args, **kwargs):
        inputs = load(*args, **kwargs)
        out.mkdir()
        other.take()
        return inputs
    monkeypatch.setattr(run, "load", load_while_another_run_starts)
    try:
        assert run.main(cli(out, ratio=0, steps=0, eval="")) == 2
    finally:
        other.release()
    assert f"is in use by another run (process {os.getpid()})" in only_line(capsys.readouterr().err)
    assert listing(out) == [".lock"]


# ----------------------------------------------------------------------------------------------
# a write the system refuses: a file size limit (ulimit -f; EFBIG) stands in for a full disk, so CI needs no mount


LIMITED = """import resource, sys
from pathlib import Path
import formats, run
limit, target = int(sys.argv[1]), sys.argv[2]


def limited(write):  # the file size limit set just before `target` is written ("*": from the start)
    def wrapped(path, *args, **kwargs):
        if Path(path).name == target:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return write(path, *args, **kwargs)
    return wrapped


if target == "*":
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
formats.atomic_write, formats.atomic_write_folder = limited(formats.atomic_write), limited(formats.atomic_write_folder)
sys.exit(run.main(sys.argv[3:]))
"""


def limited_run(limit: int, target: str, argv: list) -> subprocess.CompletedProcess:
    """run.main(argv) in a process whose files may grow to `limit` bytes, from the start or from the write of
    `target` on: Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as one on a full disk fails with
    ENOSPC."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), target, *argv], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def not_written(path, kept: bool, limit: str, needs: bool = True) -> str:
    """The line a refused write prints, as a regex."""
    return (rf"error: {re.escape(str(path))}: not written \(File too large: "
            + (r"it needs about [\d.]+ [kM]B, " if needs else "") + rf"the file size limit \(ulimit -f\) is {limit}\); "
            + (f"the earlier {re.escape(Path(path).name)} is unchanged" if kept else "nothing was left behind"))


def test_disk_full_while_saving_resume_pt(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert killed_after(2, cli(out, save_every=2), monkeypatch) == 0
    before = (out / "resume.pt").read_bytes()  # step 2's, 0.7 MB
    result = limited_run(100_000, "*", cli(out, save_every=2, resume=True))
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert re.fullmatch(not_written(out / "resume.pt", kept=True, limit="100.0 kB"), line), line
    assert (out / "resume.pt").read_bytes() == before and listing(out) == [".lock", "log.txt", "resume.pt"]
    assert (out / "log.txt").read_text().splitlines()[-1] == line


def test_disk_full_while_saving_the_model_keeps_the_earlier_one(finished, tmp_path):
    """A finished run's folder without its report: --resume slices and saves model/ again, which the limit refuses."""
    out = shutil.copytree(finished[0], tmp_path / "out")
    (out / "report.json").unlink()
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    result = limited_run(100_000, "*", cli(out, steps=24, resume=True))
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert re.fullmatch(not_written(out / "model", kept=True, limit="100.0 kB"), line), line
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    assert listing(out) == [".lock", "log.txt", "model", "resume.pt"]


@pytest.mark.parametrize("target, flags", [("report.json", {}), ("model.gguf", {"gguf": "f32"}), ("hf", {"hf": True})])
def test_disk_full_while_writing_the_report_or_an_export(target, flags, tmp_path):
    out = tmp_path / "out"
    result = limited_run(1000, target, cli(out, ratio=0, steps=0, eval="", **flags))
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert re.fullmatch(not_written(out / target, kept=False, limit="1.0 kB"), line), line
    assert listing(out) == [".lock", "log.txt", "model"]  # model/ was written before; no temporary beside it


def test_disk_full_while_appending_to_the_log(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert killed_after(2, cli(out, save_every=2), monkeypatch) == 0
    log, state = (out / "log.txt").read_text(), (out / "resume.pt").read_bytes()
    result = limited_run(len(log.encode()) + 20, "*", cli(out, save_every=2, resume=True))
    assert result.returncode == 2, result.stderr
    assert only_line(result.stderr) == f"error: {out / 'log.txt'}: not written (File too large); the lines before " \
                                       "are kept"
    assert (out / "log.txt").read_text().startswith(log) and (out / "resume.pt").read_bytes() == state


# ----------------------------------------------------------------------------------------------
# a missing optional extra: one line naming it, before the checkpoint is read, --out untouched


BLOCKED = """import contextlib, importlib.abc, io, json, sys
import run


class NotInstalled(importlib.abc.MetaPathFinder):  # as if the packages in `names` were not installed
    names = set()

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NotInstalled())
results = []
for names, argv in json.loads(sys.argv[1]):
    NotInstalled.names = set(names)
    for module in [m for m in sys.modules if m.split(".")[0] in NotInstalled.names | {"harness"}]:
        del sys.modules[module]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    from conftest import ROPE_THETA, hf_model, train_bpe, write_llama_gguf
    tok = train_bpe("smollm")
    bpe_gguf = write_llama_gguf(tmp_path / "bpe.gguf", hf_model(vocab_size=tok.get_vocab_size(),
                                                                tie_word_embeddings=True, rope_theta=ROPE_THETA), tok)
    not_a_checkpoint = _write(tmp_path / "x.bin", bytes(100))  # read first, it would fail otherwise
    out = tmp_path / "out"
    cases = [  # (packages missing, flags, the line)
        (["gguf"], cli(out, ckpt=not_a_checkpoint, gguf="f16"), "--gguf needs gguf"),
        (["gguf"], cli(out, ckpt=bpe_gguf), f"reading {bpe_gguf} needs gguf"),
        (["tokenizers"], cli(out, ckpt=bpe_gguf), f"the BPE tokenizer in {bpe_gguf} needs tokenizers"),
        (["tokenizers"], cli(out, ckpt=not_a_checkpoint, tokenizer=_write(tmp_path / "tokenizer.json", "{}")),
         f"reading {tmp_path / 'tokenizer.json'} needs tokenizers"),
        (["tiktoken"], cli(out, ckpt=not_a_checkpoint, tokenizer=_write(tmp_path / "tok.tiktoken", "")),
         f"reading {tmp_path / 'tok.tiktoken'} (a tiktoken BPE file) needs tiktoken"),
        (["lm_eval"], cli(out, ckpt=not_a_checkpoint, tasks="boolq"), "--tasks needs lm_eval"),
    ]
    extra = {"gguf": "gguf", "tokenizers": "tokenizers", "tiktoken": "tiktoken", "lm_eval": "eval"}
    result = subprocess.run([sys.executable, "-c", BLOCKED, json.dumps([[names, argv] for names, argv, _ in cases])],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stderr
    for (names, _, words), (code, err) in zip(cases, json.loads(result.stdout.splitlines()[-1])):
        line = only_line(err)
        assert code == 2 and line.startswith(f"error: {words}, which does not import (No module named "), line
        assert line.endswith(f"pip install -e '.[{extra[names[0]]}]'"), line
    assert not out.exists()
