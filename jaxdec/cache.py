"""The KV cache: preallocated, fixed-shape arrays and per-row lengths.

`k[i]` and `v[i]` are layer i's keys and values, `[batch, kv_heads, slots, head_dim]`: heads
before slots, so attention reads each head's keys as one contiguous matrix (no transpose of
the whole cache on every step).
`lengths[b]` counts the valid slots of row b; slot s of a row holds the token at position s.
A step writes its T new entries at slots `lengths[b] .. lengths[b] + T - 1` of each row and
leaves `lengths` alone: the caller commits by raising `lengths`, and rolling back rejected
tokens is only a smaller raise. Every step function takes the cache as a donated argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.config import ModelConfig
from jaxdec.sharding import constrain_cache


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # int32 [batch]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[2]


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "num_slots", "dtype"))
def init_cache(cfg: ModelConfig, batch_size: int, num_slots: int, dtype) -> KVCache:
    shape = (batch_size, cfg.num_key_value_heads, num_slots, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    # On a mesh the zeros are created sharded: a long cache need never fit one device.
    return constrain_cache(cfg, KVCache(k=zeros(), v=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32)))


def write(cache: KVCache, new_k, new_v, slots=None) -> KVCache:
    """The cache with a step's keys and values written at slots lengths .. lengths + T - 1
    (or at `slots` [B, T]).

    new_k, new_v: per layer [B, T, kv_heads, D], or None for a layer the step skipped (left
    as it is). `lengths` is not changed: the caller commits.
    """
    if slots is None:
        slots = cache.lengths[:, None] + jnp.arange(next(k for k in new_k if k is not None).shape[1])[None, :]
    keep = lambda old, new: old if new is None else write_slots(old, new, slots)
    return cache.replace(k=tuple(map(keep, cache.k, new_k)), v=tuple(map(keep, cache.v, new_v)))


def write_slots(layer_cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Writes new[b, t] ([B, T, kv_heads, D]) at slot slots[b, t] of row b, for every head;
    slots past the end are dropped.

    Dropping (rather than clamping, as dynamic_update_slice would) means an out-of-range
    write can never land on a valid entry.
    """
    B, T, H, _ = new.shape
    rows = jnp.arange(B)[:, None, None]
    heads = jnp.arange(H)[None, :, None]
    return layer_cache.at[rows, heads, slots[:, None, :]].set(
        jnp.swapaxes(new, 1, 2).astype(layer_cache.dtype), mode="drop")


def copy_slots(cache: KVCache, source, dest) -> KVCache:
    """The cache with the entries at slots source [B, N] copied to slots dest [B, N] (all
    read before any is written; destinations past the end are dropped)."""
    rows = jnp.arange(cache.batch_size)[:, None]
    # Advanced indices around a slice put their axes first: [B, N, kv_heads, D], as written.
    move = lambda layer: write_slots(layer, layer[rows, :, jnp.clip(source, 0, cache.num_slots - 1)], dest)
    return cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)))
