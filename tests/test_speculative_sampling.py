"""Speculative decoding, sampling side: the acceptance rule alone, then the exact output
distribution of every method through jaxdec.generate.

The rule (DESIGN.md, "Exact rules"): draft token x ~ q is accepted with probability
min(1, p(x)/q(x)); at the first rejection the row emits a draw of normalise(max(0, p - q));
after k accepted tokens it emits a bonus draw of p. Every emitted token is then distributed
exactly as p. The references here are exact (float64 numpy over the enumerated outcomes); the
library's draws are compared with them by chi-square tests at fixed seeds, and every test also
shows that the same draws reject a distribution a broken rule would produce (power).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxdec
from jaxdec import spec
from jaxdec.model import sequence_logits
from jaxdec.sampling import SamplingParams, probabilities
from jaxdec.verify import Draft, _accept_sampled_chain, accept

from tests.hf_models import TINY_VOCAB_SIZE
from tests.test_heads import random_heads
from tests.test_sampling import reference
from tests.test_speculative import _longest_draft

P_VALUE = 1e-3  # chi-square threshold; the seeds are fixed, so every run draws the same samples

# A donation XLA cannot use is a bug (DESIGN.md): whichever test compiles a program fails on it.
pytestmark = pytest.mark.filterwarnings("error:Some donated buffers were not usable")


def check_fit(counts, probs, label):
    """Nothing drawn outside the support, and a chi-square fit on it (cells expecting fewer
    than 5 draws are pooled into one)."""
    counts, probs = np.ravel(counts).astype(np.float64), np.ravel(probs).astype(np.float64)
    probs = probs / probs.sum()  # float32 distributions sum to 1 only within rounding
    support = probs > 0
    assert counts[~support].sum() == 0, f"{label}: drew impossible outcomes {np.flatnonzero(counts * ~support)}"
    expected = counts.sum() * probs
    big = expected >= 5
    observed, wanted = list(counts[big]), list(expected[big])
    if (support & ~big).any():
        observed.append(counts[support & ~big].sum())
        wanted.append(expected[support & ~big].sum())
    assert len(observed) >= 2, f"{label}: test setup, nothing to compare"
    pvalue = stats.chisquare(observed, wanted).pvalue
    assert pvalue > P_VALUE, f"{label}: draws do not follow the distribution (p={pvalue:.2e})"


def rejects(counts, probs) -> bool:
    """Whether the draws refute `probs`: an impossible outcome, or chi-square p < P_VALUE."""
    try:
        check_fit(counts, probs, "power")
    except AssertionError:
        return True
    return False


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The acceptance function alone

V = 6          # vocabulary of the synthetic distributions
N = 20_000     # rows per accept call: every row has its own keys
_accept = jax.jit(accept)
_probabilities = jax.jit(probabilities)


def run_accept(logits, tokens, probs, lengths, sampling, seed):
    """accept() for N rows sharing target logits [K+1, V] and draft probs [K, V] (or per-row
    [N, ...]); tokens [N, K]. Returns (num_accepted [N], next_token [N]) as numpy."""
    n, K = tokens.shape
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, K + 1, V))
    probs = jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (n, K, V))
    draft = Draft(tokens=jnp.asarray(tokens, jnp.int32), probs=probs,
                  lengths=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (n,)))
    keys = jax.random.split(jax.random.key(seed), 2 * n)
    num_accepted, next_token, path = _accept(logits, draft, sampling, keys[:n], keys[n:])
    np.testing.assert_array_equal(np.asarray(path), np.broadcast_to(np.arange(K), (n, K)))  # a chain's path
    return np.asarray(num_accepted), np.asarray(next_token)


def emitted_tokens(tokens, num_accepted, next_token):
    """Each row's emitted tokens: its accepted drafts, then the next token."""
    return [list(t[:n]) + [nxt] for t, n, nxt in zip(tokens, num_accepted, next_token)]


def rule_joint(p, q):
    """Exact distribution of (accepted?, emitted token) for one draft token x ~ q: [2, V],
    row 0 accepted (x emitted), row 1 rejected (a residual draw emitted)."""
    accepted = np.minimum(p, q)                      # q(x) * min(1, p(x) / q(x))
    residual = np.maximum(p - q, 0.0)
    reject = 1.0 - accepted.sum()
    rejected = reject * residual / residual.sum() if residual.sum() > 0 else np.zeros_like(p)
    return np.stack([accepted, rejected])


def _one_token_case(name, rng):
    """(target logits [V], processed p, draft q, sampling kwargs)."""
    logits = rng.normal(0.0, 1.5, V)
    if name == "filtered":
        # Target keeps 3 tokens at temperature 0.7; q has full support, so some drafts are
        # outside p's support and must always be rejected.
        kwargs = dict(temperature=0.7, top_k=3)
        p, margin = reference(logits, **kwargs)
        assert margin > 1e-3
        return logits, p, rng.dirichlet(np.ones(V)), kwargs
    p = _softmax(logits)
    if name == "point-mass":
        # A deterministic draft (prompt lookup): q is a point mass on the second likeliest token.
        return logits, p, np.eye(V)[np.argsort(p)[-2]], dict(temperature=1.0)
    return logits, p, rng.dirichlet(np.ones(V)), dict(temperature=1.0)


@pytest.mark.parametrize("case", ["random-0", "random-1", "filtered", "point-mass"])
def test_one_token_draft_emits_p(case):
    rng = np.random.default_rng(["random-0", "random-1", "filtered", "point-mass"].index(case))
    logits, p, q, kwargs = _one_token_case(case, rng)
    # Exact: the rule's output distribution is p.
    joint = rule_joint(p, q)
    np.testing.assert_allclose(joint.sum(axis=0), p, rtol=0, atol=1e-12)

    x = rng.choice(V, size=N, p=q)
    num_accepted, next_token = run_accept([logits, logits], x[:, None], q[None], 1,
                                          SamplingParams.create(**kwargs), seed=1)
    assert set(np.unique(num_accepted)) <= {0, 1}
    first = np.where(num_accepted == 1, x, next_token)
    counts = np.stack([np.bincount(first[num_accepted == 1], minlength=V),
                       np.bincount(first[num_accepted == 0], minlength=V)])
    # The library's (accepted?, token) draws follow the rule's exact joint distribution ...
    check_fit(counts, joint, f"{case}: (accepted, token)")
    # ... so the emitted token follows p.
    check_fit(counts.sum(axis=0), p, f"{case}: emitted token")
    # Power: the same draws refute "always accept" (the emitted token ~ q) and "after a
    # rejection sample from p instead of the residual".
    assert rejects(counts.sum(axis=0), q)
    assert rejects(counts, np.stack([joint[0], (1 - joint[0].sum()) * p]))


def _chain_case(name, rng, K=3):
    """(target logits [K+1, V], draft probs [K, V], draft tokens [N, K], lengths [N])."""
    logits = rng.normal(0.0, 1.5, (K + 1, V))
    p = _softmax(logits)
    if name == "point-mass":
        # Deterministic drafts: the same middle-likely tokens in every row.
        fixed = np.argsort(p[:K], axis=-1)[:, -2]
        return logits, np.eye(V)[fixed], np.broadcast_to(fixed, (N, K)), np.full(N, K)
    q = rng.dirichlet(np.ones(V), size=K)
    tokens = np.stack([rng.choice(V, size=N, p=q[i]) for i in range(K)], axis=1)
    lengths = np.full(N, K)
    if name == "ragged-lengths":
        lengths = rng.integers(0, K + 1, size=N)
        # Past a row's length, draft the token with the largest p/q: min(1, p/q) = 1 there, so
        # without the length mask it would surely be accepted.
        surely = np.argmax(p[:K] / q, axis=-1)
        tokens = np.where(np.arange(K)[None, :] < lengths[:, None], tokens, surely[None, :])
    return logits, q, tokens, lengths


@pytest.mark.parametrize("case", ["random", "point-mass", "ragged-lengths"])
def test_chain_emits_p_at_every_position(case):
    K = 3
    rng = np.random.default_rng(10 + ["random", "point-mass", "ragged-lengths"].index(case))
    logits, q, tokens, lengths = _chain_case(case, rng, K)
    p = _softmax(logits)
    num_accepted, next_token = run_accept(logits, tokens, q, lengths, SamplingParams.create(1.0), seed=2)
    assert (num_accepted <= lengths).all()
    emitted = emitted_tokens(tokens, num_accepted, next_token)

    # Exact acceptance counts: position i is accepted with probability sum(min(p_i, q_i)),
    # independently here (each position's p and q are fixed), and never past the length.
    accept_prob = np.minimum(p[:K], q).sum(axis=-1)
    for length in np.unique(lengths[lengths > 0]):  # length 0: checked below
        rows = lengths == length
        exact = np.array([np.prod(accept_prob[:j]) * (1 - accept_prob[j] if j < length else 1.0)
                          for j in range(length + 1)])
        check_fit(np.bincount(num_accepted[rows], minlength=length + 1), exact, f"{case}: length {length} counts")
    assert 0 < (num_accepted[lengths == K] == K).mean() < 1, "test setup: both outcomes must happen"

    # Given that the row got as far as position i, its token there follows p_i (the draft if
    # accepted, else the residual draw; at i = length, the bonus draw).
    for i in range(K + 1):
        at_i = [row[i] for row in emitted if len(row) > i]
        counts = np.bincount(at_i, minlength=V)
        check_fit(counts, p[i], f"{case}: position {i}")
        if i < K:  # power: "always accept" would emit q_i here
            assert rejects(counts, q[i]), f"{case}: no power at position {i}"
    if case == "ragged-lengths":
        # A row with nothing drafted is a plain draw from p at position 0.
        check_fit(np.bincount(next_token[lengths == 0], minlength=V), p[0], "length 0")
        assert (num_accepted[lengths == 0] == 0).all()


def test_greedy_accepts_the_longest_prefix_of_argmaxes():
    K, n = 4, 512
    rng = np.random.default_rng(20)
    logits = rng.normal(0.0, 2.0, (n, K + 1, V))
    argmax = logits.argmax(axis=-1)
    # Each draft token is the target's argmax with probability 0.7, else another token.
    tokens = np.where(rng.random((n, K)) < 0.7, argmax[:, :K], (argmax[:, :K] + rng.integers(1, V, (n, K))) % V)
    lengths = rng.integers(0, K + 1, size=n)
    q = np.eye(V)[tokens]  # a greedy draft's q is a point mass on its argmax
    num_accepted, next_token = run_accept(logits, tokens, q, lengths, SamplingParams.create(0.0), seed=3)
    for b in range(n):
        want = 0
        while want < lengths[b] and tokens[b, want] == argmax[b, want]:
            want += 1
        assert num_accepted[b] == want
        assert next_token[b] == argmax[b, want]
    assert len(set(num_accepted)) == K + 1
    # The greedy shortcut in accept() is the general rule with p one-hot: the general rule,
    # run on the same inputs, gives the same tokens.
    draft = Draft(tokens=jnp.asarray(tokens, jnp.int32), probs=jnp.asarray(q, jnp.float32),
                  lengths=jnp.asarray(lengths, jnp.int32))
    keys = jax.random.split(jax.random.key(3), 2 * n)
    general = jax.jit(_accept_sampled_chain)(jnp.asarray(logits, jnp.float32), draft, keys[:n], keys[n:],
                                             SamplingParams.create(0.0))
    np.testing.assert_array_equal(np.asarray(general[0]), num_accepted)
    np.testing.assert_array_equal(np.asarray(general[1]), next_token)


def test_draft_equal_to_target_is_always_accepted():
    """q == p (the draft is the target): u * q(x) < p(x) for every u < 1, whatever the keys."""
    K = 3
    rng = np.random.default_rng(30)
    logits = rng.normal(0.0, 1.5, (K + 1, V))
    sampling = SamplingParams.create(1.3, top_k=4, top_p=0.95)
    q = np.asarray(_probabilities(jnp.asarray(logits[:K], jnp.float32), sampling), np.float64)
    tokens = np.stack([rng.choice(V, size=N, p=q[i] / q[i].sum()) for i in range(K)], axis=1)
    num_accepted, next_token = run_accept(logits, tokens, q, K, sampling, seed=4)
    assert (num_accepted == K).all()
    check_fit(np.bincount(next_token, minlength=V), reference(logits[K], 1.3, 4, 0.95)[0], "bonus")


def test_draft_outside_target_support_is_never_accepted():
    rng = np.random.default_rng(40)
    logits = rng.normal(0.0, 1.5, (2, V))
    sampling = SamplingParams.create(1.0, top_k=2)
    outside = np.argsort(logits[0])[:V - 2]  # the tokens top-k drops
    x = rng.choice(outside, size=N)
    q = np.isin(np.arange(V), outside) / len(outside)  # uniform on them
    num_accepted, next_token = run_accept(logits, x[:, None], q[None], 1, sampling, seed=5)
    assert (num_accepted == 0).all()
    # q and p have disjoint supports, so the residual max(0, p - q) is p itself.
    p = reference(logits[0], top_k=2)[0]
    check_fit(np.bincount(next_token, minlength=V), p, "after rejection")


def test_a_rejection_that_leaves_no_residual_mass_emits_p():
    """Float32 rounding can leave a draft's q at or above p at every token (two nearly equal
    distributions); a rejection then leaves max(0, p - q) with no mass to normalise, and the
    row must still emit a draw of p (not of 0 / 0). q = 1.5 p stands in for such a q: every
    rejection (u >= 2/3) leaves no residual."""
    rng = np.random.default_rng(50)
    logits = rng.normal(0.0, 1.5, (2, V))
    p = _softmax(logits[0])
    x = rng.choice(V, size=N, p=p)
    num_accepted, next_token = run_accept(logits, x[:, None], 1.5 * p[None], 1, SamplingParams.create(1.0), seed=6)
    rejected = num_accepted == 0
    assert 0.3 < rejected.mean() < 0.37, rejected.mean()   # min(1, p / q) = 2/3
    check_fit(np.bincount(next_token[rejected], minlength=V), p, "after a rejection with no residual mass")


# ---------------------------------------------------------------------------------------------
# Exact output distributions through jaxdec.generate, on vocabulary-8 models: the joint
# distribution of the first 3 new tokens (512 outcomes) is enumerated exactly from the
# target's logits, and one generate call of 512 identical rows per seed draws it.

VOCAB = TINY_VOCAB_SIZE
PROMPT = [0, 1, 2, 3, 4, 5, 6, 7, 3, 4, 5]  # every id occurs and repeats: prompt lookup always drafts
ROWS = 512
SEEDS = range(12)  # 6144 draws


_sequence_logits = jax.jit(sequence_logits, static_argnames=("cfg", "skip_layers"))


def _prefix_logits(model, skip_layers=None, prompt=PROMPT):
    """logits [V, V, 3, V]: the next-token logits after prompt + [t1, t2] at the positions of
    t1, t2 and t3, for every t1, t2."""
    out = np.zeros((VOCAB, VOCAB, 3, VOCAB))
    seqs = np.array([prompt + [t1, t2] for t1 in range(VOCAB) for t2 in range(VOCAB)], np.int32)
    if skip_layers is None:
        rows = [jaxdec.logits(model, s.tolist()) for s in seqs]
    else:
        rows = np.asarray(_sequence_logits(model.config, model.params, jnp.asarray(seqs), skip_layers=skip_layers))
    for i, row in enumerate(rows):
        out[i // VOCAB, i % VOCAB] = np.asarray(row)[-3:]
    return out


def joint3(logits_per_token, sampling, exact=True):
    """P(t1, t2, t3) [V, V, V] where token j is drawn from the processed distribution of
    logits_per_token[j] ([V, V, 3, V] arrays, as _prefix_logits returns). exact: the result is
    the reference, so no top-p cut-off may be too close to call in float32."""
    joint = np.ones((VOCAB, VOCAB, VOCAB))
    for t1 in range(VOCAB):
        for t2 in range(VOCAB):
            probs = []
            for j in range(3):
                prob, margin = reference(logits_per_token[j][t1, t2, j], **sampling)
                assert margin > 1e-3 or not exact, "test setup: a top-k/top-p cut-off too close to call in float32"
                probs.append(prob)
            joint[t1, t2] = probs[0][t1] * probs[1][t2] * probs[2]
    assert np.isclose(joint.sum(), 1.0)
    return joint


def draw3(target, method, sampling, prompt=PROMPT):
    """Counts [V, V, V] of the first 3 new tokens over ROWS x len(SEEDS) independent rows, and
    the runs' mean_accepted."""
    counts = np.zeros(VOCAB ** 3, np.int64)
    accepted = []
    for seed in SEEDS:
        out = jaxdec.generate(target, [prompt] * ROWS, max_new_tokens=3, seed=seed, stop_token_ids=[],
                              speculative=method, **sampling)
        tokens = np.array(out.tokens)
        assert tokens.shape == (ROWS, 3)
        counts += np.bincount(np.ravel_multi_index(tokens.T, (VOCAB,) * 3), minlength=VOCAB ** 3)
        accepted.append(out.stats.mean_accepted)
    return counts.reshape((VOCAB,) * 3), float(np.mean(accepted))


SAMPLED = {
    # num_tokens 1: the second token is the draft or a residual draw, the third often the bonus.
    "draft_model": (lambda m: spec.DraftModel(m["draft"], num_tokens=1), dict(temperature=1.0)),
    # Filters on both sides: q's support differs from p's, so some drafts are always rejected.
    "draft_model_filtered": (lambda m: spec.DraftModel(m["draft"], num_tokens=2),
                             dict(temperature=1.0, top_k=4, top_p=0.95)),
    "draft_model_adaptive": (lambda m: spec.DraftModel(m["draft"], num_tokens=3, confidence_threshold=0.4,
                                                       adaptive_schedule=True), dict(temperature=1.2)),
    # The overlapped schedule (draft and target here on one device: the logic, not the speed).
    "pearl": (lambda m: spec.Pearl(m["draft"], num_tokens=2), dict(temperature=1.0)),
    "layer_skip": (lambda m: spec.LayerSkip([1], num_tokens=2), dict(temperature=1.0)),
    "prompt_lookup": (lambda m: spec.PromptLookup(max_ngram=2, num_tokens=3), dict(temperature=1.0)),
    # Point-mass drafts and top-k: drafted tokens outside the kept set are always rejected.
    "prompt_lookup_filtered": (lambda m: spec.PromptLookup(max_ngram=2, num_tokens=3),
                               dict(temperature=1.0, top_k=3)),
    # A tree of several prompt-lookup matches: point-mass siblings tried in turn.
    "prompt_lookup_tree": (lambda m: spec.PromptLookup(max_ngram=1, num_tokens=2, num_candidates=3),
                           dict(temperature=1.0)),
    # A static tree of top-ranked children: point masses, siblings tried in turn.
    "static_tree": (lambda m: spec.StaticTree(m["draft"], [(0,), (1,), (0, 0), (0, 1), (1, 0)]),
                    dict(temperature=1.0)),
    # Trees of sampled children: the multi-draft rule tries the independent draws in turn.
    "draft_tree": (lambda m: spec.DraftTree(m["draft"], depth=2, top_k=2, max_nodes=5), dict(temperature=1.0)),
    "draft_tree_filtered": (lambda m: spec.DraftTree(m["draft"], depth=3, top_k=3, max_nodes=8),
                            dict(temperature=1.0, top_k=4, top_p=0.95)),
    # Heads on the target's features: Medusa's point-mass tree, EAGLE's sampled children.
    "medusa": (lambda m: spec.Medusa(random_heads(m["target"], "medusa", num_heads=2), [(0,), (1,), (0, 0), (1, 0)]),
               dict(temperature=1.0)),
    "eagle": (lambda m: spec.Eagle(random_heads(m["target"], "eagle"), depth=2, top_k=2, max_nodes=5),
              dict(temperature=1.0)),
    "eagle_filtered": (lambda m: spec.Eagle(random_heads(m["target"], "eagle", seed=1), depth=3, top_k=2, max_nodes=6),
                       dict(temperature=1.0, top_k=4, top_p=0.95)),
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_tokens_follow_the_target_distribution(tiny, name):
    make, sampling = SAMPLED[name]
    method = make(tiny)
    target_logits = _prefix_logits(tiny["target"])
    exact = joint3([target_logits] * 3, sampling)
    counts, mean_accepted = draw3(tiny["target"], method, sampling)
    check_fit(counts, exact, name)

    # Drafts were proposed and both outcomes happened: some accepted (more than one token per
    # round), some rejected (fewer than num_tokens + 1).
    assert 1.0 < mean_accepted < _longest_draft(method) + 1, mean_accepted

    # Power: the same draws refute what always accepting the draft would give.
    if isinstance(method, (spec.PromptLookup, spec.StaticTree, spec.Medusa, spec.Eagle)):
        # Deterministic drafts have no distribution of their own (and an EAGLE layer's depends
        # on the features it is fed); the target at another temperature stands in as the
        # clearly wrong answer.
        wrong = joint3([target_logits] * 3, {**sampling, "temperature": 1.6}, exact=False)
    else:
        draft_logits = (_prefix_logits(tiny["draft"]) if isinstance(method, (spec.DraftModel, spec.Pearl, spec.DraftTree))
                        else _prefix_logits(tiny["target"], skip_layers=tuple(method.skip_layers)))
        wrong = joint3([target_logits, draft_logits, draft_logits], sampling, exact=False)
    assert rejects(counts, wrong), f"{name}: no power against the draft's own distribution"


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=1.0, top_k=4, top_p=0.95)],
                         ids=["t1", "filtered"])
def test_plain_sampling_follows_the_target_distribution(tiny, sampling):
    """The reference every method above is held to: plain decoding's first 3 tokens (prefill's
    draw, then two decode steps, each with its own counter: reusing one for two tokens draws
    them with the same noise) follow the target's processed distributions. Power: the draws
    refute the target at another temperature."""
    target_logits = _prefix_logits(tiny["target"])
    counts, _ = draw3(tiny["target"], None, sampling)
    check_fit(counts, joint3([target_logits] * 3, sampling), "plain")
    assert rejects(counts, joint3([target_logits] * 3, {**sampling, "temperature": 1.6}, exact=False))


@pytest.mark.parametrize("name", ["draft_model", "pearl", "draft_tree", "prompt_lookup_tree", "medusa", "eagle"])
def test_the_same_seed_repeats_a_speculative_call(tiny, name):
    """API.md: the same call with the same seed gives the same output, through every kind of
    drafter too (Pearl's overlapped rounds included); another seed gives other samples. The
    shapes of draw3's calls, so nothing new is compiled."""
    make, sampling = SAMPLED[name]
    method = make(tiny)

    def sample(seed):
        return jaxdec.generate(tiny["target"], [PROMPT] * ROWS, max_new_tokens=3, seed=seed, stop_token_ids=[],
                               speculative=method, **sampling).tokens

    first = sample(SEEDS[0])
    assert sample(SEEDS[0]) == first
    assert sample(SEEDS[1]) != first
