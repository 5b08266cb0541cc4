"""harness.py against lm-evaluation-harness's own `hf` model (HFLM) on the same tiny Hugging Face checkpoint and the
same tokenizer: per-request log-likelihoods, greedy flags, rolling log-likelihoods and a local task's accuracies must
agree. Everything is local: the task is a YAML over a JSONL file written to tmp_path, the tokenizer a small BPE
trained here, the checkpoint shared/data/tiny-random-llama-2 (vocab 3000, so our tokenizer's ids stay below)."""
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing below may touch the network (read at import time)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# lm-eval is the optional `eval` extra; its `hf` model, the reference here, also needs accelerate. CI installs both
# and must run these tests, so only outside CI may a missing package skip them.
if os.environ.get("CI", "").lower() in ("true", "1"):
    import accelerate  # noqa: F401
    import lm_eval  # noqa: F401
else:
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install -e '.[eval]'")
    pytest.importorskip("accelerate", reason="lm-eval's hf model (the reference) needs accelerate")

import data  # noqa: E402
import harness  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

# The local task: questions whose answers are scored with no delimiter, so some choices ("s sat") merge with the
# context's last word into one token, and one prompt ending in a space (moved to the continuation by lm-eval).
DOCS = [
    {"question": "The cat", "choices": ["s sat on the mat.", " sat on the mat.", "tle ran to the barn."], "label": 1},
    {"question": "Is the sky blue? Answer:", "choices": [" yes", " no", " maybe"], "label": 0},
    {"question": "The dog ran to the", "choices": [" barn.", " mat.", " sky."], "label": 0},
    {"question": "Is the dog red? Answer: ", "choices": ["yes", "no"], "label": 1},
    {"question": "The bird sat on the", "choices": [" tree.", " cat.", " mat and the dog ran."], "label": 0},
    {"question": "A red", "choices": [" bird", "dish barn.", " barn is big."], "label": 2},
    {"question": "The cats", "choices": [" ran.", " sat.", "s ran."], "label": 1},
    {"question": "Is the mat big? Answer:", "choices": [" no", " yes"], "label": 0},
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TEXT = ("The cat sat on the mat. The dog ran to the barn. Is the sky blue? Answer: yes. "
                "A red bird sat on the tree, and the cats ran.")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """tiny-random-llama-2 plus a 200-token BPE tokenizer.json (LLaMA-style: Metaspace, <unk>=0 <s>=1 </s>=2, BOS
    added by the post-processor) and a tokenizer_config.json that both transformers and data.Tokenizer read."""
    from conftest import shared_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    src = shared_file("tiny-random-llama-2/config.json").parent
    folder = tmp_path_factory.mktemp("tiny-hf")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, folder / name)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [d["question"] + c for d in DOCS for c in d["choices"]] + [ROLLING_TEXT]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 256}))
    return folder


@pytest.fixture(scope="module")
def models(hf_folder):
    """(our HarnessLM, lm-eval's HFLM) on the same checkpoint and tokenizer, both float32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    ours = formats.load(hf_folder, dtype=torch.float32)
    tokenizer = data.Tokenizer(hf_folder / "tokenizer.json")
    assert tokenizer.bos_id == 1 and tokenizer.vocab_size <= ours.args.vocab_size
    hf = HFLM(pretrained=str(hf_folder), device="cpu", dtype="float32", batch_size=3)
    return harness.HarnessLM(ours, tokenizer, batch_size=3), hf


def requests(kind: str, args: list) -> list:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hflm(models):
    """Every (context, continuation) of the task, an empty context and a context ending in spaces: the same
    token split as HFLM, and log-likelihoods equal to 1e-4 with the same greedy flags."""
    ours, hf = models
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]] + [("", "The cat sat."), ("The dog  ", "ran.")]
    for context, continuation in pairs:  # the split itself, with HFLM's own tokenizer
        expected = hf._encode_pair(context, continuation) if context else None
        if expected:
            assert ours.encode_pair(context, continuation) == tuple(expected), (context, continuation)
    # the check is sensitive: somewhere encoding the parts separately would give different tokens
    tok = ours.tokenizer
    assert any(tok.encode(c) + tok.encode(x, bos=False) != tok.encode(c + x) for c, x in pairs if c)
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = hf.loglikelihood(requests("loglikelihood", pairs))
    assert len(got) == len(want) == len(pairs)
    for (lp, greedy), (lp_hf, greedy_hf), pair in zip(got, want, pairs):
        assert lp == pytest.approx(lp_hf, abs=1e-4), pair
        assert greedy == greedy_hf, pair
    assert all(lp < 0 for lp, _ in got)


def test_loglikelihood_rolling_matches_hflm(models):
    """A text longer than the window (max_length 8): HFLM's windows, each token predicted once, the same sum."""
    ours, hf = models
    ours_short = harness.HarnessLM(ours.model, ours.tokenizer, batch_size=2, max_length=8)
    hf._max_length = 8  # HFLM's max_length property reads this first
    try:
        texts = [ROLLING_TEXT, "The cat sat."]
        assert len(ours.tok_encode(ROLLING_TEXT)) > 3 * 8  # several windows
        got = ours_short.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
        want = hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    finally:
        hf._max_length = None
    assert got == pytest.approx(want, abs=1e-4)
    # and a full-length window scores the short text identically
    assert ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(texts[1],)]))[0] == pytest.approx(got[1],
                                                                                                           abs=1e-4)


def test_local_task_accuracy_matches_hflm(models, tmp_path):
    """simple_evaluate on the local multiple-choice task: the same acc and acc_norm as HFLM, and per-document
    log-likelihoods equal; acc is the fraction of documents whose label has the largest log-likelihood."""
    from lm_eval import simple_evaluate

    ours, hf = models
    data_path = tmp_path / "tiny_mc.jsonl"
    data_path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(path=data_path))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    harness.check_tasks(["tiny_mc"], task_manager=manager)
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['tiny_nope'\]"):
        harness.check_tasks(["tiny_mc", "tiny_nope"], task_manager=manager)

    rng = torch.get_rng_state()
    scores = harness.evaluate_tasks(ours.model, ours.tokenizer, ["tiny_mc"], batch_size=4, task_manager=manager)
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's seeding does not leak into the run
    runs = {name: simple_evaluate(model=lm, tasks=["tiny_mc"], num_fewshot=0, task_manager=manager,
                                  log_samples=True, bootstrap_iters=0) for name, lm in (("ours", ours), ("hf", hf))}
    hf_results = runs["hf"]["results"]["tiny_mc"]
    assert set(scores) == {"tiny_mc"} and set(scores["tiny_mc"]) == {"acc", "acc_norm"}
    assert scores["tiny_mc"]["acc"] == hf_results["acc,none"]
    assert scores["tiny_mc"]["acc_norm"] == hf_results["acc_norm,none"]
    # per document, per choice: the log-likelihoods lm-eval scored
    samples = {name: sorted(run["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for name, run in runs.items()}
    assert len(samples["ours"]) == len(DOCS)
    correct = 0
    for s_ours, s_hf in zip(samples["ours"], samples["hf"]):
        lls = [float(r[0]) for r in s_ours["filtered_resps"]]
        assert lls == pytest.approx([float(r[0]) for r in s_hf["filtered_resps"]], abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == s_ours["doc"]["label"]
    assert scores["tiny_mc"]["acc"] == pytest.approx(correct / len(DOCS))


def test_tokenizer_json_without_bos_matches_hflm(hf_folder, tmp_path):
    """A tokenizer.json whose post-processor adds no BOS (SmolLM2's, Qwen's), with a bos_token in its config: HFLM
    (transformers) puts no BOS first, and neither do we: the same splits and log-likelihoods (1e-4), which a BOS
    first would move (checked: forcing BOS changes them)."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer as HFTokenizer

    folder = tmp_path / "no-bos"
    shutil.copytree(hf_folder, folder)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = None
    tok.save(str(folder / "tokenizer.json"))
    tokenizer = data.Tokenizer(folder / "tokenizer.json")
    assert tokenizer.bos_id == 1 and not tokenizer.add_bos
    ours = harness.HarnessLM(formats.load(folder, dtype=torch.float32), tokenizer, batch_size=3)
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=3)
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]][:9]
    for context, continuation in pairs:
        assert ours.encode_pair(context, continuation) == tuple(hf._encode_pair(context, continuation))
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = hf.loglikelihood(requests("loglikelihood", pairs))
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    with_bos = harness.HarnessLM(ours.model, tokenizer, batch_size=3, add_bos_token=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(with_bos.loglikelihood(requests("loglikelihood", pairs)), want)) > 1e-3


def test_generate_until_is_greedy_and_stops(shared):
    """On stories260K, greedy generation reproduces the published greedy sample (MANIFEST.md), cut before the
    stop string; max_gen_toks caps it; sampling is refused."""
    model = formats.load(shared("stories260K.bin"), dtype=torch.float32)
    lm = harness.HarnessLM(model, data.Tokenizer(shared("tok512.model")))
    got = lm.generate_until(requests("generate_until", [
        ("Once upon a time", {"until": ["."], "max_gen_toks": 40}),
        ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 5}),
        ("Once upon a time, there was a little girl named Lily.", {"until": "park", "do_sample": False})]))
    assert got == [", there was a little girl named Lily", ", there was a little",
                   "She loved to play outside in the "]  # decoded alone: SentencePiece drops the first space
    with pytest.raises(ValueError, match="generate_until decodes greedily"):
        lm.generate_until(requests("generate_until", [("Once", {"until": ["."], "temperature": 0.7})]))


def test_compiled_blocks_are_scored_eagerly():
    """run.py --compile compiles every block for fixed shapes; scoring requests of many lengths must not compile
    (one graph per length would cost minutes at 7B), and gives the uncompiled model's numbers."""
    torch.manual_seed(0)
    args = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=64)
    model = llama.Transformer(args)
    for p in model.parameters():  # the constructor leaves weights for a checkpoint to fill
        p.data.normal_(0, 0.2)
    tokenizer = type("Ids", (), {"add_bos": True, "bos_id": 1, "eos_id": 2})()  # score() needs no text
    pairs = [([1] + list(range(3, 3 + n)), [5, 6]) for n in range(1, 9)]  # eight lengths
    expected = harness.HarnessLM(model, tokenizer, batch_size=3).score(pairs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    llama.compile_blocks(model)
    got = harness.HarnessLM(model, tokenizer, batch_size=3).score(pairs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert got == expected
    assert model.training  # the model's own mode is back
