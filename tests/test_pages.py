"""Page summaries and Quest page selection (jaxdec.pages)."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxdec import pages


def _random_appends(rng, B=3, H=2, S=37, D=8, P=5):
    """Summaries after keys written in ragged chunks, some rolled back (written, not committed),
    the way decode steps write them; returns the committed lengths and the summaries."""
    lengths = np.zeros(B, np.int32)
    kmin, kmax = pages.empty_summaries(B, H, S, D, P)
    for _ in range(12):
        T = int(rng.integers(1, 5))
        new = rng.normal(size=(B, T, H, D)).astype(np.float32)
        slots = lengths[:, None] + np.arange(T)[None, :]
        kmin, kmax = pages.update_summaries(kmin, kmax, jnp.asarray(new), jnp.asarray(slots), P)
        lengths = np.minimum(lengths + rng.integers(0, T + 1, size=B), S).astype(np.int32)
    return lengths, kmin, kmax


def test_incremental_summaries_equal_recomputed():
    rng = np.random.default_rng(0)
    B, H, S, D, P = 2, 3, 41, 4, 6
    keys = rng.normal(size=(B, H, S, D)).astype(np.float32)
    lengths = np.array([S, 17], np.int32)
    kmin, kmax = pages.empty_summaries(B, H, S, D, P)
    written = np.zeros(B, np.int32)
    while (written < lengths).any():
        T = int(rng.integers(1, 7))
        slots = written[:, None] + np.arange(T)[None, :]
        slots = np.where(slots < lengths[:, None], slots, S + P)  # past the end: dropped
        new = np.stack([keys[b][:, np.clip(slots[b], 0, S - 1)].transpose(1, 0, 2) for b in range(B)])
        kmin, kmax = pages.update_summaries(kmin, kmax, jnp.asarray(new), jnp.asarray(slots), P)
        written = np.minimum(written + T, lengths)
    ref_min, ref_max = pages.summarize(jnp.asarray(keys), jnp.asarray(lengths), P)
    np.testing.assert_array_equal(np.asarray(kmin), np.asarray(ref_min))
    np.testing.assert_array_equal(np.asarray(kmax), np.asarray(ref_max))
    # And against numpy, page by page.
    for b in range(B):
        for p in range(-(-S // P)):
            chunk = keys[b][:, p * P:min((p + 1) * P, lengths[b])]
            if chunk.shape[1]:
                np.testing.assert_array_equal(np.asarray(kmin)[b, :, p], chunk.min(axis=1))
                np.testing.assert_array_equal(np.asarray(kmax)[b, :, p], chunk.max(axis=1))
            else:
                assert np.isinf(np.asarray(kmin)[b, :, p]).all()


def test_scores_bound_every_key():
    rng = np.random.default_rng(1)
    B, H, G, S, D, P = 2, 2, 2, 30, 8, 4
    keys = rng.normal(size=(B, H, S, D)).astype(np.float32)
    lengths = np.array([30, 13], np.int32)
    q = rng.normal(size=(B, H * G, D)).astype(np.float32)
    kmin, kmax = pages.summarize(jnp.asarray(keys), jnp.asarray(lengths), P)
    scores = np.asarray(pages.page_scores(jnp.asarray(q), kmin, kmax))
    qg = q.reshape(B, H, G, D)
    for b in range(B):
        for p in range(scores.shape[2]):
            valid = range(p * P, min((p + 1) * P, lengths[b]))
            for s in valid:
                dot = np.einsum("hgd,hd->h", qg[b], keys[b, :, s])
                assert (dot <= scores[b, :, p] + 1e-4).all()
            if not valid:
                assert np.isneginf(scores[b, :, p]).all()


def test_selection_keeps_first_recent_and_best():
    rng = np.random.default_rng(2)
    B, H, S, D, P = 3, 2, 64, 8, 4
    keys = rng.normal(size=(B, H, S, D)).astype(np.float32)
    lengths = np.array([64, 30, 9], np.int32)
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    kmin, kmax = pages.summarize(jnp.asarray(keys), jnp.asarray(lengths), P)
    budget = 6 * P
    chosen = np.asarray(pages.select_pages(jnp.asarray(q), kmin, kmax, jnp.asarray(lengths), P, budget))
    scores = np.asarray(pages.page_scores(jnp.asarray(q), kmin, kmax))
    for b in range(B):
        filled = -(-lengths[b] // P)
        last = filled - 1
        for h in range(H):
            picked = set(np.flatnonzero(chosen[b, h]))
            assert picked <= set(range(filled))
            assert len(picked) == min(6, filled)
            assert {0, last} <= picked
            others = sorted(set(range(1, last)), key=lambda p: -scores[b, h, p])
            assert picked - {0, last} == set(others[:len(picked) - len({0, last})])


def test_budget_covering_context_selects_every_filled_page():
    rng = np.random.default_rng(3)
    lengths, kmin, kmax = _random_appends(rng)
    q = rng.normal(size=(3, 4, 8)).astype(np.float32)
    chosen = np.asarray(pages.select_pages(jnp.asarray(q), kmin, kmax, jnp.asarray(lengths), 5, 40))
    for b in range(3):
        expected = np.arange(chosen.shape[2]) * 5 < lengths[b]
        assert (chosen[b] == expected[None]).all()


@pytest.mark.parametrize("kwargs, word", [
    (dict(budget=3), "budget"),
    (dict(budget=8, recent=-1), "recent"),
])
def test_bad_settings_raise(kwargs, word):
    kmin, kmax = pages.empty_summaries(1, 1, 8, 2, 4)
    with pytest.raises(ValueError, match=word):
        pages.select_pages(jnp.ones((1, 1, 2)), kmin, kmax, jnp.array([8]), 4, **kwargs)
    with pytest.raises(ValueError, match="page_size"):
        pages.empty_summaries(1, 1, 8, 2, 0)


@pytest.mark.parametrize("shared", [False, True])
def test_a_page_without_a_summary_is_read_only_when_forced(shared):
    """Slots below the length whose keys were never summarized (written since, not committed)
    score -inf whether each kv head chooses or all choose together: only the first and recent
    pages take them, never a score of 0 that beats the real pages' negative bounds."""
    B, H, S, D, P = 1, 2, 32, 4, 4
    keys = -np.ones((B, H, S, D), np.float32)
    kmin, kmax = pages.summarize(jnp.asarray(keys), jnp.asarray([12]), P)  # pages 0-2 summarized
    q = np.ones((B, 2 * H, D), np.float32)                                  # every real bound is negative
    ids = np.asarray(pages.select_page_ids(jnp.asarray(q), kmin, kmax, jnp.asarray([24]), P, budget=5 * P,
                                           recent=1, shared=shared))
    # Pages 3 and 4 are filled but empty: never chosen; page 5 is recent, 0 first; 1, 2 the best.
    for h in range(H):
        assert sorted(ids[0, h]) == [-1, 0, 1, 2, 5]
