"""spec.SparseSelf: the target drafts over a chosen budget of its KV cache and verifies with
full attention (TriForce / MagicDec). Greedy equality with plain decoding on prompts of
thousands of tokens, the summaries it keeps, what the sparse draft reads, the exact sampled
distribution (in test_speculative_sampling.py's machinery, with a long prompt), bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import pages, spec
from tests.hf_models import VOCAB_SIZE
from tests.test_speculative import (_check_stats, _diverges_at_near_tie, assert_cache_rows_equal, plain_forward,
                                   run_rounds)
from tests.test_speculative_sampling import _prefix_logits, check_fit, draw3, joint3, rejects
from tests.test_steps import _truncate_at_stop

pytestmark = pytest.mark.filterwarnings("error:Some donated buffers were not usable")


def _long_prompts(lengths, seed):
    """Random prompts with repeated stretches (so attention has something to find far back)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        motif = rng.integers(3, VOCAB_SIZE, 64).tolist()
        row = rng.integers(3, VOCAB_SIZE, n).tolist()
        for start in rng.integers(0, max(1, n - 64), 6):
            row[start:start + 64] = motif[:n - start]
        rows.append(row[:n])
    return rows


def _late_stop(row):
    """A token of `row` that first occurs as late as possible (but not last), so a run stopped
    on it still decodes for a while."""
    first = {}
    for i, t in enumerate(row[:-1]):
        first.setdefault(t, i)
    return max(first, key=first.get)


def _check_long_greedy(target, prompts, method, max_new=32):
    unstopped = jaxdec.generate(target, prompts, max_new_tokens=max_new, stop_token_ids=[]).tokens
    stops = [_late_stop(unstopped[0])]  # row 0 ends early, the others run on
    expected = [_truncate_at_stop(row, stops) for row in unstopped]
    out = jaxdec.generate(target, prompts, max_new_tokens=max_new, stop_token_ids=stops, speculative=method)
    if out.tokens != expected:
        assert _diverges_at_near_tie(target, prompts, expected, out.tokens), "not a float32 near-tie"
    _check_stats(out, len(prompts), method.num_tokens)
    assert out.stats.mean_accepted > 1, "no draft token accepted"
    return out


def test_greedy_demo_target_on_a_3000_token_prompt():
    """The demo target (a trained model: its attention is peaked, so a small budget drafts
    well) on 3000 tokens of held-out code, cache 4096."""
    import inspect
    target = jaxdec.load("demo-target")
    ids = target.tokenizer.encode(open(inspect.getsourcefile(inspect)).read()).ids
    out = _check_long_greedy(target, [ids[:3000]], spec.SparseSelf(budget=256, num_tokens=4))
    assert out.stats.mean_accepted > 2.5, out.stats


@pytest.mark.parametrize("lengths, method", [
    ((1900, 700, 1200), spec.SparseSelf(budget=128, num_tokens=3, page_size=32)),  # batch 4, ragged
    ((2000, 33, 1500, 1024, 800), spec.SparseSelf(budget=64, num_tokens=5, page_size=8, recent=24)),  # batch 8
], ids=["b3", "b5"])
def test_greedy_equals_plain_on_long_prompts(long_llama, lengths, method):
    """A random model: its attention is spread out, so the sparse draft is often wrong and
    rows accept ragged numbers of tokens."""
    _check_long_greedy(long_llama, _long_prompts(lengths, seed=len(lengths)), method)


@pytest.fixture(scope="module")
def long_draft(long_llama):
    """A noisy copy of long_llama as a draft model: it agrees often, not always."""
    from jaxdec.loading import model_from_params
    rng = np.random.default_rng(1)
    noisy = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * np.std(np.asarray(x)) * rng.standard_normal(x.shape).astype(np.float32),
        long_llama.params)
    return model_from_params(long_llama.config, noisy)


@pytest.mark.parametrize("num_tokens, draft_tokens", [(4, 2), (3, 5)])
def test_hierarchical_greedy_equals_plain_on_long_prompts(long_llama, long_draft, num_tokens, draft_tokens):
    """TriForce: the draft model drafts for the sparse target, which drafts for the dense one.
    Ragged rows (batch 3 in a bucket of 4), one stopping early; draft_tokens above num_tokens
    too (the sparse target then holds its chain after one inner round)."""
    method = spec.SparseSelf(budget=64, num_tokens=num_tokens, page_size=16, draft=long_draft, draft_tokens=draft_tokens)
    _check_long_greedy(long_llama, _long_prompts((1500, 600, 1100), seed=4), method)


def test_hierarchical_round_copies_no_cache_layer(long_llama, long_draft):
    compiled, cache, dstate = _compiled_rounds(long_llama, spec.SparseSelf(budget=64, num_tokens=3, draft=long_draft),
                                               num_slots=512, length=300)
    assert cache_layer_copies(compiled, cache) == 0
    assert cache_layer_copies(compiled, dstate.cache) == 0


def test_budget_covering_the_context_drafts_what_the_target_decodes(long_llama):
    """Every page chosen: the draft is the dense target, so every round is accepted whole;
    a small budget is not (the draft really reads less)."""
    prompts = _long_prompts((900, 400), seed=7)
    plain = jaxdec.generate(long_llama, prompts, max_new_tokens=33, stop_token_ids=[]).tokens
    full = jaxdec.generate(long_llama, prompts, max_new_tokens=33, stop_token_ids=[],
                           speculative=spec.SparseSelf(budget=1024, num_tokens=3))
    assert full.tokens == plain
    assert full.stats.mean_accepted == 4 and full.stats.target_steps == 8
    small = jaxdec.generate(long_llama, prompts, max_new_tokens=33, stop_token_ids=[],
                            speculative=spec.SparseSelf(budget=48, num_tokens=3))
    assert small.tokens == plain
    assert small.stats.mean_accepted < 4


def _prefilled(model, B=2, S=512, n=300, page_size=16, budget=64):
    """A cache of S slots holding two prompts of n and n - 37 tokens, and SparsePages over it."""
    from jaxdec.sparse import init_pages, summarize_cache

    cfg = model.config
    _, cache = plain_forward(model, jnp.asarray(_long_prompts((n, n), seed=3), jnp.int32), num_slots=S)
    cache = cache.replace(lengths=jnp.array([n, n - 37], jnp.int32))
    sparse = init_pages(cfg, B, S, page_size, budget, page_size, range(cfg.num_hidden_layers))
    return cache, summarize_cache(sparse, cache)


def _sparse_step(cfg, params, sparse, T=1):
    """The jitted logits of a T-token chain step over the cache, attending sparsely."""
    from jaxdec.model import causal_mask, forward
    tokens = jnp.array([[5, 8, 13], [9, 2, 7]])[:, :T]
    return jax.jit(lambda c: forward(cfg, params, tokens, c.lengths[:, None] + jnp.arange(T), c, causal_mask(2, T),
                                     sparse=sparse)[0])


def test_sparse_forward_reads_only_the_chosen_pages(long_llama):
    """A step over SparsePages gives the same logits when every slot outside the chosen pages
    is poisoned, and different ones when a chosen slot is: the layers read only the pages
    their Quest bound picked (plus the first and most recent)."""
    cfg, params = long_llama.config, long_llama.params
    B, S, P, budget = 2, 512, 16, 64
    cache, sparse = _prefilled(long_llama, B, S, page_size=P, budget=budget)
    step = _sparse_step(cfg, params, sparse)
    base = np.asarray(step(cache))

    # The pages each layer chose, recomputed from its query: poison everything else.
    chosen = np.zeros((cfg.num_hidden_layers, B, cfg.num_key_value_heads, S), bool)
    from jaxdec.model import Decoder
    _, inter = Decoder(cfg, write_cache=True).apply({"params": params}, jnp.array([[5], [9]]),
                                                    cache.lengths[:, None], cache, jnp.ones((B, 1, 1), bool),
                                                    sparse=sparse, capture_intermediates=True, mutable=["intermediates"])
    for layer in range(cfg.num_hidden_layers):
        ids = np.asarray(inter["intermediates"][f"layers_{layer}"]["self_attn"]["__call__"][0][3])
        assert ids.shape == (B, cfg.num_key_value_heads, budget // P)
        for b in range(B):
            for h in range(cfg.num_key_value_heads):
                for page in ids[b, h][ids[b, h] >= 0]:
                    chosen[layer, b, h, page * P:(page + 1) * P] = True
    assert 0 < chosen.mean() < 0.5
    poison = lambda x, mask: jnp.where(jnp.asarray(mask)[..., None], x, 1e3)
    poisoned = cache.replace(k=tuple(poison(k, chosen[i]) for i, k in enumerate(cache.k)),
                             v=tuple(poison(v, chosen[i]) for i, v in enumerate(cache.v)))
    np.testing.assert_allclose(np.asarray(step(poisoned)), base, atol=1e-4)
    b, h, slot = 0, 0, int(np.flatnonzero(chosen[0, 0, 0])[3])
    touched = cache.replace(v=(cache.v[0].at[b, h, slot].set(1e3),) + cache.v[1:])
    assert np.abs(np.asarray(step(touched)) - base).max() > 1e-2


@pytest.mark.parametrize("T", [1, 3])
def test_pallas_sparse_kernel_in_the_model_equals_the_reference(long_llama, T):
    """attn_impl="pallas" runs pallas_kernels/sparse_attention.py's kernel (interpreted here)
    in the sparse layers: a decoding step and a chain step give the reference's logits. (Not
    the whole speculative loop: interpreted kernels make that program huge on XLA:CPU.)"""
    import dataclasses
    cache, sparse = _prefilled(long_llama)
    pallas = dataclasses.replace(long_llama.config, attn_impl="pallas")
    got = np.asarray(_sparse_step(pallas, long_llama.params, sparse, T)(cache))
    want = np.asarray(_sparse_step(long_llama.config, long_llama.params, sparse, T)(cache))
    np.testing.assert_allclose(got, want, atol=2e-4)


def cache_layer_copies(compiled, cache) -> int:
    """How many copies of a whole cache layer a compiled program makes (XLA inserts them where
    a donated buffer cannot be updated in place)."""
    shape = "f32[{},{},{},{}]".format(*cache.k[0].shape)
    return sum(shape in line and " copy(" in line for line in compiled.as_text().splitlines())


def _compiled_rounds(target, method, num_slots, length, batch_size=4):
    """speculative_decode compiled ahead for `method` (greedy, rows at `length` tokens):
    (the compiled program, the target's cache, the drafter's state)."""
    from jaxdec import speculative as spec_steps
    from jaxdec.cache import init_cache
    from jaxdec.sampling import SamplingParams, row_keys
    from jaxdec.steps import DecodeState

    B, cfg = batch_size, target.config
    drafter, dparams, dstate = method.build(target, B, num_slots)
    cache = init_cache(cfg, B, num_slots, jnp.float32)
    lengths = jnp.full((B,), length, jnp.int32)
    state = DecodeState(tokens=jnp.zeros((B, num_slots), jnp.int32), lengths=lengths, prompt_lengths=lengths - 1,
                        done=jnp.zeros((B,), bool), keys=row_keys(0, B), target_steps=jnp.int32(0),
                        active_row_steps=jnp.int32(0))
    compiled = spec_steps.speculative_decode.lower(cfg, drafter, target.params, dparams, cache, dstate, state,
                                                   SamplingParams.create(0.0), jnp.full((4,), -1, jnp.int32),
                                                   jnp.int32(64)).compile()
    return compiled, cache, dstate


def test_the_round_copies_no_cache_layer(llama):
    """The compiled SparseSelf round updates the cache in place: the page summaries are folded
    from the keys the verify step commits, not read back from the cache at the start of the
    round (which made XLA copy a cache layer twice per draft step)."""
    compiled, cache, _ = _compiled_rounds(llama, spec.SparseSelf(budget=32, num_tokens=3, page_size=8),
                                          num_slots=256, length=100)
    assert cache_layer_copies(compiled, cache) == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_summaries_after_rounds_equal_recomputed(llama, temperature):
    """After prefill and several rounds the drafter's page summaries are exactly those of the
    committed cache (the draft's own writes past the length are never in them), and the cache
    is plain decoding's."""
    method = spec.SparseSelf(budget=16, num_tokens=3, page_size=4)
    state, cache, dstate, _ = run_rounds(llama, method, temperature)
    for layer in range(llama.config.num_hidden_layers):
        want_min, want_max = pages.summarize(cache.k[layer], cache.lengths, 4)
        np.testing.assert_array_equal(np.asarray(dstate.kmin[layer]), np.asarray(want_min))
        np.testing.assert_array_equal(np.asarray(dstate.kmax[layer]), np.asarray(want_max))
    assert_cache_rows_equal(cache, plain_forward(llama, state.tokens)[1], np.asarray(cache.lengths))


def test_sliding_window_layers_stay_dense(models):
    """Mistral's layers all have a sliding window: none chooses pages, so the draft is the
    target itself and every draft is accepted."""
    prompts = [list(range(3, 120)), [9, 9, 9, 12] * 20]
    plain = jaxdec.generate(models["mistral"], prompts, max_new_tokens=21, stop_token_ids=[]).tokens
    out = jaxdec.generate(models["mistral"], prompts, max_new_tokens=21, stop_token_ids=[],
                          speculative=spec.SparseSelf(budget=32, num_tokens=3, page_size=8))
    assert out.tokens == plain
    assert out.stats.mean_accepted == 4


# The exact sampled distribution, with test_speculative_sampling's machinery (vocabulary-8
# models, the joint law of the first 3 new tokens enumerated exactly) and a prompt of 120
# tokens of which the draft reads at most 32.
LONG_PROMPT = np.random.default_rng(11).integers(0, 8, 120).tolist()


def test_sampled_tokens_follow_the_target_distribution(tiny):
    sampling = dict(temperature=1.0)
    method = spec.SparseSelf(budget=32, num_tokens=2, page_size=8)
    target_logits = _prefix_logits(tiny["target"], prompt=LONG_PROMPT)
    counts, mean_accepted = draw3(tiny["target"], method, sampling, prompt=LONG_PROMPT)
    check_fit(counts, joint3([target_logits] * 3, sampling), "sparse_self")
    assert 1.0 < mean_accepted < 3, mean_accepted  # drafts accepted and rejected
    # Power: the same draws refute a clearly different distribution.
    assert rejects(counts, joint3([target_logits] * 3, {**sampling, "temperature": 1.6}, exact=False))


def test_hierarchical_sampled_tokens_follow_the_target_distribution(tiny):
    """TriForce's two levels of speculative sampling: the draft model's tokens through the
    sparse target's rule, the sparse target's chain (with its distributions as q) through
    the dense target's."""
    sampling = dict(temperature=1.0)
    method = spec.SparseSelf(budget=32, num_tokens=2, page_size=8, draft=tiny["draft"], draft_tokens=2)
    target_logits = _prefix_logits(tiny["target"], prompt=LONG_PROMPT)
    counts, mean_accepted = draw3(tiny["target"], method, sampling, prompt=LONG_PROMPT)
    check_fit(counts, joint3([target_logits] * 3, sampling), "triforce")
    assert 1.0 < mean_accepted < 3, mean_accepted
    assert rejects(counts, joint3([target_logits] * 3, {**sampling, "temperature": 1.6}, exact=False))


@pytest.mark.parametrize("kwargs, word", [
    (dict(draft_tokens=0), "draft_tokens"),
    (dict(draft="demo-draft"), "SparseSelf needs a jaxdec.Model"),
    (dict(budget=8, page_size=16), "budget=8"),
    (dict(budget=32, page_size=16), "budget=32 is too small.*3 pages"),
    (dict(budget=64, page_size=16, recent=40), "budget=64 is too small.*last 40 tokens.*5 pages"),
    (dict(page_size=0), "page_size"),
    (dict(budget=0), "budget"),
    (dict(num_tokens=0), "num_tokens"),
    (dict(recent=-1), "recent"),
    (dict(recent=2.5), "recent"),
])
def test_bad_settings_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        spec.SparseSelf(**kwargs)


def test_hierarchical_draft_must_share_the_vocabulary(tiny, long_llama):
    with pytest.raises(ValueError, match="vocabulary"):
        jaxdec.generate(long_llama, [[5, 6, 7]], max_new_tokens=4, speculative=spec.SparseSelf(budget=64, draft=tiny["draft"]))


def test_pallas_kernel_needs_whole_pages(llama):
    """The Pallas sparse kernel reads whole pages: a cache (here 64 slots) that page_size does
    not divide is refused before anything compiles; the reference takes it."""
    import dataclasses
    from jaxdec.loading import model_from_params
    pallas = model_from_params(dataclasses.replace(llama.config, attn_impl="pallas"), llama.params, llama.tokenizer)
    method = spec.SparseSelf(budget=72, page_size=24)
    with pytest.raises(ValueError, match=r"cache \(64 slots\) to be whole pages: page_size=24"):
        jaxdec.generate(pallas, [[5, 6, 7]], max_new_tokens=4, speculative=method)
    with pytest.raises(ValueError, match="page_size=24 must divide"):
        jaxdec.generate(pallas, [[5, 6, 7]], max_new_tokens=4, speculative=spec.LossySparseDecode(budget=72, page_size=24))
    assert len(jaxdec.generate(llama, [[5, 6, 7]], max_new_tokens=4, speculative=method).tokens[0]) == 4
