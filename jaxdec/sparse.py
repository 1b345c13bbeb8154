"""Sparse attention over the KV cache: what a step that reads only chosen pages carries.

A `SparsePages` holds, per layer, the page summaries of the cache's committed entries
(`jaxdec.pages`); the selection settings ride along as static fields. A full-attention
layer with summaries chooses its pages from its own queries (Quest); a layer without them
reuses the pages the last choosing layer took (TidalDecode), or attends densely when no
layer before it chose.

Summaries cover only committed entries (slots below `cache.lengths`, written by the dense
target): computed from the cache after prefill (`summarize_cache`), then folded in from what
each step commits (`fold_entries`), never a guess a later rejection would take back. Entries
written since (a draft's own tokens) lie in the most recent pages, which the selection
always keeps.
"""

from __future__ import annotations

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
    page_size: int = struct.field(pytree_node=False)
    budget: int = struct.field(pytree_node=False)
    recent: int = struct.field(pytree_node=False)
    shared_heads: bool = struct.field(pytree_node=False, default=False)  # one choice for all kv heads

    def choose(self, layer: int, q, lengths):
        """Page ids [B, kv_heads, budget // page_size] for layer `layer`'s queries q [B, T, H, D],
        chosen by the step's first token alone. A step of several tokens checks guesses
        (TriForce's sparse target verifying the draft model's): were they to pick the pages,
        the distribution it gives a guess would depend on the guess, and speculative sampling
        over it would no longer be exact."""
        return pages.select_page_ids(q[:, :1], self.kmin[layer], self.kmax[layer], lengths, self.page_size, self.budget,
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
    return SparsePages(kmin=tuple(e[0] for e in empty), kmax=tuple(e[1] for e in empty), page_size=page_size,
                       budget=budget, recent=recent, shared_heads=shared_heads)


def summarize_cache(sparse: SparsePages, cache: KVCache) -> SparsePages:
    """The summaries of every entry below cache.lengths, computed from the cache (after prefill;
    outside the decode loop, where reading the whole cache costs one pass)."""
    summaries = [(None, None) if kmin is None else pages.summarize(layer_k, cache.lengths, sparse.page_size)
                 for kmin, layer_k in zip(sparse.kmin, cache.k)]
    return sparse.replace(kmin=tuple(s[0] for s in summaries), kmax=tuple(s[1] for s in summaries))


def fold_entries(sparse: SparsePages, new_k, slots) -> SparsePages:
    """The summaries with a step's committed keys folded in: new_k per layer [B, T, kv_heads, D]
    written at slots [B, T] (-1: not committed).
    Folding what the step wrote, not reading it back from the cache, matters: a read of the
    cache inside the decode loop makes XLA copy a cache layer on every step."""
    kmin, kmax = list(sparse.kmin), list(sparse.kmax)
    for i, layer_k in enumerate(new_k):
        if kmin[i] is not None:
            past_end = kmin[i].shape[2] * sparse.page_size  # a page update_summaries drops
            kmin[i], kmax[i] = pages.update_summaries(kmin[i], kmax[i], layer_k, jnp.where(slots < 0, past_end, slots),
                                                      sparse.page_size)
    return sparse.replace(kmin=tuple(kmin), kmax=tuple(kmax))
