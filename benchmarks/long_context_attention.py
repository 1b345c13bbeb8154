"""Attention time at long context: dense against sparse (a budget of chosen cache pages).

    python benchmarks/long_context_attention.py --out benchmarks/results/long_context_attention_cpu.json
    python benchmarks/long_context_attention.py --shapes demo llama3-8b \
        --contexts 1024 2048 4096 8192 16384 32768 --out benchmarks/results/long_context_attention_h100.json

One attention call of one layer, as a decode step (`--tokens 1`) and a small chain verify
(`--tokens 5`, causal among the step's tokens), for every shape, context, batch size and
token count: every row's cache full to `context` slots, random keys and values. Timed:
  dense_xla      `pallas_kernels.tree_attention.reference` (the model's XLA path): all slots;
  sparse_xla     `pallas_kernels.sparse_attention.reference` (what SparseSelf's draft runs):
                 the `budget` tokens of the pages `jaxdec.pages.select_page_ids` chose from
                 the cache's page summaries, for each budget below the context;
  select_pages   that choice itself (Quest bounds over every page, top-k), which a sparse
                 draft step pays in each layer besides the attention;
  tree_pallas, decode_splitk_pallas, sparse_pallas
                 the Pallas kernels (`tree_attention`, the split-K `decode_attention`,
                 `sparse_attention`), only on a GPU or TPU: on a CPU they run in interpret
                 mode, which is no timing, and are recorded as skipped (`--interpret-kernels`
                 runs them anyway, to check they agree with the references).
Each side is jitted and run `--iterations` times inside one program (a lax.fori_loop whose
every call depends on the last, so dispatch is not timed), compilation excluded; the sides of
one case take turns, `--repeats` times, and each keeps the median. Kernels record their
largest difference from their reference. Shapes: `demo` is the demo target's attention (6
query heads, 2 kv heads, head_dim 64, float32), `llama3-8b` Llama-3-8B's (32/8/128,
bfloat16); `HxKxD:dtype` gives any other (e.g. 4x2x16:float32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import refused_in_one_line, results_path  # noqa: E402
from jaxdec.cli import POSITIVE  # noqa: E402

SHAPES = {"demo": (6, 2, 64, "float32"), "llama3-8b": (32, 8, 128, "bfloat16")}
KERNELS = ("tree_pallas", "decode_splitk_pallas", "sparse_pallas")
INTERPRET_SKIP = "interpret mode: not a timing"


def parse_shape(text: str):
    """(name, heads, kv_heads, head_dim, dtype) from a SHAPES name or "HxKxD:dtype"."""
    if text in SHAPES:
        return (text, *SHAPES[text])
    dims, _, dtype = text.partition(":")
    try:
        heads, kv_heads, head_dim = (int(x) for x in dims.split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: one of {', '.join(SHAPES)} or HxKxD:dtype, e.g. 4x2x16:float32") from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"shape {text!r}: dtype must be float32 or bfloat16")
    if min(heads, kv_heads, head_dim) < 1 or heads % kv_heads:
        raise ValueError(f"shape {text!r}: query heads must be a positive multiple of kv heads")
    return (text, heads, kv_heads, head_dim, dtype)


def random_case(rng, batch, tokens, heads, kv_heads, head_dim, context, dtype):
    """q, k_cache, v_cache, lengths, k_new, v_new, step_mask: every row's cache full to `context`."""
    import jax.numpy as jnp
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype="float32"), dtype)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)), (batch, tokens, tokens))
    return (normal(batch, tokens, heads, head_dim), normal(batch, kv_heads, context, head_dim),
            normal(batch, kv_heads, context, head_dim), jnp.full((batch,), context, jnp.int32),
            normal(batch, tokens, kv_heads, head_dim), normal(batch, tokens, kv_heads, head_dim), causal)


def timed_loop(fn, iterations: int):
    """A jitted program calling fn(q, *rest) `iterations` times, each call's query depending
    on the last output (so no call can be skipped or hoisted)."""
    import jax
    import jax.numpy as jnp

    def body(_, q, rest):
        out = fn(q, *rest)
        if out.shape == q.shape:
            return (out.astype(q.dtype) * jnp.asarray(1e-3, q.dtype) + q)
        return q + jnp.asarray(1e-6, q.dtype) * jnp.sum(out).astype(q.dtype)

    @jax.jit
    def loop(q, *rest):
        return jax.lax.fori_loop(0, iterations, lambda i, q: body(i, q, rest), q)
    return loop


def kv_megabytes(batch, kv_heads, slots, head_dim, itemsize) -> float:
    """Keys and values one call must read: 2 * B * Hkv * slots * D."""
    return 2 * batch * kv_heads * slots * head_dim * itemsize / 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="demo, llama3-8b or HxKxD:dtype (default: demo on a CPU, both elsewhere)")
    parser.add_argument("--contexts", type=POSITIVE, nargs="+", default=None,
                        help="cache slots, multiples of --page-size (default: 1024 2048 4096 on a CPU, up to 32768 "
                             "elsewhere)")
    parser.add_argument("--batch-sizes", type=POSITIVE, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=POSITIVE, nargs="+", default=[1, 5],
                        help="step tokens: 1 decodes, 5 verifies a chain")
    parser.add_argument("--budgets", type=POSITIVE, nargs="+", default=[128, 256, 512, 1024],
                        help="tokens the sparse side reads (those below the context are timed)")
    parser.add_argument("--page-size", type=POSITIVE, default=16)
    parser.add_argument("--iterations", type=POSITIVE, default=10, help="calls inside one timed program")
    parser.add_argument("--repeats", type=POSITIVE, default=7, help="timed programs per side; the median is kept")
    parser.add_argument("--interpret-kernels", action="store_true",
                        help="on a CPU, run the Pallas kernels in interpret mode anyway (agreement only)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)
    with refused_in_one_line(parser):
        shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    if args.contexts is not None and any(c % args.page_size for c in args.contexts):
        parser.error(f"--contexts must be positive multiples of --page-size {args.page_size}, got {args.contexts}")
    if any(b % args.page_size for b in args.budgets):
        parser.error(f"--budgets must be multiples of --page-size {args.page_size}, got {args.budgets}")

    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from benchmarks.common import results_payload, write_results
    from jaxdec import pages
    from pallas_kernels import decode_attention, sparse_attention, tree_attention

    backend = jax.default_backend()
    accelerator = backend in ("gpu", "tpu")
    if shapes is None:
        shapes = [parse_shape("demo")] + ([parse_shape("llama3-8b")] if accelerator else [])
    contexts = args.contexts or ([1024, 2048, 4096] + ([8192, 16384, 32768] if accelerator else []))
    run_kernels = accelerator or args.interpret_kernels
    page_size = args.page_size

    cases = [(s, c, b, t) for s in shapes for c in contexts for b in args.batch_sizes for t in args.tokens]
    rng = np.random.default_rng(0)
    rows = []
    for (name, heads, kv_heads, head_dim, dtype_name), context, batch, tokens in tqdm(
            cases, desc="attention cases", disable=not args.progress):
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        case = random_case(rng, batch, tokens, heads, kv_heads, head_dim, context, dtype)
        q, k_cache, _, lengths = case[:4]
        kmin, kmax = pages.summarize(k_cache, lengths, page_size)
        budgets = [b for b in args.budgets if b < context]
        itemsize = jnp.dtype(dtype).itemsize
        config = {"shape": name, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype_name,
                  "context": context, "batch_size": batch, "tokens": tokens, "page_size": page_size}

        # side name -> (function of q and the rest, the rest, budget, its reference side or None)
        sides = {"dense_xla": (tree_attention.reference, case[1:], None, None)}
        for budget in budgets:
            select = functools.partial(pages.select_page_ids, page_size=page_size, budget=budget, recent=page_size)
            ids = jax.jit(select)(q, kmin, kmax, lengths)
            sparse_args = (case[1], case[2], ids, *case[3:])
            sides[f"sparse_xla@{budget}"] = (functools.partial(sparse_attention.reference, page_size=page_size),
                                             sparse_args, budget, None)
            sides[f"select_pages@{budget}"] = (select, (kmin, kmax, lengths), budget, None)
            if run_kernels:
                sides[f"sparse_pallas@{budget}"] = (
                    functools.partial(sparse_attention.sparse_attention, page_size=page_size), sparse_args, budget,
                    f"sparse_xla@{budget}")
        if run_kernels:
            sides["tree_pallas"] = (tree_attention.tree_attention, case[1:], None, "dense_xla")
            sides["decode_splitk_pallas"] = (decode_attention.decode_attention, case[1:], None, "dense_xla")

        # Agreement of each kernel with its reference, then every side compiled once.
        errors, diffs, loops, outputs = {}, {}, {}, {}
        compared = {ref for *_, ref in sides.values() if ref is not None}
        for side, (fn, rest, _, ref) in sides.items():
            try:
                if ref is not None or side in compared:
                    outputs[side] = np.asarray(jax.jit(fn)(q, *rest).astype(jnp.float32))
                loops[side] = timed_loop(fn, args.iterations)
                jax.block_until_ready(loops[side](q, *rest))
            except Exception as err:  # a kernel that fails to lower or compile on this device: recorded
                if ref is None:
                    raise
                errors[side] = f"{type(err).__name__}: {str(err)[:400]}"
                loops.pop(side, None)
            if ref is not None and side in outputs:
                diffs[side] = float(np.max(np.abs(outputs[side] - outputs[ref])))

        times = {side: [] for side in loops}
        for _ in range(args.repeats):  # sides take turns; each keeps its median
            for side, loop in loops.items():
                rest = sides[side][1]
                start = time.perf_counter()
                jax.block_until_ready(loop(q, *rest))
                times[side].append((time.perf_counter() - start) / args.iterations)

        dense_us = statistics.median(times["dense_xla"]) * 1e6
        for side, (_, _, budget, ref) in sides.items():
            impl = side.partition("@")[0]
            row = {**config, "impl": impl, "budget": budget}
            if impl == "select_pages":  # reads the page summaries (float32 min and max), not the cache
                row["summary_mb"] = 2 * batch * kv_heads * (context // page_size) * head_dim * 4 / 1e6
            else:
                row["kv_mb"] = kv_megabytes(batch, kv_heads, context if budget is None else budget, head_dim, itemsize)
            if side in times:
                us = statistics.median(times[side]) * 1e6
                row |= {"us": us, "us_runs": [t * 1e6 for t in times[side]], "dense_xla_over_this": dense_us / us}
            else:
                row["error"] = errors[side]
            if side in diffs:
                row["max_abs_diff_vs_reference"] = diffs[side]
            if impl in KERNELS and not accelerator:
                row["interpret"] = True
                row["note"] = "interpret mode: the time means nothing"
            rows.append(row)
        if not run_kernels:
            for impl in KERNELS:
                for budget in (budgets if impl == "sparse_pallas" else [None]):
                    rows.append({**config, "impl": impl, "budget": budget, "skipped": INTERPRET_SKIP})

        sparse = "  ".join(f"{b}: {statistics.median(times[f'sparse_xla@{b}']) * 1e6:.0f} "
                           f"(+{statistics.median(times[f'select_pages@{b}']) * 1e6:.0f} select)" for b in budgets)
        tqdm.write(f"{name} context {context} batch {batch} tokens {tokens}: dense {dense_us:.0f} us  sparse {sparse}"
                   + "".join(f"  {s} {statistics.median(times[s]) * 1e6:.0f}" for s in times
                             if s.partition("@")[0] in KERNELS))

    payload = results_payload("attention at long context: dense vs sparse (chosen pages) vs split-K, one layer",
                              args, rows, skip=("out", "progress"), shapes=[s[0] for s in shapes], contexts=contexts)
    if args.out:
        print(f"wrote {write_results(args.out, payload)}")
    return rows


if __name__ == "__main__":
    main()
