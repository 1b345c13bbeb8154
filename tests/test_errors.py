"""Bad input to load, logits and generate raises ValueError naming the offending value.

None of these calls gets as far as compiling anything: validation happens on the host first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

import jaxdec
from jaxdec.loading import model_from_params
from tests.hf_models import VOCAB_SIZE

MAX_POSITIONS = 256  # max_position_embeddings of the fixtures
OK = [[1, 5, 9]]


def named(value) -> str:
    """A `match` pattern for the value as the message spells it (repr or str)."""
    return f"({re.escape(repr(value))}|{re.escape(str(value))})"


# ---------------------------------------------------------------------------------------------
# generate and logits: the model


@pytest.mark.parametrize("bad", ["demo-target", None])
def test_a_model_that_is_not_a_jaxdec_model(bad):
    """A checkpoint's name for the model (as from_pretrained takes) was an AttributeError on .config."""
    with pytest.raises(ValueError, match=rf"model must be a jaxdec.Model .*got {named(bad)}"):
        jaxdec.generate(bad, OK, max_new_tokens=4)
    with pytest.raises(ValueError, match=rf"model must be a jaxdec.Model .*got {named(bad)}"):
        jaxdec.logits(bad, OK[0])


# ---------------------------------------------------------------------------------------------
# generate: prompts


@pytest.mark.parametrize("prompts, pattern", [
    ([], r"non-empty.*\[\]"),
    ([[]], r"prompt 0 is empty"),
    ([[1, 2], []], r"prompt 1 is empty"),
    ("hello", r"'hello'"),          # a bare string, not a list of prompts
    (None, r"None"),
    ([5], r"prompt 0 .*\b5\b.*\[ids\]"),  # an id where a list of ids belongs
    ([{"ids": [1]}], r"prompt 0 .*ids"),
    # bytes that were not UTF-8, decoded with errors="surrogateescape" (argv, a C-locale stdin)
    (["ok", "x\udcff"], r"prompt 1 is not valid text: surrogates not allowed '\\udcff' at character 1"),
    # bytes are sequences of ints: they were read as token ids, one per byte
    ([b"def f"], r"prompt 0 is bytes \(b'def f'\), not token ids: decode it"),
    ([[1, 2], bytearray(b"x")], r"prompt 1 is bytes \(b'x'\)"),
    ([memoryview(b"ab")], r"prompt 0 is bytes \(b'ab'\)"),
])
def test_malformed_prompts(llama, prompts, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxdec.generate(llama, prompts, max_new_tokens=4)


@pytest.mark.parametrize("prompts, pattern", [
    (np.array([1, 5, 9]), r"prompt 0 .*\b1\b.*\[ids\]"),  # one row, not a batch of rows: as the list [1, 5, 9]
    (np.ones((1, 2, 3), np.int32), r"prompt 0 has token id \[1, 1, 1\], not an integer"),
    (np.zeros((0, 3), np.int32), r"non-empty"),
    (np.zeros((2, 0), np.int32), r"prompt 0 is empty"),
    (np.array([[1.0, 5.0]]), r"prompt 0 has token id 1\.0, not an integer token id"),
    ([np.array([1, VOCAB_SIZE])], rf"prompt 0 has token id {VOCAB_SIZE} outside"),
])
def test_malformed_arrays_of_prompts(llama, prompts, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxdec.generate(llama, prompts, max_new_tokens=4)


@pytest.mark.parametrize("bad", [-1, VOCAB_SIZE, VOCAB_SIZE + 1000])
def test_token_id_outside_vocabulary(llama, bad):
    with pytest.raises(ValueError, match=rf"prompt 1 has token id {named(bad)} outside the vocabulary"):
        jaxdec.generate(llama, [[1, 2], [3, bad, 4]], max_new_tokens=4)


@pytest.mark.parametrize("bad", [2.5, 3.0, "7", True, None])
def test_token_id_that_is_not_an_integer(llama, bad):
    """Not "outside the vocabulary": 3.0 and True are inside it, as numbers."""
    with pytest.raises(ValueError, match=rf"prompt 1 has token id {named(bad)}, not an integer token id"):
        jaxdec.generate(llama, [[1, 2], [3, bad, 4]], max_new_tokens=4)


def test_numpy_token_ids_are_checked_too(llama):
    with pytest.raises(ValueError, match=named(VOCAB_SIZE)):
        jaxdec.generate(llama, [np.array([1, VOCAB_SIZE], np.int64)], max_new_tokens=4)


def test_text_that_encodes_past_the_vocabulary(llama):
    """A tokenizer with more tokens than the model has embeddings (added tokens): the ids used
    to reach XLA, which reads some embedding for them, and decoded garbage."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(llama.tokenizer.to_str())
    tokenizer.add_tokens([f"<extra{i}>" for i in range(VOCAB_SIZE + 2 - tokenizer.get_vocab_size())])
    extra = f"<extra{VOCAB_SIZE + 1 - llama.tokenizer.get_vocab_size()}>"
    assert tokenizer.token_to_id(extra) == VOCAB_SIZE + 1
    with pytest.raises(ValueError, match=rf"prompt 1 \('a {extra}'\) encodes to token id {VOCAB_SIZE + 1} outside "
                                         rf"the vocabulary \[0, {VOCAB_SIZE}\): the tokenizer has tokens the model"):
        jaxdec.generate(dataclasses.replace(llama, tokenizer=tokenizer), ["ok", f"a {extra}"], max_new_tokens=4)


def test_text_prompt_without_tokenizer(llama):
    bare = dataclasses.replace(llama, tokenizer=None)
    with pytest.raises(ValueError, match=r"'hello world'.*tokenizer"):
        jaxdec.generate(bare, ["hello world"], max_new_tokens=4)
    in_memory = model_from_params(llama.config, llama.params)
    assert in_memory.tokenizer is None
    with pytest.raises(ValueError, match=r"prompt 1 is text .*'abc'.*tokenizer"):
        jaxdec.generate(in_memory, [[1, 2], "abc"], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# generate: lengths


@pytest.mark.parametrize("prompt_len, max_new", [(200, 57), (MAX_POSITIONS, 1), (1, MAX_POSITIONS),
                                                 (MAX_POSITIONS + 1, 0),
                                                 # 200 + 32767 wrapped around in int16, to a length that fit
                                                 (200, np.int16(32767))])
def test_prompt_plus_max_new_tokens_too_long(llama, prompt_len, max_new):
    prompts = [[3] * min(prompt_len, 5), [3] * prompt_len]  # the longest row counts
    with pytest.raises(ValueError, match=rf"{prompt_len} tokens.*max_new_tokens={max_new}.*{MAX_POSITIONS}"):
        jaxdec.generate(llama, prompts, max_new_tokens=max_new)


def test_longest_allowed_prompt_is_accepted(llama):
    """The bound is inclusive: this is the edge the test above stands on (no compile at 0 new)."""
    out = jaxdec.generate(llama, [[3] * MAX_POSITIONS], max_new_tokens=0)
    assert out.tokens == [[]]


@pytest.mark.parametrize("method", [
    lambda llama, k: jaxdec.spec.DraftModel(llama, k),
    lambda llama, k: jaxdec.spec.LayerSkip([0], k),
    lambda llama, k: jaxdec.spec.PromptLookup(3, k),
    lambda llama, k: jaxdec.spec.DraftTree(llama, depth=k, top_k=1, max_nodes=k),
    # A tree of k // 2 candidate continuations of 2 tokens: k nodes. It used to be checked as a
    # chain of 2 (num_candidates=10**12 then failed in XLA: "out of bounds for int32").
    lambda llama, k: jaxdec.spec.PromptLookup(3, 2, num_candidates=k // 2),
    # The draft model of a hierarchical SparseSelf, whose guesses the sparse target scores.
    lambda llama, k: jaxdec.spec.SparseSelf(draft=llama, draft_tokens=k),
], ids=["DraftModel", "LayerSkip", "PromptLookup", "DraftTree", "PromptLookup-candidates", "SparseSelf-draft"])
def test_draft_window_longer_than_the_model(llama, method):
    """A verify of the pending token and K drafts needs K + 1 positions; a larger K used to
    compile and then fail in XLA, out of memory (num_tokens=10**6 asked for 73 TB)."""
    assert MAX_POSITIONS % 2 == 0
    with pytest.raises(ValueError, match=rf"drafts {MAX_POSITIONS} tokens.*max_position_embeddings={MAX_POSITIONS}"):
        jaxdec.generate(llama, OK, max_new_tokens=4, speculative=method(llama, MAX_POSITIONS))


def test_a_draft_length_past_int64_is_the_window_error(llama):
    """It was an OverflowError, from the draft state made before the window was checked."""
    with pytest.raises(ValueError, match=rf"DraftModel drafts {10**20} tokens"):
        jaxdec.generate(llama, OK, max_new_tokens=4, speculative=jaxdec.spec.DraftModel(llama, 10**20))


def test_a_bad_method_is_refused_with_no_new_tokens_too(llama):
    """max_new_tokens=0 returned before the method was checked against the model."""
    with pytest.raises(ValueError, match=r"skipped layer index 99 is out of range"):
        jaxdec.generate(llama, OK, max_new_tokens=0, speculative=jaxdec.spec.LayerSkip([99]))


@pytest.mark.parametrize("bad", [True, "print", [print]])
def test_on_progress_that_is_not_a_function(llama, bad):
    with pytest.raises(ValueError, match=rf"on_progress .*{named(bad)}"):
        jaxdec.generate(llama, OK, max_new_tokens=4, on_progress=bad)


@pytest.mark.parametrize("bad", [-1, -100, 2.5, "8", None, True])
def test_bad_max_new_tokens(llama, bad):
    with pytest.raises(ValueError, match=rf"max_new_tokens.*{named(bad)}"):
        jaxdec.generate(llama, OK, max_new_tokens=bad)


# ---------------------------------------------------------------------------------------------
# generate: sampling parameters


@pytest.mark.parametrize("name, bad", [
    ("temperature", -0.5), ("temperature", -1e-9), ("temperature", float("nan")), ("temperature", "0.7"),
    ("temperature", None), ("temperature", float("inf")), ("temperature", 1e39), ("temperature", True),
    ("temperature", np.float16("inf")),  # compared with float32's largest, cast to float16: inf, so not larger
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", None),
    ("top_k", -1), ("top_k", 2.5), ("top_k", "5"), ("top_k", None),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")), ("min_p", False),
])
def test_bad_sampling_parameters(llama, name, bad):
    with pytest.raises(ValueError, match=rf"{name}.*{named(bad)}"):
        jaxdec.generate(llama, OK, max_new_tokens=4, **{"temperature": 0.8, name: bad})


@pytest.mark.parametrize("name, bad", [("temperature", -0.5), ("top_p", 0.0), ("top_k", -1), ("min_p", 1.5)])
def test_bad_sampling_parameters_even_when_greedy(llama, name, bad):
    """A bad filter is an error at temperature 0 too, not silently ignored."""
    with pytest.raises(ValueError, match=rf"{name}.*{named(bad)}"):
        jaxdec.generate(llama, OK, max_new_tokens=4, **{name: bad})


@pytest.mark.parametrize("bad", [1.5, "0", None, 2**70, -2**70])
def test_bad_seed(llama, bad):
    with pytest.raises(ValueError, match=rf"seed.*{named(bad)}"):
        jaxdec.generate(llama, OK, max_new_tokens=4, temperature=1.0, seed=bad)


@pytest.mark.parametrize("bad, pattern", [
    ([-1], rf"{named(-1)} outside"), ([2, VOCAB_SIZE], rf"{named(VOCAB_SIZE)} outside"),
    ([1.5], rf"{named(1.5)}, not an integer"), (["2"], rf"{named('2')}, not an integer"),
    (2, r"stop_token_ids.*\b2\b"), ("2", r"'2'"), (list(range(3, 20)), r"\b17\b"),
    (np.array(2), r"stop_token_ids must be a list.*\b2\b"), (np.array([[2]]), r"stop token id \[2\], not an integer"),
    (np.array([VOCAB_SIZE]), rf"stop token id {VOCAB_SIZE} outside"),
])
def test_bad_stop_token_ids(llama, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxdec.generate(llama, OK, max_new_tokens=4, stop_token_ids=bad)


# ---------------------------------------------------------------------------------------------
# logits


@pytest.mark.parametrize("token_ids, pattern", [
    ([], r"empty"),
    ([1, -1], named(-1)),
    ([1, VOCAB_SIZE], named(VOCAB_SIZE)),
    ([1, 2.5], named(2.5)),
    ([1] * (MAX_POSITIONS + 1), rf"{MAX_POSITIONS + 1} tokens.*{MAX_POSITIONS}"),
    ("hello", r"text"),
    (bytearray(b"\x05\x06"), r"token_ids is bytes"),  # bytes was refused, bytearray read as ids
    (None, r"None"),
    (5, r"token_ids must be a sequence of token ids.*\b5\b"),
    (np.array([[1, 2]]), r"token_ids has token id \[1, 2\], not an integer"),  # a batch: logits scores one row
])
def test_bad_logits_input(llama, token_ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxdec.logits(llama, token_ids)


# ---------------------------------------------------------------------------------------------
# load


@pytest.mark.parametrize("error", [FileNotFoundError, ValueError])
def test_load_missing_path(tmp_path, error):
    """A missing checkpoint is both a missing file and bad input (API.md: ValueError)."""
    missing = tmp_path / "nowhere"
    for load in (jaxdec.load, jaxdec.load_heads):
        with pytest.raises(error, match=re.escape(str(missing))):
            load(missing)
    with pytest.raises(error, match="demo-targte"):
        jaxdec.load("demo-targte")


@pytest.mark.parametrize("load", [jaxdec.load, jaxdec.load_heads])
@pytest.mark.parametrize("bad", [None, 3, ["demo-target"], ""])  # "": not the working directory
def test_load_something_that_is_not_a_path(load, bad):
    """Not a TypeError from pathlib: a ValueError naming the value and what is expected."""
    with pytest.raises(ValueError, match=rf"checkpoint directory or a shipped name .*demo-target.*got {re.escape(repr(bad))}"):
        load(bad)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(dtype="float16"), r"float16"), (dict(dtype="int8"), r"int8"), (dict(dtype=np.float16), r"float16"),
    (dict(attn_impl="bogus"), r"bogus"),
    # numpy's TypeError ("Cannot interpret '5' as a data type"), and an array whose `in` compares elementwise
    (dict(dtype=5), r"dtype must be one of .* got 5"), (dict(dtype=True), r"dtype must be one of .* got True"),
    (dict(attn_impl=np.array("xla")), r"attn_impl must be one of .* got array\('xla'"),
])
def test_load_bad_options(converted_dirs, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxdec.load(converted_dirs["llama"], **kwargs)


def test_load_a_folder_that_is_not_a_checkpoint(tmp_path, hf_dirs):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        jaxdec.load(tmp_path)  # empty
    # A Hugging Face folder: the message points at the converter.
    with pytest.raises(ValueError, match=rf"{re.escape(str(hf_dirs['llama']))}.*jaxdec\.convert"):
        jaxdec.load(hf_dirs["llama"])
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 16)
    for load in (jaxdec.load, jaxdec.load_heads):
        with pytest.raises(ValueError, match=rf"{re.escape(str(a_file))} is a file; a checkpoint is a directory"):
            load(a_file)


@pytest.fixture
def checkpoint(converted_dirs, tmp_path):
    """A private copy of the converted llama checkpoint, free to damage."""
    return shutil.copytree(converted_dirs["llama"], tmp_path / "ckpt")


def _edit_meta(directory, **changes):
    path = directory / "jaxdec_config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _edit_config(directory, **changes):
    meta = json.loads((directory / "jaxdec_config.json").read_text())
    _edit_meta(directory, config={**meta["config"], **changes})


def test_the_undamaged_copy_loads(checkpoint):
    """The damage tests below start from a checkpoint that does load."""
    model = jaxdec.load(checkpoint)
    assert model.config.vocab_size == VOCAB_SIZE and model.tokenizer is not None


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "jaxdec_config.json").write_text("{not json"), r"jaxdec_config\.json"),
    (lambda d: (d / "jaxdec_config.json").write_text(""), r"jaxdec_config\.json"),
    (lambda d: (d / "jaxdec_config.json").write_text("[1, 2]"), r"jaxdec_config\.json"),
    (lambda d: _edit_meta(d, format=99), r"format 99"),
    (lambda d: _edit_meta(d, config=None), r"jaxdec_config\.json"),
    (lambda d: _edit_config(d, model_type="gpt2"), r"gpt2"),
    (lambda d: _edit_config(d, bogus_key=1), r"bogus_key"),
    (lambda d: _edit_config(d, model_type="mistral", attention_bias=True), r"attention_bias=True.*'mistral'"),
    # values no model has: they failed deep in tracing, or (a negative theta) decoded NaN garbage
    (lambda d: _edit_config(d, head_dim=-1), r"head_dim must be a positive integer, got -1"),
    (lambda d: _edit_config(d, num_key_value_heads=0), r"num_key_value_heads must be a positive integer, got 0"),
    (lambda d: _edit_config(d, max_position_embeddings=0), r"max_position_embeddings must be .* got 0"),
    (lambda d: _edit_config(d, num_hidden_layers=2.0), r"num_hidden_layers must be a positive integer, got 2\.0"),
    (lambda d: _edit_config(d, rope_theta=-5), r"rope_theta must be a finite number, 0 < rope_theta, got -5"),
    (lambda d: _edit_config(d, rms_norm_eps="x"), r"rms_norm_eps must be .* got 'x'"),
    (lambda d: _edit_config(d, tie_word_embeddings="yes"), r"tie_word_embeddings must be true or false, got 'yes'"),
    (lambda d: _edit_config(d, layer_windows=[0, None]), r"layer_windows entries .* got 0"),
    # fields of the wrong kind: an AttributeError, or a TypeError that named no field
    (lambda d: _edit_config(d, layer_windows=5), r"layer_windows must be a list .* got 5"),
    (lambda d: _edit_config(d, rope_scaling="linear"), r"rope_scaling must be an object .* got 'linear'"),
    (lambda d: _edit_config(d, rope_scaling=[1]), r"rope_scaling must be an object .* got \[1\]"),
    (lambda d: _edit_config(d, eos_token_id="x"), r"eos_token_id must be a token id, a list of them or null, got 'x'"),
    (lambda d: _edit_config(d, eos_token_id=[2.5]), r"eos_token_id must hold token ids .* got 2\.5"),
    (lambda d: _edit_config(d, bos_token_id="x"), r"bos_token_id must hold token ids .* got 'x'"),
    (lambda d: _edit_config(d, eos_token_id=[2, VOCAB_SIZE]),
     rf"eos_token_id {VOCAB_SIZE} is outside the vocabulary \[0, vocab_size={VOCAB_SIZE}\)"),
    # RoPE settings that failed in tracing with a bare KeyError, or decoded NaN (factor 0)
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "linear"}), r"rope_type='linear' needs factor .* got None"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": "8k"}),
     r"rope_type='llama3' needs original_max_position_embeddings as a finite number > 0, got '8k'"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     r"rope_type='llama3' needs factor as a finite number > 0, got -8\.0"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "linear", "factor": 2.0, "extra": [1]}),
     r"rope_scaling values must be numbers or strings"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "linear", "factor": 0}),
     r"rope_type='linear' needs factor as a finite number > 0, got 0"),
    (lambda d: _edit_config(d, rope_theta=1e-300), r"rope_theta=1e-300 .* frequencies that are not finite"),
])
def test_load_corrupt_config(checkpoint, damage, pattern):
    damage(checkpoint)
    with pytest.raises(ValueError, match=pattern):
        jaxdec.load(checkpoint)


def test_more_eos_ids_than_stop_ids_fit_say_whose_they_are(checkpoint):
    """The default stop ids are the checkpoint's: the message named stop_token_ids only, which
    the call never passed."""
    _edit_config(checkpoint, eos_token_id=list(range(2, 19)))
    model = jaxdec.load(checkpoint)
    with pytest.raises(ValueError, match=r"at most 16 stop_token_ids are supported, got 17 \(the checkpoint's eos_token_id"):
        jaxdec.generate(model, OK, max_new_tokens=4)


def test_a_folder_named_like_a_shipped_checkpoint_says_it_shadows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("demo-target", "demo-eagle"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=r"demo-target is not a checkpoint, and it shadows the shipped 'demo-target'"):
        jaxdec.load("demo-target")
    with pytest.raises(ValueError, match=r"demo-eagle is not a checkpoint, and it shadows the shipped 'demo-eagle'"):
        jaxdec.load_heads("demo-eagle")


def test_one_eos_id_need_not_be_a_list(checkpoint):
    """config.json may give eos_token_id as one id; a jaxdec config read it as an iterable."""
    _edit_config(checkpoint, eos_token_id=5)
    assert jaxdec.load(checkpoint).stop_token_ids == (5,)


def _garble_params(directory):
    for path in (directory / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: shutil.rmtree(d / "params"), r"params"),
    (lambda d: [shutil.rmtree(d / "params"), (d / "params").mkdir()], r"params"),
    (_garble_params, r"params"),
    # A config that does not describe the stored weights is as unusable as garbled weights.
    (lambda d: _edit_config(d, vocab_size=64), r"embed_tokens.*\(128, 64\).*\(64, 64\)"),
    (lambda d: _edit_config(d, hidden_size=32), r"\(128, 64\).*\(128, 32\)"),
    (lambda d: _edit_config(d, num_hidden_layers=3), r"layers_2"),
    (lambda d: _edit_config(d, num_hidden_layers=1), r"layers_1"),
    (lambda d: _edit_config(d, tie_word_embeddings=True), r"lm_head"),
    (lambda d: _edit_config(d, attention_bias=True), r"layers_0.*bias"),
    (lambda d: _edit_config(d, vocab_size="many"), r"vocab_size must be a positive integer, got 'many'"),
])
def test_load_damaged_params(checkpoint, damage, pattern):
    damage(checkpoint)
    with pytest.raises(ValueError, match=pattern):
        jaxdec.load(checkpoint)


def test_load_unreadable_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        jaxdec.load(checkpoint)
