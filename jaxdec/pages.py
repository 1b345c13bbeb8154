"""Page summaries of a layer's keys and top-k page selection (Quest's bound).

The cache's slots are cut into pages of `page_size`. A page's summary is the per-channel
minimum and maximum of its valid keys, `[batch, kv_heads, pages, head_dim]`; an empty page
holds (+inf, -inf), so it can never be chosen. Summaries are updated with each write (a
scatter-min and scatter-max), never recomputed from the whole cache.

A page's score for queries q is sum_d max(q_d * min_d, q_d * max_d), an upper bound on
q . k for every key k in it; the query heads sharing a kv head add their bounds, so one
choice serves the whole group. The first page (attention sinks) and the pages holding the
most recent tokens are always kept. A drafter that attends only to the chosen pages stays
lossless because the dense target verifies (DESIGN.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def empty_summaries(batch_size: int, kv_heads: int, num_slots: int, head_dim: int, page_size: int):
    """(kmin, kmax) of a cache with no valid entries: +inf and -inf."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    pages = -(-num_slots // page_size)
    shape = (batch_size, kv_heads, pages, head_dim)
    return jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32)


def update_summaries(kmin, kmax, new_k, slots, page_size: int):
    """The summaries after writing new_k [B, T, kv_heads, D] at slots [B, T] (slots past the
    end dropped, as cache.write_slots drops them)."""
    B, T, H, _ = new_k.shape
    rows = jnp.arange(B)[:, None, None]
    heads = jnp.arange(H)[None, :, None]
    pages = (slots // page_size)[:, None, :]
    keys = jnp.swapaxes(new_k, 1, 2).astype(jnp.float32)
    return (kmin.at[rows, heads, pages].min(keys, mode="drop"),
            kmax.at[rows, heads, pages].max(keys, mode="drop"))


def summarize(layer_k, lengths, page_size: int):
    """Summaries recomputed from a layer's keys [B, kv_heads, S, D] and valid lengths [B]."""
    B, H, S, D = layer_k.shape
    kmin, kmax = empty_summaries(B, H, S, D, page_size)
    slots = jnp.broadcast_to(jnp.arange(S), (B, S))
    valid = slots < lengths[:, None]
    # Invalid slots are sent past the end, so they are dropped.
    slots = jnp.where(valid, slots, kmin.shape[2] * page_size)
    return update_summaries(kmin, kmax, jnp.swapaxes(layer_k, 1, 2), slots, page_size)


def page_scores(q, kmin, kmax):
    """Quest's upper bound per kv head and page: q [B, q_heads, D] -> [B, kv_heads, pages].
    Queries of several step tokens, [B, T, q_heads, D], add their bounds (one choice per step)."""
    if q.ndim == 4:
        return jax.vmap(page_scores, in_axes=(1, None, None))(q, kmin, kmax).sum(axis=0)
    B, Hq, D = q.shape
    H = kmin.shape[1]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({H})")
    # max(q_d * lo_d, q_d * hi_d) is q_d * hi_d where q_d > 0 and q_d * lo_d elsewhere (lo <= hi),
    # so the bound is two matmuls, q+ . hi + q- . lo, summed over the group's query heads.
    q = q.reshape(B, H, Hq // H, D).astype(jnp.float32)
    empty = jnp.isinf(kmin[..., 0])                                             # [B, H, pages]
    lo = jnp.where(empty[..., None], 0.0, kmin)
    hi = jnp.where(empty[..., None], 0.0, kmax)
    bound = (jnp.einsum("bhgd,bhpd->bhp", jnp.maximum(q, 0.0), hi)
             + jnp.einsum("bhgd,bhpd->bhp", jnp.minimum(q, 0.0), lo))
    # Empty pages (inf summaries) score -inf.
    return jnp.where(empty, -jnp.inf, bound)


def select_page_ids(q, kmin, kmax, lengths, page_size: int, budget: int, recent: int | None = None,
                    shared: bool = False):
    """The pages each kv head reads: int32 [B, kv_heads, budget // page_size] page indices,
    -1 where a row has fewer filled pages than that.

    The first page, the pages holding the last `recent` tokens (default one page) and then
    the best scoring others. Pages past a row's length are never chosen. q: the step's
    queries, [B, q_heads, D] or [B, T, q_heads, D]. shared: one choice for all kv heads (by
    their summed bounds), for pages reused by other layers, whose heads are not these.
    """
    if budget < page_size:
        raise ValueError(f"budget ({budget}) must hold at least one page of {page_size} tokens")
    recent = page_size if recent is None else recent
    if recent < 0:
        raise ValueError(f"recent must be non-negative, got {recent}")
    num_pages = kmin.shape[2]
    keep = min(budget // page_size, num_pages)
    page = jnp.arange(num_pages)[None, :]
    filled = page * page_size < lengths[:, None]
    first_recent = (page == 0) | ((page + 1) * page_size > lengths[:, None] - recent)
    forced = (filled & first_recent)[:, None, :]
    scores = page_scores(q, kmin, kmax)
    if shared:  # a page without a summary scores -inf under every head, so in the sum too
        scores = jnp.sum(scores, axis=1, keepdims=True)
    scores = jnp.where(forced, jnp.inf, jnp.where(filled[:, None, :], scores, -jnp.inf))
    best, top = jax.lax.top_k(scores, keep)
    ids = jnp.where(best > -jnp.inf, top, -1).astype(jnp.int32)
    return jnp.broadcast_to(ids, (ids.shape[0], kmin.shape[1], keep))


def select_pages(q, kmin, kmax, lengths, page_size: int, budget: int, recent: int | None = None):
    """`select_page_ids` as a mask: bool [B, kv_heads, pages]."""
    ids = select_page_ids(q, kmin, kmax, lengths, page_size, budget, recent)
    return jnp.any(ids[..., None] == jnp.arange(kmin.shape[2]), axis=2)
