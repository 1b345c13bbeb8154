"""Drafting a chain by running a (cheap) model autoregressively: the shared loop of the
draft-model and layer-skip drafters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.model import causal_mask, forward
from jaxdec.sampling import sample_with_probabilities
from jaxdec.verify import Draft


def draft_chain(cfg, params, cache, first_tokens, first_positions, num_tokens, sampling, keys,
                skip_layers=(), max_lengths=None, confidence_threshold: float = 0.0, sparse=None):
    """Drafts up to `num_tokens` tokens per row.

    first_tokens / first_positions [B, T0]: what the drafting model must read before the first
    draft (T0 = 1: the pending token; T0 = 2: a catch-up token and the pending token), written
    at slots cache.lengths... Each draft token is drawn from the processed draft distribution q
    (argmax when greedy), and q is returned with it.

    Adaptive length, within the fixed shapes: row b drafts at most max_lengths[b] tokens, and
    stops after a token whose draft confidence (top probability of the raw draft distribution)
    is below confidence_threshold (SpecDec++ / AdaEDL style: a rejection is likely next). The
    loop ends as soon as no row drafts any more, and no token is run through the model unless
    some row needs its output. `sparse` (jaxdec.sparse.SparsePages): the drafting model reads
    only chosen pages of its cache. Returns (Draft, cache).
    """
    B, T0 = first_tokens.shape
    K = num_tokens
    logits, _, cache = forward(cfg, params, first_tokens, first_positions, cache, causal_mask(B, T0),
                               skip_layers, sparse)
    cache = cache.replace(lengths=cache.lengths + T0)
    max_lengths = jnp.full((B,), K, jnp.int32) if max_lengths is None else jnp.minimum(max_lengths, K)
    single = jnp.ones((B, 1, 1), bool)

    def draw(i, logits, tokens, probs, lengths, live):
        """Token i of every row from its draft logits; rows that stop drafting turn not live."""
        token, q = sample_with_probabilities(logits, sampling, keys, jnp.full((B,), i, jnp.int32))
        tokens = tokens.at[:, i].set(token)
        probs = probs.at[:, i].set(q)
        lengths = lengths + live
        live = live & (i + 1 < max_lengths)
        if confidence_threshold > 0:
            live &= jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= confidence_threshold
        return tokens, probs, lengths, live

    def step(carry):
        # Runs the previous token through the model only when some row drafts another one
        # (the loop condition), so no forward is wasted and no lax.cond holds the cache.
        i, cache, tokens, probs, lengths, live = carry
        logits, _, cache = forward(cfg, params, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), cache.lengths[:, None], cache, single, skip_layers,
                                   sparse)
        cache = cache.replace(lengths=cache.lengths + 1)
        return (i + 1, cache, *draw(i, logits[:, 0], tokens, probs, lengths, live))

    def keep_going(carry):
        i, *_, live = carry
        return (i < K) & jnp.any(live)

    first = draw(0, logits[:, -1], jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K, logits.shape[-1]), jnp.float32),
                 jnp.zeros((B,), jnp.int32), max_lengths > 0)
    _, cache, tokens, probs, lengths, _ = jax.lax.while_loop(keep_going, step, (jnp.int32(1), cache, *first))
    return Draft(tokens=tokens, probs=probs, lengths=lengths), cache
