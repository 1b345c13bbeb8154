"""jaxdec.export: a jaxdec checkpoint back to a Hugging Face folder. transformers loads it with
the original model's logits, and converting it again gives the same parameters."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxdec
from jaxdec import storage
from jaxdec.convert import convert
from jaxdec.export import export
from tests.hf_models import FAMILIES, load_hf_model

TOKENS = [1, 40, 7, 93, 12, 5, 77, 3, 64, 64, 2, 30, 18, 101, 9, 44, 45, 46, 47, 48, 49, 50, 51, 52]  # > window 16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_the_same_logits(family, converted_dirs, hf_models, tmp_path, torch):
    out = export(converted_dirs[family], tmp_path / "hf", progress=False)
    exported = load_hf_model(out)
    with torch.no_grad():
        want = hf_models[family](torch.tensor([TOKENS])).logits[0].numpy()
        got = exported(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file()

    # And back again: the very same parameters and config.
    back = convert(out, tmp_path / "back", progress=False)
    first, second = storage.read_params(converted_dirs[family]), storage.read_params(back)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), first, second)
    assert storage.read_config(back)[0] == storage.read_config(converted_dirs[family])[0]


def test_llama_attention_biases_go_back(tmp_path, build_hf, torch):
    """Llama's attention_bias: biases on all four projections, o_proj's included."""
    src = build_hf(tmp_path / "hf", "llama", attention_bias=True)
    out = export(convert(src, tmp_path / "jd", progress=False), tmp_path / "out", progress=False)
    with torch.no_grad():
        want = load_hf_model(src)(torch.tensor([TOKENS])).logits[0].numpy()
        got = load_hf_model(out)(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_stays_bfloat16(tmp_path, build_hf, torch):
    hf = build_hf(tmp_path / "hf", "llama", dtype="bfloat16")
    converted = convert(hf, tmp_path / "jd", progress=False)
    out = export(converted, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_hf_model(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_the_command_exports_a_shipped_model_and_refuses_to_overwrite(tmp_path, torch):
    dst = tmp_path / "demo"
    run = lambda *args: subprocess.run([sys.executable, "-m", "jaxdec.export", *args], capture_output=True, text=True)
    done = run("demo-target", str(dst))
    assert done.returncode == 0, done.stderr
    ids = jaxdec.load("demo-target").tokenizer.encode("def add(a, b):").ids
    with torch.no_grad():
        got = load_hf_model(dst)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, jaxdec.logits(jaxdec.load("demo-target"), ids), atol=1e-4, rtol=1e-4)
    # The tokenizer goes with it, and transformers reads it as the same tokenizer (the
    # tokenizer_config.json written beside it names the fast class for versions that need it).
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(dst)).encode("def add(a, b):") == ids
    assert json.loads((dst / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    again = run("demo-target", str(dst))
    assert again.returncode == 1 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    missing = run(str(tmp_path / "nothing-here"), str(tmp_path / "x"))
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr
    assert not (tmp_path / "x").exists()
