"""Attention over the KV cache: the mask rule and the pure-jnp (XLA) reference path.

Every step (prefill, decode, chain or tree verification) uses the same rule: the query of
in-step token t of row b sees
  * the row's cached prefix, slots `< lengths[b]`, and
  * the in-step tokens u with `step_mask[b, t, u]` (causal for a chain, ancestors for a tree),
restricted, for sliding-window layers, to keys less than `window` positions behind the query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(lengths, positions, step_mask, num_slots: int, window: int | None):
    """bool [B, T, num_slots]: which cache slots each in-step query attends to.

    lengths: int32 [B] cached prefix per row (the new tokens sit right after it);
    positions: int32 [B, T] positions of the new tokens; step_mask: bool [B, T, T].
    """
    T = positions.shape[1]
    slots = jnp.arange(num_slots)[None, :]                     # [1, S]
    in_step_index = slots - lengths[:, None]                  # [B, S]
    in_step = (in_step_index >= 0) & (in_step_index < T)
    gather_index = jnp.clip(in_step_index, 0, T - 1)
    step_visible = jnp.take_along_axis(
        step_mask, jnp.broadcast_to(gather_index[:, None, :], (*step_mask.shape[:2], num_slots)),
        axis=2)
    mask = (slots < lengths[:, None])[:, None, :] | (step_visible & in_step[:, None, :])
    if window is not None:
        key_positions = jnp.where(in_step, jnp.take_along_axis(positions, gather_index, axis=1), slots)
        mask &= (positions[:, :, None] - key_positions[:, None, :]) < window
    return mask


def reference_attention(q, k, v, mask):
    """Grouped-query attention in plain jax.numpy.

    q: [B, T, H, D]; k, v: [B, S, Hkv, D]; mask: bool [B, T, S]. Returns [B, T, H, D].
    Scores and softmax in float32; the output has q's dtype.
    """
    B, T, H, D = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(B, T, kv_heads, H // kv_heads, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (D ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(B, T, H, D)
