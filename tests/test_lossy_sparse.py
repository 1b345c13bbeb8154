"""spec.LossySparseDecode: plain decoding over a sparse KV cache (TidalDecode style), the one
explicitly lossy method. What must hold: a budget covering the context changes nothing, a
small one really drops context (the output drifts), the summaries it keeps stay exact, and
bad settings are refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import pages, spec, steps
from tests.test_sparse_self import _long_prompts, cache_layer_copies

pytestmark = pytest.mark.filterwarnings("error:Some donated buffers were not usable")

PROMPTS = _long_prompts((900, 400, 700), seed=5)


@pytest.fixture(scope="module")
def plain(long_llama):
    return jaxdec.generate(long_llama, PROMPTS, max_new_tokens=24, stop_token_ids=[]).tokens


def test_budget_covering_the_context_equals_plain_decoding(long_llama, plain):
    out = jaxdec.generate(long_llama, PROMPTS, max_new_tokens=24, stop_token_ids=[],
                          speculative=spec.LossySparseDecode(budget=1024, page_size=16))
    assert out.tokens == plain
    assert out.stats.mean_accepted == 1.0 and out.stats.target_steps == 23


def test_a_small_budget_drifts_and_streams(long_llama, plain):
    """Every layer from the first selection layer on reads 48 of up to 900 tokens: the first
    token (from the dense prefill) agrees, later ones do not all."""
    snapshots = []
    method = spec.LossySparseDecode(budget=48, page_size=16, selection_layers=[0])
    out = jaxdec.generate(long_llama, PROMPTS, max_new_tokens=24, stop_token_ids=[], speculative=method,
                          on_progress=lambda t: snapshots.append([len(r) for r in t]))
    assert [row[0] for row in out.tokens] == [row[0] for row in plain]
    assert out.tokens != plain
    assert [len(r) for r in out.tokens] == [24] * 3 and snapshots[-1] == [24] * 3 and len(snapshots) > 2
    # Sampling runs too, and a seed repeats it.
    runs = [jaxdec.generate(long_llama, PROMPTS, max_new_tokens=8, temperature=0.9, seed=3, speculative=method).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_summaries_stay_exact_while_decoding_in_place(long_llama):
    from jaxdec.cache import init_cache
    from jaxdec.sampling import SamplingParams, row_keys

    cfg = long_llama.config
    B, S = 4, 1024
    method = spec.LossySparseDecode(budget=64, page_size=16)
    _, _, sparse = method.build(long_llama, B, S)
    assert [k is not None for k in sparse.kmin] == [False, True]  # the default (1, L // 2) is (1,) for 2 layers
    tokens = np.zeros((B, S), np.int32)
    lengths = np.array([len(p) for p in PROMPTS] + [1], np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    sampling, stop, max_new = SamplingParams.create(0.0), np.full((16,), -1, np.int32), np.int32(30)
    state, cache, sparse = steps.sparse_prefill(cfg, long_llama.params, init_cache(cfg, B, S, jnp.float32), sparse,
                                                tokens, lengths, np.arange(B) < 3, sampling, row_keys(0, B), stop,
                                                max_new, prompt_bucket=1024)
    # Compiled ahead, to check the loop updates the cache in place: the summaries fold the
    # step's keys read back after its write, not before (which made XLA copy the cache).
    decode = steps.sparse_decode.lower(cfg, long_llama.params, cache, state, sparse, sampling, stop, max_new,
                                       num_steps=12).compile()
    assert cache_layer_copies(decode, cache) == 0
    state, cache, sparse = decode(long_llama.params, cache, state, sparse, sampling, stop, max_new)
    for layer, kmin in enumerate(sparse.kmin):
        if kmin is not None:
            want_min, want_max = pages.summarize(cache.k[layer], cache.lengths, 16)
            np.testing.assert_array_equal(np.asarray(kmin), np.asarray(want_min))
            np.testing.assert_array_equal(np.asarray(sparse.kmax[layer]), np.asarray(want_max))


def test_shared_selection_is_one_choice_for_every_kv_head():
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(2, 3, 64, 8)), jnp.float32)
    lengths = jnp.array([64, 40], jnp.int32)
    q = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    kmin, kmax = pages.summarize(keys, lengths, 4)
    ids = np.asarray(pages.select_page_ids(q, kmin, kmax, lengths, 4, 24, shared=True))
    assert (ids == ids[:, :1]).all()
    own = np.asarray(pages.select_page_ids(q, kmin, kmax, lengths, 4, 24))
    assert not (own == own[:, :1]).all()  # per head they differ, so the test can tell
    scores = np.asarray(pages.page_scores(q, kmin, kmax)).sum(axis=1)
    for b, n in enumerate(np.asarray(lengths)):
        last = (n - 1) // 4
        best = [p for p in np.argsort(-scores[b]) if p not in (0, last) and p * 4 < n][:4]
        assert set(ids[b, 0]) == {0, last, *best}


@pytest.mark.parametrize("kwargs, word", [
    (dict(selection_layers=[]), "selection_layers"),
    (dict(selection_layers=[5]), "selection layer 5 is out of range"),
    (dict(budget=32), "budget=32 is too small"),
    (dict(page_size=0), "page_size"),
    (dict(recent=-2), "recent"),
])
def test_bad_settings_raise(long_llama, kwargs, word):
    with pytest.raises(ValueError, match=word):
        jaxdec.generate(long_llama, [[5, 6]], max_new_tokens=4, speculative=spec.LossySparseDecode(**kwargs))


def test_sliding_window_layers_cannot_select(models):
    with pytest.raises(ValueError, match="selection layer 0 is a sliding-window layer"):
        jaxdec.generate(models["mistral"], [[5, 6]], max_new_tokens=4,
                        speculative=spec.LossySparseDecode(budget=48, selection_layers=[0]))


def test_a_sliding_window_layer_after_a_selection_layer_keeps_its_window(models):
    """A model whose layer 0 has full attention and layer 1 a 16-token window: layer 0
    selects (every page, with this budget) and layer 1, a window layer, does not reuse the
    choice but attends over its window as in plain decoding."""
    import dataclasses
    from jaxdec.loading import model_from_params
    qwen2 = models["qwen2"]
    mixed = model_from_params(dataclasses.replace(qwen2.config, layer_windows=(None, 16)), qwen2.params)
    prompts = [list(range(3, 100)), [9, 9, 9, 12] * 20]
    plain = jaxdec.generate(mixed, prompts, max_new_tokens=24, stop_token_ids=[]).tokens
    out = jaxdec.generate(mixed, prompts, max_new_tokens=24, stop_token_ids=[],
                          speculative=spec.LossySparseDecode(budget=128, page_size=16, selection_layers=[0]))
    assert out.tokens == plain


def test_agreement_benchmark(tmp_path):
    """benchmarks/lossy_agreement.py: its measures on known rows, and a smoke run."""
    import json

    from benchmarks.lossy_agreement import agreement, main
    got = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got == {"identical_rows": 0.5, "first_divergence": 3.0, "token_agreement": 0.875}
    out = tmp_path / "lossy.json"
    main(["--context", "200", "--budgets", "48,1024", "--selection-layers", "default,0", "--num-prompts", "2",
          "--max-new-tokens", "4", "--batch-size", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    for r in results:  # rates pooled over the two batches: all tokens over all seconds
        assert r["speedup_vs_dense"] == pytest.approx(r["tokens_per_second"] / r["dense_tokens_per_second"])
    assert [(r["budget"], r["selection_layers"]) for r in results] == [
        (48, "default"), (48, [0]), (1024, "default"), (1024, [0])]
    # A budget past the whole cache keeps every page: decoding is dense, every row identical.
    assert all(r["identical_rows"] == 1.0 and r["token_agreement"] == 1.0 for r in results if r["budget"] == 1024)
    assert all(0 <= r["token_agreement"] <= 1 and r["speedup_vs_dense"] > 0 for r in results)
    with pytest.raises(SystemExit):
        main(["--budgets", "8", "--out", str(out)])
