"""Prefill of long prompts: one forward against chunks (`jaxdec.model.prefill_hidden`).

    python benchmarks/prefill.py --contexts 1024 4096 --batch-size 1 8 --chunks 0 512 \
        --out benchmarks/results/prefill_cpu.json

For each context, batch size and chunk (0: the whole prompt in one forward), the demo target
(or `--target`) reads `context` random tokens per row into an empty cache of `context`
slots. Recorded: the compiled program's working memory (XLA's `temp_size_in_bytes`, which the
[B, H, P, P] attention scores dominate in one forward) and the best of `--repeats` timed runs,
compilation excluded; the chunk sizes of one case take turns. On a CPU only the ratios mean
anything; a GPU gives absolute times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import refused_in_one_line, results_path  # noqa: E402
from jaxdec.cli import COUNT, POSITIVE  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--contexts", type=POSITIVE, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch-size", type=POSITIVE, nargs="+", default=[1])
    parser.add_argument("--chunks", type=COUNT, nargs="+", default=[0, 512],
                        help="prompt tokens per forward; 0 reads the whole prompt in one")
    parser.add_argument("--repeats", type=POSITIVE, default=3)
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import jaxdec
    from benchmarks.common import results_payload, write_results
    from jaxdec.cache import init_cache
    from jaxdec.model import prefill_hidden

    with refused_in_one_line(parser):  # a missing or wrong checkpoint
        model = jaxdec.load(args.target)
    cfg = model.config
    if max(args.contexts) > cfg.max_position_embeddings:
        parser.error(f"--contexts {max(args.contexts)} exceeds {args.target}'s "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
    run = jax.jit(prefill_hidden, static_argnames=("cfg", "prompt_bucket", "chunk"), donate_argnames=("cache",))
    rows = []
    for context in args.contexts:
        for batch in args.batch_size:
            tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, context)).astype(np.int32)
            chunks = [c or context for c in args.chunks]
            empty = lambda: init_cache(cfg, batch, context, model.dtype)
            compiled = {c: run.lower(cfg, model.params, empty(), tokens, prompt_bucket=context, chunk=c).compile()
                        for c in chunks}
            best = dict.fromkeys(chunks, float("inf"))
            for timed in [False] + [True] * args.repeats:  # the first pass warms up
                for c in chunks:
                    cache = empty()
                    start = time.perf_counter()
                    jax.block_until_ready(compiled[c](model.params, cache, tokens))
                    if timed:
                        best[c] = min(best[c], time.perf_counter() - start)
            for c in chunks:
                row = {"context": context, "batch_size": batch, "chunk": c, "one_forward": c >= context,
                       "seconds": best[c], "tokens_per_second": batch * context / best[c],
                       "temp_bytes": compiled[c].memory_analysis().temp_size_in_bytes}
                rows.append(row)
                print(f"context {context} batch {batch} chunk {c:>6}: {best[c]:.3f} s "
                      f"({row['tokens_per_second']:.0f} tok/s), working memory {row['temp_bytes'] / 2**20:.0f} MiB")
    payload = results_payload("prefill", args, rows)
    if args.out:
        print(f"wrote {write_results(args.out, payload)}")
    return rows


if __name__ == "__main__":
    main()
