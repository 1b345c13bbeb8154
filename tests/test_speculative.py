"""Speculative decoding, greedy side: every method returns exactly the tokens of plain
decoding, and the machinery around it (rounds, stats, prompt lookup, compilation, bad input)
is right. The sampling side (the acceptance rule and exact output distributions) is in
test_speculative_sampling.py.

Compilation dominates the cost here: each (batch bucket, cache bucket, drafter, num_tokens)
compiles its own program, so the hypothesis tests draw their shapes from a few fixed combos
(prompts <= 16 tokens and max_new_tokens <= 40 keep every cache at 64 slots) and only the
contents vary freely.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxdec
from jaxdec import spec
from jaxdec.cache import init_cache
from jaxdec.convert import convert
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.loading import model_from_params
from jaxdec.sampling import SamplingParams, row_keys
from jaxdec.steps import DecodeState
from jaxdec.verify import Draft
from tests.hf_models import VOCAB_SIZE
from tests.test_steps import _truncate_at_stop, compilations

# A donation XLA cannot use is a bug (DESIGN.md): whichever test compiles a program fails on it.
pytestmark = pytest.mark.filterwarnings("error:Some donated buffers were not usable")

MAX_PROMPT = 16   # prompt bucket 16
MAX_NEW = 40      # 16 + 40 <= 64 cache slots
BATCHES = {1: (1, 1), 4: (3, 4), 8: (5, 8)}  # batch bucket -> batch sizes drawn in it
# The greedy tests run every combo of their list (a pytest parameter), each with a few drawn
# cases: combos drawn by hypothesis from the list could go unrun (a depth-1 DraftTree that
# failed to compile once passed several local runs that way, and failed in CI).
PER_COMBO = settings(max_examples=4, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Drafts


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory, build_hf):
    """A different, smaller random Llama (1 layer) with the target's vocabulary: it rarely
    agrees with the target, so nearly every round goes through a rejection."""
    root = tmp_path_factory.mktemp("spec_draft")
    hf = build_hf(root / "hf", "llama", seed=1, num_hidden_layers=1)
    return jaxdec.load(convert(hf, root / "converted", progress=False))


@pytest.fixture(scope="module")
def noisy_draft(llama):
    """The target's weights plus noise: agrees with the target often but not always (mean
    acceptance around 1.6 at num_tokens 3), so rows accept ragged numbers of tokens."""
    rng = np.random.default_rng(0)
    noisy = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * np.std(np.asarray(x)) * rng.standard_normal(x.shape).astype(np.float32),
        llama.params)
    return model_from_params(llama.config, noisy)


def _drafts(llama, small_draft, noisy_draft):
    return {"small": small_draft, "noisy": noisy_draft, "self": llama}


# ---------------------------------------------------------------------------------------------
# Helpers


def _longest_draft(method) -> int:
    """The most draft tokens one round can accept: a tree's depth, a chain's length."""
    return method.depth if isinstance(method, (spec.DraftTree, spec.StaticTree, spec.Medusa, spec.Eagle)) else method.num_tokens


def _check_stats(out, num_rows, num_tokens):
    """Stats that hold for every speculative run: tokens add up, each active row-round emits
    1 to num_tokens + 1 tokens, and mean_accepted is emitted tokens per active row-round."""
    lengths = [len(t) for t in out.tokens]
    stats = out.stats
    assert stats.new_tokens == sum(lengths)
    longest = max(lengths)
    if longest <= 1:  # everything came from prefill
        assert stats.target_steps == 0 and stats.mean_accepted == 1.0
        return
    assert math.ceil((longest - 1) / (num_tokens + 1)) <= stats.target_steps <= longest - 1
    assert 1.0 <= stats.mean_accepted <= num_tokens + 1
    active_row_rounds = (stats.new_tokens - num_rows) / stats.mean_accepted
    assert active_row_rounds == pytest.approx(round(active_row_rounds), abs=1e-6)
    assert stats.active_row_steps == round(active_row_rounds)
    assert stats.target_steps <= stats.active_row_steps <= num_rows * stats.target_steps


@st.composite
def prompt_rows(draw, batch):
    """Ragged prompts of 1..16 ids; about half repeat a short motif (so prompt lookup fires)."""
    rows = []
    for _ in range(batch):
        n = draw(st.integers(1, MAX_PROMPT))
        if draw(st.booleans()):
            motif = draw(st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=4))
            rows.append((motif * MAX_PROMPT)[:n])
        else:
            rows.append(draw(st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=n, max_size=n)))
    return rows


def greedy_case(data, combo):
    """(prompts, max_new_tokens) drawn for `combo`, whose [0] is the batch bucket."""
    low, high = BATCHES[combo[0]]
    prompts = data.draw(prompt_rows(data.draw(st.integers(low, high), label="batch")), label="prompts")
    return prompts, data.draw(st.integers(1, MAX_NEW), label="max_new_tokens")


def _diverges_at_near_tie(target, prompts, expected, got) -> bool:
    """Whether every row that differs splits where the target's top two logits are within
    float32 noise: the verifier's (k+1)-token step and plain decoding's 1-token step may round
    such a tie differently, which is no evidence of a bug (like test_sampling's MARGIN)."""
    differing = [(p, w, h) for p, w, h in zip(prompts, expected, got) if w != h]
    for prompt, want, have in differing:
        split = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        if split is None:  # one is a prefix of the other: a stopping bug, not a tie
            return False
        top2 = np.sort(jaxdec.logits(target, prompt + want[:split])[-1])[-2:]
        if top2[1] - top2[0] >= 1e-4:
            return False
    return bool(differing)


def _check_greedy_equal(target, prompts, max_new_tokens, method, data):
    """Plain decoding without stops, then stop ids picked from its output (so rows really stop
    mid-sequence), then the speculative run against plain decoding with those stops."""
    unstopped = jaxdec.generate(target, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[]).tokens
    emitted = sorted({t for row in unstopped for t in row})
    stop_ids = data.draw(st.lists(st.sampled_from(emitted), max_size=3, unique=True), label="stop_ids")
    expected = [_truncate_at_stop(row, stop_ids) for row in unstopped]
    plain = jaxdec.generate(target, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)
    assert plain.tokens == expected
    out = jaxdec.generate(target, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                          speculative=method)
    if out.tokens != expected:
        assume(not _diverges_at_near_tie(target, prompts, expected, out.tokens))
    assert out.tokens == expected, (method, stop_ids)
    _check_stats(out, len(prompts), _longest_draft(method))
    return out


# ---------------------------------------------------------------------------------------------
# Greedy: exactly the tokens of plain decoding

# (batch bucket, num_tokens, draft, extra DraftModel options).
DRAFT_MODEL_COMBOS = [(8, 4, "small", {}), (1, 1, "small", {}), (4, 3, "noisy", {}), (4, 3, "self", {}),
                      (4, 4, "noisy", dict(confidence_threshold=0.5, adaptive_schedule=True))]
LAYER_SKIP_COMBOS = [(4, 2, (0,)), (8, 5, (1,))]
# (bucket, num_tokens, max_ngram, num_candidates): chains, and trees of merged matches.
PROMPT_LOOKUP_COMBOS = [(4, 8, 3, 1), (8, 1, 2, 1), (1, 3, 1, 1), (4, 4, 2, 3), (8, 3, 1, 4)]


@pytest.mark.parametrize("combo", DRAFT_MODEL_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_draft_model_equals_plain(llama, small_draft, noisy_draft, combo, data):
    _, num_tokens, draft, options = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    method = spec.DraftModel(_drafts(llama, small_draft, noisy_draft)[draft], num_tokens=num_tokens, **options)
    _check_greedy_equal(llama, prompts, max_new_tokens, method, data)


# (batch bucket, max_nodes, draft, depth, top_k): chains of single children (top_k 1), wide
# and deep trees, ragged acceptance (noisy) and full acceptance (self).
DRAFT_TREE_COMBOS = [(8, 6, "small", 3, 2), (1, 3, "noisy", 1, 3), (4, 12, "noisy", 4, 3), (4, 4, "self", 2, 2),
                     (1, 4, "noisy", 4, 1)]


@pytest.mark.parametrize("combo", DRAFT_TREE_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_draft_tree_equals_plain(llama, small_draft, noisy_draft, combo, data):
    _, max_nodes, draft, depth, top_k = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    method = spec.DraftTree(_drafts(llama, small_draft, noisy_draft)[draft], depth=depth, top_k=top_k,
                            max_nodes=max_nodes)
    _check_greedy_equal(llama, prompts, max_new_tokens, method, data)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_levels_deeper_than_max_nodes_change_nothing(llama, noisy_draft, monkeypatch, temperature):
    """DraftTree grows at most max_nodes levels: a deeper node is never among the kept ones
    (its ancestors alone fill the tree). Checked with the cap lifted: depth max_nodes + 3
    verifies the same trees as depth max_nodes (the same tokens, accepted in the same steps)."""
    method = lambda depth: spec.DraftTree(noisy_draft, depth=depth, top_k=2, max_nodes=4)
    assert method(7).build(llama, 4, 64)[0].depth == 4  # each round grows 4 levels, not 7
    monkeypatch.setattr(spec, "_grown_levels", lambda depth, max_nodes: int(depth))
    assert method(7).build(llama, 4, 64)[0].depth == 7
    prompts = [[5, 17, 33, 2, 90], list(range(40, 52)), [9, 9, 9, 12]]
    shallow, deep = (jaxdec.generate(llama, prompts, max_new_tokens=12, temperature=temperature, seed=1,
                                     stop_token_ids=[], speculative=method(depth)) for depth in (4, 7))
    assert shallow.tokens == deep.tokens and shallow.stats.target_steps == deep.stats.target_steps
    assert 1.0 < shallow.stats.mean_accepted < 5.0  # ragged: the trees decide how many tokens a step takes


def test_max_nodes_above_what_the_tree_scores_verifies_them_all(llama, noisy_draft):
    """max_nodes is a cap: depth 2 and top_k 2 score 6 nodes, so max_nodes' default (32)
    verifies those 6, the same trees as max_nodes=6 (the same tokens, in the same steps)."""
    capped = spec.DraftTree(noisy_draft, depth=2, top_k=2)
    assert capped.max_nodes == 32 and capped.build(llama, 2, 64)[0].max_nodes == 6
    prompts = [[5, 17, 33, 2, 90], list(range(40, 52))]
    run = lambda method, temperature: jaxdec.generate(llama, prompts, max_new_tokens=10, stop_token_ids=[],
                                                      speculative=method, temperature=temperature, seed=3)
    for temperature in (0.0, 1.0):  # sampled too: the same program, so the same draws
        six, default = (run(method, temperature) for method in (spec.DraftTree(noisy_draft, 2, 2, 6), capped))
        assert default.tokens == six.tokens and default.stats.target_steps == six.stats.target_steps
    assert run(capped, 0.0).tokens == run(None, 0.0).tokens  # and greedy is plain decoding's


# (batch bucket, paths, draft): a wide shallow tree, a deep one with branches, a lone node.
STATIC_TREE_COMBOS = [(8, ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)), "small"),
                      (4, ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (1,), (0, 1), (0, 0, 1)), "noisy"),
                      (1, ((1,),), "noisy"), (4, ((0,), (1,), (0, 0), (0, 0, 0)), "self")]


@pytest.mark.parametrize("combo", STATIC_TREE_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_static_tree_equals_plain(llama, small_draft, noisy_draft, combo, data):
    _, paths, draft = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    method = spec.StaticTree(_drafts(llama, small_draft, noisy_draft)[draft], paths)
    _check_greedy_equal(llama, prompts, max_new_tokens, method, data)


@pytest.mark.parametrize("combo", LAYER_SKIP_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_layer_skip_equals_plain(llama, combo, data):
    _, num_tokens, skip = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    _check_greedy_equal(llama, prompts, max_new_tokens, spec.LayerSkip(skip, num_tokens=num_tokens), data)


@pytest.mark.parametrize("combo", PROMPT_LOOKUP_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_prompt_lookup_equals_plain(llama, combo, data):
    _, num_tokens, max_ngram, num_candidates = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    method = spec.PromptLookup(max_ngram=max_ngram, num_tokens=num_tokens, num_candidates=num_candidates)
    _check_greedy_equal(llama, prompts, max_new_tokens, method, data)


# Fixed prompts for the other families: longer than mistral's sliding window (16) in total.
FAMILY_PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 56)), [9, 9, 9, 12], [100] * 3]


@pytest.mark.parametrize("family, method", [
    ("mistral", "layer_skip"),   # the draft reads the target's own sliding-window cache
    ("qwen2", "draft_model"),    # tied embeddings and qkv bias; a draft of another family
    ("qwen3", "draft_tree"),     # per-head q/k norms, head_dim != hidden / heads; trees it drafts itself
])
def test_greedy_other_families_equal_plain(models, small_draft, family, method):
    target = models[family]
    method = {"layer_skip": spec.LayerSkip([0], num_tokens=3),
              "draft_model": spec.DraftModel(small_draft, num_tokens=3),
              "draft_tree": spec.DraftTree(target, depth=3, top_k=2, max_nodes=6)}[method]
    plain = jaxdec.generate(target, FAMILY_PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[])
    out = jaxdec.generate(target, FAMILY_PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[], speculative=method)
    assert out.tokens == plain.tokens
    _check_stats(out, len(FAMILY_PROMPTS), 3)
    # And with each row stopped on a token from the middle of its own output.
    stops = [row[len(row) // 2] for row in plain.tokens]
    expected = [_truncate_at_stop(row, stops) for row in plain.tokens]
    assert any(len(row) < MAX_NEW for row in expected)
    out = jaxdec.generate(target, FAMILY_PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=stops, speculative=method)
    assert out.tokens == expected


# ---------------------------------------------------------------------------------------------
# Perfect drafts: the target itself (as a draft model, or with no layer skipped) drafts exactly
# what the target decodes, so every round emits num_tokens + 1 tokens until the row ends.

PERFECT_PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12], list(range(60, 76))]


@pytest.fixture(scope="module")
def perfect_reference(llama):
    return jaxdec.generate(llama, PERFECT_PROMPTS, max_new_tokens=33, stop_token_ids=[]).tokens


@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_perfect_draft_accepts_everything(llama, perfect_reference, method):
    K = 3
    make = {"draft_model": lambda: spec.DraftModel(llama, num_tokens=K),
            "layer_skip": lambda: spec.LayerSkip([], num_tokens=K)}[method]
    out = jaxdec.generate(llama, PERFECT_PROMPTS, max_new_tokens=33, stop_token_ids=[], speculative=make())
    assert out.tokens == perfect_reference
    # 32 tokens after prefill, K + 1 = 4 per round: 8 rounds for every row.
    assert out.stats.target_steps == 8
    assert out.stats.mean_accepted == K + 1

    # Stops cut rows short: row r then takes ceil((len_r - 1) / (K + 1)) rounds.
    stops = [perfect_reference[0][10], perfect_reference[1][3]]
    expected = [_truncate_at_stop(row, stops) for row in perfect_reference]
    out = jaxdec.generate(llama, PERFECT_PROMPTS, max_new_tokens=33, stop_token_ids=stops, speculative=make())
    assert out.tokens == expected
    rounds = [math.ceil((len(row) - 1) / (K + 1)) for row in expected]
    assert out.stats.target_steps == max(rounds)
    assert out.stats.mean_accepted == pytest.approx(sum(len(row) - 1 for row in expected) / sum(rounds), rel=1e-12)

    # Sampling: p and q are the same distribution (up to float32 rounding between the draft's
    # and the verifier's forward shapes), so a rejection is a rare rounding event.
    out = jaxdec.generate(llama, PERFECT_PROMPTS, max_new_tokens=33, temperature=1.0, top_k=20, seed=5,
                          stop_token_ids=[], speculative=make())
    assert [len(t) for t in out.tokens] == [33] * 3
    assert out.stats.mean_accepted >= 0.97 * (K + 1), out.stats


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_tree_of_single_children_is_the_chain(llama, noisy_draft, temperature):
    """DraftTree with top_k=1, or a static tree of rank-0 children, grows one chain of `depth` draft argmaxes through the tree code
    (tree drafting, ancestor masks, multi-draft acceptance, path gathering): its rounds are the
    chain drafter's greedy rounds. Sampled, both stay lossless but draw differently."""
    prompts = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12], list(range(60, 76))]
    chain = jaxdec.generate(llama, prompts, max_new_tokens=30, stop_token_ids=[], temperature=temperature,
                            speculative=spec.DraftModel(noisy_draft, num_tokens=4))
    for method in (spec.DraftTree(noisy_draft, depth=4, top_k=1, max_nodes=4),
                   spec.StaticTree(noisy_draft, [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)])):
        tree = jaxdec.generate(llama, prompts, max_new_tokens=30, stop_token_ids=[], temperature=temperature,
                               speculative=method)
        if temperature == 0:
            assert tree.tokens == chain.tokens
            assert (tree.stats.target_steps, tree.stats.mean_accepted) == (chain.stats.target_steps,
                                                                           chain.stats.mean_accepted)
            assert 1 < tree.stats.mean_accepted < 5
        else:
            assert [len(t) for t in tree.tokens] == [30] * 3


def test_rounds_and_stats_counted_by_streaming(llama, noisy_draft):
    """With on_progress every dispatch is one round, so the snapshots count the rounds and
    each row's active rounds; target_steps and mean_accepted must agree with them."""
    K = 3
    prompts = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12], list(range(60, 76))]
    plain = jaxdec.generate(llama, prompts, max_new_tokens=30, stop_token_ids=[]).tokens
    stops = [plain[1][12]]
    for kwargs in (dict(), dict(temperature=0.8, seed=4)):
        snapshots = []
        out = jaxdec.generate(llama, prompts, max_new_tokens=30, stop_token_ids=stops,
                              speculative=spec.DraftModel(noisy_draft, num_tokens=K),
                              on_progress=lambda tokens: snapshots.append([len(t) for t in tokens]), **kwargs)
        final = [len(t) for t in out.tokens]
        assert snapshots[0] == [1, 1, 1] and snapshots[-1] == final
        rounds = len(snapshots) - 1
        assert out.stats.target_steps == rounds
        active = 0
        for before, after in zip(snapshots, snapshots[1:]):
            for r in range(len(prompts)):
                if before[r] < final[r]:  # still active: it emits 1..K+1 tokens this round
                    active += 1
                    assert 1 <= after[r] - before[r] <= K + 1
                else:
                    assert after[r] == before[r]
        assert out.stats.mean_accepted == pytest.approx((sum(final) - len(prompts)) / active, rel=1e-12)
        assert 1 < out.stats.mean_accepted < K + 1, "the noisy draft accepts some tokens, not all"
        if not kwargs:
            assert out.tokens == [_truncate_at_stop(row, stops) for row in plain]
        # The non-streaming call draws the same random numbers: row keys follow the row's length.
        whole = jaxdec.generate(llama, prompts, max_new_tokens=30, stop_token_ids=stops,
                                speculative=spec.DraftModel(noisy_draft, num_tokens=K), **kwargs)
        assert whole.tokens == out.tokens


# ---------------------------------------------------------------------------------------------
# Prompt lookup


def lookup_reference(row, max_ngram, num_tokens):
    """The draft of Hugging Face's prompt lookup for a row ending with its pending token: for
    n = max_ngram down to 1, the earliest earlier occurrence of the last n tokens that has a
    continuation wins; up to num_tokens known tokens follow it."""
    L = len(row)
    for n in range(min(max_ngram, L), 0, -1):
        for j in range(L - n):
            if row[j:j + n] == row[L - n:]:
                return row[j + n:j + n + num_tokens]
    return []


def _lookup_draft(llama, rows, num_slots, method):
    """The method's draft for rows of token ids (each ending with its pending token)."""
    B = len(rows)
    tokens = np.full((B, num_slots), 5, np.int32)  # stale ids past each row's length must be ignored
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
    state = DecodeState(tokens=jnp.asarray(tokens), lengths=lengths, prompt_lengths=jnp.minimum(lengths, 3),
                        done=jnp.zeros(B, bool), keys=jax.random.split(jax.random.key(0), B),
                        target_steps=jnp.int32(0), active_row_steps=jnp.int32(0))
    drafter, _, _ = method.build(llama, B, num_slots)
    draft, _, _ = drafter.propose(llama.config, None, None, None, None, state, None, None)
    return draft


@pytest.mark.parametrize("max_ngram, num_tokens", [(3, 4), (1, 2), (2, 8), (40, 3), (10**12, 2)])
def test_prompt_lookup_drafts_match_reference(llama, max_ngram, num_tokens):
    B, S = 64, 32
    rng = np.random.default_rng(max_ngram)
    rows = []
    for b in range(B):
        alphabet = [2, 4, 12, VOCAB_SIZE][b % 4]  # small alphabets repeat; the full one rarely does
        rows.append(rng.integers(0, alphabet, size=rng.integers(1, S + 1)).tolist())
    rows[0], rows[1], rows[2] = [7], [7, 7], list(range(S))  # too short to match; no repeat at all
    rows[3], rows[4] = [7] * S, [1, 2] * (S // 2)  # matches of every length up to S - 1 and S - 2
    draft = _lookup_draft(llama, rows, S, spec.PromptLookup(max_ngram=max_ngram, num_tokens=num_tokens))
    draft_tokens, draft_lengths = np.asarray(draft.tokens), np.asarray(draft.lengths)
    probs = np.asarray(draft.probs)
    fired = 0
    for b, row in enumerate(rows):
        want = lookup_reference(row, max_ngram, num_tokens)
        assert draft_lengths[b] == len(want), (b, row)
        assert draft_tokens[b, :len(want)].tolist() == want, (b, row)
        # A point mass on each drafted token.
        np.testing.assert_array_equal(probs[b, :len(want)], np.eye(VOCAB_SIZE)[want].reshape(-1, VOCAB_SIZE))
        fired += bool(want)
    assert 0 < fired < B


def lookup_candidates(row, max_ngram, num_tokens, num_candidates):
    """The continuations after the earliest num_candidates matches of the longest matching
    n-gram (n <= max_ngram), as lookup_reference picks the first."""
    L = len(row)
    for n in range(min(max_ngram, L), 0, -1):
        found = [row[j + n:j + n + num_tokens] for j in range(L - n) if row[j:j + n] == row[L - n:]]
        if found:
            return found[:num_candidates]
    return []


def _paths(tokens, parents, count):
    """Each node's token path from the root's child down to it."""
    paths = []
    for i in range(count):
        assert parents[i] < i, "nodes in topological order"
        paths.append((paths[parents[i]] if parents[i] >= 0 else ()) + (int(tokens[i]),))
    return paths


@pytest.mark.parametrize("max_ngram, num_tokens, num_candidates", [(2, 3, 3), (1, 4, 4), (3, 2, 2), (1, 2, 40)])
def test_prompt_lookup_tree_merges_the_matches(llama, max_ngram, num_tokens, num_candidates):
    """The tree's nodes are exactly the distinct prefixes of the candidate continuations,
    each once, with the right parents; padding past the count. (1, 2, 40): more candidates
    than the rows have tokens (32), so every match is one."""
    B, S = 64, 32
    rng = np.random.default_rng(10 + max_ngram)
    rows = [rng.integers(0, [2, 3, 5, VOCAB_SIZE][b % 4], size=rng.integers(1, S + 1)).tolist() for b in range(B)]
    rows[0] = [9, 1, 2, 3, 7, 1, 2, 4, 8, 1, 2, 3, 6, 1, 2]  # three matches of (1, 2); two start with 3
    method = spec.PromptLookup(max_ngram=max_ngram, num_tokens=num_tokens, num_candidates=num_candidates)
    draft = _lookup_draft(llama, rows, S, method)
    draft_tokens, parents, count = map(np.asarray, (draft.tokens, draft.parents, draft.lengths))
    merged = 0
    for b, row in enumerate(rows):
        candidates = lookup_candidates(row, max_ngram, num_tokens, num_candidates)
        want = []
        for cand in candidates:
            for d in range(1, len(cand) + 1):
                if tuple(cand[:d]) not in want:
                    want.append(tuple(cand[:d]))
        got = _paths(draft_tokens[b], parents[b], count[b])
        assert got == want, (b, row)
        assert (parents[b, count[b]:] == -1).all()
        np.testing.assert_array_equal(np.asarray(draft.probs)[b, :count[b]], np.eye(VOCAB_SIZE)[draft_tokens[b, :count[b]]])
        merged += sum(len(c) for c in candidates) > len(want)
    assert merged > 0, "some rows shared prefixes between matches"
    if max_ngram == 2 and num_tokens == 3:
        assert draft_tokens[0, :count[0]].tolist() == [3, 7, 1, 4, 8, 1, 6, 1]
        assert parents[0, :count[0]].tolist() == [-1, 0, 1, -1, 3, 4, 0, 6]


def test_prompt_lookup_fires_on_repetitive_prompts(llama):
    prompts = [[10, 20, 30, 40] * 4, [7, 8, 9] * 5, [50, 51] * 8]
    plain = jaxdec.generate(llama, prompts, max_new_tokens=24, stop_token_ids=[])
    out = jaxdec.generate(llama, prompts, max_new_tokens=24, stop_token_ids=[],
                          speculative=spec.PromptLookup(max_ngram=3, num_tokens=8))
    assert out.tokens == plain.tokens
    # A random model seldom continues the pattern, but some drafts are accepted.
    assert out.stats.mean_accepted > 1.0, out.stats


def test_prompt_lookup_without_matches_is_plain_decoding(llama):
    """Rows whose prompt and output never repeat an id: no draft, one token per round."""
    rng = np.random.default_rng(7)
    candidates = [rng.choice(VOCAB_SIZE, size=12, replace=False).tolist() for _ in range(8)]
    plain = jaxdec.generate(llama, candidates, max_new_tokens=4, stop_token_ids=[]).tokens
    # Pending states are prompt + the first m output tokens, m = 1..3.
    quiet = [(p, t) for p, t in zip(candidates, plain)
             if not any(lookup_reference(p + t[:m], 3, 8) for m in range(1, 4))]
    assert len(quiet) >= 3, "test setup: too few candidate prompts without matches"
    prompts, expected = [p for p, _ in quiet[:4]], [t for _, t in quiet[:4]]
    out = jaxdec.generate(llama, prompts, max_new_tokens=4, stop_token_ids=[],
                          speculative=spec.PromptLookup(max_ngram=3, num_tokens=8))
    assert out.tokens == expected
    assert out.stats.mean_accepted == 1.0 and out.stats.target_steps == 3


# ---------------------------------------------------------------------------------------------
# Commit: the cache after speculative rounds is the cache plain decoding leaves


ROUND_PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12], list(range(60, 76)), [3]]


def run_rounds(target, method, temperature, num_rounds=4):
    """Prefill and `num_rounds` speculative rounds over ROUND_PROMPTS (ragged, 64 cache slots),
    called step by step: (state, cache, drafter state, prompt lengths). Fails unless some row
    accepted a draft (when any round ran)."""
    from jaxdec import speculative as spec_steps
    from jaxdec.cache import init_cache
    from jaxdec.sampling import SamplingParams, row_keys

    B, S = len(ROUND_PROMPTS), 64
    tokens = np.zeros((B, S), np.int32)
    for b, p in enumerate(ROUND_PROMPTS):
        tokens[b, :len(p)] = p
    prompt_lengths = np.array([len(p) for p in ROUND_PROMPTS], np.int32)
    sampling = SamplingParams.create(temperature)
    stop_ids, max_new = np.full((16,), -1, np.int32), np.int32(40)
    cfg = target.config
    drafter, dparams, dstate = method.build(target, B, S)
    cache = init_cache(cfg, B, S, jnp.float32)
    state, cache, dstate = spec_steps.prefill(cfg, drafter, target.params, dparams, cache, dstate, tokens,
                                              prompt_lengths, np.ones(B, bool), sampling, row_keys(0, B), stop_ids,
                                              max_new, prompt_bucket=16)
    state, cache, dstate = spec_steps.speculative_decode(cfg, drafter, target.params, dparams, cache, dstate, state,
                                                         sampling, stop_ids, max_new, num_rounds=num_rounds)
    # Prefill emits one token and each round at least one: more means some row accepted drafts.
    assert num_rounds == 0 or (np.asarray(state.lengths) - prompt_lengths > 1 + num_rounds).any(), \
        "no row accepted a draft"
    return state, cache, dstate, prompt_lengths


@pytest.mark.parametrize("make", [
    lambda draft: spec.DraftTree(draft, depth=3, top_k=2, max_nodes=6),
    lambda draft: spec.DraftTree(draft, depth=4, top_k=3, max_nodes=12),
    lambda draft: spec.DraftModel(draft, num_tokens=3),
    lambda draft: spec.StaticTree(draft, [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]),
    lambda draft: spec.SparseSelf(budget=16, num_tokens=4, page_size=4, draft=draft, draft_tokens=2),
], ids=["tree-3x2", "tree-4x3", "chain", "static", "triforce"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_commit_leaves_the_cache_of_plain_decoding(llama, noisy_draft, make, temperature):
    """After a few rounds every valid slot of the target's cache holds what a plain forward
    over the emitted tokens computes there (a tree's accepted path was gathered into place),
    and the draft's cache does too below the two tokens it re-reads each round (a tree
    drafter moves the accepted path's entries to their positions after each round)."""
    _check_caches_after_rounds(llama, noisy_draft, make(noisy_draft), temperature)


def test_triforce_keeps_the_draft_cache_when_every_guess_is_accepted(llama):
    """TriForce with a perfect draft and a budget of the whole cache: each inner round accepts
    all draft_tokens guesses and adds a bonus token, after a last guess the draft model never
    read. With num_tokens a multiple of draft_tokens + 1, an inner loop that stopped once the
    chain held num_tokens (not num_tokens + 1) would leave that guess's slot unwritten below
    where the next round, all accepted, trusts the draft cache."""
    method = spec.SparseSelf(budget=64, num_tokens=3, page_size=4, draft=llama, draft_tokens=2)
    _check_caches_after_rounds(llama, llama, method, 0.0)


def _check_caches_after_rounds(llama, draft_model, method, temperature):
    state, cache, dstate, _ = run_rounds(llama, method, temperature)
    assert_cache_rows_equal(cache, plain_forward(llama, state.tokens)[1], np.asarray(cache.lengths))
    assert_cache_rows_equal(dstate.cache, plain_forward(draft_model, state.tokens)[1], np.asarray(state.lengths) - 2)


def plain_forward(model, tokens, num_slots=None):
    """One causal forward of `model` over whole rows `tokens` [B, T] into an empty cache of
    `num_slots` (default T) slots, no speculation: (hidden states [B, T, D], the cache plain
    decoding would hold, its lengths left at 0)."""
    from jaxdec.cache import init_cache
    from jaxdec.model import causal_mask, forward_hidden
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return forward_hidden(model.config, model.params, jnp.asarray(tokens), positions,
                          init_cache(model.config, B, num_slots or T, jnp.float32), causal_mask(B, T), read_cache=False)


def assert_cache_rows_equal(got, want, valid):
    """Every layer's keys and values agree in each row b's first valid[b] slots."""
    for layer in range(len(got.k)):
        for b, n in enumerate(valid):
            for name, g, w in (("k", got.k[layer], want.k[layer]), ("v", got.v[layer], want.v[layer])):
                np.testing.assert_allclose(np.asarray(g[b, :, :n]), np.asarray(w[b, :, :n]),
                                           atol=2e-5, err_msg=f"{name} layer {layer} row {b}")


def test_float32_models_run_float32_products(llama, converted_dirs, monkeypatch):
    """The lossless guarantee is for float32 weights, so generate() and logits() trace a float32
    model's products at 'highest' precision (JAX's default is TF32 / a bfloat16 pass on
    accelerators); a bfloat16 model and a precision the user set are left alone."""
    from jaxdec import steps
    seen = []
    record = lambda _tokens: seen.append(jax.config.jax_default_matmul_precision)
    score = steps.score
    monkeypatch.setattr(steps, "score", lambda *a, **k: record(None) or score(*a, **k))
    bf16 = jaxdec.load(converted_dirs["llama"], dtype="bfloat16")
    for model, user, want in ((llama, None, "highest"), (llama, "bfloat16", "bfloat16"), (bf16, None, None)):
        seen.clear()
        with jax.default_matmul_precision(user):
            jaxdec.generate(model, [[5, 6, 7]], max_new_tokens=2, speculative=spec.PromptLookup(), on_progress=record)
            jaxdec.logits(model, [5, 6, 7])
        assert seen and set(seen) == {want}, (model.dtype, user, seen)
    assert jax.config.jax_default_matmul_precision is None  # and nothing stays set


# ---------------------------------------------------------------------------------------------
# No recompilation in steady state


def test_steady_state_speculative_compiles_nothing(llama, noisy_draft):
    methods = [spec.DraftModel(noisy_draft, num_tokens=3), spec.LayerSkip([0], num_tokens=2),
               spec.PromptLookup(max_ngram=3, num_tokens=8), spec.DraftTree(noisy_draft, depth=3, top_k=2, max_nodes=6),
               spec.StaticTree(noisy_draft, [(0,), (1,), (0, 0)])]
    for method in methods:  # warm-up: compiles, unless an earlier test already did
        jaxdec.generate(llama, [[5, 6, 7], [8] * 9, [1, 2]], max_new_tokens=20, stop_token_ids=[],
                        speculative=method)

    # Same buckets (batch 4, prompt 16, cache 64); contents, seed, sampling, stops and even
    # the draft's weights differ.
    other_weights = model_from_params(noisy_draft.config, jax.tree_util.tree_map(lambda x: 0.9 * x, noisy_draft.params))
    methods[0] = spec.DraftModel(other_weights, num_tokens=3)
    methods[3] = spec.DraftTree(other_weights, depth=3, top_k=2, max_nodes=6)
    methods[4] = spec.StaticTree(other_weights, [(0,), (1,), (0, 0)])
    with compilations() as steady:
        for i, method in enumerate(methods):
            out = jaxdec.generate(llama, [[9] * 16, [3, 99], [40, 41, 40, 41], [7]], max_new_tokens=40,
                                  temperature=0.9, top_k=10, top_p=0.8, seed=11 + i, stop_token_ids=[5, 9, 77],
                                  speculative=method)
            assert all(1 <= len(t) <= 40 for t in out.tokens)
            out = jaxdec.generate(llama, [[12, 13], [14] * 5, [15]], max_new_tokens=17, stop_token_ids=None,
                                  speculative=method)
            assert all(1 <= len(t) <= 17 for t in out.tokens)
    assert steady == [], steady


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the offending value


def _named(value) -> str:
    """A `match` pattern for the value as the message spells it (repr or str)."""
    return f"({re.escape(repr(value))}|{re.escape(str(value))})"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None])
@pytest.mark.parametrize("make", [
    lambda n, draft: spec.DraftModel(draft, num_tokens=n),
    lambda n, draft: spec.LayerSkip([0], num_tokens=n),
    lambda n, draft: spec.PromptLookup(num_tokens=n),
], ids=["DraftModel", "LayerSkip", "PromptLookup"])
def test_num_tokens_must_be_a_positive_integer(llama, make, bad):
    with pytest.raises(ValueError, match=rf"num_tokens.*{_named(bad)}"):
        make(bad, llama)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "3"])
def test_max_ngram_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=rf"max_ngram.*{_named(bad)}"):
        spec.PromptLookup(max_ngram=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0, False, "2"])
def test_num_candidates_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=rf"num_candidates.*{_named(bad)}"):
        spec.PromptLookup(num_candidates=bad)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(depth=0), r"depth.*\b0\b"), (dict(top_k=-1), r"top_k.*-1"), (dict(max_nodes=2.5), r"max_nodes.*2\.5"),
    (dict(depth=True), r"depth.*True"),
    (dict(top_k=VOCAB_SIZE + 1, max_nodes=4), rf"top_k={VOCAB_SIZE + 1}.*vocabulary"),
])
def test_bad_draft_tree_options(llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        spec.DraftTree(llama, **kwargs)


def test_the_whole_vocabulary_is_a_tree_width_and_its_last_rank_a_node(llama):
    """The bounds are the vocabulary itself: top_k = vocab_size children, rank vocab_size - 1."""
    assert spec.DraftTree(llama, depth=1, top_k=VOCAB_SIZE, max_nodes=4).top_k == VOCAB_SIZE
    assert spec.StaticTree(llama, [(0,), (VOCAB_SIZE - 1,)]).paths == ((0,), (VOCAB_SIZE - 1,))


@pytest.mark.parametrize("paths, pattern", [
    ([], r"paths must be non-empty"), ([()], r"non-empty"), ([(0,), (-1,)], r"ranks >= 0"),
    ([(0,), (0, 1, 0)], r"path \(0, 1\) is missing"), ("abc", r"paths must be a list of tuples.*abc"),
    ([(0,), (VOCAB_SIZE,)], rf"rank {VOCAB_SIZE}.*vocabulary"),
    ([(0,), (1.5,)], r"tuples of child ranks.*1\.5"), ([(0,), ("1",)], r"tuples of child ranks.*'1'"),
    ([(True,)], r"tuples of child ranks.*True"), ([0, 1], r"tuples of child ranks.*\[0, 1\]"),
    ([(0,), (1,), (0, 0), [1]], r"path \(1,\) is listed twice"),
])
def test_bad_static_tree_paths(llama, paths, pattern):
    with pytest.raises(ValueError, match=pattern):
        spec.StaticTree(llama, paths)


@pytest.mark.parametrize("method", [spec.DraftModel, spec.DraftTree, lambda d: spec.StaticTree(d, [(0,)])])
@pytest.mark.parametrize("vocab", [8, VOCAB_SIZE + 1])
def test_draft_vocabulary_must_match_target(llama, vocab, method):
    cfg = dataclasses.replace(llama.config, vocab_size=vocab)
    D = cfg.hidden_size
    params = {**llama.params, "embed_tokens": {"embedding": np.zeros((vocab, D), np.float32)},
              "lm_head": {"kernel": np.zeros((D, vocab), np.float32)}}
    draft = model_from_params(cfg, params)
    with pytest.raises(ValueError, match=rf"vocab.*\b{vocab}\b.*\b{VOCAB_SIZE}\b"):
        jaxdec.generate(llama, [[1, 2, 3]], max_new_tokens=4, speculative=method(draft))


@pytest.mark.parametrize("method", [spec.DraftModel, spec.Pearl, spec.DraftTree, lambda d: spec.StaticTree(d, [(0,)]),
                                    lambda d: spec.SparseSelf(budget=16, page_size=4, draft=d)])
def test_draft_model_must_have_room_for_the_call(llama, method):
    """A call's positions must fit the draft's context as they fit the target's (where they
    do, it runs: the test below)."""
    draft = model_from_params(dataclasses.replace(llama.config, max_position_embeddings=64), llama.params)
    with pytest.raises(ValueError, match=r"prompt of 60 tokens plus max_new_tokens=5 exceeds the draft model's "
                                         r"max_position_embeddings=64"):
        jaxdec.generate(llama, [[1] * 60], max_new_tokens=5, speculative=method(draft))


def test_a_draft_of_fewer_positions_runs_where_the_call_fits(llama):
    """60 positions in a cache of 64 slots; and 90 in the target's 128 slots, past the draft's
    context of 100 (its cache has the target's slots)."""
    for context, prompt_length, new_tokens in ((64, 32, 28), (100, 40, 50)):
        draft = model_from_params(dataclasses.replace(llama.config, max_position_embeddings=context), llama.params)
        prompt = [[5, 9, 2, 7] * (prompt_length // 4)]
        out = jaxdec.generate(llama, prompt, max_new_tokens=new_tokens, stop_token_ids=[],
                              speculative=spec.DraftModel(draft))
        assert out.tokens == jaxdec.generate(llama, prompt, max_new_tokens=new_tokens, stop_token_ids=[]).tokens


def test_layer_skip_drafts_what_the_model_without_the_layer_drafts(llama):
    """A skipped layer is left out of the draft: LayerSkip([1]) accepts, round by round, what
    a separate draft model accepts whose layer 1 adds nothing to the residual stream (zero
    output projections), and less than the target itself would (layer 1 matters)."""
    import copy
    zeroed = copy.deepcopy(jax.device_get(llama.params))
    for block, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        zeroed["layers_1"][block][name] = {k: np.zeros_like(v) for k, v in zeroed["layers_1"][block][name].items()}
    without = model_from_params(llama.config, zeroed)
    run = lambda method: jaxdec.generate(llama, ROUND_PROMPTS, max_new_tokens=24, stop_token_ids=[], speculative=method)
    skipping, drafting = run(spec.LayerSkip([1], num_tokens=3)), run(spec.DraftModel(without, num_tokens=3))
    assert skipping.tokens == drafting.tokens
    counts = lambda stats: (stats.target_steps, stats.active_row_steps, stats.mean_accepted)
    assert counts(skipping.stats) == counts(drafting.stats) and 1 < skipping.stats.mean_accepted < 4


@pytest.mark.parametrize("layers, bad", [([2], 2), ([0, 7], 7), ([-1], -1), ([1, -3], -3)])
def test_skipped_layer_out_of_range(llama, layers, bad):
    assert llama.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(str(bad))}\b.*range"):
        jaxdec.generate(llama, [[1, 2, 3]], max_new_tokens=4, speculative=spec.LayerSkip(layers))


def test_skipping_every_layer_is_refused(llama):
    with pytest.raises(ValueError, match=r"skip_layers=\[0, 1\].*all 2 layers"):
        jaxdec.generate(llama, [[1, 2, 3]], max_new_tokens=4, speculative=spec.LayerSkip([1, 0]))


@pytest.mark.parametrize("bad", [3, 1.5, None, "0,1", [0.5], [True]])
def test_skip_layers_must_be_indices(bad):
    with pytest.raises(ValueError, match=rf"skip_layers.*{_named(bad)}"):
        spec.LayerSkip(bad)


@pytest.mark.parametrize("bad", ["draft", object(), spec.PromptLookup, 4, {"num_tokens": 4}])
def test_unknown_speculative_object(llama, bad):
    with pytest.raises(ValueError, match=rf"speculative.*{re.escape(repr(bad)[:40])}"):
        jaxdec.generate(llama, [[1, 2, 3]], max_new_tokens=4, speculative=bad)


@pytest.mark.parametrize("method", [spec.DraftModel, spec.DraftTree, lambda m: spec.StaticTree(m, [(0,)])])
@pytest.mark.parametrize("bad", ["demo-draft", None, 3])
def test_draft_model_needs_a_model(bad, method):
    with pytest.raises(ValueError, match=_named(bad)):
        method(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_confidence_threshold_range(llama, bad):
    with pytest.raises(ValueError, match=rf"confidence_threshold.*{_named(bad)}"):
        spec.DraftModel(llama, confidence_threshold=bad)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_adaptive_schedule_must_be_a_bool(llama, bad):
    with pytest.raises(ValueError, match=rf"adaptive_schedule.*{_named(bad)}"):
        spec.DraftModel(llama, adaptive_schedule=bad)


def test_draft_lengths_follow_the_cap_and_the_confidence_threshold(llama):
    """draft_chain's adaptive lengths: row b drafts min(max_lengths[b], K) tokens, each a prefix
    of the uncapped row's draft; with a confidence threshold a row stops after its first token
    whose top draft probability is below it (1.0: after the first token, always)."""
    cfg, B, K = llama.config, 4, 4
    first = jnp.full((B, 1), 3, jnp.int32)                     # every row drafts after the same token
    run = jax.jit(draft_chain, static_argnames=("cfg", "num_tokens", "confidence_threshold"))

    def lengths_and_tokens(max_lengths, confidence_threshold=0.0):
        draft, _ = run(cfg=cfg, params=llama.params, cache=init_cache(cfg, B, 16, llama.dtype), first_tokens=first,
                       first_positions=jnp.zeros((B, 1), jnp.int32), num_tokens=K,
                       sampling=SamplingParams.create(0.0), keys=row_keys(0, B), max_lengths=jnp.asarray(max_lengths),
                       confidence_threshold=confidence_threshold)
        return np.asarray(draft.lengths).tolist(), np.asarray(draft.tokens)

    lengths, tokens = lengths_and_tokens([0, 1, 2, 9])
    assert lengths == [0, 1, 2, K]
    for b in range(3):
        np.testing.assert_array_equal(tokens[b, :lengths[b]], tokens[3, :lengths[b]])
    assert lengths_and_tokens([K] * B, confidence_threshold=1.0)[0] == [1] * B


def test_adaptive_schedule_grows_by_two_after_a_full_accept_else_shrinks_by_one(llama):
    """Hugging Face's schedule, per row and within [1, num_tokens]."""
    drafter, _, dstate = spec.DraftModel(llama, num_tokens=5, adaptive_schedule=True).build(llama, 4, 64)
    dstate = dstate.replace(num_tokens=jnp.asarray([1, 4, 3, 5], jnp.int32))
    lengths = jnp.asarray([1, 4, 3, 5], jnp.int32)
    draft = Draft(tokens=jnp.zeros((4, 5), jnp.int32), probs=jnp.zeros((4, 5, 1)), lengths=lengths)
    accepted = jnp.asarray([1, 4, 0, 2], jnp.int32)               # full, full, none, some
    after = drafter.update(dstate, draft, accepted, None, None, None)
    assert np.asarray(after.num_tokens).tolist() == [3, 5, 2, 4]
    fixed, _, _ = spec.DraftModel(llama, num_tokens=5).build(llama, 4, 64)
    assert fixed.update(dstate, draft, accepted, None, None, None) is dstate
