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
  * the draft model's 1-token step;
  * what each further verified token costs (`verify_token_ms`, the slope over widths 2 and up)
    and the rate of the target's matmuls that gives (`verify_token_gflop_per_s`), beside a
    large square matmul's rate on the same machine (`large_matmul_gflop_per_s`): how far the
    few-row products of a verify are from what the machine's matmuls reach.
Each timing is many steps inside one jitted loop (no host round trip between them), the best
of `--repeats`. From these costs the standard formula (Leviathan et al. 2023) gives the
speedup of k drafts at per-token acceptance rate a:
    tokens per round  E = (1 - a**(k+1)) / (1 - a)
    speedup           E * t(1) / (k * t_draft + t(k+1))
reported for every k and for a in --acceptance (default 0.6 and 0.8). Meant for a GPU; on
CPU use small shapes (e.g. --target-shape llama-50m --draft-shape llama-10m, or the shipped
demo pair's shapes, demo-target and demo-draft).

With `--rounds k1 k2 ...` it also times what the formula adds up, on the programs generate()
runs: whole greedy `spec.DraftModel(draft, k)` rounds (`speculative_decode`, many rounds per
dispatch) and plain decoding's step (`steps.decode`), so `round_ms` stands beside
`formula_round_ms` and `measured_round_speedup` is the formula's E with both costs measured.
The measured rounds hold what the sum leaves out (acceptance, commit, the draft's catch-up
read, the two models' effect on each other's caches). `round_parts_ms` splits them: each k's
draft chain and verify forward looped alone and one after the other (`parts_timer`), so the
chain's cost beside the verify, less its cost alone, is what the target's step costs it, and
the round, less the pair, is what acceptance and commit add; the chain after a plain read of
as many bytes as the target's weights tells whether that cost is the caches the step empties.
`--tree-rounds DxKxN ...` times greedy `spec.DraftTree(draft, D, K, N)` rounds on the same
program and cache beside them (`tree_round_ms`): against a chain of N drafts, which verifies as
many tokens, a tree round's extra cost is its drafting and bookkeeping; `DxKxN` with K = 1 grows
a chain through the tree's code, which splits that cost into the tree machinery and the wider
(K-row) draft steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from benchmarks.bandwidth import SHAPES  # noqa: E402
from jaxdec.cli import POSITIVE, tree_shape as parse_tree_shape  # noqa: E402


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


def token_cost(step_seconds: dict[int, float]) -> float | None:
    """Seconds each further token adds to a step of two or more (the least-squares slope of the
    step's time over its width, widths from 2 on), or None with fewer than two such widths.
    Width 1 is left out: a 1-token step is matrix-vector products, which XLA:CPU runs with
    kernels of their own, so its time is not on the wider steps' line."""
    import numpy as np
    widths = sorted(T for T in step_seconds if T >= 2)
    if len(widths) < 2:
        return None
    return float(np.polyfit(widths, [step_seconds[T] for T in widths], 1)[0])


def matmul_rate(dtype, repeats: int) -> float:
    """GFLOP/s of one large square matmul in `dtype` (1024 on a CPU, 8192 on an accelerator),
    the best of `repeats`: what the machine's matmuls reach when rows are many, the yardstick
    for `verify_token_gflop_per_s`."""
    import jax
    import jax.numpy as jnp
    n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    product = jax.jit(lambda a: a @ a)
    jax.block_until_ready(product(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def step_seconds(cfg, params, batch_size: int, context: int, num_tokens: int, iterations: int, repeats: int) -> float:
    """Seconds per target step over `num_tokens` new tokens against a cache of `context` tokens."""
    import jax
    import jax.numpy as jnp
    from jaxdec import steps
    from jaxdec.cache import init_cache
    from jaxdec.model import causal_mask, forward
    from jaxdec.sampling import argmax

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
            return cache, argmax(logits)  # generate()'s argmax (jnp.argmax is slower on XLA:CPU)
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


def round_method(draft, shape):
    """The spec object a timed round runs with the draft model `draft` (a jaxdec.Model): a
    chain of `shape` drafts (int), or a tree of `shape` = (depth, top_k, max_nodes)."""
    from jaxdec import spec
    return spec.DraftModel(draft, num_tokens=shape) if isinstance(shape, int) else spec.DraftTree(draft, *shape)


def tree_shape(text: str) -> tuple[int, int, int]:
    """argparse type of --tree-rounds: "8x2x8" -> (8, 2, 8), depth x top_k x max_nodes as in
    decode.py's tree:DxKxN and `jaxdec generate --tree` (checked against the draft's vocabulary
    once it is known)."""
    try:
        return parse_tree_shape(text, "--tree-rounds")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def round_timer(target_cfg, target, draft_cfg, draft, batch_size: int, context: int, shape,
                iterations: int, slots: int):
    """A function that times, per call, the seconds per greedy round of
    `round_method(draft, shape)` (a chain of `shape` drafts, or a DraftTree of that shape) on
    generate()'s own decoding program (`jaxdec.speculative.speculative_decode`, `iterations`
    rounds in one dispatch) after a prompt of `context` tokens, with caches of `slots` slots
    (`round_slots`: the same for every method, since attention reads all of them).
    shape = 0 times plain decoding's program (`jaxdec.steps.decode`) instead. Unlike the
    formula's sum of separately timed steps, this includes the bookkeeping (acceptance,
    commit, the draft's catch-up read of two tokens) and what each half costs the other
    (caches the other one evicted)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxdec import speculative, steps
    from jaxdec.cache import init_cache
    from jaxdec.generate import MAX_STOP_TOKENS
    from jaxdec.loading import Model
    from jaxdec.sampling import SamplingParams, row_keys

    B = batch_size
    new_tokens = slots - context
    tokens = np.zeros((B, slots), np.int32)
    tokens[:, :context] = np.random.default_rng(0).integers(3, target_cfg.vocab_size, (B, context))
    greedy, max_new = SamplingParams.create(), jnp.int32(new_tokens)
    no_stops = jnp.full((MAX_STOP_TOKENS,), -1, jnp.int32)  # padding only, as generate() pads stop ids
    inputs = (jnp.asarray(tokens), jnp.full((B,), context, jnp.int32), jnp.ones((B,), bool), greedy, row_keys(0, B),
              no_stops, max_new)
    cache = init_cache(target_cfg, B, slots, params_dtype(target))
    bucket = min(steps.bucket(context, steps.MIN_PROMPT_BUCKET), slots)
    if shape == 0:
        state, cache = steps.prefill(target_cfg, target, cache, *inputs, prompt_bucket=bucket)
        start_point = (cache, state)  # every timed dispatch starts from a copy of it
        run = lambda cache, state: steps.decode(target_cfg, target, cache, state, greedy, no_stops, max_new,
                                                num_steps=iterations)[0]
    else:
        target_model = Model(target_cfg, target)
        drafter, dparams, dstate = round_method(Model(draft_cfg, draft), shape).build(target_model, B, slots)
        state, cache, dstate = speculative.prefill(target_cfg, drafter, target, dparams, cache, dstate, *inputs,
                                                   prompt_bucket=bucket)
        start_point = (cache, dstate, state)
        run = lambda cache, dstate, state: speculative.speculative_decode(
            target_cfg, drafter, target, dparams, cache, dstate, state, greedy, no_stops, max_new,
            num_rounds=iterations)[0]
    start_steps = int(start_point[-1].target_steps)

    def dispatch():
        fresh = jax.tree.map(jnp.copy, start_point)  # the dispatch donates (consumes) its inputs
        jax.block_until_ready(fresh)
        start = time.perf_counter()
        state = run(*fresh)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        if int(state.target_steps) - start_steps != iterations:
            raise RuntimeError("a timed dispatch ended before all its rounds ran")
        return seconds / iterations

    dispatch()  # compile and warm up
    return dispatch


# parts_timer's loops: (name, runs the draft chain, runs the verify, runs the sweep).
PARTS = (("draft_chain", True, False, False), ("verify", False, True, False), ("draft_chain_and_verify", True, True, False),
         ("sweep", False, False, True), ("draft_chain_and_sweep", True, False, True))


def parts_timer(target_cfg, target, draft_cfg, draft, batch_size: int, context: int, num_drafts: int,
                iterations: int, slots: int, chain: bool, verify: bool, sweep=None):
    """A function that times, per call, the seconds per iteration of a loop running the two
    halves of a greedy `spec.DraftModel(draft, num_drafts)` round with generate()'s own
    functions, without acceptance or commit: with `chain`, the draft's chain (its catch-up read
    of two tokens, then `num_drafts` steps: `draft_chain`); with `verify`, the target's verify
    forward over the pending token and the drafts (`verify_forward`). With both, the verify reads
    the chain's drafts and the next chain starts from the verify's argmax, so each half runs
    after the other as in a round; alone, each reads what it produced itself. Set against
    each half timed alone, the pair shows what each costs the other, and against the round,
    what acceptance and commit add. With `sweep` (a buffer, `sweep_buffer`), each iteration
    first reads it whole, with no arithmetic on it: when the buffer holds as many bytes as the
    target's weights, the chain after the sweep costs what the chain beside the verify costs if
    that is the caches the target's step empties, not the computation it does."""
    import jax
    import jax.numpy as jnp
    from jaxdec.cache import init_cache
    from jaxdec.drafters.autoregressive import draft_chain
    from jaxdec.sampling import SamplingParams, argmax, row_keys
    from jaxdec.verify import Draft, verify_forward

    if not (chain or verify or sweep is not None):
        raise ValueError("parts_timer needs chain=True, verify=True or a sweep buffer")
    B, K = batch_size, num_drafts
    greedy, keys = SamplingParams.create(), row_keys(0, B)
    lengths = jnp.full((B,), context, jnp.int32)
    rows_active = jnp.ones((B,), bool)
    no_probs = jnp.zeros((B, K, target_cfg.vocab_size), jnp.float32)  # greedy acceptance never reads q

    filler = jnp.zeros((SWEEP_SLACK,), jnp.float32) if sweep is None else sweep

    def run(target, draft, filler, cache, dcache, pending, drafts):  # weights as arguments, as generate() passes them
        def body(_, carry):
            cache, dcache, pending, drafts = carry
            if sweep is not None:  # the offset follows the loop, so the read cannot be hoisted out of it
                read = jnp.sum(jax.lax.dynamic_slice_in_dim(filler, pending[0] % SWEEP_SLACK,
                                                            filler.shape[0] - SWEEP_SLACK))
                pending = pending + jnp.isnan(read).astype(jnp.int32)
            if chain:  # the catch-up read rewrites the same two slots every iteration
                first = jnp.stack([drafts[:, -1], pending], axis=1)
                positions = context + jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (B, 2))
                chained, dcache = draft_chain(draft_cfg, draft, dcache.replace(lengths=lengths), first, positions, K,
                                              greedy, keys)
                drafts = chained.tokens
            if verify:
                logits, _, _ = verify_forward(target_cfg, target, cache, pending,
                                              Draft(tokens=drafts, probs=no_probs, lengths=jnp.full((B,), K, jnp.int32)),
                                              rows_active)
                pending = argmax(logits[:, -1])  # the argmax greedy acceptance takes
            elif chain:
                pending = drafts[:, -1]
            return cache, dcache, pending, drafts
        return jax.lax.fori_loop(0, iterations, body, (cache, dcache, pending, drafts))
    run = jax.jit(run, donate_argnums=(3, 4))

    carry = (init_cache(target_cfg, B, slots, params_dtype(target)).replace(lengths=jnp.copy(lengths)),
             init_cache(draft_cfg, B, slots, params_dtype(draft)).replace(lengths=jnp.copy(lengths)),
             jnp.full((B,), 3, jnp.int32), jnp.full((B, K), 3, jnp.int32))

    def dispatch():
        nonlocal carry
        start = time.perf_counter()
        carry = run(target, draft, filler, *carry)
        jax.block_until_ready(carry)
        return (time.perf_counter() - start) / iterations

    dispatch()  # compile and warm up
    return dispatch


SWEEP_SLACK = 8  # elements of the sweep buffer past the bytes read, for the moving offset


def sweep_buffer(params):
    """A float32 buffer of as many bytes as `params` (plus SWEEP_SLACK elements): what a sweep
    reads in parts_timer. Made once and shared, since at real shapes it is as large as the
    target."""
    import jax
    import jax.numpy as jnp
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    return jnp.zeros((weight_bytes // 4 + SWEEP_SLACK,), jnp.float32)


def round_slots(target_cfg, context: int, max_drafts: int, iterations: int) -> int:
    """Cache slots with room for `iterations` rounds that each accept all `max_drafts` tokens."""
    from jaxdec import steps
    return steps.cache_bucket(target_cfg, context + iterations * (max_drafts + 1) + 1)


def params_dtype(params):
    import jax
    return jax.tree_util.tree_leaves(params)[0].dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--draft-shape", choices=sorted(SHAPES), default="llama3.2-1b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch-size", type=POSITIVE, default=1)
    parser.add_argument("--context", type=POSITIVE, default=1024, help="tokens already in the cache")
    parser.add_argument("--max-draft", type=POSITIVE, default=7, help="largest k (verify of k + 1 tokens)")
    parser.add_argument("--tree-tokens", type=POSITIVE, nargs="*", default=[],
                        help="also time verify steps of these many tokens (tree nodes + 1), e.g. 17 33 65")
    parser.add_argument("--attn-impl", choices=("xla", "pallas"), default="xla",
                        help="the models' attention: the XLA reference or the Pallas kernels (tree attention for "
                             "verifies, split-K decode attention for 1-token steps over 1024+ slots)")
    parser.add_argument("--rounds", type=POSITIVE, nargs="*", default=[],
                        help="also time whole greedy DraftModel rounds of these draft lengths (each at most "
                             "--max-draft) on the decoding program itself, e.g. 4 8")
    parser.add_argument("--tree-rounds", type=tree_shape, nargs="*", default=[],
                        help="with --rounds, also time whole greedy DraftTree rounds of these shapes, "
                             "DEPTHxTOP_KxMAX_NODES, e.g. 8x1x8 8x2x8")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--iterations", type=POSITIVE, default=20, help="steps per timed loop")
    parser.add_argument("--repeats", type=POSITIVE, default=3)
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)
    if any(k > args.max_draft for k in args.rounds):
        parser.error(f"--rounds must be draft lengths in 1..--max-draft ({args.max_draft}), got {args.rounds}")
    if args.tree_rounds and not args.rounds:
        parser.error("--tree-rounds are timed beside chain rounds and plain decoding: give --rounds too")
    if not all(0 <= a <= 1 for a in args.acceptance):
        parser.error(f"--acceptance rates must be in [0, 1], got {args.acceptance}")

    import jax
    import jax.numpy as jnp
    from benchmarks.common import (RESULTS_DIR, command_line, machine_info, refused_in_one_line, streamed_weight_bytes,
                                   versions, write_results)
    from jaxdec import steps
    from jaxdec.config import ModelConfig
    from jaxdec.loading import Model
    from jaxdec.model import init_params

    dtype = jnp.dtype(args.dtype)
    target_cfg, draft_cfg = (ModelConfig(**SHAPES[shape], attn_impl=args.attn_impl)
                             for shape in (args.target_shape, args.draft_shape))
    widest = max([args.max_draft + 1, *args.tree_tokens])
    if args.context + widest > min(target_cfg.max_position_embeddings, draft_cfg.max_position_embeddings):
        parser.error(f"--context {args.context} plus {widest} tokens exceeds the models' context")
    for shape in args.tree_rounds:  # refused now, not after minutes of timing
        with refused_in_one_line(parser, f"--tree-rounds {'x'.join(map(str, shape))}: "):
            round_method(Model(draft_cfg, None), shape)
    measure = lambda cfg, params, T: step_seconds(cfg, params, args.batch_size, args.context, T,
                                                   args.iterations, args.repeats)

    target = init_params(target_cfg, jax.random.key(0), dtype)
    target_flops = 2 * streamed_weight_bytes(Model(target_cfg, target)) // dtype.itemsize  # per token
    target_seconds = {}
    # A tree verify costs what a chain of as many tokens costs: only the mask differs.
    for T in sorted({*range(1, args.max_draft + 2), *args.tree_tokens}):
        target_seconds[T] = measure(target_cfg, target, T)
        print(f"target {args.target_shape} T={T}: {target_seconds[T] * 1e3:.3f} ms "
              f"({target_seconds[T] / target_seconds[1]:.3f}x a 1-token step)", flush=True)
    del target
    per_token = token_cost(target_seconds)
    # None where the slope is not positive: at a tiny shape, noise can outweigh the tokens.
    token_gflops = target_flops * args.batch_size / per_token / 1e9 if per_token and per_token > 0 else None
    peak_gflops = matmul_rate(dtype, args.repeats)
    if per_token is not None:
        print(f"each further verified token: {per_token * 1e3:.3f} ms"
              + (f", {token_gflops:.0f} GFLOP/s of the weights' matmuls" if token_gflops else "")
              + f" (a large matmul: {peak_gflops:.0f} GFLOP/s)")
    draft = init_params(draft_cfg, jax.random.key(1), dtype)
    draft_seconds = measure(draft_cfg, draft, 1)
    t1 = target_seconds[1]
    print(f"draft {args.draft_shape} T=1: {draft_seconds * 1e3:.3f} ms ({draft_seconds / t1:.3f}x the target step)")
    rounds = {}
    if args.rounds:
        target = init_params(target_cfg, jax.random.key(0), dtype)
        # A tree round accepts at most as many drafts as its tree is deep (or has nodes).
        longest = max([*args.rounds, *(min(depth, nodes) for depth, _, nodes in args.tree_rounds)])
        slots = round_slots(target_cfg, args.context, longest, args.iterations)
        step_slots = steps.cache_bucket(target_cfg, args.context + widest)
        if slots != step_slots:  # attention reads every slot, so the two would not compare
            print(f"note: the rounds run with {slots} cache slots, the steps with {step_slots}; fewer --iterations "
                  f"give the rounds the steps' cache")
        common = (target_cfg, target, draft_cfg, draft, args.batch_size, args.context)
        timers = {(k, "round"): round_timer(*common, k, args.iterations, slots) for k in [0, *sorted(set(args.rounds))]}
        timers.update({(shape, "tree round"): round_timer(*common, shape, args.iterations, slots)
                       for shape in dict.fromkeys(args.tree_rounds)})
        filler = sweep_buffer(target)
        for k in sorted(set(args.rounds)):
            for part, chain, verify, sweep in PARTS:
                timers[k, part] = parts_timer(*common, k, args.iterations, slots, chain=chain, verify=verify,
                                              sweep=filler if sweep else None)
        best = {key: float("inf") for key in timers}
        for _ in range(args.repeats):  # the programs take turns, so a busier moment slows them all
            for key, timer in timers.items():
                best[key] = min(best[key], timer())
        rounds = {k: seconds for (k, part), seconds in best.items() if part == "round"}
        tree_rounds = {"x".join(map(str, shape)): seconds for (shape, part), seconds in best.items()
                       if part == "tree round"}
        parts = {k: {part: best[k, part] for part, *_ in PARTS} for k in rounds if k}
        formula_rounds = {k: k * draft_seconds + target_seconds[k + 1] for k in rounds}
        for k, formula in formula_rounds.items():
            print(f"{f'round of {k} drafts' if k else 'plain decoding step'}: {rounds[k] * 1e3:.3f} ms measured on "
                  f"the decoding program, {formula * 1e3:.3f} ms by the formula ({rounds[k] / formula:.2f}x)", flush=True)
            if k:
                p = {part: ms * 1e3 for part, ms in parts[k].items()}
                print(f"  its halves: draft chain {p['draft_chain']:.3f} ms alone, "
                      f"{p['draft_chain_and_verify'] - p['verify']:.3f} ms beside the verify, "
                      f"{p['draft_chain_and_sweep'] - p['sweep']:.3f} ms after a sweep of the target's weight bytes; "
                      f"verify {p['verify']:.3f} ms; acceptance and commit add "
                      f"{rounds[k] * 1e3 - p['draft_chain_and_verify']:.3f} ms", flush=True)
        for name, seconds in tree_rounds.items():
            print(f"round of DraftTree {name} (depth x top_k x max_nodes): {seconds * 1e3:.3f} ms measured on the "
                  f"decoding program ({seconds / rounds[0]:.2f}x plain decoding's step)", flush=True)
        del target, filler
    del draft

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
        # What one more verified token costs (token_cost), and the rate of the weights' matmuls
        # that cost gives (2 flops per streamed parameter per token in each row; attention's
        # flops are left out), beside a large matmul's rate (matmul_rate) on the same machine.
        "verify_token_ms": None if per_token is None else per_token * 1e3,
        "verify_token_gflop_per_s": token_gflops,
        "large_matmul_gflop_per_s": peak_gflops,
        "draft_step_ms": draft_seconds * 1e3,
        "draft_over_target_step": draft_seconds / t1,
        "formula_speedup": speedups,
    }
    if rounds:
        # Key 0: plain decoding's step on its own program.
        result["round_ms"] = {str(k): r * 1e3 for k, r in rounds.items()}
        result["round_cache_slots"] = slots
        # Each round's halves, looped without acceptance and commit (parts_timer).
        result["round_parts_ms"] = {str(k): {part: t * 1e3 for part, t in p.items()} for k, p in parts.items()}
        result["formula_round_ms"] = {str(k): f * 1e3 for k, f in formula_rounds.items()}
        # The formula's speedup with both of its costs measured on the programs generate() runs.
        # DraftTree rounds (key: depth x top_k x max_nodes), on the same program and cache.
        result["tree_round_ms"] = {name: seconds * 1e3 for name, seconds in tree_rounds.items()}
        result["measured_round_speedup"] = {
            str(a): {str(k): expected_tokens(a, k) * rounds[0] / r for k, r in rounds.items() if k} for a in args.acceptance}
    out = args.out or RESULTS_DIR / f"verify_cost_{args.target_shape}_{jax.default_backend()}.json"
    payload = {"benchmark": "speculative round cost and formula speedup", "command": command_line(),
               "machine": machine_info(), "versions": versions(), "result": result}
    print(f"wrote {write_results(out, payload)}")
    return result


if __name__ == "__main__":
    main()
