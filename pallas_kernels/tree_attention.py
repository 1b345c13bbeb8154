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
shapes; and lowered for CUDA through Pallas's Triton lowering and for TPU through Mosaic TPU
(on a machine without either: `jax.jit(...).trace(...).lower(lowering_platforms=...)`, the
TPU under an abstract mesh of TPU devices), at shapes up to a 65-node tree over 32k slots.
Not yet verified: compiling and running it on a GPU or TPU (no device has been lent so far).
The loop reads the cache through `pl.ds` slices of a whole-row block, the shape the Triton
lowering handles (see `gpu_compiler_params`); on a GPU, bfloat16 and float16 go to
`tree_attention_mgpu.py` instead, the same attention written for Mosaic GPU (JAX 0.11's
default lowering; Triton is deprecated there), with the cache blocks pipelined through
shared memory and the products on the tensor cores. On a TPU, where a whole-row block would
be copied into VMEM, the same attention runs as `sparse_attention`'s TPU kernel with every
block of the prefix chosen: lengths and block table in scalar memory, blocks by DMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxdec.attention import prefix_mask, reference_attention

BLOCK_S = 128  # cache slots per block, by default, in this kernel and the split-K one


def reference(q, k_cache, v_cache, lengths, k_new, v_new, step_mask):
    """The same attention through the XLA reference path."""
    positions = jnp.zeros(q.shape[:2], jnp.int32)  # unused without a window
    return reference_attention(q, k_cache, v_cache, prefix_mask(lengths, positions, k_cache.shape[2], None),
                               k_new, v_new, step_mask)


def tree_attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *, block_s: int = BLOCK_S, interpret=None,
                   compiler_params=None):
    """q: [B, T, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int32 [B];
    k_new, v_new: [B, T, Hkv, D]; step_mask: bool [B, T, T]. Returns [B, T, H, D].

    On a GPU, bfloat16/float16 with head_dim a multiple of 64 goes to the Mosaic GPU kernel
    (`tree_attention_mgpu`, blocks of 64 slots); other dtypes, or `compiler_params` given,
    to this module's kernel through Triton. On a TPU (or `interpret=pltpu.InterpretParams()`)
    the blocks below each row's length come by DMA through `sparse_attention`'s TPU kernel."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    block_s = min(block_s, S)
    if S % block_s:
        raise ValueError(f"cache slots S={S} must be a multiple of block_s={block_s}")
    from pallas_kernels import tree_attention_mgpu as mgpu
    if mgpu.takes_over(interpret, compiler_params, q.dtype, D) and S % 64 == 0:
        return mgpu.tree_attention_mgpu(q, k_cache, v_cache, lengths, k_new, v_new, step_mask)
    if on_tpu(interpret):
        from pallas_kernels import sparse_attention as sparse
        # A TPU copies each block of a pallas_call into VMEM, and this kernel's cache blocks
        # are whole rows (at 32k slots of head_dim 128 in bfloat16, 16 MB of keys and values
        # per kv head, double-buffered: past VMEM's 16-32 MB). The prefix is the sparse
        # kernel's TPU formulation with every block chosen as a page: the cache stays in HBM,
        # the blocks below the row's length come by DMA, two in flight.
        blocks = jnp.broadcast_to(jnp.arange(S // block_s, dtype=jnp.int32), (B, Hkv, S // block_s))
        return sparse.sparse_attention(q, k_cache, v_cache, blocks, lengths, k_new, v_new, step_mask,
                                       page_size=block_s, interpret=interpret, compiler_params=compiler_params)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    q_rows, k_step, v_step, mask_rows = query_rows(q, k_new, v_new, step_mask)
    M, M_pad, T_pad = G * T, q_rows.shape[2], k_step.shape[2]
    G_T, T = M_pad, T_pad  # the padded sizes, in the block shapes below
    if compiler_params is None and jax.default_backend() == "gpu" and not interpret:
        compiler_params = gpu_compiler_params(M_pad, D)
    kernel = functools.partial(_kernel, block_s=block_s)
    out = pl.pallas_call(
        kernel,
        grid=(B, Hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (b,)),                               # lengths
            pl.BlockSpec((1, 1, G_T, D), lambda b, h: (b, h, 0, 0)),             # query rows
            pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),               # the row's cache
            pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((1, 1, T, D), lambda b, h: (b, h, 0, 0)),               # the step's keys
            pl.BlockSpec((1, 1, T, D), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((1, G_T, T), lambda b, h: (b, 0, 0)),                   # the tree mask
        ],
        out_specs=pl.BlockSpec((1, 1, G_T, D), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G_T, D), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params,
    )(lengths.astype(jnp.int32), q_rows, k_cache, v_cache, k_step, v_step, mask_rows)
    return from_rows(out, M // G, H)


def query_rows(q, k_new, v_new, step_mask, pad_rows=None, pad_tokens=None):
    """The kernels' operands per (row, kv head): query rows [B, Hkv, M_pad, D] (row g*T + t is
    head g of token t, scaled by D**-0.5), the step's keys and values [B, Hkv, T_pad, D] and
    the step mask per query row, int32 [B, M_pad, T_pad]. Rows and step tokens are padded to
    `pad_rows(G*T)` and `pad_tokens(T)`, by default powers of two (the Triton lowering's rule);
    padded rows see no step token and are dropped, padded step tokens are masked for every row."""
    B, T, H, D = q.shape
    Hkv = k_new.shape[2]
    G = H // Hkv
    M, M_pad, T_pad = G * T, (pad_rows or _power_of_two)(G * T), (pad_tokens or _power_of_two)(T)
    rows = lambda x: x.reshape(B, T, Hkv, -1, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, -1, D)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))
    q_rows = pad(rows(q) * jnp.asarray(D ** -0.5, q.dtype), M_pad)
    mask_rows = jnp.broadcast_to(step_mask[:, None], (B, G, T, T)).reshape(B, M, T).astype(jnp.int32)
    mask_rows = jnp.pad(mask_rows, ((0, 0), (0, M_pad - M), (0, T_pad - T)))
    return q_rows, pad(rows(k_new), T_pad), pad(rows(v_new), T_pad), mask_rows


def from_rows(out, T: int, H: int):
    """The kernels' output [B, Hkv, M_pad, D] per query row back to [B, T, H, D]."""
    B, Hkv, _, D = out.shape
    G = H // Hkv
    return out[:, :, :G * T].reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def on_tpu(interpret) -> bool:
    """Whether a kernel call takes its TPU formulation: the TPU interpreter asked for
    (`pltpu.InterpretParams()`), or a TPU backend and no interpreter."""
    return isinstance(interpret, pltpu.InterpretParams) or (not interpret and jax.default_backend() == "tpu")


def gpu_compiler_params(rows: int, head_dim: int):
    """The GPU lowering: Triton. Its refs are pointers into device memory, so the kernel's
    `pl.ds` slices load one cache block at a time; Mosaic GPU (JAX 0.11's default) would copy
    the whole row's cache block into shared memory first, which does not fit (checked by
    lowering: 572 KB for 1024 slots of head_dim 128 in bfloat16, against 227 KB). More warps
    for more query rows: the float32 accumulator [rows, head_dim] lives in registers."""
    try:
        from jax.experimental.pallas import triton as plt
    except ImportError as err:  # deprecated in JAX 0.11, to be removed
        raise ValueError(f"attn_impl='pallas' on a GPU takes Pallas's Triton lowering for float32 models and for a "
                         f"head_dim not a multiple of 64 (this one: {head_dim}), and JAX {jax.__version__} has none: "
                         f"load the model with dtype='bfloat16' (the Mosaic GPU kernels) or attn_impl='xla'") from err
    return plt.CompilerParams(num_warps=4 if rows * head_dim <= 64 * 128 else 8, num_stages=2)


def fold(scores, values, carry):
    """One block of scores [M, n] (masked ones -inf) and its values [n, D] into a running
    softmax carry = (running max [M], running sum [M], output accumulator [M, D])."""
    top, total, acc = carry
    new_top = jnp.maximum(top, jnp.max(scores, axis=1))
    # A row that has seen only masked keys keeps top = -inf; shift by 0 then (exp(-inf) = 0).
    shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
    weights = jnp.exp(scores - shift[:, None])
    rescale = jnp.exp(top - shift)
    total = total * rescale + jnp.sum(weights, axis=1)
    acc = acc * rescale[:, None] + jnp.dot(weights, values, preferred_element_type=jnp.float32)
    return new_top, total, acc


def _kernel(lengths_ref, q_ref, k_ref, v_ref, k_step_ref, v_step_ref, mask_ref, out_ref, *, block_s: int):
    q = q_ref[0, 0].astype(jnp.float32)                                         # [M, D], M = G*T
    M, D = q.shape
    length = lengths_ref[0]

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
