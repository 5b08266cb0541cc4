"""Text in, token ids out, perplexity back: training documents, tokenizers, sequence packing and the
evaluation protocol of the LoRAPrune tables (WikiText-2 / PTB perplexity over 2048-token windows).

Shapes: N rows, B batch, T time (seq_len), V vocab.
"""
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import formats

# ----------------------------------------------------------------------------------------------
# where the data lives

_DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"


def data_dir() -> Path:
    """The data folder: $LORAPRUNE_DATA if set (read at call time), else <repo>/../shared/data."""
    return Path(os.environ.get("LORAPRUNE_DATA", _DEFAULT_DATA_DIR))


# ----------------------------------------------------------------------------------------------
# training documents: plain text (TinyStories) or instruction data (Alpaca, LaMini)

ENDOFTEXT = "<|endoftext|>"  # the separator line between TinyStories stories

# The Alpaca template as used by alpaca-lora (templates/alpaca.json), the recipe LoRAPrune fine-tunes with.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further"
                 " context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately"
                          " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_instruction(record: dict, where: str) -> str:
    """One Alpaca {instruction, input, output} or LaMini {instruction, response} record as prompt + answer."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with instruction + output or response,"
                         f" found a {type(record).__name__}")
    answer_key = "output" if "output" in record else "response"
    if "instruction" not in record or answer_key not in record:
        raise ValueError(f"{where}: expected keys instruction + output (Alpaca) or instruction + response"
                         f" (LaMini), found {sorted(record)}")
    for key in ("instruction", answer_key) + (("input",) if record.get("input") is not None else ()):
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: expected text in {key!r}, found {record[key]!r:.40}")
    if record.get("input"):
        prompt = ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
    return prompt + record[answer_key]


def _read_records(path: Path, text: str) -> list:
    """The records of a .json file (a list of objects) or a .jsonl file (one object per line)."""
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: expected a JSON list of records, found invalid JSON ({e})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: expected one JSON object per line ({e})") from e
    return records


def read_text(path: Path, what: str) -> str:
    """The text of the file `path` (`what` it is, for messages), which must be UTF-8; a folder, a missing file or
    other bytes are a one-line error naming it."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, expected a file")
    if not path.exists():  # (a pipe is fine: --data <(zcat stories.txt.gz))
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: expected text in UTF-8, found byte {e.object[e.start]:#04x} at offset "
                         f"{e.start} (a binary file?)") from None


def read_documents(path: str | Path) -> list[str]:
    """The documents in a file: TinyStories-style text split on <|endoftext|> lines (stripped, empties
    dropped), other text as one document, and .json / .jsonl instruction data as Alpaca prompts + answers."""
    path = Path(path)
    text = read_text(path, "document file")
    if path.suffix in (".json", ".jsonl"):
        records = _read_records(path, text)
        docs = [format_instruction(r, f"{path}, record {i}") for i, r in enumerate(records)]
    elif ENDOFTEXT in text:
        docs = [d.strip() for d in text.split(ENDOFTEXT) if d.strip()]
    else:
        docs = [text] if text.strip() else []
    if not docs:
        raise ValueError(f"{path}: expected at least one document, found none")
    return docs


# ----------------------------------------------------------------------------------------------
# tokenizers: one small backend per kind of file, picked by its extension from TOKENIZER_BACKENDS


def _is_tiktoken_bpe(head: bytes) -> bool:
    """Whether a file's first bytes look like a tiktoken BPE file (Llama 3's tokenizer.model): text lines
    '<base64 token> <rank>'. A SentencePiece protobuf starts with a newline byte, so its first line is empty."""
    first = head.split(b"\n")[0].split(b" ")
    return len(first) == 2 and first[1].isdigit()


def _looks_like(path: Path) -> str:
    """A few words on what a file that failed to parse appears to be, for error messages."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"GGUF"):
        return "a GGUF file (its tokenizer is read from a path ending in .gguf)"
    if _is_tiktoken_bpe(head):
        return "a tiktoken BPE file like Llama 3's tokenizer.model"
    return f"{path.stat().st_size} bytes starting with {head[:16]!r}"


class _SentencePiece:
    """A SentencePiece .model file (LLaMA 1/2, llama2.c's tok512.model), or the model's bytes (`proto`, rebuilt from
    a GGUF file's vocabulary: _gguf_vocab)."""

    def __init__(self, path: Path, proto: Optional[bytes] = None, add_bos: bool = True):
        sentencepiece = formats.import_extra("sentencepiece", None, f"reading {path}")
        try:
            self.sp = (sentencepiece.SentencePieceProcessor(model_file=str(path)) if proto is None
                       else sentencepiece.SentencePieceProcessor(model_proto=proto))
        except RuntimeError as e:  # sentencepiece reports a bad protobuf as RuntimeError
            raise ValueError(f"{path}: expected a SentencePiece model (protobuf), found {_looks_like(path)}"
                             f" ({e})") from e
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)  # control pieces (BOS/EOS) decode to nothing


class _HFTokenizerJson:
    """A Hugging Face tokenizer.json, read with the optional `tokenizers` package. BOS/EOS and whether BOS goes first
    are read as transformers reads them (formats.hf_tokenizer_specials: the tokenizer_config.json beside it, the
    tokenizer's own post-processor)."""

    def __init__(self, path: Path):
        tokenizers = formats.import_extra("tokenizers", "tokenizers", f"reading {path}")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception on a malformed file
            raise ValueError(f"{path}: expected a Hugging Face tokenizer.json, found {_looks_like(path)}"
                             f" ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = formats.hf_tokenizer_specials(path)  # -1 where there is none

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # BOS/EOS are added by Tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class _GGUFVocab:
    """A byte-level BPE vocabulary (tokenizer.ggml.model 'gpt2') in a llama.cpp GGUF file's metadata (read by
    formats.gguf_tokenizer, optional `gguf`), as the `tokenizers` BPE formats.bpe_tokenizer makes of it (split the
    way llama.cpp splits for tokenizer.ggml.pre; control tokens special: matched whole in the text, dropped on
    decode). BOS goes first as tokenizer.ggml.add_bos_token says, else as llama.cpp defaults for that pre."""

    def __init__(self, path: Path, metadata: dict):
        meta = metadata.get  # tokenizer.ggml.* metadata (formats.gguf_tokenizer), the prefix dropped from the keys
        model, pre = meta("model"), meta("pre", "gpt-2")
        if model != "gpt2":
            raise ValueError(f"{path}: GGUF tokenizer.ggml.model is {model!r}, expected 'gpt2' (byte-level BPE) "
                             "or 'llama' (SentencePiece)")
        if pre not in formats.BPE_PRE:
            raise ValueError(f"{path}: GGUF tokenizer.ggml.pre {pre!r} is not supported; known: {list(formats.BPE_PRE)}")
        formats.import_extra("tokenizers", "tokenizers", f"the BPE tokenizer in {path}")  # (bpe_tokenizer's, named)
        self.tok = formats.bpe_tokenizer(meta("tokens"), meta("merges"), meta("token_type", []), pre)
        self.vocab_size = len(meta("tokens"))
        self.bos_id, self.eos_id = meta("bos_token_id", -1), meta("eos_token_id", -1)
        self.add_bos: bool = meta("add_bos_token", formats.BPE_PRE[pre].add_bos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # BOS/EOS are added by Tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _gguf_vocab(path: Path):
    """The tokenizer in a GGUF file's metadata: a SentencePiece model again for tokenizer.ggml.model 'llama' (what
    export_gguf writes for a .model tokenizer), else byte-level BPE (_GGUFVocab)."""
    meta = formats.gguf_tokenizer(path)
    if not meta:
        raise ValueError(f"{path}: expected a tokenizer in the GGUF metadata, found no tokenizer.ggml.* keys")
    if meta.get("model") != "llama":
        return _GGUFVocab(path, meta)
    proto = formats.sentencepiece_proto([t.encode("utf-8") for t in meta["tokens"]], meta["scores"], meta["token_type"],
                                meta.get("bos_token_id", -1), meta.get("eos_token_id", -1),
                                meta.get("unknown_token_id", -1), meta.get("add_space_prefix", True),
                                meta.get("remove_extra_whitespaces", False))
    return _SentencePiece(path, proto, add_bos=meta.get("add_bos_token", True))


class _Tiktoken:
    """Meta Llama 3's original tokenizer.model, read with the optional `tiktoken` package: one line
    '<base64 token> <rank>' per mergeable token, then 256 special tokens numbered from len(ranks) on, with the
    split pattern and special-token names of Meta's llama3/tokenizer.py (<|begin_of_text|> BOS, <|end_of_text|> EOS)."""

    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])  # 256 in all

    def __init__(self, path: Path):
        tiktoken = formats.import_extra("tiktoken", "tiktoken", f"reading {path} (a tiktoken BPE file)")
        import base64
        ranks = {}
        for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:  # wrong field count, bad base64 (binascii.Error) or a non-integer rank
                    raise ValueError(f"{path}, line {line_no}: expected '<base64 token> <rank>', found "
                                     f"{line[:40]!r}") from None
        self.n_ranks = len(ranks)
        if sorted(ranks.values()) != list(range(self.n_ranks)):
            raise ValueError(f"{path}: expected ranks 0..{self.n_ranks - 1}, each once")
        specials = {name: self.n_ranks + i for i, name in enumerate(self.SPECIALS)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=self.PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.vocab_size = self.n_ranks + len(specials)
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, disallowed_special=())  # special-token names in the text are plain text

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.n_ranks])  # special tokens decode to nothing


def _dot_model(path: Path):
    """A *.model file: SentencePiece, or tiktoken when it is Meta Llama 3's tokenizer.model (see the table)."""
    with open(path, "rb") as f:
        head = f.read(256)
    return _Tiktoken(path) if _is_tiktoken_bpe(head) else _SentencePiece(path)


# What reads a tokenizer file, by its extension: the one place a file's kind is decided.
TOKENIZER_BACKENDS = {
    # SentencePiece protobuf (LLaMA 1/2's tokenizer.model, llama2.c's tok512.model). Meta ships Llama 3's tiktoken
    # BPE under the same name, tokenizer.model: a .model file whose first line is '<base64 token> <rank>' is that.
    ".model": _dot_model,
    ".json": _HFTokenizerJson,  # Hugging Face tokenizer.json (+ tokenizer_config.json beside it for BOS/EOS)
    ".gguf": _gguf_vocab,  # the tokenizer in a GGUF file's metadata (SentencePiece or byte-level BPE)
    ".tiktoken": _Tiktoken,  # a tiktoken BPE file under its own extension
}


class Tokenizer:
    """Text <-> token ids, read by the backend TOKENIZER_BACKENDS names for the file's extension."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"tokenizer {path} is a folder, expected a file with one of the extensions "
                             f"{sorted(TOKENIZER_BACKENDS)}")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.suffix not in TOKENIZER_BACKENDS:
            raise ValueError(f"tokenizer file {path}: expected one of the extensions {sorted(TOKENIZER_BACKENDS)}, "
                             f"found {path.suffix!r}")
        self.path = path
        self.backend = TOKENIZER_BACKENDS[path.suffix](path)
        self.vocab_size: int = self.backend.vocab_size
        self.bos_id: int = self.backend.bos_id  # -1 when the tokenizer has none
        self.eos_id: int = self.backend.eos_id
        self.add_bos: bool = getattr(self.backend, "add_bos", True)  # encode's default; a GGUF file may say no

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        """ids of `text`, BOS first if bos (None: the tokenizer's own add_bos), EOS last if eos."""
        bos = self.add_bos if bos is None else bos
        for wanted, name, token_id in [(bos, "BOS", self.bos_id), (eos, "EOS", self.eos_id)]:
            if wanted and token_id < 0:
                raise ValueError(f"{self.path} has no {name} token, but encode was asked to add one")
        return ([self.bos_id] if bos else []) + self.backend.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise unless every token id indexes a row of the model's embedding (a padded, larger model
        vocab is fine)."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} tokens but the model's embedding"
                             f" has only {model_vocab_size} rows: ids >= {model_vocab_size} would index past it")


def find_tokenizer(ckpt_path: str | Path, vocab_size: Optional[int] = None) -> Path:
    """The tokenizer file beside a checkpoint (a file, or a folder); candidates in this order: tokenizer.model,
    tok*.model (sorted), tokenizer.json, tokenizer.tiktoken, tokenizer.gguf (what run.py saves beside a model whose
    tokenizer came from a GGUF). A .gguf checkpoint is its own tokenizer.
    Given the model's vocab_size, the first candidate whose vocabulary fits it exactly wins (a data folder may hold
    several tokenizers, e.g. stories260K.bin's tok512.model beside LLaMA's tokenizer.model), else the first with
    fewer tokens than the embedding has rows (Qwen pads its embedding)."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.suffix == ".gguf" and ckpt_path.is_file():
        return ckpt_path  # a GGUF file carries its own tokenizer in its metadata
    folder = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    toks = sorted(p for p in folder.glob("tok*.model") if p.name != "tokenizer.model")
    candidates = [folder / "tokenizer.model", *toks, folder / "tokenizer.json", folder / "tokenizer.tiktoken",
                  folder / "tokenizer.gguf"]
    candidates = list(dict.fromkeys(p for p in candidates if p.is_file()))
    if not candidates:
        raise FileNotFoundError(f"no tokenizer beside {ckpt_path}: looked for tokenizer.model, tok*.model,"
                                f" tokenizer.json, tokenizer.tiktoken and tokenizer.gguf in {folder}")
    if vocab_size is None:
        if len(toks) > 1 and candidates[0] in toks:
            raise ValueError(f"several tokenizers beside {ckpt_path}: {[p.name for p in toks]};"
                             f" expected one, pass the one you mean explicitly")
        return candidates[0]
    sizes = {path: Tokenizer(path).vocab_size for path in candidates}
    for path in candidates:
        if sizes[path] == vocab_size:
            return path
    for path in candidates:  # a padded embedding (Qwen: 151936 rows for 151665 tokens)
        if sizes[path] < vocab_size:
            return path
    raise ValueError(f"no tokenizer beside {ckpt_path} fits the model's vocab size {vocab_size}: "
                     + ", ".join(f"{p.name} has {n}" for p, n in sizes.items()))


# ----------------------------------------------------------------------------------------------
# packing documents into training rows


def pack_sequences(docs_tokens: list[list[int]], seq_len: int) -> Tensor:
    """Concatenate tokenized documents into one stream and cut it into non-overlapping rows of seq_len + 1
    tokens (inputs row[:-1], targets row[1:]), dropping the remainder: int64 (N, seq_len + 1)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, found {seq_len}")
    stream = [t for doc in docs_tokens for t in doc]
    n_rows = len(stream) // (seq_len + 1)
    if n_rows == 0:
        raise ValueError(f"found {len(stream)} tokens in {len(docs_tokens)} documents, need at least"
                         f" seq_len + 1 = {seq_len + 1} for one training row")
    return torch.tensor(stream[: n_rows * (seq_len + 1)], dtype=torch.int64).view(n_rows, seq_len + 1)  # (N, T+1)


def training_tokens(paths: list, tokenizer: Tokenizer, seq_len: int) -> Tensor:
    """Read the documents of every file, encode each as [BOS] + text + EOS (BOS where the tokenizer adds one, as
    sentencepiece LLaMA tokenizers do; a GGUF may say not to), and pack: int64 (N, seq_len + 1)."""
    docs = [doc for path in paths for doc in read_documents(path)]
    return pack_sequences([tokenizer.encode(doc, eos=True) for doc in docs], seq_len)


# ----------------------------------------------------------------------------------------------
# evaluation: the perplexity protocol of the paper's tables

EVAL_FILES = {"wikitext2": "wiki.test.raw", "ptb": "ptb.test.txt"}  # name -> test split in data_dir()


def eval_text(name_or_path: str) -> tuple[str, str]:
    """(label, text) of an evaluation split: 'wikitext2' or 'ptb' from data_dir(), else a text file path.
    The text is returned as stored (WikiText-2 raw lines, PTB with <unk>), not re-joined from HF rows."""
    if name_or_path in EVAL_FILES:
        path = data_dir() / EVAL_FILES[name_or_path]
        if not path.is_file():
            raise FileNotFoundError(f"eval set {name_or_path!r}: expected {path} (set LORAPRUNE_DATA to the"
                                    f" folder holding {EVAL_FILES[name_or_path]}), found no such file")
        return name_or_path, read_text(path, "eval set")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"eval set {name_or_path!r}: not one of {sorted(EVAL_FILES)} and no file {path}")
    return path.name, read_text(path, "eval set")


def eval_tokens(name_or_path: str, tokenizer) -> tuple[str, Tensor]:
    """(label, 1-D int64 tokens) of an evaluation split, tokenized once, with BOS at the start where the tokenizer
    adds one. A file of <|endoftext|>-separated stories (TinyStories) is the exception: each story is encoded on
    its own (with its BOS), as in training, so the separator lines are not scored as text."""
    label, text = eval_text(name_or_path)
    if ENDOFTEXT in text:
        docs = [d.strip() for d in text.split(ENDOFTEXT) if d.strip()]
        ids = [t for doc in docs for t in tokenizer.encode(doc)]
    else:
        ids = tokenizer.encode(text)
    return label, torch.tensor(ids, dtype=torch.int64)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: Tensor, seq_len: int = 2048, batch_size: int = 1,
               device: Optional[torch.device | str] = None) -> float:
    """Perplexity by the standard protocol of the paper's tables: the whole split is tokenized once
    (1-D int64 `tokens`, BOS once at the start), cut into floor(len/seq_len) non-overlapping windows of
    seq_len tokens (the remainder is dropped), each window is scored independently (no context carried
    over), the mean next-token NLL over all predicted tokens (seq_len-1 per window) is taken, and exp of
    it is returned. `model(x)` with x (B, T) int64 must return logits (B, T, V)."""
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"expected seq_len >= 2 and batch_size >= 1, found {seq_len} and {batch_size}")
    if tokens.dim() != 1:
        raise ValueError(f"expected 1-D tokens, found shape {tuple(tokens.shape)}")
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"found {tokens.numel()} tokens, need at least seq_len = {seq_len} for one window")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len).long()  # (N, T)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        nll = 0.0  # a Python float is float64
        for start in range(0, n_windows, batch_size):
            x = windows[start : start + batch_size].to(device)  # (B, T)
            logits = model(x)  # (B, T, V)
            if logits.shape[:2] != x.shape:
                raise ValueError(f"expected logits for every position, shape ({x.shape[0]}, {seq_len}, V),"
                                 f" found {tuple(logits.shape)}")
            # position t predicts token t+1, so the first token of each window is never scored
            losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(),
                                     reduction="none")  # (B*(T-1),) float32
            nll += losses.double().sum().item()
    finally:
        model.train(was_training)
    return math.exp(nll / (n_windows * (seq_len - 1)))
