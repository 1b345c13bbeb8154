"""Tree attention as a Pallas kernel, beside its reference.

The verify step's attention (`jaxdec.attention.reference_attention` with a plain prefix
mask): the T in-step tokens (a token tree's root and nodes, or a chain) attend to their row's
cached prefix, slots < lengths[b], and to the in-step tokens `step_mask` allows (ancestors for
a tree). One program per (row, kv head) takes the G * T query rows of the G query heads that
share the kv head as one matrix, so the row's cache is read once for all of them:
  1. an online softmax (running max, running sum, output) over the cache in blocks of
     `block_s` slots, looping only over the blocks that hold part of the prefix;
  2. the intra-tree block under step_mask, folded into the same running softmax;
  3. the output, normalised.
Scores and softmax in float32; the output in q's dtype.

Verified here, against the reference (tests/test_tree_attention.py): the Pallas interpreter
on CPU, and the TPU interpreter (`interpret=pltpu.InterpretParams()`) at (8, 128)-tiled
shapes. Not yet verified: compiling for a GPU or TPU (no device in this session). The loop
reads the cache through `pl.ds` slices of a whole-row block, the shape the Triton lowering
handles; Mosaic GPU and real TPUs may want explicit pipelining over cache blocks, and
`lengths` in scalar memory (scalar prefetch) on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxdec.attention import prefix_mask, reference_attention


def reference(q, k_cache, v_cache, lengths, k_new, v_new, step_mask):
    """The same attention through the XLA reference path."""
    positions = jnp.zeros(q.shape[:2], jnp.int32)  # unused without a window
    return reference_attention(q, k_cache, v_cache, prefix_mask(lengths, positions, k_cache.shape[2], None),
                               k_new, v_new, step_mask)


def tree_attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *, block_s: int = 128, interpret=None):
    """q: [B, T, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int32 [B];
    k_new, v_new: [B, T, Hkv, D]; step_mask: bool [B, T, T]. Returns [B, T, H, D]."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    block_s = min(block_s, S)
    if S % block_s:
        raise ValueError(f"cache slots S={S} must be a multiple of block_s={block_s}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    # Query rows of one kv head: [B, Hkv, G*T, D], row g*T + t is head g of token t.
    rows = lambda x: x.reshape(B, T, Hkv, -1, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, -1, D)
    q_rows = rows(q) * jnp.asarray(D ** -0.5, q.dtype)
    k_step, v_step = rows(k_new), rows(v_new)                                   # [B, Hkv, T, D]
    mask_rows = jnp.broadcast_to(step_mask[:, None], (B, G, T, T)).reshape(B, G * T, T).astype(jnp.int32)
    kernel = functools.partial(_kernel, block_s=block_s)
    out = pl.pallas_call(
        kernel,
        grid=(B, Hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (b,)),                               # lengths
            pl.BlockSpec((1, 1, G * T, D), lambda b, h: (b, h, 0, 0)),           # query rows
            pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),               # the row's cache
            pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((1, 1, T, D), lambda b, h: (b, h, 0, 0)),               # the step's keys
            pl.BlockSpec((1, 1, T, D), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((1, G * T, T), lambda b, h: (b, 0, 0)),                 # the tree mask
        ],
        out_specs=pl.BlockSpec((1, 1, G * T, D), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G * T, D), q.dtype),
        interpret=interpret,
    )(lengths.astype(jnp.int32), q_rows, k_cache, v_cache, k_step, v_step, mask_rows)
    return out.reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _kernel(lengths_ref, q_ref, k_ref, v_ref, k_step_ref, v_step_ref, mask_ref, out_ref, *, block_s: int):
    q = q_ref[0, 0].astype(jnp.float32)                                         # [M, D], M = G*T
    M, D = q.shape
    length = lengths_ref[0]

    def fold(scores, values, carry):
        """One block of scores [M, n] (masked ones -inf) into the running softmax."""
        top, total, acc = carry
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        # A row that has seen only masked keys keeps top = -inf; shift by 0 then (exp(-inf) = 0).
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
        weights = jnp.exp(scores - shift[:, None])
        rescale = jnp.exp(top - shift)
        total = total * rescale + jnp.sum(weights, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(weights, values, preferred_element_type=jnp.float32)
        return new_top, total, acc

    def cache_block(i, carry):
        start = pl.multiple_of(i * block_s, block_s)
        keys = k_ref[0, 0, pl.ds(start, block_s), :].astype(jnp.float32)
        values = v_ref[0, 0, pl.ds(start, block_s), :].astype(jnp.float32)
        scores = jnp.dot(q, keys.T, preferred_element_type=jnp.float32)
        slot = start + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        return fold(jnp.where(slot < length, scores, -jnp.inf), values, carry)

    carry = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M, D), jnp.float32))
    carry = jax.lax.fori_loop(0, pl.cdiv(length, block_s), cache_block, carry)  # only blocks of the prefix
    step_scores = jnp.dot(q, k_step_ref[0, 0].astype(jnp.float32).T, preferred_element_type=jnp.float32)
    step_scores = jnp.where(mask_ref[0] != 0, step_scores, -jnp.inf)
    _, total, acc = fold(step_scores, v_step_ref[0, 0].astype(jnp.float32), carry)
    # Every token sees itself, so total > 0.
    out_ref[0, 0] = (acc / total[:, None]).astype(out_ref.dtype)
