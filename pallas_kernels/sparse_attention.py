"""Sparse attention over selected cache pages (Quest / TriForce), beside its reference.

The step's T tokens attend to the pages of their row's cache that `jaxdec.pages` chose for
each kv head (`page_ids` [B, Hkv, N], -1 for none), within them only to slots < lengths[b],
and to the in-step tokens `step_mask` allows: the prefix part of
`jaxdec.attention.reference_attention`, restricted to N * page_size slots per kv head. Nothing
outside the chosen pages is read, so the cost follows the budget, not the context.

The kernel, `sparse_attention`, is `tree_attention`'s with the cache loop over pages instead
of blocks. One program per (row, kv head) takes the G * T query rows of the G query heads
sharing the kv head as one matrix (so each chosen page is read once for all of them):
  0. outside the kernel, the page table is compacted: the ids that hold a visible slot
     (id >= 0, inside the cache, below the row's length) first, ascending, and their count;
  1. an online softmax (running max, running sum, output) over those `count` pages, each
     loaded as one [page_size, D] slice at `page_id * page_size`, the slots >= length masked;
  2. the step block under step_mask, folded into the same running softmax;
  3. the output, normalised. Scores and softmax in float32; the output in q's dtype.
Formulations of step 1 (the Triton and TPU ones share one body, `_attend`):
  - Pallas interpreter and GPU (Triton): the page table is a small int block, the caches
    whole-row blocks read through `pl.ds` slices; under Triton a ref is a pointer into device
    memory, so the slices are the only loads. The Triton lowering wants power-of-two arrays:
    page_size and head_dim must be powers of two (checked), query rows, step tokens and the
    page table are padded to powers of two.
  - GPU in bfloat16/float16 with head_dim a multiple of 64 and pages a multiple of 16 slots:
    not this kernel but `tree_attention_mgpu.sparse_attention_mgpu` (Mosaic GPU, JAX 0.11's
    default lowering): one TMA copy per chosen page into shared memory, two in flight.
  - TPU (a TPU backend, or `interpret=pltpu.InterpretParams()`): a whole-row block would be
    copied into VMEM, so the caches stay in HBM (`pl.ANY`) and each chosen page is copied by
    DMA into a two-page VMEM buffer, the next page's copy in flight while the current one is
    used; the page table, counts and lengths come by scalar prefetch (scalar memory). The
    dense tree kernel (`tree_attention`) runs this formulation on a TPU too, with every
    block below the length chosen.

Verified here, against the reference (tests/test_sparse_attention.py): the Pallas interpreter
on CPU (random shapes, GQA 1/2/4, trees, ragged lengths, random page subsets with -1 padding,
budgets below and above the context, pages from `jaxdec.pages`; a full budget equals dense
tree attention; poisoning every unchosen page changes nothing), bfloat16, the TPU interpreter
at (8, 128)-tiled shapes; and lowered for CUDA through Pallas's Triton lowering on a machine
without a GPU (an 8B-shaped decode step over 32k slots reading 64 pages of 16), and for TPU
as the tree kernel's prefix (tests/test_tree_attention.py). Not verified
(no device was lent): compiling and running on a GPU (Triton's own checks, e.g. minimum dot
sizes for small pages or step blocks, happen at compile time) or on a TPU (Mosaic's layout
rules: pages should be a multiple of 8 slots, 16 in bfloat16; no megacore split is asked for).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxdec.attention import reference_attention
from pallas_kernels.tree_attention import _power_of_two, fold, gpu_compiler_params, on_tpu, query_rows


def page_slots(page_ids, page_size: int):
    """int32 [B, Hkv, N * page_size]: the cache slots of the chosen pages, in page order."""
    B, H, N = page_ids.shape
    return (page_ids[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)).reshape(B, H, N * page_size)


def reference(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, *, page_size: int):
    """q: [B, T, H, D]; k_cache, v_cache: [B, Hkv, S, D]; page_ids: int32 [B, Hkv, N];
    lengths: int32 [B]; k_new, v_new: [B, T, Hkv, D]; step_mask: bool [B, T, T].
    Returns [B, T, H, D].

    The chosen pages are gathered ([B, Hkv, N * page_size, D], a copy of the budget only) and
    attended with a per-kv-head mask; a slot is visible when its page is real (id >= 0),
    inside the cache and below the row's length.
    """
    B, Hkv, S, D = k_cache.shape
    N = page_ids.shape[2]
    slots = page_slots(page_ids, page_size)
    visible = (jnp.repeat(page_ids >= 0, page_size, axis=2) & (slots < S)
               & (slots < lengths[:, None, None]))                                  # [B, Hkv, N*P]
    # Whole pages at a time: one gather index per page, not per key element.
    pages = -(-S // page_size)
    pad = ((0, 0), (0, 0), (0, pages * page_size - S), (0, 0))
    paged = lambda x: (jnp.pad(x, pad) if S % page_size else x).reshape(B, Hkv, pages, page_size * D)
    index = jnp.clip(page_ids, 0, pages - 1)[..., None]
    keys = jnp.take_along_axis(paged(k_cache), index, axis=2).reshape(B, Hkv, N * page_size, D)
    values = jnp.take_along_axis(paged(v_cache), index, axis=2).reshape(B, Hkv, N * page_size, D)
    cache_mask = jnp.broadcast_to(visible[:, :, None], (B, Hkv, q.shape[1], slots.shape[2]))
    return reference_attention(q, keys, values, cache_mask, k_new, v_new, step_mask)


# The kernel. ------------------------------------------------------------------------------


def sparse_attention(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, *, page_size: int,
                     interpret=None, compiler_params=None):
    """Same arguments and result as `reference`: q [B, T, H, D]; k_cache, v_cache [B, Hkv, S, D];
    page_ids int32 [B, Hkv, N] (-1: no page); lengths int32 [B]; k_new, v_new [B, T, Hkv, D];
    step_mask bool [B, T, T]. Returns [B, T, H, D].

    interpret: None runs the Pallas interpreter on CPU and compiles elsewhere; a
    `pltpu.InterpretParams()` (the TPU interpreter) or a TPU backend selects the TPU
    formulation (page table in scalar memory, pages copied by DMA). compiler_params: passed
    through; on a GPU the default is `gpu_compiler_params` (Triton).
    """
    _check(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, page_size)
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G, N = H // Hkv, page_ids.shape[2]
    from pallas_kernels import tree_attention_mgpu as mgpu
    if mgpu.takes_over(interpret, compiler_params, q.dtype, D) and page_size % 16 == 0:  # a TMA copy per page
        return mgpu.sparse_attention_mgpu(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask,
                                          page_size=page_size)
    tpu = on_tpu(interpret)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if not interpret and not tpu:
        # Triton's arrays have power-of-two shapes; a page is one [page_size, D] load.
        for name, value in (("page_size", page_size), ("head_dim", D)):
            if value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two for the GPU (Triton) lowering")

    ids, counts = compact_pages(page_ids, lengths, S, page_size)
    N_pad = _power_of_two(N)
    ids = jnp.pad(ids, ((0, 0), (0, 0), (0, N_pad - N)))

    # Query rows of one kv head, as in tree_attention.
    q_rows, k_step, v_step, mask_rows = query_rows(q, k_new, v_new, step_mask)
    M, M_pad, T_pad = G * T, q_rows.shape[2], k_step.shape[2]
    step_specs = [
        pl.BlockSpec((1, 1, T_pad, D), lambda b, h, *_: (b, h, 0, 0)),                 # the step's keys
        pl.BlockSpec((1, 1, T_pad, D), lambda b, h, *_: (b, h, 0, 0)),                 # and values
        pl.BlockSpec((1, M_pad, T_pad), lambda b, h, *_: (b, 0, 0)),                   # the step mask
    ]
    q_spec = pl.BlockSpec((1, 1, M_pad, D), lambda b, h, *_: (b, h, 0, 0))
    out_shape = jax.ShapeDtypeStruct((B, Hkv, M_pad, D), q.dtype)
    lengths = lengths.astype(jnp.int32)

    if tpu:
        # TPU: a BlockSpec over the whole row would copy all S slots into VMEM, so the caches
        # stay in HBM (pl.ANY) and the kernel copies each chosen page by DMA into a two-page
        # VMEM buffer, the next page's copy in flight while the current one is used. The page
        # table and counts go to scalar memory (scalar prefetch), flat (no 2-D SMEM padding).
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, page_size=page_size, num_ids=N_pad, kv_heads=Hkv),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,                                                   # lengths, counts, ids
                grid=(B, Hkv),
                in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY),
                          *step_specs],
                out_specs=pl.BlockSpec((1, 1, M_pad, D), lambda b, h, *_: (b, h, 0, 0)),
                scratch_shapes=[pltpu.VMEM((2, page_size, D), k_cache.dtype),
                                pltpu.VMEM((2, page_size, D), v_cache.dtype),
                                pltpu.SemaphoreType.DMA((2, 2))]),
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=compiler_params,
        )(lengths, counts.reshape(-1), ids.reshape(-1), q_rows, k_cache, v_cache, k_step, v_step, mask_rows)
    else:
        # Interpreter and GPU (Triton): the caches' blocks span the whole row, but under Triton
        # a ref is a pointer into device memory, so each `pl.ds` page slice in the kernel is
        # the only load: only the chosen pages are read.
        if compiler_params is None and jax.default_backend() == "gpu" and not interpret:
            compiler_params = gpu_compiler_params(M_pad, D)
        out = pl.pallas_call(
            functools.partial(_kernel, page_size=page_size),
            grid=(B, Hkv),
            in_specs=[
                pl.BlockSpec((1,), lambda b, h: (b,)),                                   # lengths
                pl.BlockSpec((1, 1), lambda b, h: (b, h)),                               # counts
                pl.BlockSpec((1, 1, N_pad), lambda b, h: (b, h, 0)),                     # page ids
                q_spec,
                pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),                   # the row's cache
                pl.BlockSpec((1, 1, S, D), lambda b, h: (b, h, 0, 0)),
                *step_specs,
            ],
            out_specs=pl.BlockSpec((1, 1, M_pad, D), lambda b, h: (b, h, 0, 0)),
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=compiler_params,
        )(lengths, counts, ids, q_rows, k_cache, v_cache, k_step, v_step, mask_rows)
    return out[:, :, :M].reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def compact_pages(page_ids, lengths, num_slots: int, page_size: int):
    """The page table, compacted: per (row, kv head) the pages that hold a visible slot (id >= 0,
    inside the cache, below the row's length), ascending (sequential reads), then zeros that
    are never read; `counts` [B, Hkv] says how many lead. A kernel loops exactly over those,
    with no per-page branch, and every page it reads is inside the cache."""
    num_pages = num_slots // page_size
    filled = jnp.minimum(-(-lengths.astype(jnp.int32) // page_size), num_pages)          # pages < length
    ids = page_ids.astype(jnp.int32)
    valid = (ids >= 0) & (ids < filled[:, None, None])
    ids = jnp.sort(jnp.where(valid, ids, num_pages), axis=2)
    counts = jnp.sum(valid, axis=2, dtype=jnp.int32)
    return jnp.where(ids < num_pages, ids, 0), counts


def _check(q, k_cache, v_cache, page_ids, lengths, k_new, v_new, step_mask, page_size):
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D] and k_cache [B, Hkv, S, D], got {q.shape} and {k_cache.shape}")
    B, T, H, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if S % page_size:
        raise ValueError(f"cache slots S={S} must be a multiple of page_size={page_size}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv}")
    expected = {"k_cache": (B, Hkv, S, D), "v_cache": (B, Hkv, S, D), "lengths": (B,),
                "k_new": (B, T, Hkv, D), "v_new": (B, T, Hkv, D), "step_mask": (B, T, T)}
    given = {"k_cache": k_cache, "v_cache": v_cache, "lengths": lengths, "k_new": k_new, "v_new": v_new,
             "step_mask": step_mask}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from q {q.shape} and k_cache {k_cache.shape}), "
                             f"got {tuple(given[name].shape)}")
    if page_ids.ndim != 3 or page_ids.shape[:2] != (B, Hkv) or page_ids.shape[2] < 1:
        raise ValueError(f"page_ids must have shape ({B}, {Hkv}, N) with N >= 1, got {tuple(page_ids.shape)}")
    if not jnp.issubdtype(page_ids.dtype, jnp.integer) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"page_ids and lengths must be integers, got {page_ids.dtype} and {lengths.dtype}")


def _attend(q, length, count, load_page, k_step, v_step, mask):
    """The online softmax shared by both kernels: q [M, D] float32 over the `count` pages that
    `load_page(i) -> (first slot, keys [P, D], values [P, D])` delivers, then the step block
    (k_step, v_step [T, D], mask [M, T]). Returns the normalised output [M, D] in float32."""
    M, D = q.shape

    def page(i, carry):
        start, keys, values = load_page(i)
        scores = jnp.dot(q, keys.astype(jnp.float32).T, preferred_element_type=jnp.float32)
        # Only the page holding the row's last token is partly visible; the mask is one compare.
        slot = start + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        return fold(jnp.where(slot < length, scores, -jnp.inf), values.astype(jnp.float32), carry)

    carry = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M, D), jnp.float32))
    carry = jax.lax.fori_loop(0, count, page, carry)
    step_scores = jnp.dot(q, k_step.astype(jnp.float32).T, preferred_element_type=jnp.float32)
    step_scores = jnp.where(mask != 0, step_scores, -jnp.inf)
    _, total, acc = fold(step_scores, v_step.astype(jnp.float32), carry)
    # Every real row sees its own token, so total > 0; padded rows see nothing and give 0.
    return jnp.where(total[:, None] > 0, acc / jnp.where(total > 0, total, 1.0)[:, None], 0.0)


def _kernel(lengths_ref, counts_ref, ids_ref, q_ref, k_ref, v_ref, k_step_ref, v_step_ref, mask_ref, out_ref, *,
            page_size: int):
    def load_page(i):
        start = pl.multiple_of(ids_ref[0, 0, i] * page_size, page_size)
        return (start, k_ref[0, 0, pl.ds(start, page_size), :], v_ref[0, 0, pl.ds(start, page_size), :])

    out = _attend(q_ref[0, 0].astype(jnp.float32), lengths_ref[0], counts_ref[0, 0], load_page,
                  k_step_ref[0, 0], v_step_ref[0, 0], mask_ref[0])
    out_ref[0, 0] = out.astype(out_ref.dtype)


def _tpu_kernel(lengths_ref, counts_ref, ids_ref, q_ref, k_hbm, v_hbm, k_step_ref, v_step_ref, mask_ref, out_ref,
                k_buf, v_buf, sems, *, page_size: int, num_ids: int, kv_heads: int):
    b, h = pl.program_id(0), pl.program_id(1)
    table = (b * kv_heads + h) * num_ids
    count = counts_ref[b * kv_heads + h]

    def copies(i, slot):
        start = pl.multiple_of(ids_ref[table + i] * page_size, page_size)
        return start, (pltpu.make_async_copy(k_hbm.at[b, h, pl.ds(start, page_size)], k_buf.at[slot], sems.at[0, slot]),
                       pltpu.make_async_copy(v_hbm.at[b, h, pl.ds(start, page_size)], v_buf.at[slot], sems.at[1, slot]))

    @pl.when(count > 0)
    def _():
        for copy in copies(0, 0)[1]:
            copy.start()

    def load_page(i):
        slot = i % 2

        @pl.when(i + 1 < count)
        def _():
            for copy in copies(i + 1, 1 - slot)[1]:
                copy.start()

        start, (k_copy, v_copy) = copies(i, slot)
        k_copy.wait()
        v_copy.wait()
        return start, k_buf[slot], v_buf[slot]

    out = _attend(q_ref[0, 0].astype(jnp.float32), lengths_ref[b], count, load_page,
                  k_step_ref[0, 0], v_step_ref[0, 0], mask_ref[0])
    out_ref[0, 0] = out.astype(out_ref.dtype)
