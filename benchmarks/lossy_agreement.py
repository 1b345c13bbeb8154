"""How far spec.LossySparseDecode (plain decoding over a sparse KV cache; lossy) drifts from
plain decoding, and what it buys: greedy, the same prompts decoded densely and sparsely side
by side, per context length, budget and choice of selection layers.

    python benchmarks/lossy_agreement.py --context 1024,2048,3968 --budgets 256,512,1024 \
        --selection-layers default,0 --num-prompts 8 --max-new-tokens 64 \
        --out benchmarks/results/lossy_agreement_cpu.json

Per configuration: `identical_rows` (share of rows whose whole output equals plain
decoding's), `first_divergence` (mean new tokens before a row's first differing token: the
length of output one can trust), `token_agreement` (share of positions holding plain
decoding's token; after a divergence the texts differ, so this mostly follows the former),
and tokens/s with `speedup_vs_dense`, timed after a compile run. Prompts: the `code`
category of benchmarks/data/prompts.json at each context length (as benchmarks/decode.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (command_line, machine_info, refused_in_one_line, results_path,  # noqa: E402
                               versions, write_results)
from benchmarks.decode import category_prompts, load_prompts, parse_list  # noqa: E402
from jaxdec.cli import POSITIVE  # noqa: E402


def agreement(dense: list[list[int]], sparse: list[list[int]]) -> dict:
    """Agreement of each sparse row with its dense row (same length: no stop tokens)."""
    first = [next((i for i, (a, b) in enumerate(zip(d, s)) if a != b), len(d)) for d, s in zip(dense, sparse)]
    same = [np.mean(np.array(d) == np.array(s)) for d, s in zip(dense, sparse)]
    return {"identical_rows": float(np.mean([f == len(d) for f, d in zip(first, dense)])),
            "first_divergence": float(np.mean(first)), "token_agreement": float(np.mean(same))}


def timed(model, prompts, max_new_tokens, method):
    """(tokens, (new tokens, decode seconds)): one run to compile, one timed."""
    import jaxdec
    jaxdec.generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[], speculative=method)
    out = jaxdec.generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[], speculative=method)
    return out.tokens, (out.stats.new_tokens, out.stats.decode_seconds)


def parse_layers(text: str) -> list[tuple[int, ...] | None]:
    """'default,0,1+3' -> [None, (0,), (1, 3)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "default":
            out.append(None)
            continue
        try:
            out.append(tuple(int(i) for i in item.split("+")))
        except ValueError:
            raise ValueError(f"--selection-layers: {item!r} is neither 'default' nor layer indices like 1+3") from None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--context", default="1024,2048,3968")
    parser.add_argument("--budgets", default="256,512,1024")
    parser.add_argument("--selection-layers", default="default,0",
                        help="comma-separated: 'default' or layer indices joined by '+'")
    parser.add_argument("--page-size", type=POSITIVE, default=16)
    parser.add_argument("--num-prompts", type=POSITIVE, default=8)
    parser.add_argument("--batch-size", type=POSITIVE, default=8)
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    parser.add_argument("--out", type=results_path, default="benchmarks/results/lossy_agreement.json")
    args = parser.parse_args(argv)

    import jaxdec
    from tqdm import tqdm

    with refused_in_one_line(parser):  # bad lists, settings or checkpoints
        contexts, budgets = parse_list(args.context, "--context", low=0), parse_list(args.budgets, "--budgets")
        methods = {(b, layers): jaxdec.spec.LossySparseDecode(budget=b, page_size=args.page_size,
                                                              selection_layers=layers)
                   for b in budgets for layers in parse_layers(args.selection_layers)}
        target = jaxdec.load(args.target)
    texts = load_prompts(["code"])["code"]
    room = target.config.max_position_embeddings - args.max_new_tokens
    results = []
    rate = lambda timings: sum(n for n, _ in timings) / sum(s for _, s in timings)  # pooled over the batches
    progress = tqdm(total=len(contexts) * (1 + len(methods)), desc="lossy agreement")
    for context in contexts:
        with refused_in_one_line(parser):
            prompts = category_prompts(target.tokenizer, texts, args.num_prompts, context, room)
        dense, dense_runs = [], []
        for start in range(0, len(prompts), args.batch_size):
            tokens, run = timed(target, prompts[start:start + args.batch_size], args.max_new_tokens, None)
            dense += tokens
            dense_runs.append(run)
        progress.update()
        for (budget, layers), method in methods.items():
            sparse, runs = [], []
            for start in range(0, len(prompts), args.batch_size):
                tokens, run = timed(target, prompts[start:start + args.batch_size], args.max_new_tokens, method)
                sparse += tokens
                runs.append(run)
            results.append({"context": context, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                            "budget": budget, "selection_layers": "default" if layers is None else list(layers),
                            **agreement(dense, sparse), "tokens_per_second": rate(runs),
                            "dense_tokens_per_second": rate(dense_runs),
                            "speedup_vs_dense": rate(runs) / rate(dense_runs)})
            progress.update()
    progress.close()
    path = write_results(args.out, {"machine": machine_info(), "versions": versions(), "command": command_line(),
                                    "target": args.target, "batch_size": args.batch_size,
                                    "max_new_tokens": args.max_new_tokens, "page_size": args.page_size,
                                    "results": results})
    for r in results:
        print(f"context {r['context']:5d} budget {r['budget']:5d} layers {str(r['selection_layers']):8s} "
              f"identical {r['identical_rows']:.2f}  first divergence {r['first_divergence']:5.1f}  "
              f"agreement {r['token_agreement']:.2f}  speedup {r['speedup_vs_dense']:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
