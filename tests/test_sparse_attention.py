"""The Pallas sparse-attention kernel (Quest / TriForce: attend to chosen cache pages) against
its XLA reference, in the Pallas interpreter and the TPU interpreter on CPU, and lowered for
CUDA (Triton) without a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.pages import select_page_ids, summarize
from jaxdec.tree import ancestor_mask
from pallas_kernels import tree_attention
from pallas_kernels.sparse_attention import reference, sparse_attention

# Jitted, so each shape compiles once (eager op-by-op dispatch is several times slower here).
kernel = jax.jit(sparse_attention, static_argnames=("page_size", "interpret"))
sparse_reference = jax.jit(reference, static_argnames=("page_size",))
dense_reference = jax.jit(tree_attention.reference)


def _case(rng, B, T, H, Hkv, D, S, dtype=jnp.float32, lengths=None):
    """q, k_cache, v_cache, lengths, k_new, v_new, step_mask; a random tree of T step tokens."""
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    parents = np.array([[rng.integers(-1, i) for i in range(T - 1)] for _ in range(B)], np.int32).reshape(B, T - 1)
    lengths = rng.integers(0, S + 1, B) if lengths is None else lengths
    return (normal(B, T, H, D), normal(B, Hkv, S, D), normal(B, Hkv, S, D), jnp.asarray(lengths, jnp.int32),
            normal(B, T, Hkv, D), normal(B, T, Hkv, D), ancestor_mask(jnp.asarray(parents)))


def _page_ids(rng, B, Hkv, N, num_pages, full=False):
    """int32 [B, Hkv, N]: per kv head a random set of distinct pages (all of them when `full`),
    -1 elsewhere, in random order (-1 entries in the middle too)."""
    ids = np.full((B, Hkv, N), -1, np.int32)
    for b in range(B):
        for h in range(Hkv):
            n = min(N, num_pages) if full else rng.integers(0, min(N, num_pages) + 1)
            chosen = rng.permutation(num_pages)[:n]
            ids[b, h, rng.permutation(N)[:n]] = chosen
    return jnp.asarray(ids)


def _sparse_args(rng, B, T, H, Hkv, D, S, P, N, **kwargs):
    q, kc, vc, lengths, kn, vn, mask = _case(rng, B, T, H, Hkv, D, S, **kwargs)
    return q, kc, vc, _page_ids(rng, B, Hkv, N, S // P), lengths, kn, vn, mask


@pytest.mark.parametrize("B, T, H, Hkv, D, S, P, N", [
    (3, 1, 2, 2, 16, 64, 8, 3),    # no GQA, a plain decoding step, budget 24 of 64 slots
    (2, 4, 4, 2, 16, 64, 8, 12),   # GQA 2, a tree of 3 nodes, budget 96 > the context
    (3, 3, 4, 1, 32, 64, 16, 2),   # GQA 4, pages of 16, budget 32
])
def test_kernel_matches_reference(B, T, H, Hkv, D, S, P, N):
    rng = np.random.default_rng(T * 7 + N)
    for trial in range(2):
        # Lengths: empty, full, and inside a page (ragged, last page not full).
        args = _sparse_args(rng, B, T, H, Hkv, D, S, P, N, lengths=[0, S, P + 3][:B] if trial else None)
        got = kernel(*args, page_size=P)
        np.testing.assert_allclose(np.asarray(got), np.asarray(sparse_reference(*args, page_size=P)), atol=2e-5,
                                   err_msg=f"trial {trial}")


def test_a_full_budget_is_dense_attention():
    """Every page chosen (in any order) gives the dense tree attention over the prefix."""
    rng = np.random.default_rng(1)
    B, T, H, Hkv, D, S, P = 4, 3, 4, 2, 16, 64, 8
    q, kc, vc, lengths, kn, vn, mask = _case(rng, B, T, H, Hkv, D, S, lengths=[0, 1, 37, 64])
    ids = _page_ids(rng, B, Hkv, S // P + 2, S // P, full=True)
    got = kernel(q, kc, vc, ids, lengths, kn, vn, mask, page_size=P)
    want = dense_reference(q, kc, vc, lengths, kn, vn, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_pages_chosen_by_quest_bounds():
    """Page ids from `jaxdec.pages` (summaries, then top-k under the budget) as the drafter
    will pass them: the kernel equals the reference, and with a budget below the context the
    result is not the dense one (the choice matters)."""
    rng = np.random.default_rng(2)
    B, T, H, Hkv, D, S, P, budget = 2, 3, 4, 2, 16, 128, 8, 32
    q, kc, vc, lengths, kn, vn, mask = _case(rng, B, T, H, Hkv, D, S, lengths=[100, 13])
    ids = jax.jit(lambda q, kc, lengths: select_page_ids(q, *summarize(kc, lengths, P), lengths, P, budget))(
        q, kc, lengths)
    assert ids.shape == (B, Hkv, budget // P) and bool(jnp.any(ids[1] == -1))  # row 1 fills only 2 pages
    got = kernel(q, kc, vc, ids, lengths, kn, vn, mask, page_size=P)
    np.testing.assert_allclose(np.asarray(got), np.asarray(sparse_reference(q, kc, vc, ids, lengths, kn, vn, mask,
                                                                            page_size=P)), atol=2e-5)
    dense = dense_reference(q, kc, vc, lengths, kn, vn, mask)
    assert np.abs(np.asarray(got[0]) - np.asarray(dense[0])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(dense[1]), atol=2e-5)  # row 1: all its pages


def test_the_kernel_reads_only_the_chosen_pages():
    """Poisoning every unchosen page, and the chosen slots at or past the row's length, changes
    nothing; poisoning one chosen visible slot does."""
    rng = np.random.default_rng(3)
    B, T, H, Hkv, D, S, P = 1, 2, 4, 2, 16, 64, 8
    q, kc, vc, lengths, kn, vn, mask = _case(rng, B, T, H, Hkv, D, S, lengths=[45])
    ids = jnp.asarray([[[5, -1, 0, 2], [7, 3, -1, -1]]], jnp.int32)   # head 1's page 7 is past the length
    base = np.asarray(kernel(q, kc, vc, ids, lengths, kn, vn, mask, page_size=P))
    slot = np.arange(S)
    hidden = np.ones((B, Hkv, S, 1), bool)
    hidden[0, 0, ((slot // P == 5) | (slot // P == 0) | (slot // P == 2)) & (slot < 45)] = False
    hidden[0, 1, (slot // P == 3)] = False
    poison = lambda x: jnp.where(jnp.asarray(hidden), 1e4, x)
    got = np.asarray(kernel(q, poison(kc), poison(vc), ids, lengths, kn, vn, mask, page_size=P))
    np.testing.assert_allclose(got, base, atol=1e-5)
    seen = np.asarray(kernel(q, kc, vc.at[0, 0, 44].set(1e4), ids, lengths, kn, vn, mask, page_size=P))
    assert np.abs(seen[:, :, :2] - base[:, :, :2]).max() > 1        # kv head 0: query heads 0 and 1
    np.testing.assert_allclose(seen[:, :, 2:], base[:, :, 2:], atol=1e-5)


def test_bfloat16_inputs():
    rng = np.random.default_rng(4)
    args = _sparse_args(rng, 2, 5, 4, 2, 32, 64, 16, 3, dtype=jnp.bfloat16, lengths=[50, 64])
    got = kernel(*args, page_size=16)
    assert got.dtype == jnp.bfloat16
    want = sparse_reference(*args, page_size=16)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_tpu_interpreter_runs_the_kernel():
    """The TPU formulation (page table in scalar memory by scalar prefetch, caches left in
    HBM, each chosen page copied by a double-buffered DMA) in the TPU interpreter, at shapes
    that respect the (8, 128) tiling: 16 query rows of head_dim 128, pages of 16 slots."""
    from jax.experimental.pallas import tpu as pltpu
    rng = np.random.default_rng(5)
    B, T, H, Hkv, D, S, P, N = 2, 4, 8, 2, 128, 256, 16, 5
    args = _sparse_args(rng, B, T, H, Hkv, D, S, P, N, lengths=[100, 256])
    ids = args[3].at[1, 0].set(jnp.asarray([15, -1, 0, 7, 8], jnp.int32))   # three or more pages in flight
    args = (*args[:3], ids, *args[4:])
    got = kernel(*args, page_size=P, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(np.asarray(got), np.asarray(sparse_reference(*args, page_size=P)), atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 1, 32, 8, 128, 32768, 16, 64), (2, 5, 4, 2, 64, 256, 16, 3)],
                         ids=["8b-decode-32k-64-pages", "small-tree"])
def test_kernel_lowers_for_a_gpu(lower_for_gpu, shape):
    """Lowering for CUDA (Pallas's Triton lowering) needs no GPU: an 8B decode step over 32k
    slots reading 64 pages of 16, and a small tree. Compiling and running need a device."""
    B, T, H, Hkv, D, S, P, N = shape
    spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    args = (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, Hkv, N, dtype=jnp.int32),
            spec(B, dtype=jnp.int32), spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    params = tree_attention.gpu_compiler_params(H // Hkv * T, D)
    text = lower_for_gpu(lambda *a: sparse_attention(*a, page_size=P, interpret=False, compiler_params=params), *args)
    assert "__gpu$xla.gpu.triton" in text


def test_kernel_lowers_for_a_tpu(lower_for_tpu):
    """Through Mosaic TPU (no TPU needed to lower): an 8B decode step over 32k slots reading
    64 pages of 16 (bfloat16's minimum tile), the page table (8 kv heads x 64) flat in scalar
    memory and the cache left in HBM for the kernel's DMA copies."""
    spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    B, T, H, Hkv, D, S, P, N = 1, 1, 32, 8, 128, 32768, 16, 64
    text = lower_for_tpu(lambda *a: sparse_attention(*a, page_size=P), spec(B, T, H, D), spec(B, Hkv, S, D),
                         spec(B, Hkv, S, D), spec(B, Hkv, N, dtype=jnp.int32), spec(B, dtype=jnp.int32),
                         spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    call = next(line for line in text.splitlines() if "tpu_custom_call" in line)
    assert "tensor<512xi32>" in call and "tensor<1x8x32768x128xbf16>" in call


def test_bad_arguments_raise():
    rng = np.random.default_rng(6)
    q, kc, vc, ids, lengths, kn, vn, mask = _sparse_args(rng, 1, 2, 4, 2, 16, 48, 8, 3)
    with pytest.raises(ValueError, match=r"S=48.*page_size=32"):
        sparse_attention(q, kc, vc, ids, lengths, kn, vn, mask, page_size=32)
    with pytest.raises(ValueError, match=r"page_size must be a positive int, got 0"):
        sparse_attention(q, kc, vc, ids, lengths, kn, vn, mask, page_size=0)
    with pytest.raises(ValueError, match=r"page_ids must have shape \(1, 2, N\).*\(1, 1, 3\)"):
        sparse_attention(q, kc, vc, ids[:, :1], lengths, kn, vn, mask, page_size=8)
    with pytest.raises(ValueError, match=r"v_new must have shape \(1, 2, 2, 16\).*\(1, 2, 2, 8\)"):
        sparse_attention(q, kc, vc, ids, lengths, kn, vn[..., :8], mask, page_size=8)
    with pytest.raises(ValueError, match=r"H=4 must be a multiple of kv heads Hkv=3"):
        sparse_attention(q, kc[:, :1].repeat(3, 1), vc, ids, lengths, kn, vn, mask, page_size=8)
    with pytest.raises(ValueError, match=r"page_size=24 must be a power of two"):   # checked before lowering
        sparse_attention(q, kc, vc, ids, lengths, kn, vn, mask, page_size=24, interpret=False)


# The Mosaic GPU form (tree_attention_mgpu.sparse_attention_mgpu): its interpreter (compiled on a GPU), and lowering.

@pytest.mark.parametrize("B, T, H, Hkv, D, S, P, N, lengths", [
    (2, 4, 8, 2, 64, 256, 16, 5, [100, 256]),     # GQA 4, a small tree; a row inside a page, a full row
    (3, 1, 8, 1, 128, 128, 32, 3, [0, 128, 19]),  # GQA 8, head_dim 128, a decoding step; an empty row
])
def test_mosaic_gpu_form_matches_reference(mosaic_gpu_interpret, B, T, H, Hkv, D, S, P, N, lengths):
    from pallas_kernels.tree_attention_mgpu import sparse_attention_mgpu
    rng = np.random.default_rng(N + P)
    args = _sparse_args(rng, B, T, H, Hkv, D, S, P, N, dtype=jnp.bfloat16, lengths=lengths)
    ids = args[3].at[0, 0].set(jnp.asarray([15, -1, 0, 7, 8][:N], jnp.int32) % (S // P))  # unordered, with a hole
    args = (*args[:3], ids, *args[4:])
    got = sparse_attention_mgpu(*args, page_size=P, interpret=mosaic_gpu_interpret)
    want = sparse_reference(*args, page_size=P)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_mosaic_gpu_form_lowers_and_is_what_a_gpu_takes(lower_for_gpu):
    """An 8B decode step over 32k slots reading 64 pages of 16, lowered for CUDA through Mosaic
    GPU when the backend query answers "gpu" (float32 still goes to Triton); pages of 8 are
    refused (a wgmma operand's rows come in groups of 16 bfloat16)."""
    from pallas_kernels.tree_attention_mgpu import sparse_attention_mgpu
    B, T, H, Hkv, D, S, P, N = 1, 1, 32, 8, 128, 32768, 16, 64
    for dtype, lowering in ((jnp.bfloat16, "mosaic_gpu"), (jnp.float32, "__gpu$xla.gpu.triton")):
        spec = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype)
        args = (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, Hkv, N, dtype=jnp.int32),
                spec(B, dtype=jnp.int32), spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
        assert lowering in lower_for_gpu(lambda *a: sparse_attention(*a, page_size=P), *args)
    args = _sparse_args(np.random.default_rng(0), 1, 2, 2, 1, 64, 64, 8, 2, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="page_size=8"):
        sparse_attention_mgpu(*args, page_size=8)
