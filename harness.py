"""Zero-shot accuracy the way the paper's Tables 2 and 5 report it: our Transformer + data.Tokenizer as an
lm-evaluation-harness model, so `lm_eval.simple_evaluate` scores BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c
and OBQA (and 5-shot MMLU) on any checkpoint, before and after pruning.

An edge module: lm-eval (the optional `eval` extra, `pip install -e '.[eval]'`) is imported at the top, so import
this module only when --tasks is used. Requests are scored exactly as lm-eval's own `hf` model (HFLM) scores them:
the same split of context and continuation into tokens, the same rolling windows, right padding, log-softmax in
float32; tests/test_harness.py checks the log-likelihoods and accuracies against HFLM on a tiny HF checkpoint.
Generative tasks get greedy decoding without a KV cache (correct, slow at 7B; the paper's tasks never generate).

Shapes: B batch, T time, V vocab.
"""
import random
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate, utils
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from data import Tokenizer
from llama import Transformer

# ----------------------------------------------------------------------------------------------
# the model class lm-eval calls


@contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (no dropout), without autograd and run eagerly inside the block, its own mode
    restored after. Eagerly: blocks compiled by run.py --compile (dynamic=False) would recompile for every new
    batch shape, and lm-eval's requests come in hundreds of lengths."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield model
    finally:
        model.train(was_training)


class HarnessLM(LM):
    """Our Transformer behind lm-eval's LM interface. The model is scored as it is: its device, its dtype (run.py
    loads bf16 on a GPU, float32 on a CPU), its LoRA adapters and pruning masks; the log-softmax is float32.
    add_bos_token: None adds BOS where the tokenizer does by default (HFLM's default); True / False force it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8,
                 max_length: Optional[int] = None, add_bos_token: Optional[bool] = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, found {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = min(max_length or model.args.max_seq_len, model.args.max_seq_len)  # tokens per forward
        self.add_bos = tokenizer.add_bos and tokenizer.bos_id >= 0 if add_bos_token is None else add_bos_token
        # the token an empty context (and every rolling text) is conditioned on: BOS, or EOS if there is no BOS
        self.prefix_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
        self._device = next(model.parameters()).device

    # --- text -> tokens, with HFLM's conventions (lm_eval.api.model.TemplateLM)

    def tok_encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        return self.tokenizer.encode(text, bos=self.add_bos if add_bos is None else add_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as TemplateLM._encode_pair and its empty-context case make them: spaces
        that end the context move to the continuation, the whole string is encoded and the continuation is what
        follows the context's own encoding, so a token merged across the boundary is scored as continuation.
        An empty context becomes the prefix token (BOS, else EOS)."""
        if context == "":
            cont = self.tok_encode(continuation, add_bos=False)
            return ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, context_ids = self.tok_encode(context + continuation), self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # --- scoring

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) of each (context ids,
        continuation ids) pair. Longest first in batches of batch_size, right-padded (causal attention: padding
        after a row cannot change its logits); a row longer than max_length + 1 loses tokens on the left."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list = [None] * len(pairs)
        with evaluating(self.model):
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                rows, conts = [], []
                for i in batch:
                    context, cont = pairs[i]
                    if not cont or len(cont) > self.max_length:
                        raise ValueError(f"expected a continuation of 1 to {self.max_length} tokens, found "
                                         f"{len(cont)}")
                    rows.append((context + cont)[-(self.max_length + 1):][:-1])  # the last token is only a target
                    conts.append(cont)
                T = max(len(r) for r in rows)
                x = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)  # (B, T) right-padded
                logits = self.model(x)  # (B, T, V)
                for b, i in enumerate(batch):
                    n, cont = len(rows[b]), torch.tensor(conts[b], device=self.device)  # (c,)
                    logp = F.log_softmax(logits[b, n - len(cont) : n].float(), dim=-1)  # (c, V) positions -> cont
                    greedy = bool((logp.argmax(dim=-1) == cont).all())
                    results[i] = (logp.gather(1, cont[:, None]).sum().item(), greedy)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """lm-eval's (context, continuation) requests -> (log-likelihood, is greedy) each."""
        return self.score([self.encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """lm-eval's (text,) requests -> the text's log-likelihood each, in HFLM's windows: the tokens (BOS first
        where tok_encode adds it) after the prefix token, max_length at a time, each predicted once."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            for window in utils.get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                                          max_seq_len=self.max_length, context_len=1):
                windows.append(utils.make_disjoint_window(window))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self.score(windows)):
            totals[k] += logp
        return totals

    def generate_until(self, requests) -> list[str]:
        """lm-eval's (context, generation kwargs) requests -> greedy continuations as HFLM makes them: at most
        max_gen_toks tokens (default 256) after the context's last max_length - max_gen_toks tokens, stopped at EOS
        or once a stop string ('until') appears, and cut before the first stop string. Greedy only, and without a
        KV cache (each token runs the whole sequence again): fine for short answers, slow for long generations."""
        results = []
        with evaluating(self.model):
            for req in requests:
                context, kwargs = req.args
                if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                    raise ValueError(f"generate_until decodes greedily; the task asks to sample ({kwargs})")
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = kwargs.get("max_gen_toks", 256)
                if max_new >= self.max_length:
                    raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length}")
                ids, new = self.tok_encode(context)[-(self.max_length - max_new):], []
                while len(new) < max_new:
                    logits = self.model(torch.tensor([ids + new], device=self.device))  # (1, T, V)
                    token = int(logits[0, -1].argmax())
                    if token == self.tokenizer.eos_id:
                        break
                    new.append(token)
                    if any(stop in self.tokenizer.decode(new) for stop in until):
                        break
                text = self.tokenizer.decode(new)
                for stop in until:
                    text = text.split(stop)[0]
                results.append(text)
        return results

    # lm-eval reads these when it logs the run configuration
    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)


# ----------------------------------------------------------------------------------------------
# the API run.py calls

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")  # Table 5


def check_tasks(tasks: list[str], task_manager: Optional[TaskManager] = None) -> None:
    """Raise ValueError (one line) naming any task lm-eval does not know. Building a TaskManager indexes every
    task config lm-eval ships (seconds): pass one to reuse it."""
    known = set((task_manager or TaskManager()).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {unknown or tasks}; expected names such as "
                         f"{','.join(PAPER_TASKS)} (`lm-eval ls tasks` lists them all)")


def evaluate_tasks(model: Transformer, tokenizer: Tokenizer, tasks: list[str], batch_size: int = 8,
                   num_fewshot: int = 0, limit: Optional[int] = None, task_manager: Optional[TaskManager] = None,
                   max_length: Optional[int] = None) -> dict:
    """Scores of the model on lm-eval tasks, zero-shot unless num_fewshot (the paper: 0, MMLU 5): {task or group:
    {metric: value}} with every metric lm-eval reports but the standard errors; a multiple-choice task gives
    {"acc": a, "acc_norm": b} (acc_norm: the choice with the highest log-likelihood per character), fractions in
    [0, 1]; a metric of a filter other than "none" keeps its name ("exact_match,strict-match").
    limit: the first N documents of each task only.
    lm-eval seeds Python's, numpy's and torch's global generators; their states are restored afterwards, so a run
    with --tasks trains on the same random draws as one without."""
    lm = HarnessLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=task_manager, log_samples=False)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {task: {key.removesuffix(",none"): value for key, value in metrics.items()
                   if "," in key and "_stderr," not in key and isinstance(value, (int, float))}
            for task, metrics in out["results"].items()}
