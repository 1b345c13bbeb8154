"""What a speculative round costs at real model shapes, and the speedup those costs allow.

    python benchmarks/verify_cost.py --target-shape llama3-8b --draft-shape llama3.2-1b \
        --dtype bfloat16 --context 1024 --max-draft 7 --tree-tokens 17 33 65 \
        --out benchmarks/results/verify_cost_h100.json

Random weights (cost does not depend on them). Measures, at batch `--batch-size` with a
cache holding `--context` tokens:
  * the target's step over T = 1 .. max_draft + 1 tokens (a verify of k drafts is T = k + 1;
    T = 1 is a plain decoding step), each the forward, the cache write and the LM head;
  * with --tree-tokens, wider verify steps too (a tree of N nodes is T = N + 1 tokens; the
    ancestor mask costs nothing over a causal one);
  * the draft model's 1-token step.
Each timing is many steps inside one jitted loop (no host round trip between them), the best
of `--repeats`. From these costs the standard formula (Leviathan et al. 2023) gives the
speedup of k drafts at per-token acceptance rate a:
    tokens per round  E = (1 - a**(k+1)) / (1 - a)
    speedup           E * t(1) / (k * t_draft + t(k+1))
reported for every k and for a in --acceptance (default 0.6 and 0.8). Meant for a GPU; on
CPU use small shapes (e.g. --target-shape llama-50m --draft-shape llama-10m).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bandwidth import SHAPES  # noqa: E402


def expected_tokens(acceptance: float, num_drafts: int) -> float:
    """Tokens a round emits when each draft token is accepted with probability `acceptance`
    independently: the accepted prefix plus the one token the target always adds."""
    if acceptance == 1.0:
        return num_drafts + 1.0
    return (1 - acceptance ** (num_drafts + 1)) / (1 - acceptance)


def formula_speedup(acceptance: float, num_drafts: int, step_seconds: float, verify_seconds: float,
                    draft_seconds: float) -> float:
    """Plain-decoding time per token over speculative time per token."""
    round_seconds = num_drafts * draft_seconds + verify_seconds
    return expected_tokens(acceptance, num_drafts) * step_seconds / round_seconds


def step_seconds(cfg, params, batch_size: int, context: int, num_tokens: int, iterations: int, repeats: int) -> float:
    """Seconds per target step over `num_tokens` new tokens against a cache of `context` tokens."""
    import jax
    import jax.numpy as jnp
    from jaxdec import steps
    from jaxdec.cache import init_cache
    from jaxdec.model import causal_mask, forward

    B, T = batch_size, num_tokens
    cache = init_cache(cfg, B, steps.cache_bucket(cfg, context + T), params_dtype(params))
    cache = cache.replace(lengths=jnp.full((B,), context, jnp.int32))
    tokens = jnp.ones((B, T), jnp.int32)
    positions = context + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    # The loop carries the cache (donated, updated in place) and feeds each step's argmax back
    # in, so no step can be hoisted or skipped; every step writes the same slots.
    def run(params, cache, tokens):
        def body(_, carry):
            cache, tokens = carry
            logits, _, cache = forward(cfg, params, tokens, positions, cache, causal_mask(B, T))
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, iterations, body, (cache, tokens))
    run = jax.jit(run, donate_argnums=1)

    cache, out = run(params, cache, tokens)  # compile and warm up
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        cache, out = run(params, cache, tokens)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def params_dtype(params):
    import jax
    return jax.tree_util.tree_leaves(params)[0].dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--draft-shape", choices=sorted(SHAPES), default="llama3.2-1b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the cache")
    parser.add_argument("--max-draft", type=int, default=7, help="largest k (verify of k + 1 tokens)")
    parser.add_argument("--tree-tokens", type=int, nargs="*", default=[],
                        help="also time verify steps of these many tokens (tree nodes + 1), e.g. 17 33 65")
    parser.add_argument("--attn-impl", choices=("xla", "pallas"), default="xla",
                        help="the models' attention: the XLA reference or the Pallas kernels (tree attention for "
                             "verifies, split-K decode attention for 1-token steps over 1024+ slots)")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--iterations", type=int, default=20, help="steps per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("batch_size", "context", "max_draft", "iterations", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.tree_tokens):
        parser.error(f"--tree-tokens must be >= 1, got {args.tree_tokens}")
    if not all(0 <= a <= 1 for a in args.acceptance):
        parser.error(f"--acceptance rates must be in [0, 1], got {args.acceptance}")

    import jax
    import jax.numpy as jnp
    from benchmarks.common import RESULTS_DIR, command_line, machine_info, versions, write_results
    from jaxdec.config import ModelConfig
    from jaxdec.model import init_params

    dtype = jnp.dtype(args.dtype)
    target_cfg, draft_cfg = (ModelConfig(**SHAPES[shape], attn_impl=args.attn_impl)
                             for shape in (args.target_shape, args.draft_shape))
    widest = max([args.max_draft + 1, *args.tree_tokens])
    if args.context + widest > min(target_cfg.max_position_embeddings, draft_cfg.max_position_embeddings):
        parser.error(f"--context {args.context} plus {widest} tokens exceeds the models' context")
    measure = lambda cfg, params, T: step_seconds(cfg, params, args.batch_size, args.context, T,
                                                   args.iterations, args.repeats)

    target = init_params(target_cfg, jax.random.key(0), dtype)
    target_seconds = {}
    # A tree verify costs what a chain of as many tokens costs: only the mask differs.
    for T in sorted({*range(1, args.max_draft + 2), *args.tree_tokens}):
        target_seconds[T] = measure(target_cfg, target, T)
        print(f"target {args.target_shape} T={T}: {target_seconds[T] * 1e3:.3f} ms "
              f"({target_seconds[T] / target_seconds[1]:.3f}x a 1-token step)", flush=True)
    del target
    draft = init_params(draft_cfg, jax.random.key(1), dtype)
    draft_seconds = measure(draft_cfg, draft, 1)
    del draft
    t1 = target_seconds[1]
    print(f"draft {args.draft_shape} T=1: {draft_seconds * 1e3:.3f} ms ({draft_seconds / t1:.3f}x the target step)")

    speedups = {}
    for a in args.acceptance:
        per_k = {k: formula_speedup(a, k, t1, target_seconds[k + 1], draft_seconds)
                 for k in range(1, args.max_draft + 1)}
        best_k = max(per_k, key=per_k.get)
        speedups[str(a)] = {"per_num_drafts": {str(k): s for k, s in per_k.items()},
                            "best_num_drafts": best_k, "best_speedup": per_k[best_k]}
        print(f"acceptance {a}: speedup at k={args.max_draft} {per_k[args.max_draft]:.2f}x, "
              f"best k={best_k} {per_k[best_k]:.2f}x")

    result = {
        "target_shape": args.target_shape, "draft_shape": args.draft_shape, "dtype": args.dtype,
        "batch_size": args.batch_size, "context": args.context, "attn_impl": args.attn_impl,
        "target_step_ms": {str(T): s * 1e3 for T, s in target_seconds.items()},
        "verify_over_step": {str(T): s / t1 for T, s in target_seconds.items()},
        "draft_step_ms": draft_seconds * 1e3,
        "draft_over_target_step": draft_seconds / t1,
        "formula_speedup": speedups,
    }
    out = args.out or RESULTS_DIR / f"verify_cost_{args.target_shape}_{jax.default_backend()}.json"
    payload = {"benchmark": "speculative round cost and formula speedup", "command": command_line(),
               "machine": machine_info(), "versions": versions(), "result": result}
    print(f"wrote {write_results(out, payload)}")
    return result


if __name__ == "__main__":
    main()
