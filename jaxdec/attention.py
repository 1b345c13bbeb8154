"""Attention over the KV cache plus the step's own tokens: the mask rule and the pure-jnp
(XLA) reference path.

Every step (prefill, decode, chain or tree verification) uses the same rule: the query of
in-step token t of row b sees
  * the row's cached prefix, slots `< lengths[b]` (slot s holds position s), and
  * the in-step tokens u with `step_mask[b, t, u]` (causal for a chain, ancestors for a tree),
restricted, for sliding-window layers, to keys less than `window` positions behind the query.

The two parts are two blocks of one softmax: the cache is only read here, and the step's keys
and values are written to it afterwards (`jaxdec.cache.write`). So a step that may not keep its
tokens (a verify step inside a `lax.switch`) never hands the cache to a branch that writes it,
which would make XLA copy the whole cache; and the tree-attention kernel has the same shape
(cache blocks with an online softmax, then the intra-tree block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def prefix_mask(lengths, positions, num_slots: int, window: int | None):
    """bool [B, T, num_slots]: which cache slots each in-step query sees.

    lengths: int32 [B] cached prefix per row; positions: int32 [B, T] of the in-step tokens.
    """
    slots = jnp.arange(num_slots)[None, None, :]
    mask = jnp.broadcast_to(slots < lengths[:, None, None], (*positions.shape, num_slots))
    if window is not None:
        mask &= (positions[:, :, None] - slots) < window
    return mask


def step_visibility(positions, step_mask, window: int | None):
    """bool [B, T, T]: step_mask, restricted to the window for sliding-window layers."""
    if window is None:
        return step_mask
    return step_mask & ((positions[:, :, None] - positions[:, None, :]) < window)


def reference_attention(q, k_cache, v_cache, cache_mask, k_new, v_new, step_mask):
    """Grouped-query attention in plain jax.numpy.

    q, k_new, v_new: [B, T, H or Hkv, D] the step's queries, keys and values;
    k_cache, v_cache: [B, Hkv, S, D] (the cache layout), or None for a step that reads no
    prefix (prefill from an empty cache); cache_mask: bool [B, T, S], or [B, Hkv, T, S] when
    each kv head sees its own slots (sparse attention); step_mask: bool [B, T, T].
    Returns [B, T, H, D]. Scores and softmax in float32; the output has q's dtype.

    The G = H / Hkv query heads sharing a kv head and the T in-step tokens are merged into one
    axis of G * T rows, so the cache products are plain batched matmuls over (row, kv head)
    that read the cache in its stored layout, with no per-step copy of it.
    """
    B, T, H, D = q.shape
    kv_heads = k_new.shape[2]
    groups = H // kv_heads
    rows = lambda x: x.reshape(B, T, kv_heads, -1, D).transpose(0, 2, 3, 1, 4).reshape(B, kv_heads, -1, D)
    def merge_mask(m):  # [B, T, S] or [B, Hkv, T, S] -> [B, 1 or Hkv, G*T, S]
        m = m[:, None] if m.ndim == 3 else m
        return jnp.broadcast_to(m[:, :, None], (B, m.shape[1], groups, T, m.shape[-1])).reshape(B, m.shape[1], groups * T, -1)
    q = rows(q) * jnp.asarray(D ** -0.5, q.dtype)                      # [B, Hkv, G*T, D]
    k_new, v_new = rows(k_new), rows(v_new)                             # [B, Hkv, T, D]
    new_scores = jnp.einsum("bkmd,bktd->bkmt", q, k_new, preferred_element_type=jnp.float32)
    new_scores = jnp.where(merge_mask(step_mask), new_scores, NEG_INF)
    if k_cache is None:
        weights = jax.nn.softmax(new_scores, axis=-1).astype(v_new.dtype)
        out = jnp.einsum("bkmt,bktd->bkmd", weights, v_new)
    else:
        S = k_cache.shape[2]
        cache_scores = jnp.einsum("bkmd,bksd->bkms", q, k_cache, preferred_element_type=jnp.float32)
        cache_scores = jnp.where(merge_mask(cache_mask), cache_scores, NEG_INF)
        weights = jax.nn.softmax(jnp.concatenate([cache_scores, new_scores], axis=-1), axis=-1)
        weights = weights.astype(v_new.dtype)
        out = (jnp.einsum("bkms,bksd->bkmd", weights[..., :S], v_cache)
               + jnp.einsum("bkmt,bktd->bkmd", weights[..., S:], v_new))
    return out.reshape(B, kv_heads, groups, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
