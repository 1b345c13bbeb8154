"""Sparse attention over the KV cache: what a step that reads only chosen pages carries.

A `SparsePages` holds, per layer, the page summaries of the cache's committed entries
(`jaxdec.pages`) and how far each row's summaries reach; the selection settings ride along
as static fields. A full-attention layer with summaries chooses its pages from its own
queries (Quest); a layer without them reuses the pages the last choosing layer took
(TidalDecode), or attends densely when no layer before it chose.

Summaries cover only committed entries (slots below `cache.lengths`, written by the dense
target), folded in at the start of each step (`fold_committed`), never a guess a later
rejection would take back. Entries written since (a draft's own tokens) lie in the most
recent pages, which the selection always keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec import pages
from jaxdec.cache import KVCache
from jaxdec.config import ModelConfig
from jaxdec.sharding import attention_over_mesh


@struct.dataclass
class SparsePages:
    kmin: tuple            # per layer [B, kv_heads, pages, D] float32, or None (the layer does not choose)
    kmax: tuple
    summarized: jax.Array  # int32 [B]: the summaries hold slots below this
    page_size: int = struct.field(pytree_node=False)
    budget: int = struct.field(pytree_node=False)
    recent: int = struct.field(pytree_node=False)
    shared_heads: bool = struct.field(pytree_node=False, default=False)  # one choice for all kv heads

    def choose(self, layer: int, q, lengths):
        """Page ids [B, kv_heads, budget // page_size] for layer `layer`'s queries q [B, T, H, D]."""
        return pages.select_page_ids(q, self.kmin[layer], self.kmax[layer], lengths, self.page_size, self.budget,
                                     self.recent, self.shared_heads)


def sparse_attention(cfg: ModelConfig, q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask,
                     page_size: int):
    """Attention over the chosen pages and the step's own tokens: the Pallas kernel with
    attn_impl="pallas" (per shard on a mesh), else its XLA reference, which gathers the
    pages (pallas_kernels/sparse_attention.py)."""
    from pallas_kernels import sparse_attention as kernels
    if cfg.attn_impl != "pallas":
        return kernels.reference(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, page_size=page_size)

    def kernel(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, page_ids):
        return kernels.sparse_attention(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask,
                                        page_size=page_size)
    return attention_over_mesh(cfg, kernel, q, k_cache, v_cache, lengths, k_new, v_new, step_mask, page_ids)


def init_pages(cfg: ModelConfig, batch_size: int, num_slots: int, page_size: int, budget: int, recent: int,
               choosing_layers, shared_heads: bool = False) -> SparsePages:
    """Empty summaries for the layers in `choosing_layers` (full-attention layers only)."""
    empty = [pages.empty_summaries(batch_size, cfg.num_key_value_heads, num_slots, cfg.head_dim, page_size)
             if i in choosing_layers else (None, None) for i in range(cfg.num_hidden_layers)]
    return SparsePages(kmin=tuple(e[0] for e in empty), kmax=tuple(e[1] for e in empty),
                       summarized=jnp.zeros((batch_size,), jnp.int32), page_size=page_size, budget=budget,
                       recent=recent, shared_heads=shared_heads)


def fold_committed(sparse: SparsePages, cache: KVCache, width: int) -> SparsePages:
    """The summaries with the cache's entries at slots summarized .. cache.lengths - 1 folded
    in, `width` slots per row at a time (one pass when a round commits at most `width`)."""
    B = cache.batch_size
    rows = jnp.arange(B)[:, None]
    past_end = cache.num_slots + sparse.page_size  # a slot update_summaries drops

    def fold(carry):
        kmin, kmax, done = carry
        slots = done[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
        read = jnp.clip(slots, 0, cache.num_slots - 1)
        slots = jnp.where(slots < cache.lengths[:, None], slots, past_end)
        kmin, kmax = list(kmin), list(kmax)
        for i, layer_k in enumerate(cache.k):
            if kmin[i] is not None:
                # Advanced indices around a slice put their axes first: [B, width, kv_heads, D].
                kmin[i], kmax[i] = pages.update_summaries(kmin[i], kmax[i], layer_k[rows, :, read], slots,
                                                          sparse.page_size)
        return tuple(kmin), tuple(kmax), jnp.minimum(done + width, cache.lengths)

    def behind(carry):
        return jnp.any(carry[2] < cache.lengths)

    kmin, kmax, done = jax.lax.while_loop(behind, fold, (sparse.kmin, sparse.kmax,
                                                          jnp.minimum(sparse.summarized, cache.lengths)))
    return sparse.replace(kmin=kmin, kmax=kmax, summarized=done)
