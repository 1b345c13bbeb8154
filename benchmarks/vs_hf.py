"""Plain decoding, jaxdec against Hugging Face transformers `generate`, same weights, same run.

    python benchmarks/vs_hf.py --batch-sizes 1,8 --max-new-tokens 128 \
        --out benchmarks/results/vs_hf_cpu.json

A random Llama of about 50M parameters is built with transformers, saved, converted with
`jaxdec.convert` and loaded, so both sides decode identical float32 weights. Greedy, no stop
tokens, every row generates exactly max_new_tokens. The two sides alternate for --repeats
rounds (the machine is shared and noisy) and the median is reported; compilation is excluded
by a warm-up call of each shape.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import RESULTS_DIR, command_line, machine_info, versions

# ~50M parameters: 2 x 32000 x 512 embeddings/head + 8 layers x ~3.1M.
LLAMA_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2)


def build_models(workdir: Path):
    import torch
    import transformers
    import jaxdec
    from jaxdec.convert import convert
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_50M)).eval()
    hf.save_pretrained(workdir / "hf")
    convert(workdir / "hf", workdir / "jaxdec", progress=False)
    return hf, jaxdec.load(workdir / "jaxdec")


def time_hf(hf, prompts, new_tokens):
    import torch
    config = copy.deepcopy(hf.generation_config)
    config.update(eos_token_id=[], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    seconds = time.perf_counter() - start
    return out[:, ids.shape[1]:].tolist(), seconds


def time_jaxdec(model, prompts, new_tokens):
    import jaxdec
    start = time.perf_counter()
    out = jaxdec.generate(model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    seconds = time.perf_counter() - start
    return out.tokens, seconds, out.stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / "vs_hf_cpu.json"))
    args = parser.parse_args(argv)

    import torch
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, model = build_models(Path(tmp))
        params = sum(int(np.prod(p.shape)) for p in hf.parameters())
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = rng.integers(3, LLAMA_50M["vocab_size"], size=(batch, args.prompt_length)).tolist()
            time_hf(hf, prompts, 4)                              # warm-up
            time_jaxdec(model, prompts, args.max_new_tokens)     # warm-up: compiles every step
            hf_times, jd_times, decode_tps = [], [], []
            for _ in range(args.repeats):
                hf_tokens, s = time_hf(hf, prompts, args.max_new_tokens)
                hf_times.append(s)
                jd_tokens, s, stats = time_jaxdec(model, prompts, args.max_new_tokens)
                jd_times.append(s)
                decode_tps.append(stats.tokens_per_second)
            new = batch * args.max_new_tokens
            hf_tps, jd_tps = new / statistics.median(hf_times), new / statistics.median(jd_times)
            same = np.mean([a == b for a, b in zip(hf_tokens, jd_tokens)])
            results.append({
                "batch_size": batch,
                "new_tokens": new,
                "hf_seconds": statistics.median(hf_times),
                "jaxdec_seconds": statistics.median(jd_times),
                "hf_tokens_per_second": hf_tps,
                "jaxdec_tokens_per_second": jd_tps,
                "jaxdec_decode_only_tokens_per_second": statistics.median(decode_tps),
                "speedup_vs_hf": jd_tps / hf_tps,
                "rows_identical_to_hf": float(same),
            })
            print(f"batch {batch}: HF {hf_tps:.1f} tok/s, jaxdec {jd_tps:.1f} tok/s "
                  f"({jd_tps / hf_tps:.2f}x); rows identical to HF: {same:.0%}")
    payload = {
        "benchmark": "plain greedy decoding, jaxdec vs transformers generate (wall time incl. prefill)",
        "command": command_line(),
        "machine": machine_info(),
        "versions": {**versions("torch", "transformers"), "torch_threads": torch.get_num_threads()},
        "model": {**LLAMA_50M, "parameters": params, "dtype": "float32"},
        "prompt_length": args.prompt_length,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    from benchmarks.common import write_results
    print(f"wrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main()
