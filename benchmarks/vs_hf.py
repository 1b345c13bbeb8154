"""jaxdec against Hugging Face transformers `generate` on identical weights, in one run.

    python benchmarks/vs_hf.py --target demo-target --draft demo-draft --num-prompts 8 \
        --max-new-tokens 128 --batch-sizes 1,8 --out benchmarks/results/vs_hf_cpu.json

The jaxdec checkpoints are exported to Hugging Face folders (`python -m jaxdec.export`), so
both sides decode the same float32 weights. Greedy, no stop tokens (every row generates
exactly max_new_tokens), prompts from benchmarks/data/prompts.json (`--category`, the last
`--context` tokens of each). Three pairs of methods, each side timed by wall clock around
its generate call (prefill included), alternating, the median of --repeats kept:
  plain      HF generate               / jaxdec.generate                  (every batch size)
  assisted   HF assistant_model=draft,  / spec.DraftModel(draft, K)       (batch 1: HF's limit)
             K constant assistant tokens, no confidence cut-off
  lookup     HF prompt_lookup_num_tokens=L, max_matching_ngram_size=N
                                       / spec.PromptLookup(N, L)          (batch 1)
Each method's speedup is over its own side's plain decoding at batch 1. Compilation is
excluded by a warm-up call of every shape on both sides.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS_DIR, command_line, machine_info, refused_in_one_line, results_path,  # noqa: E402
                               versions, write_results)
from jaxdec.cli import POSITIVE  # noqa: E402


def hf_twin(source: str, folder: Path):
    """The transformers model of the jaxdec checkpoint `source`, exported to `folder`, so both
    sides decode the same float32 weights."""
    import torch
    import transformers
    from jaxdec.export import export
    return transformers.AutoModelForCausalLM.from_pretrained(export(source, folder, progress=False),
                                                             dtype=torch.float32).eval()


def hf_generate(hf, prompts, new_tokens, **options):
    """(new tokens per row, seconds) of HF greedy generate; prompts of equal length."""
    import torch
    config = copy.deepcopy(hf.generation_config)
    config.update(eos_token_id=[], max_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **options)
    return out[:, ids.shape[1]:].tolist(), time.perf_counter() - start


def jaxdec_generate(model, prompts, new_tokens, speculative=None):
    import jaxdec
    start = time.perf_counter()
    out = jaxdec.generate(model, prompts, max_new_tokens=new_tokens, stop_token_ids=[], speculative=speculative)
    return out.tokens, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--draft", default="demo-draft")
    parser.add_argument("--num-prompts", type=POSITIVE, default=8)
    parser.add_argument("--category", default="code", help="a prompt category of benchmarks/data/prompts.json")
    parser.add_argument("--context", type=POSITIVE, default=128, help="prompt tokens kept from each prompt's context")
    parser.add_argument("--batch-sizes", default="1,8", help="for plain decoding")
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    parser.add_argument("--num-tokens", type=POSITIVE, default=4, help="draft tokens per round (K)")
    parser.add_argument("--lookup-tokens", type=POSITIVE, default=8, help="prompt-lookup tokens per round (L)")
    parser.add_argument("--lookup-ngram", type=POSITIVE, default=2, help="longest n-gram matched (N)")
    parser.add_argument("--repeats", type=POSITIVE, default=3)
    parser.add_argument("--out", type=results_path, default=str(RESULTS_DIR / "vs_hf_cpu.json"))
    args = parser.parse_args(argv)

    import jaxdec
    from tqdm import tqdm
    from benchmarks.decode import load_prompts, parse_list, prompt_ids

    with refused_in_one_line(parser):  # bad batch sizes or category, a missing or wrong checkpoint
        batch_sizes = parse_list(args.batch_sizes, "--batch-sizes")
        texts = load_prompts([args.category])[args.category][:args.num_prompts]
        target, draft = jaxdec.load(args.target), jaxdec.load(args.draft)
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:  # the other side of the comparison
        parser.error(f"the Hugging Face side needs {' and '.join(missing)}, not installed here: "
                     f"pip install -e '.[bench]'")
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        hf_target, hf_draft = hf_twin(args.target, Path(tmp) / "target"), hf_twin(args.draft, Path(tmp) / "draft")
        # Equal lengths (the shortest), so HF batches need no padding.
        ids = [prompt_ids(target.tokenizer, p, args.context) for p in texts]
        shortest = min(map(len, ids))
        prompts = [row[-shortest:] for row in ids]

        hf_draft.generation_config.update(num_assistant_tokens=args.num_tokens, num_assistant_tokens_schedule="constant",
                                          assistant_confidence_threshold=0.0)
        methods = {  # name -> (HF options, jaxdec method, batch sizes)
            "plain": ({}, None, batch_sizes),
            "assisted": ({"assistant_model": hf_draft}, jaxdec.spec.DraftModel(draft, args.num_tokens), [1]),
            "lookup": ({"prompt_lookup_num_tokens": args.lookup_tokens,
                        "max_matching_ngram_size": args.lookup_ngram},
                       jaxdec.spec.PromptLookup(max_ngram=args.lookup_ngram, num_tokens=args.lookup_tokens), [1]),
        }
        results = []
        for name, (options, method, batch_sizes) in methods.items():
            for batch in batch_sizes:
                groups = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
                hf_seconds = jd_seconds = 0.0
                identical = rows = 0
                for group in tqdm(groups, desc=f"{name}, batch {batch}"):
                    hf_generate(hf_target, group, 4, **options)                       # warm-up
                    jaxdec_generate(target, group, args.max_new_tokens, method)          # warm-up: compiles
                    hf_times, jd_times = [], []
                    for _ in range(args.repeats):
                        hf_tokens, s = hf_generate(hf_target, group, args.max_new_tokens, **options)
                        hf_times.append(s)
                        jd_tokens, s = jaxdec_generate(target, group, args.max_new_tokens, method)
                        jd_times.append(s)
                    hf_seconds += statistics.median(hf_times)
                    jd_seconds += statistics.median(jd_times)
                    identical += sum(a == b for a, b in zip(hf_tokens, jd_tokens))
                    rows += len(group)
                new = rows * args.max_new_tokens
                results.append({"method": name, "batch_size": batch, "new_tokens": new,
                                "hf_seconds": hf_seconds, "jaxdec_seconds": jd_seconds,
                                "hf_tokens_per_second": new / hf_seconds, "jaxdec_tokens_per_second": new / jd_seconds,
                                "jaxdec_over_hf": hf_seconds / jd_seconds, "rows_identical_to_hf": identical / rows})
        plain = {r["batch_size"]: r for r in results if r["method"] == "plain"}
        for r in results:
            base = plain.get(1)
            if base is not None and r["batch_size"] == 1:
                r["hf_speedup_vs_plain"] = r["hf_tokens_per_second"] / base["hf_tokens_per_second"]
                r["jaxdec_speedup_vs_plain"] = r["jaxdec_tokens_per_second"] / base["jaxdec_tokens_per_second"]
            print(f"{r['method']:9s} batch {r['batch_size']}: HF {r['hf_tokens_per_second']:7.1f} tok/s, jaxdec "
                  f"{r['jaxdec_tokens_per_second']:7.1f} tok/s ({r['jaxdec_over_hf']:.2f}x HF)"
                  + (f"; speedup over plain: HF {r['hf_speedup_vs_plain']:.2f}x, jaxdec {r['jaxdec_speedup_vs_plain']:.2f}x"
                     if "hf_speedup_vs_plain" in r and r["method"] != "plain" else "")
                  + f"; rows identical {r['rows_identical_to_hf']:.0%}")
    payload = {
        "benchmark": "jaxdec vs transformers generate on identical weights (greedy, wall time incl. prefill)",
        "command": command_line(),
        "machine": machine_info(),
        "versions": {**versions("torch", "transformers"), "torch_threads": torch.get_num_threads()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"prompt_tokens": shortest},
        "results": results,
    }
    print(f"wrote {write_results(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
