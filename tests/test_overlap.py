"""spec.Pearl: the draft model on its own devices drafts the next chain while the target
verifies (jaxdec/overlap.py). Greedy output equals plain decoding; the overlapped schedule
gives exactly the sequential schedule's samples (and the fused DraftModel's); a perfect draft
has every round after the first drafted ahead. (The chi-square test of its sampling is in
test_speculative_sampling.py with the other methods.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxdec
from jaxdec import spec

PROMPTS = ["def add(a, b):", "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "    return", "x = [", "# Copyright", "def __init__(self, name):"]
MAX_NEW = 24
K = 3  # one draft length and batch buckets 1, 2 and 8 throughout: each new shape compiles both models


@pytest.fixture(scope="module")
def models():
    """The target on device 0 (and on a 2x2 mesh), the draft and a perfect draft (the target
    itself) on the last device."""
    last = jaxdec.make_mesh(devices=jax.devices()[-1:])
    return {"target": jaxdec.load("demo-target"),
            "target_2x2": jaxdec.load("demo-target", mesh=jaxdec.make_mesh(2, 2)),
            "draft": jaxdec.load("demo-draft", mesh=last),
            "perfect": jaxdec.load("demo-target", mesh=last)}


@pytest.fixture(scope="module")
def plain(models):
    return jaxdec.generate(models["target"], PROMPTS, max_new_tokens=MAX_NEW).tokens


@pytest.mark.parametrize("batch, overlap", [(1, True), (7, True), (2, False)])
def test_greedy_equals_plain_decoding(models, plain, batch, overlap):
    out = jaxdec.generate(models["target"], PROMPTS[:batch], max_new_tokens=MAX_NEW,
                          speculative=spec.Pearl(models["draft"], num_tokens=K, overlap=overlap))
    assert out.tokens == plain[:batch]
    assert out.stats.mean_accepted > 1.5
    if not overlap:
        assert out.stats.rounds_drafted_ahead == 0


def test_greedy_with_the_target_sharded(models, plain):
    out = jaxdec.generate(models["target_2x2"], PROMPTS[:2], max_new_tokens=MAX_NEW,
                          speculative=spec.Pearl(models["draft"], num_tokens=K))
    assert out.tokens == plain[:2]


def test_a_perfect_draft_is_always_drafted_ahead(models, plain):
    """The target drafting for itself: every chain is accepted and its guess of the next token
    is right, so every round but the first verifies a chain drafted during the last verify."""
    out = jaxdec.generate(models["target"], PROMPTS[:2], max_new_tokens=MAX_NEW,
                          speculative=spec.Pearl(models["perfect"], num_tokens=K))
    assert out.tokens == plain[:2]
    assert out.stats.rounds_drafted_ahead == out.stats.target_steps - 1 > 0
    # Streamed (the command line), a dispatch is one round: the chain drafted ahead carries over.
    snapshots = []
    streamed = jaxdec.generate(models["target"], PROMPTS[:2], max_new_tokens=MAX_NEW,
                               speculative=spec.Pearl(models["perfect"], num_tokens=K),
                               on_progress=lambda tokens: snapshots.append(tokens))
    assert streamed.tokens == plain[:2] and snapshots[-1] == plain[:2]
    assert len(snapshots) == streamed.stats.target_steps + 1  # one call before the first round
    assert streamed.stats.rounds_drafted_ahead == out.stats.rounds_drafted_ahead


def test_overlap_changes_when_drafts_are_made_not_what_they_are(models):
    """Sampling: the chain drafted ahead is the one the sequential schedule drafts after the
    same tokens (same keys, same cache entries), so the samples are identical, and identical
    to DraftModel's in one program; some rounds must really have been drafted ahead."""
    same_device_draft = jaxdec.load("demo-draft")
    drafted_ahead = 0
    # A chain is drafted ahead only when all K drafts and the sampled token after them are
    # what the draft guessed: at temperature 1 in about one round in twenty on these prompts,
    # at 0.5 in one in five (8 rounds of these runs).
    for seed, batch in enumerate((PROMPTS[:1], PROMPTS[1:3]) * 2):
        run = lambda method: jaxdec.generate(models["target"], batch, max_new_tokens=2 * MAX_NEW, temperature=0.5,
                                             seed=seed, speculative=method)
        ahead = run(spec.Pearl(models["draft"], num_tokens=K))
        assert ahead.tokens == run(spec.Pearl(models["draft"], num_tokens=K, overlap=False)).tokens
        assert ahead.tokens == run(spec.DraftModel(same_device_draft, num_tokens=K)).tokens
        drafted_ahead += ahead.stats.rounds_drafted_ahead
    assert drafted_ahead > 0


def test_bad_pearl_options(models):
    with pytest.raises(ValueError, match="num_tokens"):
        spec.Pearl(models["draft"], num_tokens=0)
    with pytest.raises(ValueError, match="overlap must be True or False"):
        spec.Pearl(models["draft"], overlap="yes")
    with pytest.raises(ValueError, match="needs a jaxdec.Model"):
        spec.Pearl("demo-draft")


def test_steady_state_compiles_nothing(models):
    from tests.test_steps import compilations
    method = spec.Pearl(models["draft"], num_tokens=K)
    jaxdec.generate(models["target"], PROMPTS[:2], max_new_tokens=MAX_NEW, speculative=method)
    with compilations() as steady:  # same buckets; other prompts, sampling, seed and length
        jaxdec.generate(models["target"], PROMPTS[2:4], max_new_tokens=MAX_NEW - 4, temperature=0.8, seed=3,
                        speculative=method)
    assert steady == [], steady


def test_a_chain_drafted_ahead_is_used_only_when_the_whole_guess_came_true():
    from jaxdec.overlap import guess_came_true
    full, guess, active = np.array([3, 3]), np.array([7, 9]), np.array([True, True])
    assert guess_came_true(full, np.array([7, 9]), guess, active, 3)
    assert not guess_came_true(full, np.array([7, 8]), guess, active, 3)            # a wrong next token
    # The next token equals the guess, but a row stopped after 2 of 3 tokens: its next token
    # follows other tokens than the guess did.
    assert not guess_came_true(np.array([3, 2]), np.array([7, 9]), guess, active, 3)
    # Finished rows (inactive) do not count.
    assert guess_came_true(np.array([3, 0]), np.array([7, 1]), guess, np.array([True, False]), 3)
