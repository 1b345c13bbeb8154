"""Split-K decode attention (FlashDecoding / Lean Attention) as a Pallas kernel, beside its reference.

The same attention as `pallas_kernels.tree_attention` (a drop-in with the same arguments): the
T in-step tokens attend to their row's cached prefix, slots < lengths[b], and to the in-step
tokens `step_mask` allows. The G = H / Hkv query heads sharing a kv head are taken together as
G * T query rows, so the cache is read once per kv head. Scores and softmax in float32.

Why split: the tree kernel runs one program per (row, kv head), which walks the whole prefix
alone. A plain decoding step at batch 1 then has only Hkv programs (8 for a Llama-3 8B) on a GPU
with 132 SMs, and at a long context almost all of the GPU idles while they read the cache. Here
the cache's slots are also split into `num_splits` contiguous chunks, each its own program:
  1. pass 1, a pallas_call over the grid (B, Hkv, num_splits): split j reads only its chunk,
     in blocks of `block_s` slots, looping only over the blocks below the row's length (a split
     wholly past the length does no work), with an online softmax; it writes its partial output,
     normalised within the split, and its log-sum-exp per query row. An empty split writes
     output 0 and log-sum-exp -inf, so it weighs nothing in the combine.
  2. pass 2, plain jax.numpy: the in-step block (the step's own T keys under step_mask, small)
     as one more partial, then the partials summed with weights exp(lse_j - logsumexp(lse)).
The dots take the inputs' dtype with float32 accumulation (tensor cores / the MXU for bfloat16);
the probabilities are cast to the values' dtype before p @ v, as the XLA reference does.

Verified here, against the reference and against `tree_attention` (tests/test_decode_attention.py):
the Pallas interpreter on CPU, the TPU interpreter (`interpret=pltpu.InterpretParams()`) at
(8, 128)-tiled shapes, and lowering for CUDA through Pallas's Triton lowering on a machine
without a GPU (`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`), and for TPU
through Mosaic TPU (under an abstract mesh of TPU devices), up to one decode token over 32k
slots of head_dim 128 in bfloat16. On a TPU the lengths come by scalar prefetch and a split
past its row's length re-names the block copied before it, so it reads nothing. Not verified:
compiling and running on a GPU or TPU (no device was lent), hence neither its speed nor the
default `num_splits` heuristic, which assumes an H100/H200-sized GPU. On a GPU, bfloat16/float16
with head_dim a multiple of 64 goes to `tree_attention_mgpu` (Mosaic GPU, JAX 0.11's default lowering), which splits the
cache the same way; this kernel (Triton there) takes the rest. Known gaps: the splits cover
the cache's slots, not the row's length, so a short row in a long cache leaves most splits empty (cheap, but its work is
not spread; Lean Attention's stream-K balancing over the real lengths is not done); on a real
TPU `lengths` belongs in scalar memory (scalar prefetch), where the index map could also stop
the pipeline from copying chunks past the length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tree_attention import BLOCK_S, gpu_compiler_params, on_tpu
from pallas_kernels.tree_attention import reference as _tree_reference

# The default split count aims for about one program per SM of an H100/H200 (132 SMs) over the
# whole grid, with at least this many cache blocks per split so each program's fixed cost (its
# query rows, the combine's extra partial) stays small against its cache reads.
_TARGET_PROGRAMS = 128
_MIN_BLOCKS_PER_SPLIT = 4


def reference(q, k_cache, v_cache, lengths, k_new, v_new, step_mask):
    """The same attention through the XLA reference path (`jaxdec.attention.reference_attention`)."""
    return _tree_reference(q, k_cache, v_cache, lengths, k_new, v_new, step_mask)


def default_num_splits(batch: int, kv_heads: int, num_slots: int, block_s: int = BLOCK_S) -> int:
    """Splits per (row, kv head): enough programs to fill a GPU when batch * kv_heads alone does
    not, at least `_MIN_BLOCKS_PER_SPLIT` blocks each, and a divisor of the number of blocks (so
    every split's chunk is a whole block of the grid; a prime number of blocks gets 1)."""
    num_blocks = num_slots // block_s
    want = min(pl.cdiv(_TARGET_PROGRAMS, batch * kv_heads), max(1, num_blocks // _MIN_BLOCKS_PER_SPLIT))
    return max(d for d in range(1, want + 1) if num_blocks % d == 0)


def decode_attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *, num_splits: int | None = None,
                     block_s: int = BLOCK_S, interpret=None, compiler_params=None):
    """q: [B, T, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int32 [B] (slots < lengths[b] are
    the row's prefix); k_new, v_new: [B, T, Hkv, D]; step_mask: bool [B, T, T]. Returns [B, T, H, D]
    in q's dtype. num_splits: chunks of the cache per (row, kv head), a divisor of S / block_s
    (default: `default_num_splits`). interpret: None runs the Pallas interpreter on CPU."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of the kv heads Hkv={Hkv}")
    block_s = min(block_s, S)
    if block_s < 1:
        raise ValueError(f"block_s={block_s} must be at least 1 (cache slots S={S})")
    if S % block_s:
        raise ValueError(f"cache slots S={S} must be a multiple of block_s={block_s}")
    num_blocks = S // block_s
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, S, block_s)
    if num_splits < 1 or num_blocks % num_splits:
        raise ValueError(f"num_splits={num_splits} must be at least 1 and divide the number of cache blocks "
                         f"S/block_s={S}/{block_s}={num_blocks}")
    from pallas_kernels import tree_attention_mgpu as mgpu
    if mgpu.takes_over(interpret, compiler_params, q.dtype, D) and S % 64 == 0:  # split the same way
        return mgpu.tree_attention_mgpu(q, k_cache, v_cache, lengths, k_new, v_new, step_mask,
                                            num_splits=num_splits)
    tpu = on_tpu(interpret)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    G = H // Hkv
    # Query rows of one kv head: [B, Hkv, G*T, D], row g*T + t is head g of token t, scaled in q's
    # dtype as the reference does. Rows are padded to a power of two (the Triton lowering's rule
    # for the arrays a kernel loads); padded rows are zeros and dropped.
    M, M_pad = G * T, _power_of_two(G * T)
    rows = lambda x: x.reshape(B, T, Hkv, -1, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, -1, D)
    q_rows = rows(q) * jnp.asarray(D ** -0.5, q.dtype)
    q_pad = jnp.pad(q_rows, ((0, 0), (0, 0), (0, M_pad - M), (0, 0)))
    if compiler_params is None and jax.default_backend() == "gpu" and not interpret:
        compiler_params = gpu_compiler_params(M_pad, D)  # Triton: Mosaic GPU would copy each chunk to smem

    chunk = S // num_splits
    kernel = functools.partial(_split_kernel, block_s=block_s, blocks_per_split=num_blocks // num_splits,
                               all_lengths=tpu)
    # Pass 1. The cache block of split j is its chunk [j * chunk, (j + 1) * chunk) of the row's
    # slots: (chunk, D) tiles, chunk a multiple of block_s, so (8, 128)-tiled when block_s is.
    def chunk_map(b, h, j, *prefetched):
        if prefetched:
            # TPU: a split that starts past its row's length names the row's last chunk with
            # data, the block the pipeline copied one step before, so it copies nothing.
            (row_lengths,) = prefetched
            j = jnp.minimum(j, jnp.maximum(pl.cdiv(row_lengths[b], chunk) - 1, 0))
        return b, h, j, 0

    in_specs = [
        pl.BlockSpec((None, None, M_pad, D), lambda b, h, j, *_: (b, h, 0, 0)),       # query rows
        pl.BlockSpec((None, None, chunk, D), chunk_map),                              # the split's chunk
        pl.BlockSpec((None, None, chunk, D), chunk_map),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, M_pad, D), lambda b, h, j, *_: (b, h, j, 0, 0)),  # partial outputs
        pl.BlockSpec((None, None, None, M_pad, 1), lambda b, h, j, *_: (b, h, j, 0, 0)),  # their log-sum-exp
    ]
    if tpu:  # the lengths in scalar memory: a rank-1 block of one row's length is not a TPU tile
        grid = dict(grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(B, Hkv, num_splits),
                                                           in_specs=in_specs, out_specs=out_specs))
    else:
        grid = dict(grid=(B, Hkv, num_splits), in_specs=[pl.BlockSpec((1,), lambda b, h, j: (b,)), *in_specs],
                    out_specs=out_specs)
    parts, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, Hkv, num_splits, M_pad, D), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, num_splits, M_pad, 1), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name="decode_attention_splits",
        **grid,
    )(lengths.astype(jnp.int32), q_pad, k_cache, v_cache)
    parts, lse = parts[:, :, :, :M], lse[:, :, :, :M, 0]                              # [B, Hkv, splits, M(, D)]

    # Pass 2. The in-step block: G*T query rows against the step's T keys, [B, Hkv, M, T].
    k_step, v_step = rows(k_new), rows(v_new)                                           # [B, Hkv, T, D]
    scores = jnp.einsum("bkmd,bktd->bkmt", q_rows.astype(k_step.dtype), k_step, preferred_element_type=jnp.float32)
    visible = jnp.broadcast_to(step_mask[:, None, None], (B, 1, G, T, T)).reshape(B, 1, M, T)
    scores = jnp.where(visible, scores, -jnp.inf)
    step_lse, step_part = _softmax_part(scores, v_step)
    # The combine: every partial weighs exp(its lse - the total lse); empty ones (lse -inf) 0.
    lse = jnp.concatenate([lse, step_lse[:, :, None]], axis=2)                          # [B, Hkv, splits+1, M]
    parts = jnp.concatenate([parts, step_part[:, :, None]], axis=2)
    out = combine_splits(parts, lse).astype(q.dtype)                                   # [B, Hkv, M, D]
    return out.reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def combine_splits(parts, lse):
    """Partial outputs [B, Hkv, splits, M, D], each normalised within its split, and their
    log-sum-exps [B, Hkv, splits, M] -> the whole softmax's output [B, Hkv, M, D] (float32):
    each split weighs exp(its lse - the total's); an empty one (lse -inf) weighs 0."""
    weights = jnp.exp(lse - jax.nn.logsumexp(lse, axis=2, keepdims=True))
    return jnp.sum(weights[..., None] * parts, axis=2)


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _softmax_part(scores, values):
    """A normalised partial output and its log-sum-exp from scores [..., M, n] (masked ones -inf)
    and values [..., n, D]. A row with no visible key gives output 0 and log-sum-exp -inf."""
    top = jnp.max(scores, axis=-1)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    weights = jnp.exp(scores - shift[..., None])
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("...mn,...nd->...md", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return _finish(out, total, shift)


def _finish(acc, total, shift):
    """(log-sum-exp, normalised output) of an online softmax; rows that saw nothing: (-inf, 0)."""
    seen = total > 0
    lse = jnp.where(seen, shift + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return lse, acc / jnp.where(seen, total, 1.0)[..., None]


def _split_kernel(lengths_ref, q_ref, k_ref, v_ref, part_ref, lse_ref, *, block_s: int, blocks_per_split: int,
                  all_lengths: bool):
    """all_lengths: lengths_ref holds every row's length (scalar prefetch), else the row's own."""
    q = q_ref[...].astype(k_ref.dtype)                                              # [M, D]
    M, D = q.shape
    length = lengths_ref[pl.program_id(0)] if all_lengths else lengths_ref[0]
    start = pl.program_id(2) * (blocks_per_split * block_s)                        # the chunk's first slot
    # Only the blocks that hold part of the prefix; none when the chunk starts past the length.
    num_blocks = jnp.clip(pl.cdiv(length - start, block_s), 0, blocks_per_split)

    def cache_block(i, carry):
        top, total, acc = carry
        offset = pl.multiple_of(i * block_s, block_s)
        keys = k_ref[pl.ds(offset, block_s), :]
        values = v_ref[pl.ds(offset, block_s), :]
        scores = jnp.dot(q, keys.T, preferred_element_type=jnp.float32)           # [M, block_s]
        slot = start + offset + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        scores = jnp.where(slot < length, scores, -jnp.inf)
        # Every looped block holds at least one slot below the length, so new_top is finite.
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        weights = jnp.exp(scores - new_top[:, None])
        rescale = jnp.exp(top - new_top)                                             # 0 on the first block
        total = total * rescale + jnp.sum(weights, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(weights.astype(values.dtype), values,
                                               preferred_element_type=jnp.float32)
        return new_top, total, acc

    carry = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M, D), jnp.float32))
    top, total, acc = jax.lax.fori_loop(0, num_blocks, cache_block, carry)
    lse, part = _finish(acc, total, top)
    part_ref[...] = part
    lse_ref[...] = lse[:, None]
