"""The tree-attention kernel against its XLA reference, side by side, at real shapes.

    python benchmarks/tree_attention.py --contexts 1024 4096 16384 32768 --nodes 16 32 64 \
        --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --out benchmarks/results/tree_attention_h100.json

Meant for a GPU (the issue's goal: the kernel at least 2x faster than the reference at 1k-32k
slots and 16-64 nodes); there `kernel` is the Mosaic GPU kernel in bfloat16 (what
attn_impl="pallas" runs) and `triton` the Triton one, timed beside it. For each (context,
nodes): one verify step's attention for batch `--batch-size`, a random tree of `nodes` nodes
below the root (so nodes + 1 query tokens), every row's cache full to `context` slots; each
side jitted, run `--iterations` times inside one program (a lax.fori_loop, so dispatch is not
timed), best of `--repeats`, the sides alternating. Also checks they agree. On a CPU the kernel runs in interpret mode:
only small shapes are practical, and the timings mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from jaxdec.cli import POSITIVE  # noqa: E402


def random_case(rng, batch, nodes, heads, kv_heads, head_dim, context, dtype):
    import jax.numpy as jnp
    import numpy as np
    from jaxdec.tree import ancestor_mask
    T = nodes + 1
    parents = np.stack([[-1] + [int(rng.integers(-1, i)) for i in range(1, nodes)] for _ in range(batch)])
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return (normal(batch, T, heads, head_dim), normal(batch, kv_heads, context, head_dim),
            normal(batch, kv_heads, context, head_dim), jnp.full((batch,), context, jnp.int32),
            normal(batch, T, kv_heads, head_dim), normal(batch, T, kv_heads, head_dim),
            ancestor_mask(jnp.asarray(parents, jnp.int32)))


def seconds_per_call(fn, args, iterations: int) -> float:
    """One call of fn(*args), timed over `iterations` calls chained inside one program."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loop(q, *rest):
        # Each call's query depends on the last output, so no call can be skipped or hoisted.
        body = lambda _, q: fn(q, *rest).astype(q.dtype) * jnp.asarray(1e-3, q.dtype) + q
        return jax.lax.fori_loop(0, iterations, body, q)

    jax.block_until_ready(loop(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(loop(*args))
    return (time.perf_counter() - start) / iterations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=POSITIVE, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--nodes", type=POSITIVE, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch-size", type=POSITIVE, default=1)
    parser.add_argument("--heads", type=POSITIVE, default=32)
    parser.add_argument("--kv-heads", type=POSITIVE, default=8)
    parser.add_argument("--head-dim", type=POSITIVE, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--block-s", type=POSITIVE, default=128,
                        help="cache slots per block of the pallas_call kernel (the Mosaic GPU kernel takes 64)")
    parser.add_argument("--iterations", type=POSITIVE, default=20)
    parser.add_argument("--repeats", type=POSITIVE, default=3)
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    bad = [c for c in args.contexts if c % min(args.block_s, c)]
    if bad:
        parser.error(f"--contexts {bad[0]} is not a multiple of --block-s {args.block_s}")

    import functools

    import jax.numpy as jnp
    import numpy as np
    from benchmarks.common import command_line, machine_info, versions, write_results
    import jax
    from pallas_kernels.tree_attention import _power_of_two, gpu_compiler_params, reference, tree_attention

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    rows = []
    for context in args.contexts:
        for nodes in args.nodes:
            case = random_case(rng, args.batch_size, nodes, args.heads, args.kv_heads, args.head_dim, context, dtype)
            # `kernel` is what attn_impl="pallas" runs (on a GPU in half precision: the Mosaic GPU
            # kernel); on a GPU the Triton kernel is timed beside it.
            sides = {"kernel": functools.partial(tree_attention, block_s=args.block_s), "reference": reference}
            if on_gpu:
                query_rows = _power_of_two(args.heads // args.kv_heads * (nodes + 1))
                sides["triton"] = functools.partial(tree_attention, block_s=args.block_s,
                                                    compiler_params=gpu_compiler_params(query_rows, args.head_dim))
            want = reference(*case).astype(jnp.float32)
            diffs = {name: float(jnp.max(jnp.abs(fn(*case).astype(jnp.float32) - want)))
                     for name, fn in sides.items() if name != "reference"}
            best = dict.fromkeys(sides, float("inf"))
            for _ in range(args.repeats):  # alternating, each keeps its best
                for name, fn in sides.items():
                    best[name] = min(best[name], seconds_per_call(fn, case, args.iterations))
            row = {"context": context, "nodes": nodes, "max_abs_diff": diffs["kernel"]}
            for name in sides:
                row[f"{name}_us"] = best[name] * 1e6
                if name != "reference":
                    row[f"{name}_speedup"] = best["reference"] / best[name]
            if on_gpu:
                row["triton_max_abs_diff"] = diffs["triton"]
            rows.append(row)
            timings = "  ".join(f"{name} {row[f'{name}_us']:9.1f} us" for name in sides)
            print(f"context {context:6d}  nodes {nodes:3d}  {timings}  speedup {row['kernel_speedup']:.2f}x  "
                  f"max|diff| {diffs['kernel']:.2e}", flush=True)
    payload = {"benchmark": "tree attention: Pallas kernel vs XLA reference", "command": command_line(),
               "machine": machine_info(), "versions": versions(), "options": vars(args), "results": rows}
    if args.out:
        write_results(args.out, payload)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
