"""The Pallas tree-attention kernel (interpret mode on CPU) against its XLA reference, and
`attn_impl="pallas"` end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec.tree import ancestor_mask, chain_parents
from pallas_kernels.tree_attention import fold, reference, tree_attention


def _case(rng, B, T, H, Hkv, D, S, dtype=jnp.float32, chain=False, lengths=None):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    parents = (chain_parents(B, T - 1) if chain else
               jnp.asarray(np.array([[rng.integers(-1, i) for i in range(T - 1)] for _ in range(B)], np.int32)
                           .reshape(B, T - 1)))
    lengths = rng.integers(0, S + 1, B) if lengths is None else lengths
    return (normal(B, T, H, D), normal(B, Hkv, S, D), normal(B, Hkv, S, D), jnp.asarray(lengths, jnp.int32),
            normal(B, T, Hkv, D), normal(B, T, Hkv, D), ancestor_mask(parents))


@pytest.mark.parametrize("B, T, H, Hkv, D, S, block_s", [
    (2, 5, 4, 2, 16, 64, 16),     # GQA 2, a tree of 4 nodes
    (3, 9, 4, 1, 32, 128, 32),    # GQA 4, depth up to 8
    (2, 17, 2, 2, 64, 64, 64),    # no GQA, 16 nodes, one block
    (1, 1, 4, 2, 16, 32, 8),      # a plain decoding step
])
def test_kernel_matches_reference(B, T, H, Hkv, D, S, block_s):
    rng = np.random.default_rng(T * 7 + S)
    for trial in range(3):
        args = _case(rng, B, T, H, Hkv, D, S)
        got = tree_attention(*args, block_s=block_s)
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference(*args)), atol=2e-5, err_msg=f"trial {trial}")


def test_ragged_lengths_at_the_edges_and_chains():
    """Rows with an empty prefix, a full cache and lengths inside and on block edges."""
    rng = np.random.default_rng(1)
    args = _case(rng, 6, 6, 4, 2, 16, 64, chain=True, lengths=[0, 64, 1, 15, 16, 17])
    np.testing.assert_allclose(np.asarray(tree_attention(*args, block_s=16)), np.asarray(reference(*args)), atol=2e-5)


@pytest.mark.parametrize("T, D, S, block_s", [(7, 32, 64, 32), (20, 64, 128, 64)])
def test_bfloat16_inputs(T, D, S, block_s):
    """(On a GPU the second case runs the Mosaic GPU kernel, the first the Triton one.)"""
    rng = np.random.default_rng(2)
    args = _case(rng, 2, T, 4, 2, D, S, dtype=jnp.bfloat16)
    got = tree_attention(*args, block_s=block_s)
    assert got.dtype == jnp.bfloat16
    want = reference(*args)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_the_kernel_sees_only_the_prefix_and_the_ancestors():
    """Poisoning what must stay invisible (cache slots past lengths, non-ancestor nodes)
    changes nothing; poisoning a visible slot does."""
    rng = np.random.default_rng(3)
    q, kc, vc, lengths, kn, vn, mask = _case(rng, 1, 5, 2, 1, 16, 32, lengths=[10])
    base = np.asarray(tree_attention(q, kc, vc, lengths, kn, vn, mask, block_s=8))
    hidden = np.asarray(tree_attention(q, kc, vc.at[:, :, 10:].set(1e4), lengths, kn, vn, mask, block_s=8))
    np.testing.assert_allclose(hidden, base, atol=1e-5)
    seen = np.asarray(tree_attention(q, kc, vc.at[:, :, 9].set(1e4), lengths, kn, vn, mask, block_s=8))
    assert np.abs(seen - base).max() > 1


def test_block_size_must_divide_the_cache():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match=r"S=48.*block_s=32"):
        tree_attention(*_case(rng, 1, 3, 2, 1, 16, 48), block_s=32)


@pytest.mark.parametrize("family, extra", [("mistral", False), ("llama", True)], ids=["window", "extra-slots"])
def test_steps_the_kernel_cannot_take_stay_on_the_reference(models, family, extra):
    """The kernel reads a plain prefix of the cache: a sliding-window layer (Mistral's, window
    16 here, behind a 36-token prefix) and a step that also sees slots past the row's length
    (what a draft tree's kept ancestors are) stay on the reference under attn_impl="pallas",
    with the XLA path's hidden states."""
    import dataclasses

    from jaxdec.loading import model_from_params
    from jaxdec.model import causal_mask, forward_hidden
    from tests.test_speculative import plain_forward

    xla = models[family]
    pallas = model_from_params(dataclasses.replace(xla.config, attn_impl="pallas"), xla.params)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 100, (2, 39)), jnp.int32)
    _, cache = plain_forward(xla, tokens[:, :36], num_slots=64)
    cache = cache.replace(lengths=jnp.asarray([36, 28], jnp.int32))
    positions = cache.lengths[:, None] + jnp.arange(3)
    # Row 1 also sees two of the entries past its length (slots 30 and 33).
    seen = jnp.zeros((2, 3, 64), bool).at[1, :, jnp.asarray([30, 33])].set(True) if extra else None
    hidden = lambda model: np.asarray(forward_hidden(model.config, model.params, tokens[:, 36:], positions, cache,
                                                     causal_mask(2, 3), extra_visible=seen)[0])
    np.testing.assert_allclose(hidden(pallas), hidden(xla), atol=2e-5)


def test_pallas_attention_in_the_model_equals_xla(converted_dirs):
    """attn_impl="pallas" runs the kernel in every full-attention layer that reads the cache:
    plain decoding gives the reference path's tokens, and a tree verify step its logits.
    (The whole speculative loop with the interpreted kernel inside is not compiled here: its
    program is huge in interpret mode, and XLA:CPU has crashed compiling it late in a full run.)"""
    from jaxdec.verify import Draft, verify_forward
    from tests.test_speculative import plain_forward

    xla = jaxdec.load(converted_dirs["llama"])
    pallas = jaxdec.load(converted_dirs["llama"], attn_impl="pallas")
    assert pallas.attn_impl == "pallas" and xla.attn_impl == "xla"
    prompts = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12]]
    want = jaxdec.generate(xla, prompts, max_new_tokens=8, stop_token_ids=[]).tokens
    assert jaxdec.generate(pallas, prompts, max_new_tokens=8, stop_token_ids=[]).tokens == want

    B, S, N = 2, 64, 5
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 100, (B, 12)), jnp.int32)
    draft = Draft(tokens=tokens[:, 7:12], probs=jnp.zeros((B, N, 1)), lengths=jnp.full((B,), N, jnp.int32),
                  parents=jnp.asarray([[-1, 0, 0, 1, -1], [-1, -1, 1, 2, 3]], jnp.int32))

    def verify_logits(model):
        _, cache = plain_forward(model, tokens[:, :6], num_slots=S)
        cache = cache.replace(lengths=jnp.asarray([6, 4], jnp.int32))
        run = jax.jit(lambda params, cache: verify_forward(model.config, params, cache, tokens[:, 6], draft,
                                                           jnp.ones((B,), bool))[0])
        return np.asarray(run(model.params, cache))

    np.testing.assert_allclose(verify_logits(pallas), verify_logits(xla), atol=2e-4)


@pytest.mark.parametrize("B, T, H, Hkv, lengths", [
    (2, 8, 8, 2, [100, 256]),        # GQA 4: 32 query rows; a prefix ending mid-block, a full cache
    (3, 9, 4, 1, [0, 128, 129]),     # GQA 4, depth up to 8; an empty prefix, one on a block's edge, past it
])
def test_tpu_interpreter_runs_the_kernel(B, T, H, Hkv, lengths):
    """The TPU interpreter checks TPU semantics on CPU (the TPU formulation: blocks below the
    length copied by DMA into a two-block VMEM buffer); shapes that respect the (8, 128)
    tiling: head_dim 128, cache blocks of 128 slots."""
    from jax.experimental.pallas import tpu as pltpu
    rng = np.random.default_rng(5 + T)
    args = _case(rng, B, T, H, Hkv, 128, 256, lengths=lengths)
    got = tree_attention(*args, block_s=128, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(*args)), atol=2e-5)


def test_kernel_lowers_for_a_tpu(lower_for_tpu):
    """On a TPU a 65-node tree over 32k slots at an 8B model's shapes lowers through Mosaic
    TPU in its TPU formulation: the cache stays in HBM and the table of its blocks (8 kv heads
    x 256 blocks) goes to scalar memory, where a whole-row block per kv head (16 MB of keys
    and values) would not fit VMEM."""
    text = lower_for_tpu(tree_attention, *_abstract(1, 65, 32, 8, 128, 32768))
    call = next(line for line in text.splitlines() if "tpu_custom_call" in line)
    assert "tensor<2048xi32>" in call and "tensor<1x8x32768x128xbf16>" in call


def _verify_step(model, batch_size: int, num_slots: int, num_nodes: int = 3):
    """(the model's tree verify step as a function of (params, cache, pending, draft), its
    abstract arguments): every width bucket of `verify_forward`, 1 to num_nodes + 1 tokens."""
    from jaxdec.cache import init_cache
    from jaxdec.verify import Draft, verify_forward
    cfg, B, N = model.config, batch_size, num_nodes
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    draft = Draft(tokens=spec((B, N)), probs=spec((B, N, 1), jnp.float32), lengths=spec((B,)), parents=spec((B, N)))
    step = lambda params, cache, pending, draft: verify_forward(cfg, params, cache, pending, draft,
                                                                jnp.ones((B,), bool))[0]
    return step, (jax.eval_shape(lambda: model.params),
                  jax.eval_shape(lambda: init_cache(cfg, B, num_slots, model.dtype)), spec((B,)), draft)


@pytest.mark.parametrize("precision", [None, "highest"])
def test_the_models_verify_step_lowers_for_a_tpu(converted_dirs, lower_for_tpu, precision):
    """attn_impl="pallas" on a TPU, batch 2 over 1024 slots: a verify step of a draft tree
    (every width bucket, from a 1-token step through the split-K kernel to the whole tree
    through the tree kernel's TPU formulation) lowers through Mosaic TPU in every layer, also
    at the "highest" precision that generate() gives a float32 model."""
    import re
    model = jaxdec.load(converted_dirs["llama"], attn_impl="pallas")
    step, args = _verify_step(model, 2, 1024)
    with jax.default_matmul_precision(precision):
        text = lower_for_tpu(step, *args)
    assert ("HIGHEST" in text) == (precision == "highest")
    kernels = re.findall(r'kernel_name = "(\w+)"', text)
    assert set(kernels) == {"decode_attention_splits", "_tpu_kernel"}
    assert len(kernels) == 3 * model.config.num_hidden_layers        # widths 1, 2 and 4 tokens


@pytest.mark.parametrize("dtype, call, precision", [("bfloat16", "mosaic_gpu_v2", None),
                                                     ("float32", "__gpu$xla.gpu.triton", None),
                                                     ("float32", "__gpu$xla.gpu.triton", "highest")])
def test_the_models_verify_step_lowers_for_a_gpu(lower_for_gpu, dtype, call, precision):
    """attn_impl="pallas" on a GPU (the backend query answers "gpu" here), the demo target
    (head_dim 64) at batch 2 over 1024 slots: every width bucket of a tree verify step lowers
    for CUDA with a kernel in every layer, bfloat16 through Mosaic GPU, float32 through Triton,
    also at the "highest" precision that generate() gives a float32 model (IEEE dots)."""
    import re
    model = jaxdec.load("demo-target", attn_impl="pallas", dtype=dtype)
    step, args = _verify_step(model, 2, 1024)
    with jax.default_matmul_precision(precision):
        text = lower_for_gpu(step, *args)
    assert ("HIGHEST" in text) == (precision == "highest")
    calls = re.findall(r"custom_call @([\w$.]+)", text)
    assert set(calls) == {call} and len(calls) == 3 * model.config.num_hidden_layers      # widths 1, 2, 4


@pytest.mark.parametrize("shape", [(1, 65, 32, 8, 128, 32768), (2, 5, 4, 2, 64, 256)],
                         ids=["8b-65-nodes-32k", "small"])
def test_kernel_lowers_for_a_gpu(lower_for_gpu, shape):
    """Lowering for CUDA (Pallas's Triton lowering) needs no GPU: the kernel's shapes and ops
    must pass its rules (power-of-two arrays among them), here at an 8B shape with a 65-node
    tree over 32k slots, and at a small ragged one. Compiling and running need a device."""
    from pallas_kernels.tree_attention import gpu_compiler_params
    B, T, H, Hkv, D, S = shape
    spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    args = (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, dtype=jnp.int32),
            spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))
    params = gpu_compiler_params(128, D)
    text = lower_for_gpu(lambda *a: tree_attention(*a, interpret=False, compiler_params=params), *args)
    assert "__gpu$xla.gpu.triton" in text


def test_a_jax_without_the_triton_lowering_is_a_clear_error(monkeypatch):
    """JAX 0.11 deprecates Pallas's Triton lowering, which float32 models take on a GPU: once
    it is gone, asking for it names the way out instead of failing on an import."""
    import sys

    import jax.experimental.pallas as pallas_package

    from pallas_kernels.tree_attention import gpu_compiler_params
    monkeypatch.delattr(pallas_package, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    with pytest.raises(ValueError, match=r"Triton lowering for float32 models .*\(this one: 96\).*dtype='bfloat16'.*attn_impl='xla'"):
        gpu_compiler_params(16, 96)


# The Mosaic GPU kernel (tree_attention_mgpu.py): the GPU interpreter on CPU (compiled on a GPU), and lowering.

def _abstract(B, T, H, Hkv, D, S, dtype=jnp.bfloat16):
    spec = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype)
    return (spec(B, T, H, D), spec(B, Hkv, S, D), spec(B, Hkv, S, D), spec(B, dtype=jnp.int32),
            spec(B, T, Hkv, D), spec(B, T, Hkv, D), spec(B, T, T, dtype=jnp.bool_))


@pytest.mark.parametrize("B, T, H, Hkv, D, S, lengths, num_splits", [
    (3, 9, 8, 2, 64, 192, [0, 192, 70], 1),   # GQA 4, depth up to 8; empty, full and mid-block prefixes
    (3, 9, 8, 2, 64, 192, [0, 192, 70], 3),   # the same in 3 splits: some empty, one partly filled
    (2, 5, 8, 1, 128, 128, [64, 1], 2),       # GQA 8, head_dim 128; prefixes ending on a split's edge, in it
    (1, 70, 4, 2, 64, 128, [100], None),      # 140 query rows (3 tiles), 70 step tokens (2 blocks)
], ids=["gqa4-ragged", "gqa4-ragged-3-splits", "gqa8-d128-2-splits", "three-tiles"])
def test_mosaic_gpu_kernel_matches_reference(mosaic_gpu_interpret, B, T, H, Hkv, D, S, lengths, num_splits):
    from pallas_kernels.tree_attention_mgpu import tree_attention_mgpu
    rng = np.random.default_rng(T + S)
    args = _case(rng, B, T, H, Hkv, D, S, dtype=jnp.bfloat16, lengths=lengths)
    got = tree_attention_mgpu(*args, num_splits=num_splits, interpret=mosaic_gpu_interpret)
    assert got.dtype == jnp.bfloat16 and got.shape == (B, T, H, D)
    want = reference(*args)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


@pytest.mark.parametrize("T, num_splits", [(65, 1), (65, None), (1, None)], ids=["65-nodes", "65-nodes-split",
                                                                              "decode-split"])
def test_mosaic_gpu_kernel_lowers_for_a_gpu(lower_for_gpu, T, num_splits):
    """Through Mosaic GPU at an 8B model's shapes over 32k slots: a 65-node tree (5 row tiles
    of GQA 4, 2 blocks of step tokens) and a decoding step, whole or in the default splits."""
    from pallas_kernels.tree_attention_mgpu import tree_attention_mgpu
    text = lower_for_gpu(lambda *a: tree_attention_mgpu(*a, num_splits=num_splits), *_abstract(1, T, 32, 8, 128, 32768))
    assert "mosaic_gpu" in text and "triton" not in text


@pytest.mark.parametrize("dtype, lowering", [(jnp.bfloat16, "mosaic_gpu"), (jnp.float32, "__gpu$xla.gpu.triton")])
def test_a_gpu_takes_the_mosaic_kernel_for_half_precision(lower_for_gpu, dtype, lowering):
    """What `tree_attention` picks on a GPU backend (the backend query answers "gpu" here)."""
    assert lowering in lower_for_gpu(tree_attention, *_abstract(2, 5, 4, 2, 64, 256, dtype))


@pytest.mark.parametrize("dtype, D, S, block_s, match", [
    (jnp.float32, 64, 128, 64, "dtype=float32"),
    (jnp.bfloat16, 32, 128, 64, "head_dim=32"),
    (jnp.bfloat16, 64, 128, 96, "block_s=96"),
    (jnp.bfloat16, 64, 192, 128, "S=192"),
    (jnp.bfloat16, 64, 192, 64, "num_splits=2"),
])
def test_mosaic_gpu_kernel_refuses_what_it_cannot_run(dtype, D, S, block_s, match):
    from pallas_kernels.tree_attention_mgpu import tree_attention_mgpu
    args = _case(np.random.default_rng(0), 1, 3, 2, 1, D, S, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        tree_attention_mgpu(*args, block_s=block_s, num_splits=2 if "num_splits" in match else 1)


def test_online_softmax_passes_over_a_block_with_nothing_visible():
    """`fold` (the online softmax of every CPU/TPU/Triton kernel here) over a block whose keys
    are all masked, first or later, adds nothing: no exp(-inf - -inf) = NaN. The shipped
    kernels never hand it such a block first (only the prefix's blocks are read), so only this
    test holds the guard; the sparse kernel's page list is the caller's and may."""
    rng = np.random.default_rng(5)
    M, n, D = 3, 4, 8
    scores = jnp.asarray(rng.normal(size=(M, n)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    masked = jnp.full((M, n), -jnp.inf)
    start = (jnp.full((M,), -jnp.inf), jnp.zeros((M,)), jnp.zeros((M, D)))
    want = jax.nn.softmax(scores, axis=1) @ values
    for carry in (fold(scores, values, fold(masked, values, start)), fold(masked, values, fold(scores, values, start))):
        _, total, acc = carry
        np.testing.assert_allclose(np.asarray(acc / total[:, None]), np.asarray(want), rtol=1e-5, atol=1e-6)
