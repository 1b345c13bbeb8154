"""The sampling distribution, checked against an independent exact reference.

`reference` below re-derives the documented semantics in float64 numpy, group by group of
tied values (the library works position by position on a sorted vocabulary): temperature,
then top-k (ties at the cut-off kept), then top-p (the smallest head of the descending ranking
whose mass reaches top_p, at least one token, ties at the threshold kept), then min-p (drop
tokens less likely than min_p times the most likely one); temperature 0 is the argmax of the
raw logits. The processed probabilities are compared exactly (up to float32 rounding), and the
sampler's draws are compared with them by chi-square tests at fixed seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy import stats

import jaxdec
from jaxdec.sampling import SamplingParams, probabilities, process_logits, row_keys, sample, sample_with_probabilities

# A float32 decision closer than this to its cut-off may round either way: such cases are
# not evidence of anything and are skipped (hypothesis) or ruled out (fixed cases).
MARGIN = 1e-4
P_VALUE = 1e-3  # chi-square threshold; the seeds are fixed, so every run draws the same samples


def _softmax(x, keep):
    z = np.where(keep, x - x[keep].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


def reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(probabilities, margin) of the processed distribution, in float64.

    margin: how close a top-p or min-p decision came to its cut-off (relative for min-p);
    np.inf when no such decision was made.
    """
    logits = np.asarray(logits, np.float64)
    vocab = logits.size
    if temperature == 0:
        return np.eye(vocab)[np.argmax(logits)], np.inf
    x = logits / temperature
    keep = np.ones(vocab, bool)
    margin = np.inf
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, vocab) - 1]
        keep &= x >= kth
    if top_p < 1:
        p = _softmax(x, keep)
        groups = np.unique(x[keep])[::-1]  # distinct kept values, descending: ties go together
        cum = 0.0
        for g, value in enumerate(groups):
            cum += p[x == value].sum()
            if g < len(groups) - 1:  # the last group is kept whatever the rounding
                margin = min(margin, abs(cum - top_p))
            if cum >= top_p:
                keep &= x >= value
                break
    if min_p > 0:
        p = _softmax(x, keep)
        ratio = p / p.max()
        keep_before = keep.copy()
        keep &= ratio >= min_p
        below_max = keep_before & (x < x[keep_before].max())  # exact ties with the max always stay
        if below_max.any():
            margin = min(margin, np.min(np.abs(ratio[below_max] / min_p - 1)))
    return _softmax(x, keep), margin


_probabilities = jax.jit(probabilities)
_process_logits = jax.jit(process_logits)
_sample = jax.jit(sample)


def _params(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return SamplingParams.create(temperature, top_k, top_p, min_p)


# ---------------------------------------------------------------------------------------------
# The processed distribution


@st.composite
def cases(draw):
    vocab = draw(st.integers(6, 12))
    # Quarter steps in [-3, 3]: ties are frequent, and distinct values stay distinct in float32.
    logits = [q / 4 for q in draw(st.lists(st.integers(-12, 12), min_size=vocab, max_size=vocab))]
    temperature = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.1, 4.0)))
    top_k = draw(st.one_of(st.just(0), st.integers(1, vocab + 1)))
    top_p = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
    min_p = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.01, 1.0)))
    return logits, temperature, top_k, top_p, min_p


@settings(max_examples=400, deadline=None, database=None)
@given(cases())
# top-k keeps the tie at its cut-off (4 tokens), and top-p then ranks that whole set: p(2.0) is
# 0.475, so the head needs three tokens and the tie at the threshold keeps all four.
@example(([2.0, 1.0, 1.0, 1.0, 0.0, -1.0], 1.0, 2, 0.7, 0.0))
# top_p = 1 is off: a tail token far below float32's resolution of the cumulative mass stays.
@example(([0.0, -2.5, -3.0, -3.0, -3.0, -3.0], 0.1, 0, 1.0, 0.0))
# Ties at the top-p threshold are all kept; min_p = 1 keeps exactly the ties with the max.
@example(([1.0, 1.0, 1.0, 0.0, 0.0, -1.0], 1.0, 0, 0.2, 0.0))
@example(([1.0, 0.5, 1.0, 0.0, 1.0, -1.0], 0.5, 0, 1.0, 1.0))
# Greedy ignores the filters and takes the first of tied maxima.
@example(([0.0, 2.0, 2.0, 1.0, -1.0, 0.5], 0.0, 1, 0.1, 0.9))
def test_processed_distribution_matches_reference(case):
    logits, temperature, top_k, top_p, min_p = case
    ref, margin = reference(logits, temperature, top_k, top_p, min_p)
    assume(margin > MARGIN)
    params = _params(temperature, top_k, top_p, min_p)
    x = jnp.asarray(logits, jnp.float32)
    probs = np.asarray(_probabilities(x, params), np.float64)
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    if temperature > 0:
        processed = np.asarray(_process_logits(x, params))
        # The exact support, however small the surviving probabilities.
        np.testing.assert_array_equal(np.isfinite(processed), ref > 0)
        assert processed.dtype == np.float32


def test_processed_distribution_is_per_row():
    """A batch [B, V] is processed row by row, each row against the reference."""
    rng = np.random.default_rng(0)
    logits = rng.integers(-8, 9, size=(16, 10)) / 4
    for kwargs in (dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.6),
                   dict(temperature=1.0, top_k=5, top_p=0.8, min_p=0.2), dict(temperature=0.0)):
        probs = np.asarray(_probabilities(jnp.asarray(logits, jnp.float32), _params(**kwargs)))
        for row, got in zip(logits, probs):
            ref, margin = reference(row, **kwargs)
            if margin > MARGIN:
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_top_k_beyond_int32_keeps_every_token():
    """top_k past the vocabulary is no cut, however large: 10**12 used to be an OverflowError
    when it was made an int32."""
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)), jnp.float32)
    for top_k in (10**12, np.int64(2**40), 2**31 - 1):
        np.testing.assert_array_equal(np.asarray(_probabilities(logits, _params(top_k=top_k))),
                                      np.asarray(_probabilities(logits, _params(top_k=0))))


def test_top_p_below_float32s_normal_range_keeps_the_likeliest():
    """A top_p of 1e-40 is in (0, 1], but on the device it became 0 (or was flushed to it) and
    the cut kept no token: every draw was token 0."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 50)), jnp.float32)
    for top_p in (1e-40, 5e-324, np.float64(1e-45)):
        probs = np.asarray(_probabilities(logits, _params(top_p=top_p)))
        np.testing.assert_array_equal(probs, np.eye(50)[np.argmax(np.asarray(logits), axis=-1)])


def test_masked_logits_stay_impossible():
    """-inf logits (a masked vocabulary) never get probability, whatever the filters."""
    logits = jnp.array([0.0, -jnp.inf, 1.0, -jnp.inf, 0.5, 0.5], jnp.float32)
    for kwargs in (dict(), dict(temperature=3.0), dict(top_k=5), dict(top_p=1.0), dict(min_p=0.0)):
        probs = np.asarray(_probabilities(logits, _params(**kwargs)))
        assert probs[1] == probs[3] == 0 and np.isclose(probs.sum(), 1)


def test_cuts_keep_ties_by_value():
    """The cuts are found on the values' bit patterns: equal values tie there too (0.0 and
    -0.0), and negative, masked and extreme values keep their order."""
    logits = jnp.array([1.0, 0.0, -0.0, -1.0, -jnp.inf, -3e38, 3e38, -2.0], jnp.float32)
    processed = np.asarray(_process_logits(logits, _params(temperature=1.0, top_k=3)))
    np.testing.assert_array_equal(np.isfinite(processed), [True, True, True, False, False, False, True, False])
    processed = np.asarray(_process_logits(logits[jnp.array([0, 1, 2, 3, 7])], _params(temperature=1.0, top_k=4)))
    np.testing.assert_array_equal(np.isfinite(processed), [True, True, True, True, False])


# ---------------------------------------------------------------------------------------------
# Draws

NUM_DRAWS = 8192
# Eight tokens with a tie at 1.0, so top-k = 3 keeps four.
LOGITS = np.array([2.0, 1.5, 1.0, 1.0, 0.25, 0.0, -0.5, -1.5], np.float32)
COMBOS = [
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=3),
    dict(temperature=1.5, top_p=0.7),
    dict(temperature=1.0, min_p=0.15),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    dict(temperature=2.5, top_k=5, top_p=0.8),
]


def _draw(logits, params, seed, streams):
    """NUM_DRAWS tokens: one per row ("rows": row keys of one seed, counter 0), or one row's
    key at counters 0..NUM_DRAWS-1 ("counters": the successive tokens of one sequence)."""
    n = NUM_DRAWS
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    if streams == "rows":
        keys, counters = row_keys(seed, n), jnp.zeros((n,), jnp.int32)
    else:
        keys, counters = row_keys(seed, 1)[jnp.zeros((n,), jnp.int32)], jnp.arange(n, dtype=jnp.int32)
    return np.asarray(_sample(batch, params, keys, counters))


def _check_counts(counts, ref, label):
    """Nothing outside the support, and a chi-square fit on it."""
    support = ref > 0
    assert counts[~support].sum() == 0, f"{label}: drew filtered-out tokens {np.flatnonzero(counts * ~support)}"
    expected = counts.sum() * ref[support]
    assert expected.min() >= 5, f"{label}: test setup, expected counts too small for chi-square"
    assert support.sum() >= 2, f"{label}: test setup, nothing to compare"
    pvalue = stats.chisquare(counts[support], expected).pvalue
    assert pvalue > P_VALUE, f"{label}: draws do not follow the distribution (p={pvalue:.2e})"


@pytest.mark.parametrize("streams", ["rows", "counters"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_draws_follow_the_processed_distribution(combo, streams):
    ref, margin = reference(LOGITS, **combo)
    assert margin > 1e-3, "test setup: a cut-off too close to call"
    seed = COMBOS.index(combo) + 10 * (streams == "counters")
    tokens = _draw(LOGITS, _params(**combo), seed, streams)
    counts = np.bincount(tokens, minlength=len(LOGITS))
    _check_counts(counts, ref, f"{combo} {streams}")
    # The test has the power to see a sampler that ignores the processors.
    raw = reference(LOGITS)[0]
    if not np.allclose(raw, ref, atol=0.01):
        assert stats.chisquare(counts, counts.sum() * raw).pvalue < P_VALUE


def test_filters_that_keep_one_token_always_draw_it():
    logits = jnp.asarray(LOGITS)
    for combo in (dict(temperature=5.0, top_k=1), dict(temperature=5.0, top_p=1e-3),
                  dict(temperature=0.5, min_p=0.9)):
        tokens = _draw(logits, _params(**combo), 0, "rows")
        assert (tokens == 0).all(), combo
    # min_p = 1 keeps exactly the tied maxima, and draws both.
    tied = jnp.array([0.0, 3.0, 1.0, 3.0, 2.9, -1.0, 0.0, 0.0])
    tokens = _draw(tied, _params(temperature=2.0, min_p=1.0), 1, "rows")
    assert set(np.unique(tokens)) == {1, 3}


def test_greedy_is_argmax_of_raw_logits():
    rng = np.random.default_rng(3)
    logits = rng.integers(-6, 7, size=(NUM_DRAWS, 8)).astype(np.float32) / 2  # many tied maxima
    keys, counters = row_keys(0, NUM_DRAWS), jnp.zeros((NUM_DRAWS,), jnp.int32)
    for combo in (dict(temperature=0.0), dict(temperature=0.0, top_k=2, top_p=0.3, min_p=0.9)):
        tokens = np.asarray(_sample(jnp.asarray(logits), _params(**combo), keys, counters))
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_sample_with_probabilities_is_sample_and_probabilities():
    """The drafters' one-branch form draws the same tokens with the same keys and returns the
    same distribution, greedy or sampled, with and without the filters."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32) * 2)
    keys, counters = row_keys(7, 64), jnp.arange(64, dtype=jnp.int32)
    for combo in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=3, top_p=0.8, min_p=0.05)):
        params = _params(**combo)
        tokens, q = jax.jit(sample_with_probabilities)(logits, params, keys, counters)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(_sample(logits, params, keys, counters)))
        np.testing.assert_allclose(np.asarray(q), np.asarray(_probabilities(logits, params)), rtol=1e-6, atol=1e-7)


def test_rows_and_counters_get_independent_streams():
    """Different rows, and successive tokens of one row, do not reuse random numbers."""
    flat = jnp.zeros((len(LOGITS),))  # uniform: every token equally likely
    for streams in ("rows", "counters"):
        tokens = _draw(flat, _params(), 5, streams)
        _check_counts(np.bincount(tokens, minlength=len(LOGITS)), np.full(len(LOGITS), 1 / len(LOGITS)), streams)
        # Serial dependence would show as too many (or too few) repeats of the previous token.
        repeats = np.mean(tokens[1:] == tokens[:-1])
        assert abs(repeats - 1 / len(LOGITS)) < 0.02, (streams, repeats)


# ---------------------------------------------------------------------------------------------
# Through jaxdec.generate (tiny Llama). Shapes: batch 4, prompts <= 16, cache 64; the end-to-end
# draw uses batch 256.

PROMPT = [1, 40, 41, 42, 43, 44]
SAMPLED = dict(max_new_tokens=12, temperature=1.0, stop_token_ids=[])


def test_same_seed_same_output(llama):
    prompts = [PROMPT, PROMPT[:3], [7, 8, 9, 10, 11, 12, 13, 14, 15], PROMPT]
    a = jaxdec.generate(llama, prompts, seed=3, top_k=20, top_p=0.9, **SAMPLED)
    b = jaxdec.generate(llama, prompts, seed=3, top_k=20, top_p=0.9, **SAMPLED)
    assert a.tokens == b.tokens
    assert all(len(t) == SAMPLED["max_new_tokens"] for t in a.tokens)


def test_arrays_of_token_ids_are_rows(llama):
    """A 2-D array of ids (NumPy or JAX, any integer dtype), as Hugging Face's `input_ids`, is a
    batch of rows: the same output as the lists; so are a list of 1-D arrays, and a 1-D array
    to `logits`."""
    rows = [PROMPT, PROMPT[::-1], PROMPT[1:] + [7]]
    lists = jaxdec.generate(llama, rows, seed=3, **SAMPLED).tokens
    for array in (np.array(rows), jnp.array(rows), np.array(rows, np.uint16), [jnp.array(r) for r in rows]):
        assert jaxdec.generate(llama, array, seed=3, **SAMPLED).tokens == lists
    np.testing.assert_array_equal(jaxdec.logits(llama, jnp.array(PROMPT)), jaxdec.logits(llama, PROMPT))
    stop = lists[0][5]  # stop ids as an array too
    stopped = jaxdec.generate(llama, rows, seed=3, **{**SAMPLED, "stop_token_ids": jnp.array([stop])}).tokens
    assert stopped[0] == lists[0][:lists[0].index(stop) + 1]


def test_identical_prompts_sample_independently(llama):
    out = jaxdec.generate(llama, [PROMPT] * 4, seed=0, **SAMPLED)
    assert len({tuple(t) for t in out.tokens}) == 4, out.tokens


def test_different_seed_changes_output(llama):
    a = jaxdec.generate(llama, [PROMPT] * 4, seed=0, **SAMPLED)
    b = jaxdec.generate(llama, [PROMPT] * 4, seed=1, **SAMPLED)
    assert all(x != y for x, y in zip(a.tokens, b.tokens))


def test_greedy_ignores_seed_and_filters(llama):
    prompts = [PROMPT] * 4
    a = jaxdec.generate(llama, prompts, max_new_tokens=12, stop_token_ids=[], seed=0)
    b = jaxdec.generate(llama, prompts, max_new_tokens=12, stop_token_ids=[], seed=7,
                        top_k=2, top_p=0.3, min_p=0.5)
    assert a.tokens == b.tokens and all(t == a.tokens[0] for t in a.tokens)


def test_greedy_ragged_batch_equals_alone(llama):
    prompts = [PROMPT, [5] * 16, [3, 99], list(range(20, 31))]
    batch = jaxdec.generate(llama, prompts, max_new_tokens=20, stop_token_ids=[])
    for prompt, tokens in zip(prompts, batch.tokens):
        alone = jaxdec.generate(llama, [prompt], max_new_tokens=20, stop_token_ids=[])
        assert tokens == alone.tokens[0]
    assert len({tuple(t) for t in batch.tokens}) > 1  # the rows really are different


E2E = dict(temperature=1.5, top_k=8, top_p=0.95)
E2E_ROWS = 256


def test_first_token_follows_processed_model_distribution(llama):
    """One generate call of 256 identical rows and one new token each, per seed: the draws
    follow the exact processed distribution of the model's next-token logits."""
    ref, margin = reference(jaxdec.logits(llama, PROMPT)[-1], **E2E)
    assert margin > 1e-3, "test setup: a cut-off too close to call"
    first = []
    for seed in (0, 1):
        out = jaxdec.generate(llama, [PROMPT] * E2E_ROWS, max_new_tokens=1, seed=seed, stop_token_ids=[], **E2E)
        first += [t[0] for t in out.tokens]
    counts = np.bincount(first, minlength=llama.config.vocab_size)
    _check_counts(counts, ref, "generate")
    # Power: the same draws reject the distribution at temperature 1 (same filters), by a token
    # outside its support or by chi-square.
    wrong = reference(jaxdec.logits(llama, PROMPT)[-1], **{**E2E, "temperature": 1.0})[0]
    assert (counts[wrong == 0].sum() > 0
            or stats.chisquare(counts[wrong > 0], counts.sum() * wrong[wrong > 0]).pvalue < P_VALUE)


def test_every_bit_of_the_seed_counts():
    """jax.random.key keeps a seed's low 32 bits: seeds 5 and 2**32 + 5 (or -1 and 2**32 - 1)
    drew the same tokens, though generate takes any seed in [-2**63, 2**63)."""
    data = lambda seed: np.asarray(jax.random.key_data(row_keys(seed, 2)))
    seeds = [5, 2**32 + 5, 2**40 + 5, -1, 2**32 - 1, -2**63, 0]
    assert len({data(seed).tobytes() for seed in seeds}) == len(seeds)
    # Seeds that fit 32 bits keep the streams they always had.
    assert np.array_equal(data(7), np.asarray(jax.random.key_data(
        jax.vmap(lambda b: jax.random.fold_in(jax.random.key(7), b))(jnp.arange(2)))))
