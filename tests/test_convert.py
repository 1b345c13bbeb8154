"""The converter contract: `python -m jaxdec.convert SRC_DIR DST_DIR` (see API.md).

Success paths are checked in-process through `convert(..., progress=False)`; every refusal goes
through the CLI's `main` once (exit status, a one-line stderr, nothing left behind), in-process:
a subprocess per case spent 2 s importing. `python -m jaxdec.convert` itself runs in
test_cli_dtype_bfloat16_is_stored_and_reported.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxdec
from jaxdec import storage
from jaxdec.config import ModelConfig
from jaxdec.convert import ConversionError, convert, main
from jaxdec.export import export
from jaxdec.loading import model_from_params
from tests.hf_models import SLIDING_WINDOW, VOCAB_SIZE, load_hf_model

LOGIT_TOLERANCE = 2e-3
IDS = np.random.default_rng(3).integers(3, VOCAB_SIZE, size=40).tolist()
LONG_IDS = np.random.default_rng(4).integers(3, VOCAB_SIZE, size=4 * SLIDING_WINDOW).tolist()


# ----------------------------------------------------------------------------- helpers

def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _leaves(params) -> list:
    import jax
    return jax.tree_util.tree_leaves(params)


def jnp_bfloat16():
    import jax.numpy as jnp
    return jnp.dtype(jnp.bfloat16)


def _hf_logits(hf_model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def _leftovers(parent: Path, dst: Path) -> list[str]:
    """The converter's temporary siblings of dst that survived."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{dst.name}.partial-"))


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "jaxdec.convert", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def _as_pickle(src, dst, edit=lambda state: state):
    """A copy of the folder `src` with its weights as pytorch_model.bin only (edited first)."""
    import torch
    from safetensors.torch import load_file
    shutil.copytree(src, dst)
    torch.save(edit(load_file(dst / "model.safetensors")), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def src_root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_sources")


@pytest.fixture(scope="module")
def single(hf_dirs):
    """The session's tiny Llama, saved as one model.safetensors (never modified here)."""
    path = hf_dirs["llama"]
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def hf_llama(single):
    return load_hf_model(single)


@pytest.fixture(scope="module")
def sharded(hf_llama, single, src_root):
    path = src_root / "sharded"
    hf_llama.save_pretrained(path, max_shard_size="20KB")
    shutil.copy2(single / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def pickled(single, src_root, torch):
    """The same weights as a pickle pytorch_model.bin only (transformers 5 ignores
    safe_serialization=False, so the state dict is torch.save'd directly)."""
    return _as_pickle(single, src_root / "pickled")


@pytest.fixture(scope="module")
def converted_single(single, tmp_path_factory):
    return convert(single, tmp_path_factory.mktemp("convert_out") / "single", progress=False)


@pytest.fixture(scope="module")
def single_logits(converted_single):
    return jaxdec.logits(jaxdec.load(converted_single), IDS)


@pytest.fixture
def variant(single, tmp_path):
    """variant(**config_changes) -> a fresh copy of the single-file source with config.json edited."""
    def make(source=None, name="src", **changes):
        path = tmp_path / name
        shutil.copytree(source or single, path)
        if changes:
            _edit_json(path / "config.json", **changes)
        return path
    return make


# ----------------------------------------------------------------------------- success paths

def test_single_safetensors_file_converts_and_matches_hf(converted_single, single_logits, hf_llama):
    assert (converted_single / storage.CONFIG_FILE).is_file() and (converted_single / storage.PARAMS_DIR).is_dir()
    assert not _leftovers(converted_single.parent, converted_single)
    model = jaxdec.load(converted_single)
    assert model.dtype == np.float32
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == VOCAB_SIZE
    ref = _hf_logits(hf_llama, IDS)
    assert np.abs(ref).std() > 0.5, "logits too flat to tell models apart"
    np.testing.assert_allclose(single_logits, ref, atol=LOGIT_TOLERANCE, rtol=0)


def test_sharded_safetensors_with_index_matches_single_file(sharded, single_logits, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 2 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    out = convert(sharded, tmp_path / "out", progress=False)
    np.testing.assert_array_equal(jaxdec.logits(jaxdec.load(out), IDS), single_logits)


def test_pickle_bin_loads_with_allow_pickle_and_matches(pickled, single_logits, tmp_path):
    assert not list(pickled.glob("*.safetensors"))
    out = convert(pickled, tmp_path / "out", allow_pickle=True, progress=False)
    np.testing.assert_array_equal(jaxdec.logits(jaxdec.load(out), IDS), single_logits)


def test_rotary_buffers_of_older_checkpoints_are_skipped(single, single_logits, tmp_path, torch):
    """transformers before 4.31 saved each layer's rotary_emb.inv_freq buffer with the weights."""
    def with_buffers(state):
        inv_freq = torch.ones(8)
        return {**state, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(2)}}
    src = _as_pickle(single, tmp_path / "old", with_buffers)
    out = convert(src, tmp_path / "out", allow_pickle=True, progress=False)
    np.testing.assert_array_equal(jaxdec.logits(jaxdec.load(out), IDS), single_logits)


def test_bfloat16_pickle_is_read_bit_for_bit(tmp_path, build_hf, torch):
    """torch's bfloat16 tensors have no `.numpy()`: the converter reinterprets their bits."""
    src = build_hf(tmp_path / "hf_bf16", "llama", dtype="bfloat16")
    from_safetensors = jaxdec.load(convert(src, tmp_path / "a", progress=False)).params
    pickled = _as_pickle(src, tmp_path / "pickled")
    from_pickle = jaxdec.load(convert(pickled, tmp_path / "b", allow_pickle=True, progress=False)).params
    assert {leaf.dtype for leaf in _leaves(from_pickle)} == {jnp_bfloat16()}
    for a, b in zip(_leaves(from_safetensors), _leaves(from_pickle)):
        np.testing.assert_array_equal(np.asarray(a).view(np.int16), np.asarray(b).view(np.int16))


def test_cli_dtype_bfloat16_is_stored_and_reported(single, single_logits, tmp_path):
    dst = tmp_path / "out" / "bf16"  # the parent does not exist yet either
    result = _cli(single, dst, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {dst}"
    assert "converting" not in result.stderr, "no progress bar when stderr is not a terminal"
    assert json.loads((dst / storage.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    model = jaxdec.load(dst)
    assert model.dtype == jnp_bfloat16()
    assert {leaf.dtype for leaf in _leaves(model.params)} == {jnp_bfloat16()}
    ours = jaxdec.logits(model, IDS)
    assert ours.dtype == np.float32
    assert np.abs(ours - single_logits).max() < 0.1 * np.abs(single_logits).max()
    assert jaxdec.load(dst, dtype="float32").dtype == np.float32


def test_bfloat16_source_stays_bfloat16_by_default(tmp_path, build_hf):
    from safetensors import safe_open
    src = build_hf(tmp_path / "hf_bf16", "llama", dtype="bfloat16")
    with safe_open(str(src / "model.safetensors"), framework="flax") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == jnp_bfloat16()
        embedding = np.asarray(f.get_tensor("model.embed_tokens.weight"))
        up = np.asarray(f.get_tensor("model.layers.1.mlp.up_proj.weight"))
    model = jaxdec.load(convert(src, tmp_path / "kept", progress=False))
    assert {leaf.dtype for leaf in _leaves(model.params)} == {jnp_bfloat16()}
    np.testing.assert_array_equal(np.asarray(model.params["embed_tokens"]["embedding"]), embedding)
    np.testing.assert_array_equal(np.asarray(model.params["layers_1"]["mlp"]["up_proj"]["kernel"]), up.T)
    widened = jaxdec.load(convert(src, tmp_path / "f32", dtype="float32", progress=False))
    assert {leaf.dtype for leaf in _leaves(widened.params)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(np.asarray(widened.params["embed_tokens"]["embedding"]),
                                  embedding.astype(np.float32))


def test_tokenizer_files_are_copied_and_round_trip(variant, tmp_path):
    src = variant()
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out = convert(src, tmp_path / "out", progress=False)
    for name in storage.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    tokenizer = jaxdec.load(out).tokenizer
    assert tokenizer is not None
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 42!"
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1 and len(ids) == len(text) + 1  # <s> + one id per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    (src / "tokenizer.json").unlink()
    assert jaxdec.load(convert(src, tmp_path / "no_tok", progress=False)).tokenizer is None


def test_overwrite_replaces_a_non_empty_destination(single, single_logits, tmp_path):
    dst = tmp_path / "dst"
    (dst / "params").mkdir(parents=True)
    (dst / "params" / "stale").write_text("old")
    (dst / "notes.txt").write_text("old")
    assert convert(single, dst, overwrite=True, progress=False) == dst
    assert not (dst / "notes.txt").exists() and not (dst / "params" / "stale").exists()
    assert not _leftovers(tmp_path, dst)
    np.testing.assert_array_equal(jaxdec.logits(jaxdec.load(dst), IDS), single_logits)


def test_existing_empty_destination_is_used(single, single_logits, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    convert(single, dst, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    np.testing.assert_array_equal(jaxdec.logits(jaxdec.load(dst), IDS), single_logits)


@pytest.mark.parametrize("generation_eos, expected", [([2, 7], (2, 7)), (5, (5,)), (None, (2,))],
                         ids=["list", "int", "no-generation-config"])
def test_eos_ids_come_from_generation_config(variant, tmp_path, generation_eos, expected):
    src = variant()
    assert json.loads((src / "config.json").read_text())["eos_token_id"] == 2
    if generation_eos is None:
        (src / "generation_config.json").unlink()
    else:
        _edit_json(src / "generation_config.json", eos_token_id=generation_eos)
    model = jaxdec.load(convert(src, tmp_path / "out", progress=False))
    assert model.config.eos_token_id == expected
    assert model.stop_token_ids == expected


@pytest.mark.parametrize("family, overrides, windows", [
    ("qwen2", dict(max_window_layers=1), (None, SLIDING_WINDOW)),
    ("qwen2", dict(layer_types=["sliding_attention", "full_attention"]), (SLIDING_WINDOW, None)),
    ("qwen3", dict(layer_types=["sliding_attention", "full_attention"]), (SLIDING_WINDOW, None)),
], ids=["qwen2-max_window_layers", "qwen2-layer_types", "qwen3-layer_types"])
def test_qwen_sliding_window_follows_layer_types(tmp_path, build_hf, family, overrides, windows):
    src = build_hf(tmp_path / "hf", family, use_sliding_window=True, sliding_window=SLIDING_WINDOW, **overrides)
    hf_config = json.loads((src / "config.json").read_text())
    assert hf_config["layer_types"] == ["full_attention" if w is None else "sliding_attention" for w in windows]
    model = jaxdec.load(convert(src, tmp_path / "out", progress=False))
    assert model.config.layer_windows == windows
    ours, ref = jaxdec.logits(model, LONG_IDS), _hf_logits(load_hf_model(src), LONG_IDS)
    np.testing.assert_allclose(ours, ref, atol=LOGIT_TOLERANCE, rtol=0)
    full = model_from_params(dataclasses.replace(model.config, layer_windows=()), model.params)
    assert np.abs(jaxdec.logits(full, LONG_IDS) - ours).max() > 10 * LOGIT_TOLERANCE, "window had no effect"


# ----------------------------------------------------------------------------- transformers 4 configs

TF4_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, transformers_version="4.44.0")


@pytest.mark.parametrize("family, overrides, biased", [
    ("llama", dict(attention_bias=True), ["k_proj", "o_proj", "q_proj", "v_proj"]),
    ("qwen3", dict(attention_bias=True), ["k_proj", "o_proj", "q_proj", "v_proj"]),
    ("qwen2", dict(attention_bias=False), ["k_proj", "q_proj", "v_proj"]),  # transformers' Qwen2 ignores the switch
    ("mistral", dict(attention_bias=True), []),                              # and so does its Mistral
], ids=["llama", "qwen3", "qwen2-switch-ignored", "mistral-switch-ignored"])
def test_attention_biases_follow_transformers(tmp_path, build_hf, family, overrides, biased):
    """Each family's attention_bias means what its transformers class makes of it (the biases
    are random: tests.hf_models)."""
    src = build_hf(tmp_path / "hf", family, **overrides)
    model = jaxdec.load(convert(src, tmp_path / "out", progress=False))
    attention = model.params["layers_0"]["self_attn"]
    assert sorted(name for name, leaves in attention.items() if "bias" in leaves) == biased
    np.testing.assert_allclose(jaxdec.logits(model, IDS), _hf_logits(load_hf_model(src), IDS),
                               atol=LOGIT_TOLERANCE, rtol=0)


def test_linear_rope_scaling_matches_transformers(tmp_path, build_hf):
    """Linear RoPE scaling (positions divided by `factor`) against transformers; the shared
    models cover only llama3's."""
    src = build_hf(tmp_path / "hf", "llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = jaxdec.load(convert(src, tmp_path / "out", progress=False))
    assert dict(model.config.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    ours = jaxdec.logits(model, LONG_IDS)
    np.testing.assert_allclose(ours, _hf_logits(load_hf_model(src), LONG_IDS), atol=LOGIT_TOLERANCE, rtol=0)
    unscaled = model_from_params(dataclasses.replace(model.config, rope_scaling=()), model.params)
    assert np.abs(jaxdec.logits(unscaled, LONG_IDS) - ours).max() > 10 * LOGIT_TOLERANCE, "scaling had no effect"


@pytest.mark.parametrize("family, config", [
    ("llama", {}),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=16)),
    ("mistral", {}),
])
def test_keys_left_out_mean_what_transformers_assumes(torch, family, config):
    """A hand-written config.json without num_key_value_heads, head_dim, sliding_window or
    max_window_layers: each family's transformers class fills in its own defaults (Qwen3's
    head_dim 128, Mistral's 4096-token window, ...), and so must the converter."""
    import transformers
    config = {**TF4_BASE, "model_type": family, "num_hidden_layers": 30, "hidden_size": 512,
              "num_attention_heads": 64, **config}
    del config["num_key_value_heads"]
    theirs = transformers.AutoConfig.for_model(**config)
    ours = ModelConfig.from_hf(config)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads  # as Qwen2's attention
    assert (ours.num_key_value_heads, ours.head_dim) == (theirs.num_key_value_heads, head_dim)
    layer_types = getattr(theirs, "layer_types", None) or ["full_attention"] * 30
    window = getattr(theirs, "sliding_window", None)
    assert [ours.window(i) for i in range(30)] == [window if t == "sliding_attention" or family == "mistral" else None
                                                   for t in layer_types]


def test_a_left_out_key_whose_default_does_not_fit_is_refused():
    """Qwen2 without num_key_value_heads means 32 kv heads (transformers' default): with 4
    query heads that is no model, and the error says which values clash."""
    config = {**TF4_BASE, "model_type": "qwen2"}
    del config["num_key_value_heads"]
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=32"):
        ModelConfig.from_hf(config)


@pytest.mark.parametrize("hf, expected", [
    (dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
          rope_scaling={"type": "linear", "factor": 2.0}),
     dict(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, layer_windows=())),
    (dict(model_type="llama", rope_theta=500000.0,
          rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
     dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    (dict(model_type="llama", rope_theta=10000.0, rope_scaling=None, head_dim=None),
     dict(rope_theta=10000.0, rope_scaling={}, head_dim=16)),
    (dict(model_type="qwen2", rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
          sliding_window=131072, max_window_layers=28, tie_word_embeddings=True, eos_token_id=[2, 3]),
     dict(rope_theta=1000000.0, layer_windows=(), attention_bias=True, tie_word_embeddings=True,
          eos_token_id=(2, 3))),
    (dict(model_type="qwen2", rope_theta=1000000.0, use_sliding_window=True, sliding_window=16,
          max_window_layers=1),
     dict(layer_windows=(None, 16))),
    (dict(model_type="qwen3", rope_theta=1000000.0, head_dim=128, attention_bias=False, use_sliding_window=False,
          sliding_window=None, max_window_layers=28, tie_word_embeddings=True),  # Qwen3-0.6B's switches
     dict(head_dim=128, attention_bias=False, qk_norm=True, tie_word_embeddings=True, layer_windows=())),
    (dict(model_type="mistral", rope_theta=1000000.0, sliding_window=4096), dict(layer_windows=(4096, 4096))),
    (dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None), dict(layer_windows=())),
], ids=["llama-linear-type", "llama3", "llama-default", "qwen2-no-window", "qwen2-window", "qwen3", "mistral-window",
        "mistral-no-window"])
def test_transformers4_configs_parse(hf, expected):
    cfg = ModelConfig.from_hf({**TF4_BASE, **hf})
    for key, value in expected.items():
        actual = getattr(cfg, key)
        if key == "rope_scaling":
            actual = dict(actual)
        assert actual == value, key
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # jaxdec_config.json round trip


@pytest.mark.parametrize("rope_scaling", [{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                          {"type": "dynamic", "factor": 2.0}], ids=["yarn", "dynamic"])
def test_transformers4_unsupported_rope_scaling_is_refused(rope_scaling):
    with pytest.raises(ValueError, match=f"rope_type='{rope_scaling['type']}'"):
        ModelConfig.from_hf({**TF4_BASE, "model_type": "llama", "rope_theta": 1e4, "rope_scaling": rope_scaling})


@pytest.mark.parametrize("where", ["rope_parameters", "top level"])
def test_partial_rotary_factor_is_refused_where_transformers_keeps_it(where):
    """transformers 5 writes partial_rotary_factor inside rope_parameters; read only at the top
    level, it was dropped there and the model converted as if RoPE covered every channel."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    hf = {**TF4_BASE, "model_type": "llama", "rope_parameters": rope}
    if where == "top level":
        hf["partial_rotary_factor"] = 0.5
    else:
        rope["partial_rotary_factor"] = 0.5
    with pytest.raises(ValueError, match=r"unsupported partial_rotary_factor=0\.5"):
        ModelConfig.from_hf(hf)
    rope["partial_rotary_factor"], hf["partial_rotary_factor"] = 1.0, None  # what transformers 5 writes: fine
    assert dict(ModelConfig.from_hf(hf).rope_scaling) == {"rope_type": "linear", "factor": 2.0}


# ----------------------------------------------------------------------------- refusals through the CLI

def _unsupported_architecture(src, dst):
    _edit_json(src / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")


def _no_weight_file(src, dst):
    (src / "model.safetensors").unlink()


def _index_names_missing_shard(src, dst):
    sorted(src.glob("model-*-of-*.safetensors"))[1].unlink()


def _truncated_weights(src, dst):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _overwritten_header(src, dst):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def _hidden_size_mismatch(src, dst):
    _edit_json(src / "config.json", hidden_size=96, head_dim=24)


def _non_empty_destination(src, dst):
    (dst / "sub").mkdir(parents=True)
    (dst / "keep.txt").write_text("precious")
    (dst / "sub" / "also.txt").write_text("precious too")


def _yarn(src, dst):
    _edit_json(src / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 64})


def _missing_source(src, dst):
    shutil.rmtree(src)


def _unreadable_config(src, dst):
    (src / "config.json").write_text("{not json")


def _config_not_an_object(src, dst):
    (src / "config.json").write_text("[1, 2]")


def _no_config(src, dst):  # a folder of weights alone
    (src / "config.json").unlink()


def _empty_weight_map(src, dst):
    _edit_json(src / "model.safetensors.index.json", weight_map={})


def _tensor_in_two_shards(src, dst):
    from safetensors.numpy import load_file, save_file
    first, second = sorted(src.glob("model-*-of-*.safetensors"))[:2]
    extra = load_file(second)
    name = sorted(extra)[0]
    save_file({**load_file(first), name: extra[name]}, first, metadata={"format": "pt"})


def _index_not_an_object(src, dst):
    (src / "model.safetensors.index.json").write_text('["model.safetensors"]')


def _index_names_no_file(src, dst):
    _edit_json(src / "model.safetensors.index.json", weight_map={"model.norm.weight": None})


def _config_not_utf8(src, dst):  # an AttributeError, a TypeError and a UnicodeDecodeError, each with a traceback
    (src / "config.json").write_bytes(b"\xff\xfe{}")


def _corrupt_tokenizer(src, dst):  # copied as it was, and jaxdec.load then refused the converted folder
    (src / "tokenizer.json").write_text("{")


def _eos_outside_the_vocabulary(src, dst):  # every generate() then refused its default stop ids
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": VOCAB_SIZE + 99}))


def _rope_parameters_not_an_object(src, dst):
    _edit_json(src / "config.json", rope_parameters="llama3")


def _rope_factor_zero(src, dst):  # transformers converts it too, to NaN logits
    _edit_json(src / "config.json", rope_parameters={"rope_type": "linear", "factor": 0, "rope_theta": 10000.0})


def _already_converted(src, dst):  # a jaxdec checkpoint given where a Hugging Face folder belongs
    shutil.rmtree(src)
    shutil.copytree(Path(jaxdec.__file__).parents[1] / "checkpoints" / "demo-draft", src)


def _draft_heads(src, dst):
    shutil.rmtree(src)
    shutil.copytree(Path(jaxdec.__file__).parents[1] / "checkpoints" / "demo-medusa", src)


REFUSALS = {  # name: (source, break it, what the one stderr line must say)
    "unsupported-architecture": ("single", _unsupported_architecture, r"unsupported architecture.*GPT2LMHeadModel"),
    "no-weight-file": ("single", _no_weight_file, r"no weight files"),
    "index-names-missing-shard": ("sharded", _index_names_missing_shard,
                                  r"missing weight file .*model-00002-of-\d+\.safetensors.*index"),
    "truncated-weights": ("single", _truncated_weights, r"corrupt weight file .*model\.safetensors"),
    "overwritten-header": ("single", _overwritten_header, r"corrupt weight file .*model\.safetensors"),
    "config-does-not-match": ("single", _hidden_size_mismatch, r"config.* does not match the weights"),
    "non-empty-destination": ("single", _non_empty_destination, r"exists and is not empty.*--overwrite"),
    "pickle-without-allow-pickle": ("pickled", None, r"pickle.*--allow-pickle"),
    "unsupported-rope-scaling": ("single", _yarn, r"RoPE scaling rope_type='yarn'"),
    "missing-source": ("single", _missing_source, r"source folder .* does not exist"),
    "unreadable-config": ("single", _unreadable_config, r"cannot read .*config\.json"),
    "config-not-an-object": ("single", _config_not_an_object, r"config\.json is not a JSON object"),
    "no-config": ("single", _no_config, r"has no config\.json$"),
    "empty-weight-map": ("sharded", _empty_weight_map, r"model\.safetensors\.index\.json has an empty weight_map"),
    "index-not-an-object": ("sharded", _index_not_an_object, r"model\.safetensors\.index\.json is damaged"),
    "index-names-no-file": ("sharded", _index_names_no_file, r"model\.safetensors\.index\.json is damaged"),
    "config-not-utf8": ("single", _config_not_utf8, r"cannot read .*config\.json: 'utf-8' codec can't decode"),
    "corrupt-tokenizer": ("single", _corrupt_tokenizer, r"unreadable tokenizer .*tokenizer\.json"),
    "eos-outside-the-vocabulary": ("single", _eos_outside_the_vocabulary,
                                   rf"eos_token_id {VOCAB_SIZE + 99} is outside the vocabulary \[0, vocab_size={VOCAB_SIZE}\)"),
    "tensor-in-two-shards": ("sharded", _tensor_in_two_shards, r"tensor 'model\..*' appears twice in the weight files"),
    "rope-parameters-not-an-object": ("single", _rope_parameters_not_an_object,
                                      r"rope_parameters must be an object of RoPE settings or null, got 'llama3'"),
    "rope-factor-zero": ("single", _rope_factor_zero, r"rope_type='linear' needs factor as a finite number > 0, got 0"),
    "already-converted": ("single", _already_converted,
                          r"no config\.json: it is already a jaxdec checkpoint \(jaxdec_config\.json\); jaxdec\.load "),
    "draft-heads": ("single", _draft_heads, r"it is already a jaxdec checkpoint \(heads\.json\); jaxdec\.load_heads "),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_refusal(case, hf_dirs, request, tmp_path, capsys):
    # hf_dirs: every source fixture is built from it, but getfixturevalue does not say so.
    source, breaker, reason = REFUSALS[case]
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(request.getfixturevalue(source), src)
    out.mkdir()
    dst = out / "ckpt"
    if breaker is not None:
        breaker(src, dst)
    before = {p.relative_to(dst): p.read_text() for p in dst.rglob("*") if p.is_file()} if dst.exists() else None

    capsys.readouterr()  # what building the source printed
    status = main([str(src), str(dst)])
    written = capsys.readouterr()

    assert status != 0
    assert written.out == ""
    lines = [line for line in written.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{written.err}"
    assert lines[0].startswith("jaxdec.convert: error: "), lines[0]
    assert re.search(reason, lines[0]), lines[0]
    assert not _leftovers(out, dst)
    if before is None:
        assert not dst.exists() and list(out.iterdir()) == []
    else:  # the refused destination is untouched
        assert {p.relative_to(dst): p.read_text() for p in dst.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in out.iterdir()) == ["ckpt"]


# ----------------------------------------------------------------------------- more refusals, in-process

@pytest.mark.parametrize("write", ["convert", "export"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_is_not_a_destination(tmp_path, write, overwrite):
    """--overwrite replaces a folder; a file (say .../model.safetensors, a slip) stays a file."""
    (tmp_path / "src").mkdir()
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"precious")
    run = {"convert": lambda: convert(tmp_path / "src", dst, overwrite=overwrite, progress=False),
           "export": lambda: export("demo-draft", dst, overwrite=overwrite, progress=False)}[write]
    with pytest.raises(ConversionError, match=rf"destination {re.escape(str(dst))} is a file, not a folder"):
        run()
    assert dst.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == [dst.name, "src"]


@pytest.mark.parametrize("write", ["convert", "export"])
def test_a_destination_below_a_file_is_refused_before_the_work(tmp_path, write, monkeypatch):
    """It used to fail with a FileExistsError traceback when the folder was made, at the end."""
    (tmp_path / "src").mkdir()
    (tmp_path / "a_file").write_bytes(b"precious")
    dst = tmp_path / "a_file" / "out"
    monkeypatch.setattr(storage, "written_atomically", None)  # not reached
    run = {"convert": lambda: convert(tmp_path / "src", dst, progress=False),
           "export": lambda: export("demo-draft", dst, progress=False)}[write]
    with pytest.raises(ConversionError, match=rf"{re.escape(str(dst))} cannot be made: .*a_file is a file"):
        run()
    assert (tmp_path / "a_file").read_bytes() == b"precious"


def test_a_destination_that_cannot_be_written_is_one_line(single, tmp_path, monkeypatch, capsys):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(storage.tempfile, "mkdtemp", refused)
    assert main([str(single), str(tmp_path / "out")]) == 1
    assert re.fullmatch(r"jaxdec\.convert: error: cannot write .*out: \[Errno 13\] Permission denied\n",
                        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("write", ["convert", "export"])
@pytest.mark.parametrize("where", ["the source", "its parent"])
def test_the_source_is_never_the_destination(variant, tmp_path, where, write):
    """--overwrite replaces the destination: given the source (or a folder holding it), that
    deleted the Hugging Face weights, or the checkpoint exported."""
    if write == "convert":
        src = variant(name="hf")
    else:
        src = shutil.copytree(Path(jaxdec.__file__).parents[1] / "checkpoints" / "demo-draft", tmp_path / "ckpt")
    before = sorted(p.name for p in src.iterdir())
    dst = src if where == "the source" else tmp_path
    run = {"convert": convert, "export": export}[write]
    with pytest.raises(ConversionError, match=r"destination .* is or holds the source folder"):
        run(src, dst, overwrite=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def test_export_refuses_draft_heads(tmp_path):
    """Heads have no Hugging Face form: they said only that jaxdec_config.json was missing."""
    with pytest.raises(ConversionError, match=r"demo-medusa holds draft heads, not a model: only models"):
        export("demo-medusa", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, windows, reason", [
    ("qwen2", (8, 16), r"layers use different attention windows \[8, 16\]: Hugging Face configs hold one"),
    ("mistral", (None, 16), r"a Mistral config cannot mix sliding-window and full-attention layers"),
    ("llama", (16, 16), r"a Llama config has no sliding-window attention"),
])
def test_export_refuses_windows_no_hugging_face_config_holds(model_type, windows, reason):
    from jaxdec.export import hf_config
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      model_type=model_type, attention_bias=model_type == "qwen2", layer_windows=windows)
    with pytest.raises(ConversionError, match=reason):
        hf_config(cfg, "float32")
    assert hf_config(dataclasses.replace(cfg, layer_windows=()), "float32")["num_hidden_layers"] == 2


def test_a_file_is_not_a_source(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"source .*config\.json is a file, not a model folder"):
        convert(tmp_path / "config.json", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, changes, reason", [
    ("single", dict(num_hidden_layers=3), r"missing tensor 'model\.layers\.2\..*does not match"),
    ("single", dict(num_hidden_layers=1), r"unexpected tensor 'model\.layers\.1\..*does not match"),
    ("single", dict(vocab_size=VOCAB_SIZE + 1), r"shape \(128, 64\).*\(129, 64\).*does not match"),
    ("single", dict(num_key_value_heads=4), r"k_proj.*does not match"),
    ("single", dict(intermediate_size=96), r"mlp.*does not match"),
    ("single", dict(tie_word_embeddings=True), r"lm_head.*does not match"),
    ("qwen2", dict(tie_word_embeddings=False), r"missing tensor 'lm_head\.weight'"),
    ("single", dict(attention_bias=True), r"missing tensor .*self_attn\.[qkvo]_proj\.bias"),
    ("qwen3", dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
     r"unexpected tensor .*self_attn\.[qk]_norm\.weight"),
    ("single", dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"), r"missing tensor .*self_attn\.[qk]_norm"),
    ("single", dict(architectures=["LlamaForCausalLM"], model_type="gpt2"), r"unsupported"),
    ("single", dict(hidden_act="gelu"), r"hidden_act"),
    ("single", dict(mlp_bias=True), r"unsupported mlp_bias=True"),
], ids=["more-layers", "fewer-layers", "vocab-size", "kv-heads", "intermediate-size", "tied-but-distinct-head",
        "untied-but-no-head", "bias-but-none-saved", "qwen3-as-qwen2", "llama-as-qwen3", "model-type", "activation",
        "mlp-bias"])
def test_config_that_does_not_match_is_refused(hf_dirs, variant, tmp_path, source, changes, reason):
    src = variant(hf_dirs[source] if source != "single" else None, **changes)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=reason) as info:
        convert(src, dst, progress=False)
    assert "\n" not in str(info.value)
    assert not dst.exists() and not _leftovers(tmp_path, dst)


def test_tied_config_with_a_saved_identical_head_converts(variant, tmp_path):
    from safetensors.torch import load_file, save_file
    src = variant(tie_word_embeddings=True)
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    model = jaxdec.load(convert(src, tmp_path / "out", progress=False))
    assert model.config.tie_word_embeddings and "lm_head" not in model.params
    np.testing.assert_allclose(jaxdec.logits(model, IDS), _hf_logits(load_hf_model(src), IDS),
                               atol=LOGIT_TOLERANCE, rtol=0)


def test_corrupt_pickle_is_refused(pickled, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pickled, src)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match=r"corrupt weight file .*pytorch_model\.bin") as info:
        convert(src, tmp_path / "out", allow_pickle=True, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------- failures while writing

@pytest.mark.parametrize("error, existing", [(OSError, False), (KeyboardInterrupt, True)],
                         ids=["oserror", "interrupt-while-overwriting"])
def test_failure_while_writing_leaves_no_partial_output(single, tmp_path, monkeypatch, error, existing):
    real_save, written = storage.save, []

    def save_then_fail(directory, *args, **kwargs):
        real_save(directory, *args, **kwargs)
        written.append(Path(directory))
        assert (Path(directory) / storage.CONFIG_FILE).is_file()
        raise error("No space left on device")

    monkeypatch.setattr(storage, "save", save_then_fail)
    dst = tmp_path / "ckpt"
    if existing:
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    with pytest.raises(error):
        convert(single, dst, overwrite=existing, progress=False)
    assert written and written[0].parent == tmp_path and written[0].name.startswith(".ckpt.partial-")
    assert not written[0].exists() and not _leftovers(tmp_path, dst)
    if existing:  # the old destination survives a failed --overwrite
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
        assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    else:
        assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the progress bar

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _render(text: str) -> list[str]:
    """The non-blank lines a terminal shows for text (carriage returns overwrite the line)."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    lines.append("".join(line))
    return [line.rstrip() for line in lines if line.strip()]


def test_progress_bar_on_a_terminal_is_erased_before_a_refusal(variant, tmp_path, monkeypatch):
    src = variant(num_hidden_layers=1)  # fails midway, at the first tensor of layer 1
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([str(src), str(tmp_path / "out")]) == 1
    shown = terminal.getvalue()
    assert "converting" in shown, "the bar should show on a terminal"
    assert "\x1b" not in shown
    lines = _render(shown)
    assert len(lines) == 1 and lines[0].startswith("jaxdec.convert: error: unexpected tensor"), lines


def test_stray_bin_files_are_not_weights(hf_dirs, tmp_path):
    """training_args.bin and friends sit beside real weights in fine-tuned folders."""
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["llama"], src)
    (src / "training_args.bin").write_bytes(b"\x80\x04not a state dict")
    out = convert(src, tmp_path / "dst", progress=False)
    assert jaxdec.load(out).config.num_hidden_layers == 2
    for weights in src.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConversionError, match="no weight files"):
        convert(src, tmp_path / "dst2", progress=False)
    assert not (tmp_path / "dst2").exists()


def test_write_json_is_all_or_nothing(tmp_path, monkeypatch):
    """A write cut off midway (here: the disk fills after half the text) leaves the old file
    whole and nothing beside it; a good write replaces it."""
    path = tmp_path / "meta.json"
    storage.write_json(path, {"step": 1})
    write_text = Path.write_text

    def disk_fills(self, text, *args, **kwargs):
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(OSError, match="No space"):
        storage.write_json(path, {"step": 2, "loss": 1.5})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    storage.write_json(path, {"step": 3})
    assert json.loads(path.read_text()) == {"step": 3}


def test_a_failed_final_move_puts_the_old_destination_back(tmp_path, monkeypatch):
    """--overwrite moves the old folder aside before the new one takes its name; if that last
    move fails, the old folder goes back, and neither the new nor the set-aside copy stays."""
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    rename = Path.rename

    def the_new_one_cannot_move(self, target):
        if self.name.startswith(".ckpt.partial-"):
            raise OSError("Input/output error")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", the_new_one_cannot_move)
    with pytest.raises(OSError, match="Input/output"):
        with storage.written_atomically(dst) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
