"""Verification: one target forward over the drafted tokens, and the acceptance rule.

Every drafter returns a `Draft`; this module turns it into the tokens a row emits. Chains
only for now (a chain is a tree whose parents are i - 1); token trees reuse the same forward
with an ancestor mask.

The acceptance rule is the lossless one of speculative sampling (Leviathan et al.; Chen et
al.), written over distributions so that one function covers every case:
  * draft token x ~ q is accepted with probability min(1, p(x) / q(x));
  * at the first rejection the row emits a sample of normalise(max(0, p - q)) and stops;
  * if all its draft tokens are accepted, it emits a bonus sample of p at the next position.
p and q are the processed distributions of `jaxdec.sampling.probabilities`. Greedy decoding
makes p a one-hot argmax, so the rule accepts exactly the tokens equal to the target's argmax
and emits the argmax at the first mismatch. Deterministic drafts (prompt lookup) pass a
one-hot q, which makes the residual "p with p(x) removed", the point-mass rule of DESIGN.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import write
from jaxdec.model import lm_head, step_hidden
from jaxdec.sampling import SamplingParams, argmax, probabilities


@struct.dataclass
class Draft:
    tokens: jax.Array   # int32 [B, K] drafted tokens, a chain after each row's pending token
    probs: jax.Array    # float32 [B, K, V]: the distribution q each token was drawn from
    lengths: jax.Array  # int32 [B]: how many of the K tokens are real (the rest is padding)


def verify_forward(cfg, params, cache, pending, draft: Draft, active, skip_layers=()):
    """Target logits [B, K+1, V] at the pending token and each draft token, in one forward.

    The tokens are written to the cache at slots cache.lengths ..; the caller commits the
    accepted ones by setting cache.lengths. The forward is only as wide as the longest draft
    of an active row needs, rounded up to a bucket (0, 1, 3, 7, ... draft tokens, and K): a
    round where no row drafted anything (a prompt-lookup miss, a short adaptive draft) costs
    about one plain decoding step, not K + 1. Logits past the forward's width are zeros; no
    row's acceptance reads them, since each row's draft fits inside it.
    """
    B, K = draft.tokens.shape
    sizes = verify_widths(K)
    needed = jnp.max(jnp.where(active, draft.lengths, 0))
    tokens = jnp.concatenate([pending[:, None], draft.tokens], axis=1)
    positions = cache.lengths[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]

    def verify(width):
        # Reads the cache only: the branches of the switch below must not write it, or XLA
        # copies the whole cache into each branch on every round.
        def run(cache):
            T = width + 1
            chain = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
            hidden, new_kv = step_hidden(cfg, params, tokens[:, :T], positions[:, :T], cache, chain, skip_layers)
            pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, K - width), (0, 0), (0, 0)))
            logits = jnp.pad(lm_head(cfg, params, hidden), ((0, 0), (0, K - width), (0, 0)))
            return logits, jax.tree.map(pad, new_kv, is_leaf=lambda x: x is None)
        return run

    if len(sizes) == 1:
        logits, new_kv = verify(K)(cache)
    else:
        branch = jnp.searchsorted(jnp.asarray(sizes), needed)
        logits, new_kv = jax.lax.switch(branch, [verify(w) for w in sizes], cache)
    # The padded entries (past a narrow forward's width) land in slots past every row's draft.
    return logits, write(cache, *new_kv)


def verify_widths(num_tokens: int) -> tuple[int, ...]:
    """The draft lengths verify compiles for: 0, 1, 3, 7, ... below num_tokens, and num_tokens."""
    return tuple(sorted({2 ** i - 1 for i in range(num_tokens.bit_length()) if 2 ** i - 1 < num_tokens} | {num_tokens}))


def accept(target_logits, draft: Draft, sampling: SamplingParams, key_accept, key_next):
    """The speculative-sampling rule for chains.

    target_logits: [B, K+1, V] (position i predicts the token after draft token i, position 0
    the first draft token); key_accept, key_next: PRNG keys [B].
    Returns (num_accepted [B] in 0..draft.lengths, next_token [B]): the row emits its first
    num_accepted draft tokens, then next_token (the correction, or the bonus token).

    Greedy decoding takes a shortcut through the same rule: with p one-hot at the argmax, a
    token is accepted iff it is the argmax, and the residual max(0, p - q) after a rejection
    is p itself, so the next token is the argmax either way. That skips the [B, K+1, V]
    distributions and the random draws, which cost more than the rest of a small round.
    """
    def greedy(target_logits, draft, key_accept, key_next):
        B, K = draft.tokens.shape
        best = argmax(target_logits)                                               # [B, K+1]
        accepted = (draft.tokens == best[:, :K]) & (jnp.arange(K)[None, :] < draft.lengths[:, None])
        num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
        return num_accepted, best[jnp.arange(B), num_accepted]

    def sampled(target_logits, draft, key_accept, key_next):
        return _accept_sampled(target_logits, draft, sampling, key_accept, key_next)

    return jax.lax.cond(sampling.temperature > 0, sampled, greedy, target_logits, draft, key_accept, key_next)


def _accept_sampled(target_logits, draft: Draft, sampling: SamplingParams, key_accept, key_next):
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
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # A rejection has residual mass > 0 in exact arithmetic; fall back to p if rounding ate it.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    dist = jnp.where(rejected[:, None], residual, p_next)
    return num_accepted, jax.vmap(jax.random.categorical)(key_next, jnp.log(dist)).astype(jnp.int32)
