"""The Pallas split-K decode-attention kernel (interpret mode on CPU) against its XLA reference
and against the tree-attention kernel, the TPU interpreter, and lowering for CUDA."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.tree import ancestor_mask, chain_parents
from pallas_kernels import decode_attention as kernel
from pallas_kernels.decode_attention import default_num_splits
from pallas_kernels.tree_attention import gpu_compiler_params, tree_attention

# Jitted whole: one compilation per shape and setting (eager dispatch compiles each small op).
decode_attention = jax.jit(kernel.decode_attention, static_argnames=("num_splits", "block_s", "interpret"))
reference = jax.jit(kernel.reference)


def _case(rng, T, H, Hkv, D, S, lengths, dtype=jnp.float32, chain=False):
    B = len(lengths)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    parents = (chain_parents(B, T - 1) if chain else
               jnp.asarray(np.array([[rng.integers(-1, i) for i in range(T - 1)] for _ in range(B)], np.int32)
                           .reshape(B, T - 1)))
    return (normal(B, T, H, D), normal(B, Hkv, S, D), normal(B, Hkv, S, D), jnp.asarray(lengths, jnp.int32),
            normal(B, T, Hkv, D), normal(B, T, Hkv, D), ancestor_mask(parents))


@pytest.mark.parametrize("T, H, Hkv, D, S, block_s, lengths, splits", [
    # A decode token, no GQA: an empty row, a full one, lengths off the block edges; 8 splits of
    # one block leave most splits of the short rows wholly past their length.
    (1, 4, 4, 16, 64, 8, [0, 13, 64, 40], [8, None]),
    # A random tree of 5 nodes, GQA 2.
    (5, 4, 2, 16, 64, 16, [1, 17, 64], [2, 4]),
    # A chain of 4, GQA 4 (16 query rows per kv head), one split and one per block.
    (4, 8, 2, 32, 128, 16, [33, 0], [1, 8]),
], ids=["decode-gqa1", "tree-gqa2", "chain-gqa4"])
def test_kernel_matches_reference(T, H, Hkv, D, S, block_s, lengths, splits):
    rng = np.random.default_rng(T * 7 + S)
    args = _case(rng, T, H, Hkv, D, S, lengths, chain=T == 4)
    want = np.asarray(reference(*args))
    for num_splits in splits:
        got = decode_attention(*args, num_splits=num_splits, block_s=block_s)
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg=f"num_splits={num_splits}")


def test_equals_tree_attention():
    """The drop-in: the same arguments give the tree kernel's result."""
    rng = np.random.default_rng(1)
    args = _case(rng, 5, 4, 2, 16, 64, [1, 17, 64])
    np.testing.assert_allclose(np.asarray(decode_attention(*args, num_splits=4, block_s=16)),
                               np.asarray(tree_attention(*args, block_s=16)), atol=1e-6)


def test_the_kernel_sees_only_the_prefix_and_the_step_mask():
    """Poisoning what must stay invisible (slots past the length, in a split that holds visible
    slots and in splits wholly past it; a later token of the chain) changes nothing; poisoning
    a row's last visible slot, or a token's own value, does."""
    rng = np.random.default_rng(3)
    q, kc, vc, lengths, kn, vn, mask = _case(rng, 3, 4, 4, 16, 64, [0, 13, 64, 40], chain=True)
    run = lambda kc=kc, vc=vc, vn=vn: np.asarray(
        decode_attention(q, kc, vc, lengths, kn, vn, mask, num_splits=8, block_s=8))
    base = run()
    past = jnp.arange(64)[None, None, :, None] >= lengths[:, None, None, None]
    np.testing.assert_allclose(run(jnp.where(past, 1e4, kc), jnp.where(past, 1e4, vc)), base, atol=1e-5)
    seen = run(vc=vc.at[1, :, 12].set(1e4))                     # row 1's last visible slot
    assert np.abs(seen[1] - base[1]).min() > 1
    np.testing.assert_allclose(np.delete(seen, 1, axis=0), np.delete(base, 1, axis=0), atol=1e-6)
    last = run(vn=vn.at[:, 2].set(1e4))                         # the chain's last token: seen only by itself
    np.testing.assert_allclose(last[:, :2], base[:, :2], atol=1e-6)
    assert np.abs(last[:, 2] - base[:, 2]).min() > 1


def test_bfloat16_inputs():
    rng = np.random.default_rng(2)
    args = _case(rng, 3, 4, 2, 32, 64, [5, 64], dtype=jnp.bfloat16)
    got = decode_attention(*args, num_splits=4, block_s=16)
    assert got.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference(*f32)), atol=3e-2)


@pytest.mark.parametrize("S, splits, lengths", [(256, 2, [100, 256]), (512, 4, [0, 100, 512, 300])])
def test_tpu_interpreter_runs_the_kernel(S, splits, lengths):
    """The TPU interpreter checks TPU semantics on CPU (the TPU formulation: lengths by scalar
    prefetch, splits past a row's length naming its last chunk with data), at shapes that
    respect the (8, 128) tiling: 8 query rows (GQA 8) of head_dim 128, chunks of one 128-slot
    block; an empty row (every split past its length), short rows, a full one."""
    from jax.experimental.pallas import tpu as pltpu
    rng = np.random.default_rng(5 + S)
    args = _case(rng, 1, 8, 1, 128, S, lengths)
    got = kernel.decode_attention(*args, num_splits=splits, block_s=128, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(*args)), atol=2e-5)


@pytest.mark.parametrize("shape, num_splits", [((1, 1, 32, 8, 128, 32768), 16), ((2, 5, 4, 2, 64, 1024), 2)],
                         ids=["8b-decode-32k", "small-tree"])
def test_kernel_lowers_for_a_gpu(lower_for_gpu, shape, num_splits):
    """Lowering for CUDA (Pallas's Triton lowering) needs no GPU: one decode token of an 8B
    model (32 query heads, 8 kv heads) over 32k bfloat16 slots gets a grid of 8 kv heads x 16
    splits by default; a small tree with 10 query rows (padded to 16) lowers too. Compiling
    and running need a device."""
    B, T, H, Hkv, D, S = shape
    assert default_num_splits(B, Hkv, S) == num_splits
    spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    args = (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, dtype=jnp.int32),
            spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    params = gpu_compiler_params(16, D)
    text = lower_for_gpu(lambda *a: kernel.decode_attention(*a, interpret=False, compiler_params=params), *args)
    assert "__gpu$xla.gpu.triton" in text
    grid = re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32", text).groups()
    assert tuple(map(int, grid)) == (B, Hkv, num_splits)


def test_kernel_lowers_for_a_tpu(lower_for_tpu):
    """Through Mosaic TPU (no TPU needed to lower): one decode token of an 8B model over 32k
    bfloat16 slots, 16 splits of 2048 slots per kv head (512 KB of keys per block)."""
    spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    B, T, H, Hkv, D, S = 1, 1, 32, 8, 128, 32768
    text = lower_for_tpu(kernel.decode_attention, spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D),
                         spec(B, dtype=jnp.int32), spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    call = next(line for line in text.splitlines() if "tpu_custom_call" in line)
    assert "-> (tensor<1x8x16x4x128xf32>, tensor<1x8x16x4x1xf32>)" in call          # partial outputs, lse


def test_default_num_splits():
    assert default_num_splits(1, 8, 32768) == 16        # 8 kv heads x 16 splits of 16 blocks
    assert default_num_splits(1, 1, 32768) == 64        # capped by 4 blocks a split
    assert default_num_splits(64, 8, 32768) == 1        # the batch fills the GPU already
    assert default_num_splits(1, 8, 7 * 128) == 1       # 7 blocks: no divisor up to 7 // 4
    assert default_num_splits(1, 2, 12 * 128) == 3      # a divisor of the 12 blocks
    assert default_num_splits(1, 1, 14 * 128) == 2      # 3 would fit, but does not divide 14 blocks
    for blocks in range(1, 70):
        for batch, kv_heads in ((1, 1), (1, 8), (2, 4), (32, 8)):
            splits = default_num_splits(batch, kv_heads, blocks * 128)
            assert splits >= 1 and blocks % splits == 0, (blocks, batch, kv_heads, splits)
            assert splits == 1 or blocks // splits >= 4


def test_a_token_that_sees_no_step_token_reads_the_cache_alone():
    """step_mask may hide every step token from a query (only the cache is visible to it):
    its step part then weighs nothing, rather than turning the output into NaN."""
    rng = np.random.default_rng(5)
    q, kc, vc, lengths, kn, vn, mask = _case(rng, 3, 4, 2, 16, 64, [5, 40], chain=True)
    mask = mask.at[:, 0].set(False)
    want = np.asarray(reference(q, kc, vc, lengths, kn, vn, mask))
    got = np.asarray(decode_attention(q, kc, vc, lengths, kn, vn, mask, num_splits=4, block_s=8))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(S=48, block_s=32), r"S=48.*block_s=32"),
    (dict(num_splits=0), r"num_splits=0"),
    (dict(num_splits=3), r"num_splits=3.*=4"),
    (dict(num_splits=8), r"num_splits=8.*=4"),
    (dict(H=3), r"H=3.*Hkv=2"),
])
def test_bad_arguments_raise(kwargs, message):
    shape = dict(T=1, H=4, Hkv=2, D=16, S=64, block_s=16) | kwargs
    rng = np.random.default_rng(4)
    args = _case(rng, shape["T"], shape["H"], shape["Hkv"], shape["D"], shape["S"], [3])
    with pytest.raises(ValueError, match=message):
        kernel.decode_attention(*args, block_s=shape["block_s"], num_splits=kwargs.get("num_splits"))


def test_plain_decoding_at_long_context_runs_split_k_and_equals_xla(llama):
    """attn_impl="pallas": a decoding step over 1024 cache slots or more goes through the
    split-K kernel (its program is in the step), and plain decoding gives the XLA path's tokens."""
    import dataclasses

    import jaxdec
    from jaxdec import steps
    from jaxdec.cache import init_cache
    from jaxdec.loading import model_from_params
    from jaxdec.sampling import SamplingParams

    cfg = dataclasses.replace(llama.config, max_position_embeddings=2048)
    xla = model_from_params(cfg, llama.params)
    pallas = model_from_params(dataclasses.replace(cfg, attn_impl="pallas"), llama.params)
    prompts = [(list(range(3, 100)) * 11)[:1000], [5, 17, 33]]  # cache bucket 1024
    want = jaxdec.generate(xla, prompts, max_new_tokens=6, stop_token_ids=[]).tokens
    assert jaxdec.generate(pallas, prompts, max_new_tokens=6, stop_token_ids=[]).tokens == want

    def step_program(model, num_slots):
        def prefill_and_decode(cache):
            state, cache = steps.prefill(model.config, model.params, cache, jnp.zeros((2, num_slots), jnp.int32),
                                         jnp.array([3, 5], jnp.int32), jnp.ones(2, bool), SamplingParams.create(0.0),
                                         jax.random.split(jax.random.key(0), 2), jnp.full((16,), -1, jnp.int32),
                                         jnp.int32(4), prompt_bucket=16)
            return steps.decode(model.config, model.params, cache, state, SamplingParams.create(0.0),
                                jnp.full((16,), -1, jnp.int32), jnp.int32(4), num_steps=2)
        return str(jax.make_jaxpr(prefill_and_decode)(init_cache(model.config, 2, num_slots, jnp.float32)))

    assert "decode_attention_splits" in step_program(pallas, 1024)
    # A context that is not whole 128-slot blocks (1100) gets a cache of whole blocks past it,
    # which the split kernel (and the tree kernel, at any width) takes; XLA's stops at 1100.
    short = model_from_params(dataclasses.replace(pallas.config, max_position_embeddings=1100), llama.params)
    assert steps.cache_bucket(short.config, 1050) == 1152
    assert steps.cache_bucket(dataclasses.replace(short.config, attn_impl="xla"), 1050) == 1100
    assert "decode_attention_splits" in step_program(short, 1152)
    short_xla = model_from_params(dataclasses.replace(cfg, max_position_embeddings=1100), llama.params)
    want = jaxdec.generate(short_xla, prompts[:1], max_new_tokens=30, stop_token_ids=[]).tokens
    assert jaxdec.generate(short, prompts[:1], max_new_tokens=30, stop_token_ids=[]).tokens == want  # 1152 slots
    # A draft model of that context drafts in the cache of its target's slots: a Pallas
    # target's 1152 (past its context), an XLA target's 1100 (not whole blocks: a Pallas draft
    # reads them on the reference).
    for target, draft in ((short, short_xla), (short_xla, short)):
        out = jaxdec.generate(target, prompts[:1], max_new_tokens=30, stop_token_ids=[],
                              speculative=jaxdec.spec.DraftModel(draft, num_tokens=3))
        assert out.tokens == want


@pytest.mark.parametrize("dtype, lowering", [(jnp.bfloat16, "mosaic_gpu"), (jnp.float32, "__gpu$xla.gpu.triton")])
def test_a_gpu_takes_the_mosaic_kernel_for_half_precision(lower_for_gpu, dtype, lowering):
    """What `decode_attention` picks on a GPU backend (the backend query answers "gpu" here):
    half precision goes to the Mosaic GPU tree kernel, split the same way."""
    spec = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype)
    B, T, H, Hkv, D, S = 1, 1, 8, 2, 64, 4096
    args = (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, dtype=jnp.int32),
            spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    assert lowering in lower_for_gpu(kernel.decode_attention, *args)
