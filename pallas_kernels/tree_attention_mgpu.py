"""Tree (and sparse) attention for Hopper GPUs through Mosaic GPU, JAX 0.11's default Pallas GPU lowering.

The same attention as `tree_attention.tree_attention` (and its `reference`): the T in-step
tokens of a row attend to its cached prefix (slots < lengths[b]) and to the in-step tokens
`step_mask` allows. The query rows of the G query heads that share a kv head are one matrix
(row g * T + t is head g of token t), cut into tiles of 64 rows, one warpgroup's tensor-core
(wgmma) tile. The cache's slots are split into `num_splits` chunks (split-K, as
FlashDecoding: at batch 1 a long cache would otherwise keep only Hkv x tiles programs busy on
a GPU of 132 SMs). One program per (row tile, kv head and split, batch row):
  1. a pipeline of TMA copies brings the split's cache blocks (`block_s` slots of keys and
     values) into shared memory, two in flight, over only the blocks below the row's length
     (a grid of steps known at run time; none for a split past the length);
  2. for each block, scores = q k^T and p v on the tensor cores, folded into a running
     softmax (max, sum, output accumulator in registers, float32);
  3. in the first split, the step's own keys and values go through the same fold, in blocks
     of `block_s` tokens, with the tree mask added as a 0 / -inf bias;
  4. the split's output, normalised within it, and its log-sum-exp, back through shared
     memory; XLA then sums the splits' outputs weighted by exp(lse - logsumexp(lse)).
Unlike the `pl.pallas_call` kernel (Triton on GPU), nothing stages a whole row's cache in
shared memory, which does not fit past ~400 slots of head_dim 128. Up to 64 query rows (16
tree tokens at GQA 4) one program reads the row's cache once for all of them. Past that the
row tiles of one (kv head, row) are separate programs: one program cannot keep them all,
since each tile's float32 accumulator [64, 128] takes 64 registers of each of its 128
threads, and a 64-node tree at GQA 4 (260 rows, 5 tiles) would need more registers than an
SM has. The grid puts the row tiles fastest, so the tiles of one (kv head, row) run side by
side over the same cache blocks, and L2 can serve a block to all of them after one read from
memory (how well it does is for a GPU to measure).

`sparse_attention_mgpu` is the same kernel over chosen cache pages (Quest / TriForce's
sparse draft, `sparse_attention.py`'s arguments): the pipeline's copies follow the compacted
page table, one page of `page_size` slots per step, and there is no split.

Needs bfloat16 or float16 (the tensor cores' types; float32 goes to the Triton kernels),
head_dim a multiple of 64, cache blocks a multiple of 64 slots and pages of 16 or more (the
operands' swizzle is a page row's size in bytes, up to 128).

Checked on CPU (tests/test_tree_attention.py, test_sparse_attention.py): lowering for CUDA,
and the Mosaic GPU interpreter against the references. Under JAX 0.11's interpreter (the GPU
machines' version) everything is the kernel's own except p v, a `jnp.dot`: that interpreter
does not run a wgmma whose left operand is in registers. JAX 0.10's runs no wgmma and no layout
cast, so under it both products are `jnp.dot` on the blocks it copied and the layouts are
left to it; the pipeline, the masks, the softmax and the copies are still the kernel's own.
Not yet verified: compiling and running it on a GPU (none has been lent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_attention import combine_splits, default_num_splits
from pallas_kernels.sparse_attention import compact_pages
from pallas_kernels.tree_attention import from_rows, query_rows

TILE_ROWS = 64                      # query rows per program: one warpgroup's wgmma tile
DTYPES = (jnp.bfloat16, jnp.float16)


def supports(dtype, head_dim: int) -> bool:
    """Whether this kernel takes queries of `dtype` and `head_dim`."""
    return jnp.dtype(dtype) in map(jnp.dtype, DTYPES) and head_dim % 64 == 0


def takes_over(interpret, compiler_params, dtype, head_dim: int) -> bool:
    """Whether a pallas_call kernel (tree, decode, sparse attention) hands its call to this
    one: on a GPU, nothing asked for explicitly (no interpreter, no Triton parameters), and
    a dtype and head_dim this kernel takes. The caller checks its own block or page size."""
    return (interpret is None and compiler_params is None and jax.default_backend() == "gpu"
            and supports(dtype, head_dim))


def tree_attention_mgpu(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *, block_s: int = 64,
                        num_splits: int | None = None, interpret=None):
    """q: [B, T, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int32 [B];
    k_new, v_new: [B, T, Hkv, D]; step_mask: bool [B, T, T]. Returns [B, T, H, D].
    num_splits: chunks of the cache per (row, kv head), each its own program (split-K), a
    divisor of S / block_s (default: `decode_attention.default_num_splits`, enough programs
    to fill an H100/H200). `interpret`: None compiles for the GPU; the Mosaic GPU
    interpreter's params run it on CPU."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    _check(q.dtype, D, block_s, S)
    num_blocks = S // block_s
    if num_splits is None:
        num_splits = default_num_splits(B * _tiles(H // Hkv * T), Hkv, S, block_s)
    if num_splits < 1 or num_blocks % num_splits:
        raise ValueError(f"num_splits={num_splits} must be at least 1 and divide the number of cache blocks "
                         f"S/block_s={S}/{block_s}={num_blocks}")
    return _attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, block_s=block_s, num_splits=num_splits,
                      pages=None, interpret=interpret)


def sparse_attention_mgpu(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, *, page_size: int,
                          interpret=None):
    """`sparse_attention.sparse_attention` (same arguments) through this kernel: the cache
    pipeline copies the chosen pages (the compacted table's first `count` ids, one TMA copy of
    [page_size, D] each) instead of contiguous blocks."""
    B, T, H, D = q.shape
    S = k_cache.shape[2]
    _check(q.dtype, D, page_size, S, what="page_size", multiple=16)
    ids, counts = compact_pages(page_ids, lengths, S, page_size)
    return _attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, block_s=page_size, num_splits=1,
                      pages=(ids, counts), interpret=interpret)


def _tiles(rows: int) -> int:
    return -(-rows // TILE_ROWS)


def _check(dtype, head_dim: int, block: int, S: int, what: str = "block_s", multiple: int = 64):
    if not supports(dtype, head_dim):
        raise ValueError(f"the Mosaic GPU attention kernel takes bfloat16 or float16 with head_dim a multiple of "
                         f"64, got dtype={jnp.dtype(dtype).name}, head_dim={head_dim}")
    if block % multiple or S % block:
        raise ValueError(f"{what}={block} must be a multiple of {multiple} that divides the cache slots S={S}")


def _attention(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *, block_s, num_splits, pages, interpret):
    """The kernel of the module docstring. `pages`: None reads the contiguous blocks of
    `block_s` slots below each row's length, in `num_splits` chunks; (ids [B, Hkv, N], counts
    [B, Hkv]) reads only the pages ids[b, h, :counts[b, h]] of `block_s` slots."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    dtype = q.dtype
    step_block_s = max(block_s, 64)                                         # step tokens per block
    round_up = lambda n, m: -(-n // m) * m
    q_rows, k_step, v_step, mask_rows = query_rows(q, k_new, v_new, step_mask,
                                                   pad_rows=lambda n: round_up(n, TILE_ROWS),
                                                   pad_tokens=lambda n: round_up(n, step_block_s))
    bias = jnp.where(mask_rows != 0, 0.0, -jnp.inf).astype(jnp.float32)       # [B, M_pad, T_pad]
    M_pad, T_pad = q_rows.shape[2], k_step.shape[2]
    tiles, chunk = M_pad // TILE_ROWS, S // num_splits
    # Under an interpreter, what it cannot run is done in plain jnp instead: JAX 0.10's runs no
    # wgmma, layout cast or iota with a layout; 0.11's runs them all except a wgmma whose left
    # operand is in registers (p v), which is a jnp.dot under both.
    interpreting = interpret is not None
    stand_ins = interpreting and jax.__version_info__ < (0, 11)

    # wgmma reads its shared-memory operands in 128-byte swizzled tiles of 8 rows.
    swizzled = lambda itemsize, swizzle=128: (plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle))
    itemsize = jnp.dtype(dtype).itemsize
    # p v contracts over a block's rows in groups of (swizzle / itemsize), 64 rows at the widest
    # swizzle, so a block of fewer rows (a page of 16) takes a narrower one, and wgmma wants q's
    # swizzle to match the keys'.
    operands = swizzled(itemsize, min(128, block_s * itemsize))
    kv_block = lambda rows, index: plgpu.BlockSpec((rows, D), index, transforms=operands)
    step_block = lambda: kv_block(step_block_s, lambda j: (j, 0))
    bias_block = plgpu.BlockSpec((TILE_ROWS, step_block_s), lambda j: (0, j), transforms=swizzled(4))
    wgmma_layout = (lambda x, layout: x) if stand_ins else plgpu.layout_cast

    def product(a, b_smem, transpose_b=False, a_in_registers=False):
        """a [64, K] (in shared memory or registers) @ b_smem [K, N] (or its transpose) in float32."""
        if stand_ins or (interpreting and a_in_registers):
            a = a if a_in_registers else a[...]
            b = b_smem[...]
            return jnp.dot(a, b.T if transpose_b else b, preferred_element_type=jnp.float32)
        N = b_smem.shape[0] if transpose_b else b_smem.shape[1]

        def on_tensor_cores(acc_ref):
            plgpu.wgmma(acc_ref, a, b_smem.transpose((1, 0)) if transpose_b else b_smem)
            return acc_ref[...]
        return pl.run_scoped(on_tensor_cores, plgpu.ACC((TILE_ROWS, N), jnp.float32))

    def slot_ids(start, width):
        shape = (TILE_ROWS, width)
        if stand_ins:
            return start + lax.broadcasted_iota(jnp.int32, shape, 1)
        return start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

    def fold(q_smem, keys_smem, values_smem, carry, visible):
        """One block into the running softmax (max [64], sum [64], output [64, D])."""
        top, total, acc = carry
        scores = visible(product(q_smem, keys_smem, transpose_b=True))     # [64, block_s], -inf where hidden
        new_top = jnp.maximum(top, scores.max(axis=1))
        # A row that has seen only hidden keys keeps top = -inf; shift by 0 then (exp(-inf) = 0).
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
        weights = jnp.exp(scores - lax.broadcast_in_dim(shift, scores.shape, [0]))
        rescale = jnp.exp(top - shift)
        total = total * rescale + weights.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0]) + product(weights.astype(dtype), values_smem,
                                                                        a_in_registers=True)
        return new_top, total, acc

    def kernel(lengths_gmem, q_gmem, k_gmem, v_gmem, k_step_gmem, v_step_gmem, bias_gmem, *rest):
        *page_table, part_gmem, lse_gmem = rest
        tile, kv_split, b = lax.axis_index("tile"), lax.axis_index("kv_split"), lax.axis_index("row")
        h, split = kv_split // num_splits, kv_split % num_splits
        length = lengths_gmem[b]
        rows = pl.ds(tile * TILE_ROWS, TILE_ROWS)
        start = split * chunk                                                   # the split's first slot

        def with_buffers(q_smem, part_smem, lse_smem, q_ready):
            plgpu.copy_gmem_to_smem(q_gmem.at[b, h, rows], q_smem, q_ready.at[0])
            plgpu.barrier_wait(q_ready.at[0])
            carry = (wgmma_layout(jnp.full((TILE_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                     wgmma_layout(jnp.zeros((TILE_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                     wgmma_layout(jnp.zeros((TILE_ROWS, D), jnp.float32), plgpu.Layout.WGMMA))

            if pages is None:
                # Only the split's blocks below the length (none when it starts past the length).
                num_blocks = jnp.clip(pl.cdiv(length - start, block_s), 0, chunk // block_s)
                first_slot = lambda i: start + i * block_s
                cache_spec = kv_block(block_s, lambda i: (i, 0))
                keys, values = k_gmem.at[b, h, pl.ds(start, chunk)], v_gmem.at[b, h, pl.ds(start, chunk)]
            else:
                # Only the chosen pages that hold a visible slot: the compacted table's first `count`.
                ids_gmem, counts_gmem = page_table
                num_blocks = counts_gmem[b, h]
                first_slot = lambda i: ids_gmem[b, h, i] * block_s
                cache_spec = kv_block(block_s, lambda i: (ids_gmem[b, h, i], 0))
                keys, values = k_gmem.at[b, h], v_gmem.at[b, h]

            def cache_block(index, keys_smem, values_smem, carry):
                slots = slot_ids(first_slot(index[0]), block_s)
                return fold(q_smem, keys_smem, values_smem, carry, lambda s: jnp.where(slots < length, s, -jnp.inf))

            def step_tokens(index, keys_smem, values_smem, bias_smem, carry):
                return fold(q_smem, keys_smem, values_smem, carry, lambda s: s + bias_smem[...])

            carry = plgpu.emit_pipeline(cache_block, grid=(num_blocks,), in_specs=[cache_spec, cache_spec],
                                        max_concurrent_steps=2, init_carry=carry)(keys, values)
            # The step's own tokens, in the first split only.
            top, total, acc = plgpu.emit_pipeline(
                step_tokens, grid=(jnp.where(split == 0, T_pad // step_block_s, 0),),
                in_specs=[step_block(), step_block(), bias_block], max_concurrent_steps=2,
                init_carry=carry)(k_step_gmem.at[b, h], v_step_gmem.at[b, h], bias_gmem.at[b, rows])
            # The split's output normalised within it, and its log-sum-exp (-inf: saw nothing).
            seen = total > 0
            part_smem[...] = acc / lax.broadcast_in_dim(jnp.where(seen, total, 1.0), acc.shape, [0])
            lse_smem[...] = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(part_smem, part_gmem.at[b, h, split, rows])
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, h, split, rows])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(with_buffers, plgpu.SMEM((TILE_ROWS, D), dtype, transforms=operands),
                      plgpu.SMEM((TILE_ROWS, D), jnp.float32, transforms=swizzled(4)),
                      plgpu.SMEM((TILE_ROWS,), jnp.float32), plgpu.Barrier(num_barriers=1))

    # Row tiles fastest, then the splits of one kv head: programs that read the same blocks
    # (tiles) or neighbouring ones (splits) run side by side.
    parts, lse = plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((B, Hkv, num_splits, M_pad, D), jnp.float32),
                          jax.ShapeDtypeStruct((B, Hkv, num_splits, M_pad), jnp.float32)),
        grid=(tiles, Hkv * num_splits, B), grid_names=("tile", "kv_split", "row"),
        compiler_params=plgpu.CompilerParams(), interpret=interpret,
    )(lengths.astype(jnp.int32), q_rows, k_cache, v_cache, k_step, v_step, bias, *(pages or ()))
    # The combine (plain XLA, small). Every real query row sees its own token (split 0), so
    # its total is finite; padding rows (which may see nothing) are dropped first.
    M = H // Hkv * T
    return from_rows(combine_splits(parts[:, :, :, :M], lse[:, :, :, :M]).astype(dtype), T, H)
