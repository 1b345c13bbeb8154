"""Draft heads on the target's features (Medusa, EAGLE): lossless greedy decoding through
their trees, the state they keep between rounds, their on-disk format, the tree Medusa
ships, their training objectives, and bad input. (Sampling: test_speculative_sampling.py.)"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxdec
from jaxdec import spec
from jaxdec.heads import (Heads, HeadsConfig, best_static_tree, eagle_forward, init_heads, load_heads,
                          save_heads)
from jaxdec.loading import model_from_params
from tests.test_speculative import (PER_COMBO, ROUND_PROMPTS, _check_greedy_equal, assert_cache_rows_equal,
                                   greedy_case, plain_forward,
                                   run_rounds)


def random_heads(model, kind, seed=0, num_heads=3, tree=(), scale=0.3):
    """Heads with random weights for `model` (Medusa's residual blocks made non-zero, so each
    head differs from the target's own next-token head)."""
    cfg = HeadsConfig.medusa(model.config, num_heads, tree) if kind == "medusa" else HeadsConfig.eagle(model.config)
    params = init_heads(cfg, jax.random.key(seed))
    if kind == "medusa":
        w = scale * jax.random.normal(jax.random.key(seed + 1), params["w"].shape) / np.sqrt(cfg.hidden_size)
        params = {**params, "w": w}
    return Heads(cfg, params)


def trained_heads(model, kind, steps=100):
    """Heads distilled for a few steps on the target's own greedy continuations of random
    prompts (as `python -m jaxdec.train` does on a corpus): they agree with the target often
    but not always, so rows accept ragged numbers of tokens."""
    from jaxdec.train import make_optimizer, make_train_step
    from jaxdec.train_heads import EagleObjective, MedusaObjective
    rng = np.random.default_rng(2)
    prompts = ROUND_PROMPTS + [rng.integers(0, model.config.vocab_size, 8).tolist() for _ in range(4)]
    out = jaxdec.generate(model, prompts, max_new_tokens=40, stop_token_ids=[])
    batch = jnp.asarray([(p + t)[:41] for p, t in zip(prompts, out.tokens)], jnp.int32)
    heads = random_heads(model, kind, num_heads=4)
    objective = (MedusaObjective if kind == "medusa" else EagleObjective)(heads.config, model.config)
    optimizer, _ = make_optimizer(3e-3, steps, 1, 0.0)
    step = make_train_step(objective, optimizer)
    params, opt_state = heads.params, optimizer.init(heads.params)
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, batch, model.params)
    return Heads(heads.config, params)


@pytest.fixture(scope="module")
def medusa(llama):
    return trained_heads(llama, "medusa")


@pytest.fixture(scope="module")
def eagle(llama):
    return trained_heads(llama, "eagle")


# ---------------------------------------------------------------------------------------------
# Greedy: exactly the tokens of plain decoding

# (batch bucket, paths): a wide shallow tree, a deep one with branches, a lone node.
MEDUSA_COMBOS = [(8, ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0))),
                 (4, ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (1,), (0, 1), (0, 0, 1))),
                 (1, ((0,),))]
# (batch bucket, max_nodes, depth, top_k)
EAGLE_COMBOS = [(8, 6, 3, 2), (1, 4, 4, 1), (4, 12, 4, 3), (4, 1, 1, 1), (1, 2, 1, 2)]


@pytest.mark.parametrize("combo", MEDUSA_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_medusa_equals_plain(llama, medusa, combo, data):
    _, paths = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    _check_greedy_equal(llama, prompts, max_new_tokens, spec.Medusa(medusa, paths), data)


@pytest.mark.parametrize("combo", EAGLE_COMBOS)
@PER_COMBO
@given(data=st.data())
def test_greedy_eagle_equals_plain(llama, eagle, combo, data):
    _, max_nodes, depth, top_k = combo
    prompts, max_new_tokens = greedy_case(data, combo)
    _check_greedy_equal(llama, prompts, max_new_tokens, spec.Eagle(eagle, depth=depth, top_k=top_k,
                                                                   max_nodes=max_nodes), data)


# ---------------------------------------------------------------------------------------------
# What the drafters keep between rounds


def _target_features(llama, tokens):
    """The target's hidden states over whole rows (what its LM head reads), from no cache."""
    return np.asarray(plain_forward(llama, tokens)[0])


@pytest.mark.parametrize("temperature, num_rounds", [(0.0, 4), (1.0, 4), (0.0, 0)])
def test_medusa_keeps_the_feature_behind_the_pending_token(llama, medusa, temperature, num_rounds):
    """After rounds, each row's feature is the target's hidden state at the token before the
    pending one: the one whose logits gave the pending token. After prefill alone too: the
    last prompt token's (the first round drafts from it)."""
    state, _, dstate, _ = run_rounds(llama, spec.Medusa(medusa, [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]), temperature,
                                     num_rounds=num_rounds)
    lengths = np.asarray(state.lengths)
    features = _target_features(llama, state.tokens)
    want = features[np.arange(len(lengths)), lengths - 2]
    np.testing.assert_allclose(np.asarray(dstate.features), want, atol=2e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eagle_cache_holds_pairs_of_true_features(llama, eagle, temperature):
    """After rounds, the EAGLE layer's cache below `fed` is what the layer computes over the
    committed tokens paired with the target's true features (no predicted feature stays in
    it), and the kept features are the target's at positions fed - 1 .. lengths - 2."""
    _check_eagle_cache(llama, eagle, temperature)


def test_eagle_cache_after_a_chunked_prefill(llama, eagle, small_prefill_chunks):
    """The same with the prompts (bucket 16) read 4 tokens at a time, by the target and the
    EAGLE layer alike."""
    _check_eagle_cache(llama, eagle, 0.0)


def _check_eagle_cache(llama, eagle, temperature):
    from jaxdec.cache import init_cache
    from jaxdec.model import causal_mask

    method = spec.Eagle(eagle, depth=4, top_k=2, max_nodes=8)
    state, _, dstate, prompt_lengths = run_rounds(llama, method, temperature)
    tokens, lengths, fed = state.tokens, np.asarray(state.lengths), np.asarray(dstate.fed)
    features = _target_features(llama, tokens)
    B, S = tokens.shape
    shifted = jnp.concatenate([jnp.zeros_like(features[:, :1]), features[:, :-1]], axis=1)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    _, want = eagle_forward(eagle.config, llama.params, eagle.params, shifted, tokens, positions,
                            init_cache(eagle.config.layer, B, S, jnp.float32), causal_mask(B, S), read_cache=False)
    assert_cache_rows_equal(dstate.cache, want, fed)
    for b in range(B):
        new = lengths[b] - fed[b]
        np.testing.assert_allclose(np.asarray(dstate.features[b, :new]), features[b, fed[b] - 1:lengths[b] - 1],
                                   atol=2e-5, err_msg=f"features row {b}")


# ---------------------------------------------------------------------------------------------
# On disk, and the tree Medusa ships


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_heads_round_trip_through_disk(llama, tmp_path, kind):
    heads = random_heads(llama, kind, seed=4, tree=[(0,), (1,), (0, 0)])
    save_heads(tmp_path / kind, heads.config, heads.params, {"note": "test"})
    loaded = load_heads(tmp_path / kind)
    assert loaded.config == heads.config
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(heads.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (tmp_path / f"{kind}.tmp").exists()
    half = load_heads(tmp_path / kind, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(half.params))


def _expected_length(paths, accuracy):
    """Expected accepted length of a static tree when depth d's rank-r token is right with
    probability accuracy[d - 1][r], independently: the sum over nodes of their path's odds."""
    return sum(np.prod([accuracy[d][r] for d, r in enumerate(p)]) for p in paths)


def test_best_static_tree_beats_every_other_tree():
    """Against brute force over all trees of n nodes inside a small grid of depths and ranks."""
    rng = np.random.default_rng(0)
    accuracy = np.sort(rng.uniform(0, 0.6, (3, 3)), axis=1)[:, ::-1]
    universe = [p for d in range(1, 4) for p in itertools.product(range(3), repeat=d)]
    for n in (1, 3, 5):
        best = best_static_tree(accuracy, n)
        assert len(best) == n and all(p[:-1] in best for p in best if len(p) > 1)
        brute = max(_expected_length(c, accuracy) for c in itertools.combinations(universe, n)
                    if all(p[:-1] in c for p in c if len(p) > 1))
        assert _expected_length(best, accuracy) == pytest.approx(brute)


# ---------------------------------------------------------------------------------------------
# Training objectives: a few steps on the tiny model lower the loss on a fixed batch


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_training_lowers_the_heads_loss(llama, kind):
    from jaxdec.train import make_optimizer, make_train_step
    from jaxdec.train_heads import EagleObjective, MedusaObjective, held_out_accuracy
    cfg = HeadsConfig.medusa(llama.config, 2) if kind == "medusa" else HeadsConfig.eagle(llama.config)
    objective = (MedusaObjective if kind == "medusa" else EagleObjective)(cfg, llama.config)
    rng = np.random.default_rng(1)
    batch = jnp.asarray(rng.integers(0, llama.config.vocab_size, (4, 33)), jnp.int32)
    params = objective.init(jax.random.key(0))
    optimizer, _ = make_optimizer(3e-3, 30, 1, 0.0)
    step = make_train_step(objective, optimizer)
    first, _ = objective.loss(params, batch, llama.params)
    opt_state = optimizer.init(params)
    for _ in range(30):
        params, opt_state, metrics = step(params, opt_state, batch, llama.params)
    last, _ = objective.loss(params, batch, llama.params)
    assert float(last) < 0.8 * float(first)
    accuracy = np.asarray(held_out_accuracy(objective, params, llama.params, np.asarray(batch), 2))
    assert accuracy.shape == (2, 8) and (accuracy >= 0).all() and accuracy.sum(axis=1).max() <= 1 + 1e-9


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_heads_losses_are_the_documented_sums(llama, kind):
    """Medusa's loss is the heads' KL(target || head) weighted 0.8^(k-1), normalised; EAGLE's
    is KL of the first pass + KL of the second + 0.1 x smooth-L1 to the target's features. The
    KLs are recomputed here from the objective's outputs. And the accuracies count the
    positions each depth is scored at: EAGLE's second pass not at position 0 (no predicted
    feature came before it)."""
    import optax
    from jaxdec.model import lm_head
    from jaxdec.train_heads import EagleObjective, MedusaObjective
    heads = random_heads(llama, kind, num_heads=3)
    objective = (MedusaObjective if kind == "medusa" else EagleObjective)(heads.config, llama.config)
    batch = jnp.asarray(np.random.default_rng(3).integers(0, llama.config.vocab_size, (2, 17)), jnp.int32)
    loss, metrics = objective.loss(heads.params, batch, llama.params)

    def kl(t_logp, logits):
        t, q = np.asarray(t_logp, np.float64), np.asarray(jax.nn.log_softmax(logits), np.float64)
        return float(np.mean(np.sum(np.exp(t) * (t - q), axis=-1)))

    if kind == "medusa":
        kls = [kl(t, s) for s, t in objective.outputs(heads.params, batch, llama.params)]
        want = sum(0.8 ** k * v for k, v in enumerate(kls)) / sum(0.8 ** k for k in range(3))
        positions = [2 * (17 - k) for k in (1, 2, 3)]
    else:
        features, t_logp, first, second = objective.outputs(heads.params, batch, llama.params)
        head = lambda h: lm_head(llama.config, llama.params, h)
        kls = [kl(t_logp, head(first)), kl(t_logp[:, 1:], head(second[:, 1:]))]
        want = kls[0] + kls[1] + 0.1 * float(jnp.mean(optax.huber_loss(first, features, delta=1.0)))
        positions = [2 * 17, 2 * 16]
    assert min(kls) > 1e-3  # every term weighs
    np.testing.assert_allclose([float(metrics[f"kl{k + 1}"]) for k in range(len(kls))], kls, rtol=1e-4)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    assert np.asarray(objective.hits(heads.params, batch, llama.params))[:, -1].tolist() == positions


# ---------------------------------------------------------------------------------------------
# Bad input


def test_heads_must_be_heads_of_the_right_kind(llama, medusa, eagle):
    with pytest.raises(ValueError, match="Medusa needs medusa heads.*eagle heads"):
        spec.Medusa(eagle, [(0,)])
    with pytest.raises(ValueError, match="Eagle needs eagle heads.*medusa heads"):
        spec.Eagle(medusa)
    with pytest.raises(ValueError, match="Eagle needs eagle heads"):
        spec.Eagle(llama)


def test_medusa_tree_must_fit_the_heads(medusa):
    with pytest.raises(ValueError, match="5 deep but there are only 4 Medusa heads"):
        spec.Medusa(medusa, [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="ship no tree"):
        spec.Medusa(medusa)
    with pytest.raises(ValueError, match="missing"):
        spec.Medusa(medusa, [(0, 0)])
    with pytest.raises(ValueError, match=r"path \(0,\) is listed twice"):
        spec.Medusa(medusa, [(0,), (1,), (0,)])
    with pytest.raises(ValueError, match="paths must be non-empty"):  # given empty, not "ship no tree"
        spec.Medusa(medusa, [])


def test_medusa_paths_may_be_an_array(medusa):
    """As StaticTree's: an integer array of equal-depth paths is a list of them (NumPy's truth
    value of an array was once asked, an error that named nothing)."""
    assert spec.Medusa(medusa, np.array([[0], [1]])).paths == spec.Medusa(medusa, [(0,), (1,)]).paths


@pytest.mark.parametrize("kwargs, pattern", [(dict(depth=0), "depth must be"), (dict(top_k=0), "top_k must be"),
                                             (dict(max_nodes=0), "max_nodes must be")])
def test_bad_eagle_tree_options(eagle, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        spec.Eagle(eagle, **kwargs)


def test_eagle_max_nodes_is_a_cap(eagle):
    """A tree of depth 2 and top_k 2 scores 6 nodes: max_nodes' default (32) verifies those 6."""
    assert spec.Eagle(eagle, depth=2, top_k=2).num_tokens == 6
    assert spec.Eagle(eagle, depth=2, top_k=2, max_nodes=5).num_tokens == 5


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
@pytest.mark.parametrize("name", ["hidden_size", "vocab_size"])
def test_heads_of_another_target_are_refused(llama, kind, name):
    import dataclasses
    theirs = 2 * getattr(llama.config, name)
    other = model_from_params(dataclasses.replace(llama.config, **{name: theirs}), llama.params)
    heads = random_heads(other, kind, tree=[(0,)])
    method = spec.Medusa(heads) if kind == "medusa" else spec.Eagle(heads)
    with pytest.raises(ValueError, match=f"trained for a target with {name}={theirs}, this target has {name}="):
        jaxdec.generate(llama, [[1, 2, 3]], max_new_tokens=2, speculative=method)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_float32_heads_draft_in_a_bfloat16_targets_dtype(llama, kind):
    """Heads stored in float32 (as training writes them) on a bfloat16 target: the drafter
    gets them in bfloat16, the dtype of the features and cache they meet."""
    bf16 = model_from_params(llama.config, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), llama.params))
    heads = random_heads(llama, kind, tree=[(0,), (1,), (0, 0)])
    assert {x.dtype for x in jax.tree_util.tree_leaves(heads.params)} == {jnp.dtype(jnp.float32)}
    method = spec.Medusa(heads) if kind == "medusa" else spec.Eagle(heads, depth=2, top_k=2)
    _, params, _ = method.build(bf16, 2, 64)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_eagle_layer_must_have_room_for_the_call(llama, eagle):
    """A call's positions must fit the EAGLE layer's context; where they do, it runs, in the
    target's cache of 128 slots past the layer's 100 positions."""
    import dataclasses
    short = lambda context: Heads(dataclasses.replace(
        eagle.config, layer=dataclasses.replace(eagle.config.layer, max_position_embeddings=context)), eagle.params)
    with pytest.raises(ValueError, match=r"prompt of 60 tokens plus max_new_tokens=5 exceeds the EAGLE layer's "
                                         r"max_position_embeddings=64"):
        jaxdec.generate(llama, [[1] * 60], max_new_tokens=5, speculative=spec.Eagle(short(64)))
    prompt = [[5, 9, 2, 7] * 10]
    out = jaxdec.generate(llama, prompt, max_new_tokens=50, stop_token_ids=[], speculative=spec.Eagle(short(100)))
    assert out.tokens == jaxdec.generate(llama, prompt, max_new_tokens=50, stop_token_ids=[]).tokens


def test_load_tells_models_and_heads_apart(llama, tmp_path, converted_dirs):
    heads = random_heads(llama, "eagle")
    save_heads(tmp_path / "eagle", heads.config, heads.params)
    with pytest.raises(ValueError, match="holds draft heads, not a model: load it with jaxdec.load_heads"):
        jaxdec.load(tmp_path / "eagle")
    with pytest.raises(ValueError, match="holds no draft heads.*it is a model: load it with jaxdec.load"):
        load_heads(converted_dirs["llama"])
    with pytest.raises(FileNotFoundError):
        load_heads(tmp_path / "absent")
    shallow = HeadsConfig.medusa(llama.config, 2)
    save_heads(tmp_path / "medusa", shallow, init_heads(HeadsConfig.medusa(llama.config, 3), jax.random.key(0)))
    with pytest.raises(ValueError, match="do not match"):
        load_heads(tmp_path / "medusa")
    (tmp_path / "eagle" / "heads.json").write_text('{"format": 1, "config": {"kind": "hydra"}}')
    with pytest.raises(ValueError, match="unreadable heads config"):
        load_heads(tmp_path / "eagle")


def _saved_medusa(llama, directory):
    """Random Medusa heads saved in `directory`, checked to load undamaged."""
    heads = random_heads(llama, "medusa")
    save_heads(directory, heads.config, heads.params)
    assert load_heads(directory).config == heads.config
    return directory


@pytest.mark.parametrize("field, value, says", [
    ("num_heads", 2.5, r"num_heads >= 1, got 2\.5"),  # was a TypeError from the shapes
    ("num_heads", 0, r"num_heads >= 1, got 0"),
    ("hidden_size", "x", r"hidden_size must be a positive integer, got 'x'"),
    ("accuracy", [[0.5, 2.0]], r"accuracy entries are shares in \[0, 1\], got 2\.0"),
    ("accuracy", [[float("nan")]], r"shares, got \[\[nan\]\]"),
    ("accuracy", [[0.5, -0.1]], r"accuracy entries are shares in \[0, 1\], got -0\.1"),
    ("layer", "x", r"layer must be a model config .* got 'x'"),
    ("kind", "eagle", r"EAGLE heads need the layer's config"),
    # were "'int' object is not iterable", or a rank 1.5 read as 1
    ("tree", 5, r"heads tree must be a list of lists of child ranks, got 5"),
    ("tree", [[0], [1.5]], r"heads tree must be a list of lists of child ranks, got \[\[0\], \[1\.5\]\]"),
    ("accuracy", [0.5], r"heads accuracy must be a list of lists of shares, got \[0\.5\]"),
    ("accuracy", [["a"]], r"heads accuracy must be a list of lists of shares"),
])
def test_load_refuses_a_damaged_heads_config(llama, tmp_path, field, value, says):
    import json
    path = _saved_medusa(llama, tmp_path / "medusa") / "heads.json"
    meta = json.loads(path.read_text())
    meta["config"][field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"unreadable heads config .*{says}"):
        load_heads(tmp_path / "medusa")


def test_load_refuses_an_eagle_layer_of_another_width(llama, tmp_path):
    """It was a TypeError from JAX, about broadcasting (384 against 128)."""
    import json
    heads = random_heads(llama, "eagle")
    save_heads(tmp_path / "eagle", heads.config, heads.params)
    path = tmp_path / "eagle" / "heads.json"
    meta = json.loads(path.read_text())
    meta["config"]["layer"]["hidden_size"] = 48
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"the EAGLE layer's hidden_size=48 and vocab_size=128 differ from the heads' "
                                         r"64 and 128"):
        load_heads(tmp_path / "eagle")


@pytest.mark.parametrize("written, says", [('{"format": 99, "config": {}}', r"unknown heads format 99"),
                                          ("[1, 2]", r"unknown heads format \[1, 2\]")])
def test_load_refuses_heads_of_another_format(llama, tmp_path, written, says):
    (_saved_medusa(llama, tmp_path / "medusa") / "heads.json").write_text(written)
    with pytest.raises(ValueError, match=f"unreadable heads config .*{says}"):
        load_heads(tmp_path / "medusa")
