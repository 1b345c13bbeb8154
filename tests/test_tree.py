"""Token trees: the tree index arithmetic, and the acceptance rule on trees alone (greedy:
the deepest path of argmaxes; sampling: the emitted tokens follow the target exactly).
Trees through jaxdec.generate are tested with the tree drafters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.sampling import SamplingParams, probabilities
from jaxdec.tree import StaticTree, ancestor_mask, chain_parents, gather_steps, path_to, step_depths
from jaxdec.verify import Draft, _accept_sampled_tree, accept
from tests.test_speculative_sampling import check_fit, rejects

V = 5


def random_parents(rng, batch, num_nodes):
    """Random trees in topological order: node i hangs below the root or an earlier node."""
    return np.stack([[rng.integers(-1, i) for i in range(num_nodes)] for _ in range(batch)]).astype(np.int32)


def python_ancestors(parents):
    """[N+1, N+1] ancestor-or-self over step tokens, walked one parent at a time."""
    n = len(parents)
    out = np.eye(n + 1, dtype=bool)
    for i in range(n):
        node = i
        while node >= 0:
            out[i + 1, node + 1] = True
            node = parents[node]
        out[i + 1, 0] = True
    return out


def test_ancestors_depths_and_paths_match_a_walk_up_the_tree():
    rng = np.random.default_rng(0)
    for num_nodes in (1, 2, 7, 8, 33):
        parents = random_parents(rng, 6, num_nodes)
        ancestors = np.asarray(ancestor_mask(jnp.asarray(parents)))
        depths = np.asarray(step_depths(jnp.asarray(ancestors)))
        nodes = rng.integers(-1, num_nodes, size=6).astype(np.int32)
        paths = np.asarray(path_to(jnp.asarray(ancestors), jnp.asarray(depths), jnp.asarray(nodes)))
        for b in range(6):
            want = python_ancestors(parents[b])
            np.testing.assert_array_equal(ancestors[b], want)
            np.testing.assert_array_equal(depths[b], want.sum(axis=1) - 1)
            path, node = [], nodes[b]
            while node >= 0:
                path.insert(0, node)
                node = parents[b, node]
            assert list(paths[b, :len(path)]) == path
    # A chain's mask is causal.
    chain = np.asarray(ancestor_mask(chain_parents(2, 6)))
    np.testing.assert_array_equal(chain, np.broadcast_to(np.tril(np.ones((7, 7), bool)), (2, 7, 7)))


def test_gather_steps_puts_the_root_then_the_path_first():
    B, N = 2, 4
    entries = jnp.arange(B * (N + 1), dtype=jnp.float32).reshape(B, N + 1, 1, 1)
    path = jnp.asarray([[2, 3, 0, 0], [1, 0, 0, 0]], jnp.int32)
    (out,), (none,) = gather_steps(((entries,), (None,)), path)
    assert none is None
    np.testing.assert_array_equal(np.asarray(out)[:, :, 0, 0], [[0, 3, 4, 1, 1], [5, 7, 6, 6, 6]])


def test_greedy_takes_the_deepest_path_of_argmaxes():
    rng = np.random.default_rng(1)
    B, N = 256, 12
    parents = random_parents(rng, B, N)
    logits = rng.normal(0.0, 2.0, (B, N + 1, V)).astype(np.float32)
    best = logits.argmax(-1)
    # Each node is the argmax after its parent with probability 0.6.
    wanted = np.take_along_axis(best, parents + 1, axis=1)
    tokens = np.where(rng.random((B, N)) < 0.6, wanted, (wanted + rng.integers(1, V, (B, N))) % V).astype(np.int32)
    lengths = rng.integers(0, N + 1, size=B).astype(np.int32)
    draft = Draft(tokens=jnp.asarray(tokens), probs=jax.nn.one_hot(tokens, V), lengths=jnp.asarray(lengths),
                  parents=jnp.asarray(parents))
    keys = jax.random.split(jax.random.key(0), 2 * B)
    num, nxt, path = jax.jit(accept)(jnp.asarray(logits), draft, SamplingParams.create(0.0), keys[:B], keys[B:])
    num, nxt, path = map(np.asarray, (num, nxt, path))
    for b in range(B):
        # Accepted nodes: every node from the root's child down to them is the argmax after its
        # parent. The deepest one (the first of equals) ends the path: with a real model, duplicate
        # siblings have equal logits, so every accepted path is a prefix of the greedy output.
        def chain_of(node):
            walk = []
            while node >= 0:
                walk.insert(0, node)
                node = parents[b, node]
            return walk
        accepted = [i for i in range(lengths[b])
                    if all(tokens[b, j] == best[b, parents[b, j] + 1] for j in chain_of(i))]
        walk = max((chain_of(i) for i in accepted), key=len, default=[])
        assert num[b] == len(walk)
        assert list(path[b, :num[b]]) == walk
        assert nxt[b] == best[b, walk[-1] + 1 if walk else 0]
    assert len(set(num)) >= 4


# ---------------------------------------------------------------------------------------------
# Sampling: a tree over a vocabulary of 5 whose nodes mix sampled and deterministic children.
# The target's distribution after a prefix is a fixed function of the prefix's tokens, as it is
# for a model. The first two emitted tokens (when a round emits only one, the second is drawn
# from the target after it, as the next round would) must follow p(x) p(y | x) exactly.

ROWS = 40_000
# Node: (parent, kind): "sampled" nodes are drawn from the draft after their parent (siblings
# independently), "fixed" nodes are a deterministic token with a point-mass q.
TREE = [(-1, "sampled"), (-1, "sampled"), (-1, "fixed"), (0, "sampled"), (2, "fixed"), (0, "sampled")]


def _sampled_tree_case(rng, sampling):
    target_logits = {(): rng.normal(0, 1.5, V)}
    draft_logits = {(): rng.normal(0, 1.5, V)}
    for x in range(V):
        target_logits[(x,)] = rng.normal(0, 1.5, V)
        draft_logits[(x,)] = rng.normal(0, 1.5, V)
        for y in range(V):
            target_logits[(x, y)] = rng.normal(0, 1.5, V)
    process = jax.jit(lambda x: probabilities(x, sampling))
    p = {k: np.asarray(process(jnp.asarray(v, jnp.float32)), np.float64) for k, v in target_logits.items()}
    q = {k: np.asarray(process(jnp.asarray(v, jnp.float32)), np.float64) for k, v in draft_logits.items()}
    fixed = {i: int(rng.integers(V)) for i, (_, kind) in enumerate(TREE) if kind == "fixed"}

    N = len(TREE)
    tokens = np.zeros((ROWS, N), np.int32)
    probs = np.zeros((ROWS, N, V), np.float32)
    logits = np.zeros((ROWS, N + 1, V), np.float32)
    logits[:, 0] = target_logits[()]
    prefix = [None] * N  # per node, each row's tokens from the root's child down to the node
    for i, (parent, kind) in enumerate(TREE):
        if kind == "fixed":
            tokens[:, i] = fixed[i]
            probs[:, i] = np.eye(V)[fixed[i]]
        else:
            # The draft after the parent's token (rows differ in the tokens they drew).
            if parent < 0:
                dist = q[()]
                tokens[:, i] = rng.choice(V, size=ROWS, p=dist / dist.sum())
                probs[:, i] = dist
            else:
                parent_tokens = tokens[:, parent]
                for x in range(V):
                    rows = parent_tokens == x
                    dist = q[(x,)]
                    tokens[rows, i] = rng.choice(V, size=rows.sum(), p=dist / dist.sum())
                    probs[rows, i] = dist
        prefix[i] = [(*(() if parent < 0 else prefix[parent][r]), int(tokens[r, i])) for r in range(ROWS)]
        logits[:, i + 1] = np.stack([target_logits[k] for k in prefix[i]])
    draft = Draft(tokens=jnp.asarray(tokens), probs=jnp.asarray(probs), lengths=jnp.full((ROWS,), N, jnp.int32),
                  parents=jnp.broadcast_to(jnp.asarray([t[0] for t in TREE], jnp.int32), (ROWS, N)))
    return p, jnp.asarray(logits), draft


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.8, top_k=3)])
def test_sampled_tree_emits_the_target_distribution(kwargs):
    rng = np.random.default_rng(2)
    sampling = SamplingParams.create(**kwargs)
    p, logits, draft = _sampled_tree_case(rng, sampling)
    keys = jax.random.split(jax.random.key(1), 2 * ROWS)
    num, nxt, path = map(np.asarray, jax.jit(accept)(logits, draft, sampling, keys[:ROWS], keys[ROWS:]))
    tokens = np.asarray(draft.tokens)
    emitted = np.concatenate([np.take_along_axis(tokens, path, axis=1), np.zeros((ROWS, 1), np.int32)], axis=1)
    emitted[np.arange(ROWS), num] = nxt
    first = emitted[:, 0]
    second = emitted[:, 1].copy()
    # Rows that emitted one token: the next round would draw the second from p(. | first).
    alone = num == 0
    for x in range(V):
        rows = alone & (first == x)
        second[rows] = rng.choice(V, size=rows.sum(), p=p[(x,)] / p[(x,)].sum())
    joint = np.stack([p[()][x] * p[(x,)] for x in range(V)])
    check_fit(np.bincount(first * V + second, minlength=V * V), joint, "first two tokens")
    # Every kind of outcome happens: rejections at the root, paths of depth 1 and 2.
    assert set(num) == {0, 1, 2}
    # The test has power: as many of the draft's own first tokens are refuted.
    assert rejects(np.bincount(tokens[:, 0], minlength=V), p[()])


def test_tree_rule_on_a_chain_is_the_chain_rule():
    """A tree whose parents are i - 1 goes through the tree code and gives the chain's answer
    for the same keys."""
    rng = np.random.default_rng(3)
    B, K = 2000, 4
    logits = jnp.asarray(rng.normal(0, 1.5, (B, K + 1, V)), jnp.float32)
    q = rng.dirichlet(np.ones(V), size=(B, K)).astype(np.float32)
    tokens = np.stack([[rng.choice(V, p=q[b, i] / q[b, i].sum()) for i in range(K)] for b in range(B)]).astype(np.int32)
    lengths = rng.integers(0, K + 1, B).astype(np.int32)
    chain = Draft(tokens=jnp.asarray(tokens), probs=jnp.asarray(q), lengths=jnp.asarray(lengths))
    tree = chain.replace(parents=chain_parents(B, K))
    keys = jax.random.split(jax.random.key(4), 2 * B)
    sampling = SamplingParams.create(1.0)
    want = jax.jit(accept)(logits, chain, sampling, keys[:B], keys[B:])
    got = jax.jit(_accept_sampled_tree)(logits, tree, keys[:B], keys[B:], sampling)
    np.testing.assert_array_equal(np.asarray(want[0]), np.asarray(got[0]))    # num_accepted
    np.testing.assert_array_equal(np.asarray(want[1]), np.asarray(got[1]))    # next token
    inside = np.arange(K)[None, :] < np.asarray(want[0])[:, None]             # the path itself
    np.testing.assert_array_equal(np.asarray(want[2])[inside], np.asarray(got[2])[inside])
    assert len(set(np.asarray(want[0]))) == K + 1


def test_static_tree_numbers_nodes_by_depth_then_path():
    tree = StaticTree([(1, 0), (0,), (0, 0), (1,), (0, 0, 2)])   # unordered
    assert tree.paths == ((0,), (1,), (0, 0), (1, 0), (0, 0, 2))
    assert tree.parents == (-1, -1, 0, 1, 2)
    assert tree.ranks == (0, 1, 0, 0, 2)
    assert tree.depths == (1, 1, 2, 2, 3) and tree.depth == 3
    assert tree.children(-1) == (0, 1) and tree.children(2) == (4,) and tree.children(4) == ()
    assert tree == StaticTree([(0,), (1,), (0, 0), (1, 0), (0, 0, 2)]) and hash(tree) == hash(StaticTree(tree.paths))
