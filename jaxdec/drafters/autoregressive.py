"""Drafting a chain by running a (cheap) model autoregressively: the shared loop of the
draft-model and layer-skip drafters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.model import causal_mask, forward
from jaxdec.sampling import probabilities, sample
from jaxdec.verify import Draft


def draft_chain(cfg, params, cache, first_tokens, first_positions, num_tokens, sampling, keys,
                skip_layers=()):
    """Drafts `num_tokens` tokens per row.

    first_tokens / first_positions [B, T0]: what the drafting model must read before the first
    draft (T0 = 1: the pending token; T0 = 2: a catch-up token and the pending token), written
    at slots cache.lengths... Each draft token is drawn from the processed draft distribution q
    (argmax when greedy), and q is returned with it. The last draft token is not run through
    the model: nothing would read its output. Returns (Draft, cache).
    """
    B, T0 = first_tokens.shape
    logits, _, cache = forward(cfg, params, first_tokens, first_positions, cache, causal_mask(B, T0),
                               skip_layers)
    cache = cache.replace(lengths=cache.lengths + T0)
    single = jnp.ones((B, 1, 1), bool)

    def draw(logits, i):
        return sample(logits, sampling, keys, jnp.full((B,), i, jnp.int32)), probabilities(logits, sampling)

    def step(carry, i):
        cache, logits = carry
        token, q = draw(logits, i)
        logits, _, cache = forward(cfg, params, token[:, None], cache.lengths[:, None], cache, single, skip_layers)
        return (cache.replace(lengths=cache.lengths + 1), logits[:, 0]), (token, q)

    (cache, logits), (tokens, probs) = jax.lax.scan(step, (cache, logits[:, -1]), jnp.arange(num_tokens - 1))
    last_token, last_q = draw(logits, num_tokens - 1)
    tokens = jnp.concatenate([tokens.T, last_token[:, None]], axis=1)               # [B, K]
    probs = jnp.concatenate([jnp.moveaxis(probs, 0, 1), last_q[:, None]], axis=1)  # [B, K, V]
    return Draft(tokens=tokens, probs=probs, lengths=jnp.full((B,), num_tokens, jnp.int32)), cache
