"""The fixed-shape step machinery: one forward for every step, masks, rollback, donation,
no recompilation in steady state, and generate()'s stopping rules and stats.

Shapes are shared on purpose (batch 3, prompt bucket 32, 64 cache slots for the forward
tests; generate's buckets 4 x 16 x 64 elsewhere) so the jit caches are reused across tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import steps
from jaxdec.cache import init_cache, write_slots
from jaxdec.model import causal_mask, forward, prefill_hidden
from jaxdec.sampling import SamplingParams, row_keys
from pallas_kernels.tree_attention import BLOCK_S
from tests.hf_models import SLIDING_WINDOW, VOCAB_SIZE

TOL = 1e-4            # float32, same math along different step shapes
SLOTS = 64            # cache slots of the forward tests
PREFILL_T = 32        # prompt bucket of the forward tests
PREFIX = [20, 27, 9]  # ragged cached prefixes; 27 > the sliding window (16)
K = 4                 # chain length (and the longest root-to-node path of TREE)
# One token tree per row, in topological order (parent -1 hangs off the cached prefix): several
# roots, siblings, paths of depth 3, and a different shape per row, so the step mask really is
# per row.
TREE_PARENTS = [
    [-1, 0, 0, 1, -1, 4, 3],
    [-1, 0, 1, 2, 0, -1, 5],
    [-1, -1, 1, 0, 2, 3, 1],
]

_forward = jax.jit(forward, static_argnames=("cfg", "skip_layers"))


def _run(model, cache, tokens, positions, mask):
    """One general forward step (no donation, so the input cache stays usable)."""
    logits, _, cache = _forward(model.config, model.params, jnp.asarray(tokens, jnp.int32),
                                jnp.asarray(positions, jnp.int32), cache, jnp.asarray(mask, bool))
    return np.asarray(logits), cache


def _prefilled(model, rows):
    """Logits [B, PREFILL_T, V] of rows (left-aligned, ragged) from an empty cache, and the
    cache with lengths = len(row)."""
    B = len(rows)
    tokens = np.zeros((B, PREFILL_T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    positions = np.broadcast_to(np.arange(PREFILL_T), (B, PREFILL_T))
    logits, cache = _run(model, init_cache(model.config, B, SLOTS, model.dtype), tokens, positions,
                         causal_mask(B, PREFILL_T))
    return logits, cache.replace(lengths=jnp.asarray([len(r) for r in rows], jnp.int32))


def _random_rows(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in lengths]


@pytest.fixture(params=["llama", "mistral"])
def model(request, models):
    """Full attention (llama, with llama3 RoPE) and sliding-window attention (mistral)."""
    model = models[request.param]
    if request.param == "mistral":
        assert set(model.config.layer_windows) == {SLIDING_WINDOW}
    return model


# --- the general forward and its masks ---------------------------------------------------


def test_prefill_in_one_step_equals_token_by_token(model):
    rows = _random_rows([p + K for p in PREFIX], seed=10)
    ref, _ = _prefilled(model, rows)
    B, total = len(rows), np.array([len(r) for r in rows])
    cache = init_cache(model.config, B, SLOTS, model.dtype)
    one = np.ones((B, 1, 1), bool)
    for t in range(total.max()):
        # Rows whose sequence is over feed a dummy token and stop growing, as finished rows do.
        tokens = [[row[t] if t < len(row) else 0] for row in rows]
        logits, cache = _run(model, cache, tokens, np.minimum(t, total - 1)[:, None], one)
        live = t < total
        np.testing.assert_allclose(logits[live, 0], ref[live, t], atol=TOL, rtol=0)
        cache = cache.replace(lengths=cache.lengths + jnp.asarray(live, jnp.int32))
    np.testing.assert_array_equal(np.asarray(cache.lengths), total)


_prefill_hidden = jax.jit(prefill_hidden, static_argnames=("cfg", "prompt_bucket", "chunk"))


@pytest.mark.parametrize("chunk", [8, 12])  # dividing the prompt bucket, and not (padded)
def test_chunked_prefill_equals_one_forward(model, chunk):
    """A long prompt read in chunks (each attending to the cache the earlier ones wrote) gives
    one forward's hidden states and cache entries; chunks cross the sliding window (mistral)."""
    rows = _random_rows([32, 5, 27], seed=11)
    tokens = np.zeros((len(rows), SLOTS), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    empty = lambda: init_cache(model.config, len(rows), SLOTS, model.dtype)
    whole, whole_cache = _prefill_hidden(model.config, model.params, empty(), tokens, prompt_bucket=PREFILL_T,
                                         chunk=PREFILL_T)
    chunked, chunked_cache = _prefill_hidden(model.config, model.params, empty(), tokens, prompt_bucket=PREFILL_T,
                                             chunk=chunk)
    assert chunked.shape == whole.shape == (len(rows), PREFILL_T, model.config.hidden_size)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=TOL, rtol=0)
    for a, b in zip(chunked_cache.k + chunked_cache.v, whole_cache.k + whole_cache.v):
        np.testing.assert_allclose(np.asarray(a)[:, :, :PREFILL_T], np.asarray(b)[:, :, :PREFILL_T], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(chunked_cache.lengths), 0)


def test_chunked_prefill_bounds_the_attention_scores(llama):
    """What chunking is for: its working memory grows with chunk x slots, not prompt^2."""
    cfg, P = llama.config, llama.config.max_position_embeddings
    temp = lambda chunk: _prefill_hidden.lower(
        cfg, llama.params, init_cache(cfg, 2, P, llama.dtype), np.zeros((2, P), np.int32), prompt_bucket=P,
        chunk=chunk).compile().memory_analysis().temp_size_in_bytes
    whole, chunked = temp(P), temp(P // 8)
    scores = 2 * cfg.num_attention_heads * P * P * 4  # one layer's [B, H, P, P] float32 scores
    assert whole >= scores > 2 * chunked, (whole, chunked, scores)


def test_chain_in_one_causal_step_equals_single_steps(model):
    rows = _random_rows([p + K for p in PREFIX], seed=11)
    ref, _ = _prefilled(model, rows)
    _, cache = _prefilled(model, [r[:p] for r, p in zip(rows, PREFIX)])
    prefix = np.array(PREFIX)
    chain = np.array([r[p:p + K] for r, p in zip(rows, PREFIX)])
    positions = prefix[:, None] + np.arange(K)[None, :]

    verified, after_chain = _run(model, cache, chain, positions, causal_mask(len(rows), K))

    single = cache
    for i in range(K):
        logits, single = _run(model, single, chain[:, i:i + 1], positions[:, i:i + 1],
                              np.ones((len(rows), 1, 1), bool))
        single = single.replace(lengths=single.lengths + 1)
        np.testing.assert_allclose(verified[:, i], logits[:, 0], atol=TOL, rtol=0)
        for b, p in enumerate(PREFIX):
            np.testing.assert_allclose(verified[b, i], ref[b, p + i], atol=TOL, rtol=0)
    # Both wrote the same entries at slots prefix .. prefix + K - 1.
    for layer in range(model.config.num_hidden_layers):
        for b, p in enumerate(PREFIX):
            np.testing.assert_allclose(np.asarray(after_chain.k[layer][b, :, p:p + K]),
                                       np.asarray(single.k[layer][b, :, p:p + K]), atol=TOL, rtol=0)


def _ancestor_mask(parents):
    """bool [N, N]: node t sees node u iff u is t or one of its ancestors."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for t, parent in enumerate(parents):
        if parent >= 0:
            assert parent < t, "topological order"
            mask[t] |= mask[parent]
    return mask


def _path(parents, node):
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def test_tree_step_equals_each_root_to_node_chain(model):
    B, N = len(TREE_PARENTS), len(TREE_PARENTS[0])
    rng = np.random.default_rng(12)
    _, cache = _prefilled(model, _random_rows(PREFIX, seed=13))
    tree_tokens = rng.integers(3, VOCAB_SIZE, size=(B, N))
    depth = np.array([[len(_path(p, n)) - 1 for n in range(N)] for p in TREE_PARENTS])
    assert depth.max() == K - 1
    mask = np.stack([_ancestor_mask(p) for p in TREE_PARENTS])
    positions = np.array(PREFIX)[:, None] + depth

    tree_logits, _ = _run(model, cache, tree_tokens, positions, mask)

    for node in range(N):
        # Each row's root-to-node path as a chain, padded to K (the causal mask keeps the
        # padding after the path out of it), so every chain shares one compiled program.
        chain = np.zeros((B, K), np.int32)
        for b in range(B):
            path = _path(TREE_PARENTS[b], node)
            chain[b, :len(path)] = tree_tokens[b, path]
        chain_positions = np.array(PREFIX)[:, None] + np.arange(K)[None, :]
        chain_logits, _ = _run(model, cache, chain, chain_positions, causal_mask(B, K))
        at_node = chain_logits[np.arange(B), depth[:, node]]
        np.testing.assert_allclose(tree_logits[:, node], at_node, atol=TOL, rtol=0)
    # Not vacuous: nodes at the same depth with different ancestors see different contexts.
    assert np.abs(tree_logits[0, 1] - tree_logits[0, 5]).max() > 1e-2


def test_rollback_is_only_a_change_of_lengths(model):
    """Reject some draft tokens by lowering lengths: the next step sees exactly the cache that
    never held them, although their stale entries are still in the slots."""
    accepted = np.array([0, 1, 3])  # per row, out of K drafted
    rows = _random_rows([p + K for p in PREFIX], seed=14)
    _, cache = _prefilled(model, [r[:p] for r, p in zip(rows, PREFIX)])
    prefix = np.array(PREFIX)
    draft = np.array([r[p:p + K] for r, p in zip(rows, PREFIX)])
    _, cache = _run(model, cache, draft, prefix[:, None] + np.arange(K)[None, :],
                    causal_mask(len(rows), K))
    rolled_back = cache.replace(lengths=jnp.asarray(prefix + accepted, jnp.int32))

    kept_rows = [r[:p + a] for r, p, a in zip(rows, PREFIX, accepted)]
    _, clean = _prefilled(model, kept_rows)
    np.testing.assert_array_equal(np.asarray(clean.lengths), np.asarray(rolled_back.lengths))

    nxt = np.random.default_rng(15).integers(3, VOCAB_SIZE, size=(len(rows), 1))
    positions = (prefix + accepted)[:, None]
    one = np.ones((len(rows), 1, 1), bool)
    got, _ = _run(model, rolled_back, nxt, positions, one)
    want, _ = _run(model, clean, nxt, positions, one)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # The rejected entries are still there (and differ from the clean cache's slots), so only
    # the lengths kept them out of the step above.
    for b, (p, a) in enumerate(zip(PREFIX, accepted)):
        stale = np.asarray(rolled_back.k[0][b, :, p + a:p + K])
        assert np.abs(stale - np.asarray(clean.k[0][b, :, p + a:p + K])).max() > 1e-3


# --- donation ---------------------------------------------------------------------------


def test_prefill_and_decode_donate_cache_and_state(llama):
    cfg, B, S = llama.config, 4, 64  # generate's buckets for a few short prompts
    rows = _random_rows([5, 11, 3, 16], seed=16)
    tokens = np.zeros((B, S), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    prompt_lengths = np.array([len(r) for r in rows], np.int32)
    sampling = SamplingParams.create(0.0)
    stop_ids = np.full((16,), -1, np.int32)
    max_new = np.int32(40)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record, rather than raise, to assert below
        cache = init_cache(cfg, B, S, llama.dtype)
        donated = jax.tree_util.tree_leaves(cache)
        state, cache = steps.prefill(cfg, llama.params, cache, tokens, prompt_lengths, np.ones(B, bool),
                                     sampling, row_keys(0, B), stop_ids, max_new, prompt_bucket=16)
        jax.block_until_ready((state, cache))
        assert all(x.is_deleted() for x in donated)

        for _ in range(2):  # the second call gets decode's own outputs back
            donated = jax.tree_util.tree_leaves((cache, state))
            state, cache = steps.decode(cfg, llama.params, cache, state, sampling, stop_ids, max_new,
                                        num_steps=8)
            jax.block_until_ready((state, cache))
            assert all(x.is_deleted() for x in donated)
    assert not [w for w in caught if "donated" in str(w.message)], [str(w.message) for w in caught]
    # And the steps did their work: 1 token from prefill, 8 per decode dispatch.
    np.testing.assert_array_equal(np.asarray(state.lengths), prompt_lengths + 17)
    np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lengths + 16)
    assert int(state.target_steps) == 16


# --- no recompilation in steady state -----------------------------------------------------

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compilations():
    """Collects (event, function name) for every trace and XLA compilation inside."""
    seen = []

    def listener(event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            seen.append((event, kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_steady_state_generate_compiles_nothing(llama):
    # A config no other test uses (bos_token_id plays no part in decoding), so the warm-up
    # surely compiles whatever ran before: the counter is shown to see compilations.
    model = dataclasses.replace(llama, config=dataclasses.replace(llama.config, bos_token_id=97))
    with compilations() as warm:
        first = jaxdec.generate(model, _random_rows([5, 12, 9], seed=17), max_new_tokens=20,
                                stop_token_ids=[])
    compiled = {name for event, name in warm if event.endswith("backend_compile_duration")}
    assert {"jit(prefill)", "jit(decode)"} <= compiled, sorted(compiled)

    # Same buckets (batch 4, prompt 16, cache 64); everything else differs.
    with compilations() as steady:
        second = jaxdec.generate(model, _random_rows([16, 3, 7, 11], seed=18), max_new_tokens=40,
                                 temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=123,
                                 stop_token_ids=[5, 9, 77])
        third = jaxdec.generate(model, _random_rows([1, 14, 2], seed=19), max_new_tokens=1,
                                temperature=1.3, seed=7, stop_token_ids=None)
    assert steady == [], steady
    assert [len(t) for t in first.tokens] == [20] * 3 and [len(t) for t in third.tokens] == [1] * 3
    assert len(second.tokens) == 4 and all(1 <= len(t) <= 40 for t in second.tokens)


# --- generate: stop tokens, limits, stats -------------------------------------------------


def _check_stats(out, max_new_tokens):
    lengths = [len(t) for t in out.tokens]
    stats = out.stats
    assert stats.new_tokens == sum(lengths)
    assert stats.target_steps == max(0, max(lengths) - 1)
    assert stats.mean_accepted == 1.0  # plain decoding, also when no target step ran
    if stats.target_steps:
        assert stats.decode_seconds > 0
        assert stats.tokens_per_second == pytest.approx(stats.new_tokens / stats.decode_seconds, rel=1e-9)
    assert all(n <= max_new_tokens for n in lengths)


@pytest.fixture(scope="module")
def greedy_prompts():
    return _random_rows([7, 13, 4], seed=20)


@pytest.fixture(scope="module")
def unstopped(llama, greedy_prompts):
    """Greedy outputs of greedy_prompts that never stop early."""
    out = jaxdec.generate(llama, greedy_prompts, max_new_tokens=24, stop_token_ids=[])
    assert [len(t) for t in out.tokens] == [24, 24, 24]
    _check_stats(out, 24)
    return out.tokens


def _truncate_at_stop(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1]
    return tokens


def test_rows_stop_after_their_stop_token_others_go_on(llama, greedy_prompts, unstopped):
    # A token one row emits mid-sequence (first there at index i) that another row never emits.
    candidates = [(abs(i - len(row) // 2), row[i], r) for r, row in enumerate(unstopped)
                  for i in range(1, len(row) - 1)
                  if row[i] not in row[:i] and any(row[i] not in other for other in unstopped)]
    assert candidates, unstopped
    _, stop, stopped_row = min(candidates)  # the one nearest the middle
    stop_ids = [stop]
    # Also stop one other row on its very first token (sampled by prefill), when that does not
    # cut the mid-sequence row short.
    for r, row in enumerate(unstopped):
        if r != stopped_row and row[0] not in unstopped[stopped_row][:unstopped[stopped_row].index(stop)]:
            stop_ids.append(row[0])
            break
    out = jaxdec.generate(llama, greedy_prompts, max_new_tokens=24, stop_token_ids=stop_ids)
    expected = [_truncate_at_stop(row, stop_ids) for row in unstopped]
    assert out.tokens == expected
    lengths = [len(t) for t in out.tokens]
    assert 1 < lengths[stopped_row] < 24 and out.tokens[stopped_row][-1] == stop
    assert max(lengths) == 24, "some row keeps going after the others stopped"
    _check_stats(out, 24)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 9])
def test_max_new_tokens_is_exact(llama, greedy_prompts, unstopped, max_new_tokens):
    out = jaxdec.generate(llama, greedy_prompts, max_new_tokens=max_new_tokens, stop_token_ids=[])
    assert out.tokens == [row[:max_new_tokens] for row in unstopped]
    _check_stats(out, max_new_tokens)
    if max_new_tokens == 0:
        assert out.stats.new_tokens == 0 and out.stats.target_steps == 0


def test_stats_with_sampling_and_ragged_stops(llama, greedy_prompts):
    """Sampled rows end at different steps; the stats still add up."""
    out = jaxdec.generate(llama, greedy_prompts + [[3, 4, 5]], max_new_tokens=30, temperature=1.0,
                          seed=3, stop_token_ids=list(range(3, 19)))
    stop_ids = set(range(3, 19))
    for row in out.tokens:
        assert all(t not in stop_ids for t in row[:-1])
        assert len(row) == 30 or row[-1] in stop_ids
    _check_stats(out, 30)


# --- buckets ------------------------------------------------------------------------------


def test_bucket_edges():
    assert [steps.bucket(n) for n in range(0, 10)] == [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert steps.bucket(1024) == 1024 and steps.bucket(1025) == 2048
    assert steps.bucket(-5) == 1
    assert steps.bucket(0, 16) == 16 and steps.bucket(16, 16) == 16 and steps.bucket(17, 16) == 32
    assert steps.bucket(3, 5) == 5, "a minimum that is not a power of two is taken as is"
    for n in range(1, 600):
        b = steps.bucket(n, steps.MIN_PROMPT_BUCKET)
        assert b >= n and b & (b - 1) == 0 and (b == steps.MIN_PROMPT_BUCKET or b < 2 * n)


@pytest.mark.parametrize("max_positions", [256, 100, 40, 64, 300])
def test_cache_bucket_edges(llama, max_positions):
    cfg = dataclasses.replace(llama.config, max_position_embeddings=max_positions)
    pallas = dataclasses.replace(cfg, attn_impl="pallas")
    previous = 0
    for needed in range(1, max_positions + 1):
        slots = steps.cache_bucket(cfg, needed)
        assert needed <= slots <= max_positions
        assert slots == max_positions or (slots & (slots - 1) == 0 and slots >= steps.MIN_CACHE_BUCKET)
        assert slots >= previous, "monotone"
        previous = slots
        # The Pallas kernels' cache is whole blocks once past one: the same, rounded up to them.
        blocks = slots if slots <= BLOCK_S else -(-slots // BLOCK_S) * BLOCK_S
        assert steps.cache_bucket(pallas, needed) == blocks
    assert steps.cache_bucket(cfg, 1) == min(steps.MIN_CACHE_BUCKET, max_positions)
    # Past the context it never hands back fewer slots than needed (generate rejects it first).
    assert steps.cache_bucket(cfg, max_positions + 1) == max_positions + 1


def test_a_context_shorter_than_the_smallest_prompt_bucket(llama):
    """A model of 12 positions: the cache holds 12 slots, fewer than the smallest prompt bucket
    (16), so prefill reads the prompts in a bucket cut to the cache. The tokens are the full
    model's (max_position_embeddings changes no computation, only what fits)."""
    from jaxdec.loading import model_from_params
    assert steps.MIN_PROMPT_BUCKET > 12
    short = model_from_params(dataclasses.replace(llama.config, max_position_embeddings=12), llama.params)
    prompts = [[5, 6, 7, 8, 9], [3, 1, 4]]
    out = jaxdec.generate(short, prompts, max_new_tokens=7, stop_token_ids=[])
    assert out.tokens == jaxdec.generate(llama, prompts, max_new_tokens=7, stop_token_ids=[]).tokens


def test_cache_writes_past_the_last_slot_are_dropped():
    """cache.write_slots drops a write to a slot past the end rather than clamping it onto the
    last slot (finished rows and drafts near the end of the cache write there)."""
    layer = jnp.zeros((1, 2, 4, 3))                                  # [B, kv_heads, slots, D]
    new = jnp.ones((1, 3, 2, 3))                                     # [B, T, kv_heads, D]
    out = np.asarray(write_slots(layer, new * jnp.arange(1, 4)[None, :, None, None], jnp.asarray([[2, 4, 9]])))
    np.testing.assert_array_equal(out[0, :, 2], 1.0)                 # the in-range write
    np.testing.assert_array_equal(out[0, :, 3], 0.0)                 # the last slot: untouched
    np.testing.assert_array_equal(out[0, :, :2], 0.0)
