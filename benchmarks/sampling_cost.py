"""What the sampling filters cost: jaxdec's top-k / top-p cut against a sort of the vocabulary.

    python benchmarks/sampling_cost.py --vocab 4096 32000 128256 --rows 1 9 \
        --out benchmarks/results/sampling_cost_cpu.json

`jaxdec.sampling.process_logits` finds the top-k and top-p cut-offs by their value, bit by bit
(32 passes over the vocabulary per active filter). The usual way sorts the vocabulary and reads
the cut-offs off the ranking (`sorted_cut` below, what jaxdec did before). Both run here side by
side, for each vocabulary size, number of rows (1: a decoding step; K + 1: a verify) and filter
setting, each many times inside one jitted loop, the best of `--repeats`; the file holds each
one's microseconds per call and the sort's time over the cut's. Random logits: neither cost
depends on the values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from jaxdec.cli import POSITIVE, RATE  # noqa: E402

FILTERS = {"top_p": dict(top_p=0.95), "top_k": dict(top_k=50), "top_k_top_p": dict(top_k=50, top_p=0.95)}


def sorted_cut(x, top_k: int, top_p: float):
    """The top-k then top-p cut of float32 logits x [..., V] by sorting the vocabulary (ties at a
    cut-off kept, top_p = 1 off): the same rule as jaxdec.sampling, the usual way."""
    import jax
    import jax.numpy as jnp
    vocab = x.shape[-1]
    ranked = jnp.sort(x, axis=-1)[..., ::-1]
    k = min(top_k, vocab) if top_k > 0 else vocab
    ranked = jnp.where(ranked >= ranked[..., k - 1:k], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    in_head = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1)
    kept = jnp.sum(in_head & (ranked > -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= jnp.take_along_axis(ranked, jnp.maximum(kept, 1) - 1, axis=-1), x, -jnp.inf)


def microseconds(fn, x, iterations: int, repeats: int) -> float:
    """Per call of fn(x), in a jitted loop whose every iteration depends on the last one's output."""
    import jax
    import jax.numpy as jnp

    def run(x):
        def body(_, x):
            kept = jnp.sum(jnp.isfinite(fn(x)), axis=-1, keepdims=True)
            return x + kept.astype(x.dtype) * 1e-30
        return jax.lax.fori_loop(0, iterations, body, x)
    run = jax.jit(run)
    jax.block_until_ready(run(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        best = min(best, (time.perf_counter() - start) / iterations)
    return best * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=POSITIVE, nargs="+", default=[4096, 32000, 128256])
    parser.add_argument("--rows", type=POSITIVE, nargs="+", default=[1, 9], help="1: a decoding step; K + 1: a verify")
    parser.add_argument("--filters", nargs="+", choices=sorted(FILTERS), default=sorted(FILTERS))
    parser.add_argument("--temperature", type=RATE, default=0.8, help="> 0: greedy applies no filter")
    parser.add_argument("--iterations", type=POSITIVE, default=20, help="calls per timed loop")
    parser.add_argument("--repeats", type=POSITIVE, default=3)
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from benchmarks.common import RESULTS_DIR, command_line, machine_info, versions, write_results
    from jaxdec.sampling import SamplingParams, _top_k_top_p

    results = []
    for vocab in args.vocab:
        for rows in args.rows:
            x = 3 * jax.random.normal(jax.random.key(vocab + rows), (rows, vocab), jnp.float32)
            for name in args.filters:
                f = {"top_k": 0, "top_p": 1.0} | FILTERS[name]
                params = SamplingParams.create(args.temperature, **f)
                scale = lambda x: x / args.temperature
                # The cut alone on both sides: process_logits' min-p softmax is not part of it.
                cut = microseconds(lambda x: _top_k_top_p(scale(x), params), x, args.iterations, args.repeats)
                sort = microseconds(lambda x: sorted_cut(scale(x), f["top_k"], f["top_p"]), x, args.iterations,
                                    args.repeats)
                results.append({"vocab": vocab, "rows": rows, "filter": name, **f, "cut_us": cut, "sort_us": sort,
                                "sort_over_cut": sort / cut})
                print(f"vocab {vocab:6d}, {rows} rows, {name:11s}: cut {cut:9.1f} us, sort {sort:9.1f} us "
                      f"({sort / cut:.1f}x)", flush=True)
    out = args.out or RESULTS_DIR / f"sampling_cost_{jax.default_backend()}.json"
    payload = {"benchmark": "sampling filters: bit-by-bit cut against a vocabulary sort", "command": command_line(),
               "machine": machine_info(), "versions": versions(), "temperature": args.temperature, "results": results}
    print(f"wrote {write_results(out, payload)}")
    return results


if __name__ == "__main__":
    main()
