"""Tests for data.py: tokenizers, document reading, packing, eval text and the perplexity protocol."""
import base64
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import formats
from conftest import TEXT, hf_model, shared_file, train_bpe, write_llama_gguf, write_tokenizer_gguf
from data import (ALPACA_PROMPT_NO_INPUT, Tokenizer, data_dir, eval_text, find_tokenizer, pack_sequences, perplexity,
                  read_documents, training_tokens)

# ----------------------------------------------------------------------------------------------
# data folder


def test_data_dir_follows_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("LORAPRUNE_DATA")
    assert data_dir() == data._DEFAULT_DATA_DIR
    assert data._DEFAULT_DATA_DIR.parent.parent == data.Path(data.__file__).resolve().parent.parent


def test_shared_file_skips_outside_ci_and_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRUNE_DATA", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        shared_file("missing.txt")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing.txt"):
        shared_file("missing.txt")
    (tmp_path / "present.txt").write_text("x")
    assert shared_file("present.txt") == tmp_path / "present.txt"


# ----------------------------------------------------------------------------------------------
# tokenizers


@pytest.fixture(scope="module")
def tok512():
    return Tokenizer(shared_file("tok512.model"))


@pytest.fixture(scope="module")
def llama_tok():
    return Tokenizer(shared_file("tokenizer.model"))


def test_tok512_ids_and_round_trip(tok512):
    assert (tok512.vocab_size, tok512.bos_id, tok512.eos_id) == (512, 1, 2)
    assert tok512.encode("Once upon a time", bos=False) == [403, 407, 261, 378]
    assert tok512.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok512.encode("Once upon a time", bos=True, eos=True) == [1, 403, 407, 261, 378, 2]
    text = "Lily saw a big, red ball. She was happy!"
    assert tok512.decode(tok512.encode(text, eos=True)) == text


def test_llama_tokenizer_ids(llama_tok):
    assert (llama_tok.vocab_size, llama_tok.bos_id, llama_tok.eos_id) == (32000, 1, 2)
    expected = [15043, 3186, 29892, 445, 338, 263, 1243, 29889]
    assert llama_tok.encode("Hello world, this is a test.", bos=False) == expected


def test_check_vocab(tok512, llama_tok):
    with pytest.raises(ValueError, match=r"32000.*3000"):
        llama_tok.check_vocab(3000)
    tok512.check_vocab(512)
    tok512.check_vocab(576)  # a padded model vocab is fine


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        Tokenizer(tmp_path / "nothere.model")
    bad = tmp_path / "notatok.model"
    bad.write_text("this is not a tokenizer\n")
    with pytest.raises(ValueError, match=r"notatok\.model.*expected a SentencePiece model"):
        Tokenizer(bad)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    try:
        import gguf as _  # noqa: F401
        expected = ValueError  # a truncated GGUF file
    except ImportError:
        expected = ImportError  # the error names the missing extra
    with pytest.raises(expected, match="GGUF|gguf"):
        Tokenizer(gguf)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json.*expected a Hugging Face tokenizer\.json"):
        Tokenizer(bad_json)


def _write_word_level_tokenizer(folder, vocab):
    """A tiny HF tokenizer.json: whitespace-split words, with the vocab's <...> entries as special tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_json(tmp_path):
    path = _write_word_level_tokenizer(tmp_path, {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4})
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (5, 1, 2)
    assert tok.encode("hello world", bos=False) == [3, 4]
    assert tok.encode("hello world", bos=True, eos=True) == [1, 3, 4, 2]
    assert tok.decode([1, 3, 4, 2]) == "hello world"  # specials are dropped on decode
    assert find_tokenizer(tmp_path / "model.safetensors") == path


def test_hf_tokenizer_json_specials_from_config(tmp_path):
    vocab = {"<unk>": 0, "hello": 1, "<|begin_of_text|>": 2, "<|end_of_text|>": 3, "<|eot|>": 4}
    path = _write_word_level_tokenizer(tmp_path, vocab)
    assert (Tokenizer(path).bos_id, Tokenizer(path).eos_id) == (2, 3)  # Llama 3 names, no config
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (2, 4)
    assert tok.encode("hello", eos=True) == [1, 4]  # no post-processor puts BOS first: neither do we
    assert tok.encode("hello", bos=True, eos=True) == [2, 1, 4]


@pytest.mark.parametrize("post", [True, False])
def test_hf_tokenizer_json_bos_as_transformers_adds_it(tmp_path, post):
    """BOS goes first exactly when transformers' AutoTokenizer puts it first: when the tokenizer.json's own
    post-processor adds it (SmolLM2 and Qwen have none; Llama 3's adds <|begin_of_text|>); add_bos_token in the
    config does not change that for a byte-level tokenizer.json (transformers 5)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors
    tok = train_bpe("smollm")
    if post:
        bos = tok.token_to_id("<|im_start|>")
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>",
         "add_bos_token": not post}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer(tmp_path / "tokenizer.json")
    for text in ["The cat sat on the mat.", "It was 1234 degrees!"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.add_bos == post and ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id


def test_hf_tokenizer_without_bos_refuses_to_add_one(tmp_path):
    tok = Tokenizer(_write_word_level_tokenizer(tmp_path, {"<unk>": 0, "hello": 1}))
    assert tok.bos_id == -1
    assert tok.encode("hello") == [1]
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("hello", bos=True)


def test_find_tokenizer(tmp_path):
    ckpt = tmp_path / "model.bin"
    ckpt.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*tok\*\.model.*tokenizer\.json"):
        find_tokenizer(ckpt)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(ckpt) == tmp_path / "tokenizer.json"
    (tmp_path / "tok512.model").write_bytes(b"")
    assert find_tokenizer(tmp_path) == tmp_path / "tok512.model"  # a folder works too
    (tmp_path / "tok4096.model").write_bytes(b"")
    with pytest.raises(ValueError, match="tok4096.model"):
        find_tokenizer(ckpt)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert find_tokenizer(ckpt) == tmp_path / "tokenizer.model"


def test_find_tokenizer_by_vocab():
    ckpt = shared_file("stories260K.bin")  # beside it: LLaMA's tokenizer.model (32000) and tok512.model (512)
    assert find_tokenizer(ckpt, vocab_size=512).name == "tok512.model"
    assert find_tokenizer(ckpt, vocab_size=32000).name == "tokenizer.model"
    assert find_tokenizer(ckpt, vocab_size=1000).name == "tok512.model"  # no exact fit: a padded embedding's
    with pytest.raises(ValueError, match="fits the model's vocab size 100: tokenizer.model has 32000"):
        find_tokenizer(ckpt, vocab_size=100)


# ----------------------------------------------------------------------------------------------
# documents

NO_INPUT_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n")
INPUT_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n")


def test_tinystories_files():
    train = read_documents(shared_file("tinystories-train.txt"))
    valid = read_documents(shared_file("tinystories-valid.txt"))
    assert (len(train), len(valid)) == (290, 193)
    for doc in train + valid:
        assert "<|endoftext|>" not in doc and doc == doc.strip() and doc
    assert not set(train) & set(valid)


def test_plain_text_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("line one\n\nline two\n")
    assert read_documents(path) == ["line one\n\nline two\n"]
    (tmp_path / "sep.txt").write_text("a\n<|endoftext|>\n\n<|endoftext|>\n b \n<|endoftext|>\n")
    assert read_documents(tmp_path / "sep.txt") == ["a", "b"]
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_documents(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_documents(tmp_path / "absent.txt")


def test_alpaca_json(tmp_path):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    assert read_documents(path) == [
        INPUT_HEAD + "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        NO_INPUT_HEAD + "Say hi.\n\n### Response:\nHi!",
    ]


def test_lamini_jsonl(tmp_path):
    lines = [{"instruction": "Name a colour.", "response": "Blue."},
             {"instruction": "Count to two.", "response": "One, two."}]
    path = tmp_path / "lamini.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert read_documents(path) == [
        NO_INPUT_HEAD + "Name a colour.\n\n### Response:\nBlue.",
        NO_INPUT_HEAD + "Count to two.\n\n### Response:\nOne, two.",
    ]


def test_bad_instruction_records(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 1.*\['answer', 'prompt'\]"):
        read_documents(path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_documents(path)
    for record, words in (({"instruction": 1, "output": "b"}, "expected text in 'instruction', found 1"),
                          ({"instruction": "a", "output": None}, "expected text in 'output', found None"),
                          ({"instruction": "a", "input": ["x"], "response": "b"},
                           "expected text in 'input', found ['x']")):
        path.write_text(json.dumps([{"instruction": "a", "output": "b"}, record]))
        with pytest.raises(ValueError, match=r"bad\.json, record 1: " + re.escape(words)):
            read_documents(path)
    path.write_text(json.dumps([{"instruction": "a", "input": None, "output": "b"}]))  # a null input is no input
    assert read_documents(path) == [ALPACA_PROMPT_NO_INPUT.format(instruction="a") + "b"]


def test_text_files_must_be_utf8_files(tmp_path):
    """Binary bytes, a folder or a missing file as training or eval data: one line naming the file and what was
    expected, for text, JSON and JSONL alike."""
    for name in ("data.txt", "data.json", "data.jsonl"):
        (tmp_path / name).write_bytes(b"Once upon a time \xff\xfe\x00 binary")
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: expected text in UTF-8, found byte 0xff "
                                                       "at offset 17 (a binary file?)")):
            read_documents(tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(f"eval set {tmp_path / 'data.txt'}: expected text in UTF-8")):
        eval_text(str(tmp_path / "data.txt"))
    with pytest.raises(ValueError, match=re.escape(f"document file {tmp_path} is a folder, expected a file")):
        read_documents(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"eval set {tmp_path} is a folder, expected a file")):
        eval_text(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {tmp_path} is a folder, expected a file")):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"document file {tmp_path / 'no.txt'} does not exist")):
        read_documents(tmp_path / "no.txt")


# ----------------------------------------------------------------------------------------------
# packing


def test_pack_sequences_exact():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 2], [1, 11]]  # 14 tokens
    rows = pack_sequences(docs, seq_len=3)  # rows of 4: 3 rows, the last 2 tokens dropped
    assert rows.dtype == torch.int64
    assert rows.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 10, 2]]


def test_pack_sequences_too_short():
    with pytest.raises(ValueError, match=r"found 3 tokens.*5"):
        pack_sequences([[1, 2], [3]], seq_len=4)


def test_training_tokens(tok512):
    path = shared_file("tinystories-valid.txt")
    rows = training_tokens([path], tok512, seq_len=64)
    stream = [t for doc in read_documents(path) for t in tok512.encode(doc, bos=True, eos=True)]
    assert rows.shape == (len(stream) // 65, 65)
    assert rows.flatten().tolist() == stream[: rows.numel()]
    assert rows[0, 0] == tok512.bos_id and (rows == tok512.eos_id).sum() > 0


# ----------------------------------------------------------------------------------------------
# eval text


def test_eval_text():
    shared_file("wiki.test.raw")
    label, text = eval_text("wikitext2")
    assert label == "wikitext2" and text.startswith(" \n = Robert Boulter = \n")
    shared_file("ptb.test.txt")
    label, text = eval_text("ptb")
    assert label == "ptb" and text.startswith(" no it was n't black monday \n")


def test_eval_text_paths_and_errors(tmp_path, monkeypatch):
    path = tmp_path / "mine.txt"
    path.write_text("some text")
    assert eval_text(str(path)) == ("mine.txt", "some text")
    with pytest.raises(FileNotFoundError, match="wikitext2.*nosuch"):
        eval_text("nosuch")
    monkeypatch.setenv("LORAPRUNE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "wiki.test.raw")):
        eval_text("wikitext2")


# ----------------------------------------------------------------------------------------------
# perplexity


class Uniform(nn.Module):
    """Logits all zero (every token equally likely); records the train flag it was called in."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(1))  # so perplexity can find the device
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return torch.zeros(*x.shape, self.vocab_size)  # (B, T, V)


class Bigram(nn.Module):
    """Logits at position t are a fixed row of a table, chosen by token t: known next-token probabilities."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)  # (V, V)

    def forward(self, x):
        return self.table[x]  # (B, T, V)


def reference_perplexity(table, tokens, seq_len):
    """The protocol written out as a loop in float64 numpy."""
    table, tokens = np.asarray(table, dtype=np.float64), np.asarray(tokens)
    log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))  # (V, V) row-wise log-softmax
    nll, count = 0.0, 0
    for w in range(len(tokens) // seq_len):  # the remainder is dropped
        window = tokens[w * seq_len : (w + 1) * seq_len]
        for t in range(seq_len - 1):  # window[0] is never predicted
            nll -= log_probs[window[t], window[t + 1]]
            count += 1
    return math.exp(nll / count)


def test_uniform_model_has_perplexity_vocab_size():
    model = Uniform(vocab_size=97)
    model.train()
    tokens = torch.randint(0, 97, (1000,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, tokens, seq_len=64, batch_size=4) == pytest.approx(97, rel=1e-6)
    assert model.seen_training and not any(model.seen_training)  # scored in eval mode
    assert model.training  # and the mode is restored


def test_perplexity_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    V, seq_len = 11, 16
    table = torch.randn(V, V, generator=gen) * 2
    tokens = torch.randint(0, V, (7 * seq_len + 5,), generator=gen)  # 7 windows and a remainder of 5
    model = Bigram(table)
    expected = reference_perplexity(table, tokens, seq_len)
    got = perplexity(model, tokens, seq_len=seq_len, batch_size=1)
    assert got == pytest.approx(expected, rel=1e-6)
    # the protocol matters: a different cut of the same tokens gives a different number
    assert reference_perplexity(table, tokens[1:], seq_len) != pytest.approx(expected, rel=1e-6)
    assert perplexity(model, tokens, seq_len=seq_len, batch_size=3) == pytest.approx(got, rel=1e-12)
    assert perplexity(model, tokens, seq_len=seq_len, device="cpu") == pytest.approx(got, rel=1e-12)


def test_perplexity_upcasts_low_precision_logits():
    gen = torch.Generator().manual_seed(1)
    table = (torch.randn(50, 50, generator=gen) * 8).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (4 * 128,), generator=gen)
    expected = reference_perplexity(table.float(), tokens, 128)
    assert perplexity(Bigram(table), tokens, seq_len=128) == pytest.approx(expected, rel=1e-5)


def test_perplexity_errors():
    model = Uniform(vocab_size=5)
    with pytest.raises(ValueError, match=r"found 10 tokens.*16"):
        perplexity(model, torch.zeros(10, dtype=torch.int64), seq_len=16)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 16, dtype=torch.int64), seq_len=16)

    class LastOnly(Uniform):
        def forward(self, x):
            return super().forward(x)[:, -1:]  # (B, 1, V), as some generate-only models do

    with pytest.raises(ValueError, match="every position"):
        perplexity(LastOnly(5), torch.zeros(32, dtype=torch.int64), seq_len=16)


def test_eval_tokens_one_bos_per_story():
    tok = Tokenizer(shared_file("tok512.model"))
    label, ids = data.eval_tokens(str(shared_file("tinystories-valid.txt")), tok)
    assert label == "tinystories-valid.txt" and ids.dtype == torch.int64
    assert int((ids == tok.bos_id).sum()) == 193  # one per story, and no separator text scored
    assert "endoftext" not in tok.decode(ids[:3000].tolist())
    label, ids = data.eval_tokens("wikitext2", tok)  # no separators: the whole split, BOS once
    assert int((ids == tok.bos_id).sum()) == 1 and ids[0] == tok.bos_id


# ----------------------------------------------------------------------------------------------
# the GGUF tokenizer (metadata read by formats.gguf_tokenizer) and tiktoken (Llama 3's tokenizer.model)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_matches_its_source(tmp_path, pre):
    tok = train_bpe(pre)
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", tok, pre=pre)
    ours = Tokenizer(path)
    bos, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|endoftext|>")
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (300, bos, eos)
    for text in [TEXT, "  leading spaces, ümlauts and ünïcode: 東京 2024\t tabs", "<|endoftext|>the cat",
                 "It's 12345 o'CLOCK\n\n  indented\r\nline", "cafe\u0301 vs café"]:
        expected = tok.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, bos=False) == expected
        assert ours.decode(expected) == tok.decode(expected, skip_special_tokens=True)
    assert ours.decode(ours.encode(TEXT, bos=True, eos=True)) == TEXT  # specials dropped on decode
    assert len(ours.encode(TEXT, bos=False)) < 0.6 * len(TEXT)  # the merges are used
    if pre == "smollm":
        assert ours.encode("1234", bos=False) == [tok.token_to_id(d) for d in "1234"]



@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_tokenizer_honours_add_bos(tmp_path, add_bos):
    tok = train_bpe("gpt-2")
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", tok, add_bos=add_bos)
    ours = Tokenizer(path)
    body = tok.encode("the cat", add_special_tokens=False).ids
    assert ours.add_bos == add_bos
    assert ours.encode("the cat") == ([ours.bos_id] if add_bos else []) + body
    assert ours.encode("the cat", bos=True)[0] == ours.bos_id  # an explicit request still wins



@pytest.mark.parametrize("name", ["tok512.model", "tokenizer.model"])
def test_gguf_sentencepiece_vocab_reads_back_as_the_model(tmp_path, name):
    """A SentencePiece vocabulary as export_gguf writes it (tokenizer.ggml.model 'llama': pieces, scores, types)
    reads back as a SentencePiece model that tokenizes and detokenizes exactly as the .model file it came from:
    llama2.c's tok512 and Meta's LLaMA tokenizer, with byte fallback, spaces and unicode."""
    gguf = pytest.importorskip("gguf")
    source = Tokenizer(shared_file(name))
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value, kind, item in formats.gguf_tokenizer_fields(shared_file(name), source.vocab_size):
        writer.add_key_value(key, value, kind, sub_type=item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer(path)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (source.vocab_size, 1, 2, True)
    story = shared_file("tinystories-valid.txt").read_text(encoding="utf-8")[:20000]
    for text in [story, "  two leading spaces,  double  spaces\n\nand lines", "ümlauts, 東京 and emoji 🙂 (bytes)"]:
        ids = source.encode(text, bos=True)
        assert ours.encode(text, bos=True) == ids
        assert ours.decode(ids) == source.decode(ids)


def write_tiktoken_file(path, merged: list) -> dict:
    """Llama 3's format: one '<base64 bytes> <rank>' line per token, the 256 bytes first, then `merged`."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({m: 256 + i for i, m in enumerate(merged)})
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks



def test_tiktoken_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    merged = [b"th", b"he", b"the", b" the", b"at", b" c", b" cat", b"\xc3\xbc"]
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model", merged)
    tok = Tokenizer(tmp_path / "tokenizer.model")
    n = len(ranks)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (n + 256, n, n + 1, True)
    assert tok.encode("the cat", eos=True) == [n, ranks[b"the"], ranks[b" cat"], n + 1]
    for text in [TEXT, "über  naïve\n\n 東京 <|begin_of_text|> 12345"]:
        ids = tok.encode(text)
        assert ids[0] == n and max(ids[1:]) < n  # special-token names in the text are plain text
        assert tok.decode(ids) == text
    assert "ü" in tok.decode([ranks[b"\xc3\xbc"]])



def test_tokenizer_backend_is_chosen_by_extension(tmp_path):
    """One table: .model SentencePiece (or Llama 3's tiktoken tokenizer.model), .json, .gguf, .tiktoken; any other
    extension is refused by name, whatever the file holds."""
    pytest.importorskip("tiktoken")
    assert sorted(data.TOKENIZER_BACKENDS) == [".gguf", ".json", ".model", ".tiktoken"]
    ranks = write_tiktoken_file(tmp_path / "llama3.tiktoken", [b"th", b"the"])
    for name in ("llama3.tiktoken", "tokenizer.model"):
        if name != "llama3.tiktoken":
            (tmp_path / name).write_bytes((tmp_path / "llama3.tiktoken").read_bytes())
        tok = Tokenizer(tmp_path / name)
        assert type(tok.backend).__name__ == "_Tiktoken" and tok.encode("the", bos=False) == [ranks[b"the"]]
    assert type(Tokenizer(shared_file("tok512.model")).backend).__name__ == "_SentencePiece"
    (tmp_path / "tokenizer.txt").write_bytes((tmp_path / "llama3.tiktoken").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer\.txt.*'\.tiktoken'.*found '\.txt'"):
        Tokenizer(tmp_path / "tokenizer.txt")
    assert find_tokenizer(tmp_path / "tokenizer.txt") == tmp_path / "tokenizer.model"  # first in the fixed order


def test_tiktoken_file_errors(tmp_path):
    pytest.importorskip("tiktoken")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"line 2.*base64 token"):
        Tokenizer(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match=r"ranks 0\.\.1"):
        Tokenizer(bad)



def test_find_tokenizer_of_a_gguf_is_the_file_itself(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert data.find_tokenizer(path) == path



def test_gguf_tokenizer_errors(tmp_path):
    pytest.importorskip("gguf")
    scaled = write_llama_gguf(tmp_path / "scaled.gguf", hf_model(vocab_size=300, tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"scaled\.gguf: expected a tokenizer in the GGUF metadata, found no "
                                         r"tokenizer\.ggml\.\* keys"):
        Tokenizer(scaled)  # a GGUF without tokenizer metadata
    other = write_tokenizer_gguf(tmp_path / "other.gguf", train_bpe("gpt-2"), pre="deepseek-llm")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'deepseek-llm' is not supported"):
        Tokenizer(other)
