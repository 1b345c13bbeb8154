"""Verification: one target forward over the drafted tree, and the acceptance rule.

Every drafter returns a `Draft`: a token tree below each row's pending token (see
`jaxdec.tree`; `parents=None` is a chain, the common case, which takes cheaper paths). This
module turns it into the tokens a row emits and the path whose keys and values the cache keeps.

The acceptance rule is the lossless one of speculative sampling (Leviathan et al.; Chen et
al.), written over distributions so that one function covers every case:
  * draft token x ~ q is accepted with probability min(1, p(x) / q(x));
  * at the first rejection the row emits a sample of normalise(max(0, p - q)) and stops;
  * if all its draft tokens are accepted, it emits a bonus sample of p at the next position.
p and q are the processed distributions of `jaxdec.sampling.probabilities`. Greedy decoding
makes p a one-hot argmax, so the rule accepts exactly the tokens equal to the target's argmax
and emits the argmax at the first mismatch. Deterministic drafts (prompt lookup) pass a
one-hot q, which makes the residual "p with p(x) removed", the point-mass rule of DESIGN.md.
Trees use the multi-draft form of the same rule (SpecInfer): below an accepted node its
children are tried in index order, each against the residual left by the siblings rejected
before it; the first accepted child becomes the new node, and a node whose children are all
rejected (or that has none) emits a sample of what is left.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.model import lm_head, step_hidden
from jaxdec.sampling import SamplingParams, argmax, probabilities
from jaxdec.tree import ancestor_mask, gather_steps, path_to, step_depths


@struct.dataclass
class Draft:
    tokens: jax.Array   # int32 [B, K] drafted tokens (tree nodes) after each row's pending token
    probs: jax.Array    # float32 [B, K, V]: the distribution q each token was drawn from
    lengths: jax.Array  # int32 [B]: how many of the K tokens are real (the rest is padding)
    parents: jax.Array | None = None  # int32 [B, K] (jaxdec.tree); None: a chain


def verify_forward(cfg, params, cache, pending, draft: Draft, active, skip_layers=()):
    """Target logits [B, K+1, V] at the pending token and each draft token, in one forward,
    their hidden states [B, K+1, D] (the features the LM head reads: drafters on the target's
    features keep the accepted path's), and the step's new keys and values (per layer
    [B, K+1, Hkv, D], for `commit_entries`).

    The cache is only read. The forward is only as wide as the longest draft of an active
    row needs, rounded up to a bucket (0, 1, 3, 7, ... draft tokens, and K): a round where no
    row drafted anything (a prompt-lookup miss, a short adaptive draft) costs about one plain
    decoding step, not K + 1. Logits, hidden states and entries past the forward's width are zeros; no row's
    acceptance reads them, since each row's draft fits inside it.
    """
    B, K = draft.tokens.shape
    sizes = verify_widths(K)
    needed = jnp.max(jnp.where(active, draft.lengths, 0))
    tokens = jnp.concatenate([pending[:, None], draft.tokens], axis=1)
    if draft.parents is None:
        visible = jnp.broadcast_to(jnp.tril(jnp.ones((K + 1, K + 1), bool)), (B, K + 1, K + 1))
        positions = cache.lengths[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    else:
        visible = ancestor_mask(draft.parents)
        positions = cache.lengths[:, None] + step_depths(visible)

    def verify(width):
        # Reads the cache only: the branches of the switch below must not write it, or XLA
        # copies the whole cache into each branch on every round.
        def run(cache):
            T = width + 1
            hidden, new_kv = step_hidden(cfg, params, tokens[:, :T], positions[:, :T], cache,
                                         visible[:, :T, :T], skip_layers)
            pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, K - width)) + ((0, 0),) * (x.ndim - 2))
            logits = pad(lm_head(cfg, params, hidden))
            return logits, pad(hidden), jax.tree.map(pad, new_kv, is_leaf=lambda x: x is None)
        return run

    if len(sizes) == 1:
        return verify(K)(cache)
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), needed), [verify(w) for w in sizes], cache)


def commit_entries(draft: Draft, new_kv, path):
    """The verify step's keys and values in the order the cache keeps them (write them at
    slots cache.lengths ..): the pending token's, then the accepted path's. A chain's path
    is already in order; a tree's is gathered. Entries past the path are never in view."""
    return new_kv if draft.parents is None else gather_steps(new_kv, path)


def path_tokens(draft: Draft, path):
    """int32 [B, K]: the draft tokens along the accepted path (then padding)."""
    return draft.tokens if draft.parents is None else jnp.take_along_axis(draft.tokens, path, axis=1)


def verify_widths(num_tokens: int) -> tuple[int, ...]:
    """The draft lengths verify compiles for: 0, 1, 3, 7, ... below num_tokens, and num_tokens."""
    return tuple(sorted({2 ** i - 1 for i in range(num_tokens.bit_length()) if 2 ** i - 1 < num_tokens} | {num_tokens}))


def accept(target_logits, draft: Draft, sampling: SamplingParams, key_accept, key_next):
    """The speculative-sampling rule, for chains and trees.

    target_logits: [B, K+1, V] (step position 0 predicts the root's children, position i + 1
    the children of node i); key_accept, key_next: PRNG keys [B].
    Returns (num_accepted [B] in 0..draft.lengths, next_token [B], path [B, K]): the row emits
    the first num_accepted nodes of `path` (node indices; a chain's path is 0, 1, ...), then
    next_token (the correction, or the bonus token).

    Greedy decoding takes a shortcut through the same rule: with p one-hot at the argmax, a
    token is accepted iff it is the argmax, and the residual max(0, p - q) after a rejection
    is p itself, so the next token is the argmax either way. That skips the [B, K+1, V]
    distributions and the random draws, which cost more than the rest of a small round.
    """
    chain = draft.parents is None
    greedy = _accept_greedy_chain if chain else _accept_greedy_tree
    sampled = _accept_sampled_chain if chain else _accept_sampled_tree
    return jax.lax.cond(sampling.temperature > 0, lambda *a: sampled(*a, sampling), greedy,
                        target_logits, draft, key_accept, key_next)


def _chain_path(draft: Draft):
    B, K = draft.tokens.shape
    return jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))


def _accept_greedy_chain(target_logits, draft: Draft, key_accept, key_next):
    B, K = draft.tokens.shape
    best = argmax(target_logits)                                                # [B, K+1]
    accepted = (draft.tokens == best[:, :K]) & (jnp.arange(K)[None, :] < draft.lengths[:, None])
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
    return num_accepted, best[jnp.arange(B), num_accepted], _chain_path(draft)


def _accept_sampled_chain(target_logits, draft: Draft, key_accept, key_next, sampling):
    B, K = draft.tokens.shape
    p = probabilities(target_logits, sampling)                                 # [B, K+1, V]
    p_x = jnp.take_along_axis(p[:, :K], draft.tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft.probs, draft.tokens[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(key_accept)
    # u < p/q, written without a division; q_x > 0 for every token actually drawn from q.
    accepted = (u * q_x < p_x) & (jnp.arange(K)[None, :] < draft.lengths[:, None])
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)

    rows = jnp.arange(B)
    p_next = p[rows, num_accepted]                                             # [B, V]
    q_next = draft.probs[rows, jnp.minimum(num_accepted, K - 1)]
    rejected = num_accepted < draft.lengths
    dist = jnp.where(rejected[:, None], _residual(p_next, q_next), p_next)
    return num_accepted, _draw(key_next, dist), _chain_path(draft)


def _accept_greedy_tree(target_logits, draft: Draft, key_accept, key_next):
    B, K = draft.tokens.shape
    ancestors = ancestor_mask(draft.parents)
    depths = step_depths(ancestors)
    best = argmax(target_logits)                                                # [B, K+1]
    # A node matches when it is the target's argmax after its parent; it is accepted when it
    # and every ancestor match. The deepest accepted node (the first of equals: duplicate
    # siblings carry the same tokens and entries) ends the path.
    wanted = jnp.take_along_axis(best, draft.parents + 1, axis=1)
    match = (draft.tokens == wanted) & (jnp.arange(K)[None, :] < draft.lengths[:, None])
    accepted = ~jnp.any(ancestors[:, 1:, 1:] & ~match[:, None, :], axis=-1)
    score = jnp.where(accepted, depths[:, 1:], 0)
    num_accepted = jnp.max(score, axis=1)
    node = jnp.where(num_accepted > 0, argmax(score), -1)
    return num_accepted, best[jnp.arange(B), node + 1], path_to(ancestors, depths, node)


def _accept_sampled_tree(target_logits, draft: Draft, key_accept, key_next, sampling):
    B, K = draft.tokens.shape
    rows = jnp.arange(B)
    p = probabilities(target_logits, sampling)                                 # [B, K+1, V]
    u = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(key_accept)

    # Nodes in index order: a node is tried only while its parent is the current node, so a
    # node below a rejected sibling is skipped and the children of an accepted node (all of
    # higher index, by topological order) come after it.
    def try_node(j, carry):
        current, residual = carry
        token, q = draft.tokens[:, j], draft.probs[:, j]
        tried = (draft.parents[:, j] == current) & (j < draft.lengths)
        taken = tried & (u[:, j] * q[rows, token] < residual[rows, token])
        residual = jnp.where(taken[:, None], p[:, j + 1],
                             jnp.where(tried[:, None], _residual(residual, q), residual))
        return jnp.where(taken, j, current), residual

    node, dist = jax.lax.fori_loop(0, K, try_node, (jnp.full((B,), -1, jnp.int32), p[:, 0]))
    ancestors = ancestor_mask(draft.parents)
    depths = step_depths(ancestors)
    return depths[rows, node + 1], _draw(key_next, dist), path_to(ancestors, depths, node)


def _residual(p, q):
    """normalise(max(0, p - q)) over the last axis; p itself if rounding left no mass (in
    exact arithmetic a rejection always leaves some)."""
    residual = jnp.maximum(p - q, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)


def _draw(keys, dist):
    return jax.vmap(jax.random.categorical)(keys, jnp.log(dist)).astype(jnp.int32)
