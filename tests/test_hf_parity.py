"""jaxdec against the Hugging Face transformers oracle, for every supported family."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import jaxdec
from tests.hf_models import FAMILIES, ROPE_ORIGINAL_CONTEXT, SLIDING_WINDOW, VOCAB_SIZE

LOGIT_TOLERANCE = 2e-3
# Longer than the sliding window and than the llama3 RoPE's original context.
LONG = 3 * max(SLIDING_WINDOW, ROPE_ORIGINAL_CONTEXT) + 5


def hf_greedy(hf_model, ids, max_new_tokens, eos_token_id=None):
    """HF greedy generate of one prompt; eos_token_id=None never stops (nor masks EOS)."""
    config = copy.deepcopy(hf_model.generation_config)
    config.update(eos_token_id=[] if eos_token_id is None else eos_token_id, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    import torch
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=config)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos_token_id) + 1] if eos_token_id in new else new


def hf_logits(hf_model, ids):
    import torch
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_hf(family, models, hf_models):
    ids = np.random.default_rng(1).integers(3, VOCAB_SIZE, size=LONG).tolist()
    ours = jaxdec.logits(models[family], ids)
    ref = hf_logits(hf_models[family], ids)
    assert ours.shape == (LONG, VOCAB_SIZE) and ours.dtype == np.float32
    assert np.abs(ref).std() > 0.5, "logits too flat to tell models apart"
    np.testing.assert_allclose(ours, ref, atol=LOGIT_TOLERANCE, rtol=0)


def test_sliding_window_and_rope_scaling_are_used(models, converted_dirs):
    """The parity test above would pass vacuously if the switches were ignored."""
    assert set(models["mistral"].config.layer_windows) == {SLIDING_WINDOW}
    assert dict(models["llama"].config.rope_scaling)["rope_type"] == "llama3"
    assert models["qwen2"].config.tie_word_embeddings and models["qwen2"].config.attention_bias
    assert "lm_head" not in models["qwen2"].params


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_ragged_batch_matches_hf_one_at_a_time(family, models, hf_models):
    rng = np.random.default_rng(2)
    lengths = [5, 40, 1, 23, 70]  # ragged, and past the window / original RoPE context
    prompts = [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in lengths]
    new = 24
    out = jaxdec.generate(models[family], prompts, max_new_tokens=new, stop_token_ids=[])
    for prompt, ours in zip(prompts, out.tokens):
        assert ours == hf_greedy(hf_models[family], prompt, new)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_after_a_chunked_prefill_matches_hf(family, models, hf_models, small_prefill_chunks):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in (70, 9, 41)]  # bucket 128: 32 chunks
    out = jaxdec.generate(models[family], prompts, max_new_tokens=12, stop_token_ids=[])
    for prompt, ours in zip(prompts, out.tokens):
        assert ours == hf_greedy(hf_models[family], prompt, 12)


def test_greedy_text_prompts_match_hf_with_eos(models, hf_models):
    """Text in, text out; HF stops at its EOS like we do with the checkpoint's stop ids."""
    model, hf = models["qwen2"], hf_models["qwen2"]
    prompts = ["def add(a, b):", "x = [i * i for i in range(10)]\nprint(", "Hello"]
    out = jaxdec.generate(model, prompts, max_new_tokens=30)
    for prompt, tokens, text in zip(prompts, out.tokens, out.texts):
        ids = model.tokenizer.encode(prompt).ids
        assert tokens == hf_greedy(hf, ids, 30, eos_token_id=2)
        assert text == model.tokenizer.decode(tokens, skip_special_tokens=True)


def test_hf_input_ids_go_in_as_they_are(models, hf_models):
    """The torch `input_ids` a Hugging Face tokenizer or pipeline gives are a batch of rows: the
    same greedy tokens as HF's own generate, and as the lists."""
    import torch
    model, hf = models["llama"], hf_models["llama"]
    rows = np.random.default_rng(5).integers(3, VOCAB_SIZE, size=(3, 9)).tolist()
    out = jaxdec.generate(model, torch.tensor(rows), max_new_tokens=10, stop_token_ids=[])
    assert out.tokens == jaxdec.generate(model, rows, max_new_tokens=10, stop_token_ids=[]).tokens
    assert out.tokens == [hf_greedy(hf, row, 10) for row in rows]


def test_bfloat16_close_to_float32(converted_dirs):
    f32 = jaxdec.load(converted_dirs["llama"])
    bf16 = jaxdec.load(converted_dirs["llama"], dtype="bfloat16")
    assert bf16.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == np.dtype("bfloat16")
    ids = list(range(3, 60))
    a, b = jaxdec.logits(f32, ids), jaxdec.logits(bf16, ids)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
