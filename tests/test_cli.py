"""The `jaxdec generate` command line, run in-process on the tiny converted Llama."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import pytest

import jaxdec
from jaxdec import cli
from jaxdec.loading import model_from_params


@pytest.fixture(scope="module")
def llama_dir(converted_dirs):
    return str(converted_dirs["llama"])


def run(capsys, monkeypatch, argv, stdin=None):
    if stdin is not None:  # a pipe's text stream, over its bytes
        data = stdin if isinstance(stdin, bytes) else stdin.encode()
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("method", ["ar", "draft", "tree", "layerskip", "sparse", "triforce", "lookup"])
def test_streams_the_same_text_as_generate(capsys, monkeypatch, llama_dir, method):
    prompt = "def add(a, b):"
    code, out, err = run(capsys, monkeypatch, ["generate", prompt, "--model", llama_dir, "--draft", llama_dir,
                                               "--method", method, "--max-new-tokens", "12", "--num-tokens", "3",
                                               "--tree", "3x2x5"])
    assert code == 0
    expected = jaxdec.generate(jaxdec.load(llama_dir), [prompt], max_new_tokens=12).texts[0]
    assert out == prompt + expected + "\n"
    stats = re.search(r"\[(\w+)\] (\d+) new tokens in (\d+) target steps, mean accepted ([\d.]+)", err)
    assert stats and stats.group(1) == method and 1 <= int(stats.group(2)) <= 12
    if method in ("draft", "tree"):  # the model drafts for itself: its top drafts are accepted
        assert float(stats.group(4)) > 2


def test_flags_build_the_methods_they_name(llama_dir):
    """--paths shapes the static tree (by default STATIC_PATHS: 8 nodes, 5 deep) and Medusa's,
    --num-candidates the prompt lookup, and pearl's draft goes on a device the target leaves
    free (the tests have 8 CPU devices). Built, not run: each method's tokens are tested with
    the library (Pearl's streamed, as here, in test_overlap.py)."""
    target = jaxdec.load(llama_dir)

    def build(*argv):
        return cli.build_speculative(cli.parser().parse_args(["generate", "--draft", llama_dir, *argv]), target)

    static = build("--method", "static", "--paths", "0", "0.0", "1")
    assert isinstance(static, jaxdec.spec.StaticTree) and static.paths == ((0,), (1,), (0, 0))
    default = build("--method", "static")
    assert default.num_tokens == 8 and default.depth == 5 and default.paths == tuple(cli.tree_paths(cli.STATIC_PATHS))
    medusa = build("--method", "medusa", "--paths", "0", "1", "0.0")
    assert isinstance(medusa, jaxdec.spec.Medusa) and medusa.paths == ((0,), (1,), (0, 0))
    lookup = build("--method", "lookup", "--num-candidates", "2")
    assert isinstance(lookup, jaxdec.spec.PromptLookup) and lookup.num_candidates == 2
    pearl = build("--method", "pearl", "--num-tokens", "3")
    assert isinstance(pearl, jaxdec.spec.Pearl) and pearl.num_tokens == 3
    assert jax.devices()[0] not in set(pearl.model.config.mesh.devices.flat)  # the target's device


# A value away from the default for each method-specific flag; "/no/draft" and "/no/heads" fail
# to load, which reads the flag as surely as a different build does.
OTHER_VALUES = {"draft": ["--draft", "/no/draft"], "num_tokens": ["--num-tokens", "3"], "tree": ["--tree", "2x2x3"],
                "paths": ["--paths", "0", "1"], "heads": ["--heads", "/no/heads"], "skip_layers": ["--skip-layers", "0"],
                "budget": ["--budget", "64"], "max_ngram": ["--max-ngram", "2"], "num_candidates": ["--num-candidates", "2"]}


def _built(argv, target):
    """What cli.build_speculative makes of argv: the method's type and fields (a model or heads
    by its config), or the error it raised."""
    import dataclasses
    try:
        method = cli.build_speculative(cli.parser().parse_args(["generate", *argv]), target)
    except ValueError as err:
        return str(err)
    if method is None:
        return None
    return type(method), tuple((f.name, getattr(getattr(method, f.name), "config", getattr(method, f.name)))
                               for f in dataclasses.fields(method))


def test_the_ignored_flags_warning_names_what_each_method_reads(llama_dir):
    """cli.FLAG_METHODS, behind the warning, against build_speculative itself: a method reads a
    flag exactly when a different value of it changes the method built."""
    target = jaxdec.load(llama_dir)
    base = ["--draft", llama_dir]
    defaults = vars(cli.parser().parse_args(["generate"]))
    assert set(OTHER_VALUES) == set(cli.FLAG_METHODS)
    for method in cli.METHODS:
        default = _built([*base, "--method", method], target)
        for dest, flag in OTHER_VALUES.items():
            argv = [*base, "--method", method, *flag]
            reads = _built(argv, target) != default
            assert reads == (method in cli.FLAG_METHODS[dest]), (method, dest)
            args = cli.parser().parse_args(["generate", *argv])
            assert any(f"--{dest.replace('_', '-')} applies" in line
                       for line in cli.ignored_flags(args, defaults)) == (not reads), (method, dest)


def test_an_ignored_flag_is_a_warning_on_stderr(capsys, monkeypatch, llama_dir):
    code, out, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "ar",
                                               "--max-new-tokens", "2", "--budget", "64", "--tree", "2x2x3",
                                               "--top-k", "5", "--seed", "3"])
    assert code == 0 and out.startswith("hi")
    assert ("jaxdec: warning: --tree applies to --method tree, eagle; --method ar ignores it\n"
            "jaxdec: warning: --budget applies to --method sparse, triforce; --method ar ignores it\n"
            "jaxdec: warning: --top-k applies when sampling (--temperature > 0); greedy decoding ignores it\n"
            "jaxdec: warning: --seed applies when sampling (--temperature > 0); greedy decoding ignores it\n") in err
    # Sampling reads them: no warning then.
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "ar",
                                             "--max-new-tokens", "2", "--temperature", "0.7", "--top-k", "5",
                                             "--top-p", "0.9", "--min-p", "0.1", "--seed", "3"])
    assert code == 0 and "warning" not in err


def _sentencepiece_like_tokenizer():
    """BPE over Metaspace words: its decoder drops the leading space of a slice's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.train_from_iterator([STREAMED_TEXT] * 4, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    return tokenizer


def _byte_level_tokenizer():
    """The demo checkpoints' byte-level BPE: a character outside its merges is several tokens."""
    from tokenizers import Tokenizer

    from jaxdec.loading import _resolve
    return Tokenizer.from_file(str(_resolve("demo-target") / "tokenizer.json"))


STREAMED_TEXT = "def naïve(café):\n    return '日本語 😀' + café  # the lazy dog\n\nprint(naïve('x'))\n"


@pytest.mark.parametrize("make_tokenizer", [_sentencepiece_like_tokenizer, _byte_level_tokenizer])
def test_streamed_text_is_the_rows_text_from_short_tails(make_tokenizer):
    """Rows grown 1 to 4 tokens at a time write exactly the whole row's text, while the decoder
    sees only tails of the last steps (whole rows: quadratic in a long stream)."""
    import random
    tokenizer = make_tokenizer()
    row = tokenizer.encode(STREAMED_TEXT * 8).ids
    whole = tokenizer.decode(row, skip_special_tokens=True)
    assert whole.count("café") == 16  # the tokenizer does round-trip the text
    decoded_lengths = []
    real_decode = tokenizer.decode

    class Spy:  # the tokenizer, recording how many tokens each decode is given
        def decode(self, ids, **options):
            decoded_lengths.append(len(ids))
            return real_decode(ids, **options)

    out = io.StringIO()
    stream = cli.TextStream(Spy(), out, head="PROMPT")
    rng, end = random.Random(0), 0
    while end < len(row):
        end = min(len(row), end + rng.randint(1, 4))
        stream.update(row[:end])
        assert whole.startswith(out.getvalue()[len("PROMPT"):])  # never a character that is not there
    stream.finish(whole)
    assert out.getvalue() == "PROMPT" + whole
    assert max(decoded_lengths) <= 32 < len(row) // 2, (max(decoded_lengths), len(row))


def test_a_final_text_that_does_not_continue_the_stream_goes_on_a_new_line():
    """finish() writes the rest of the row's final text; should that text not continue what
    was streamed, the whole of it follows on a new line rather than a garbled tail."""
    tokenizer = _byte_level_tokenizer()
    for final, written in (("hello world!", "P: hello world!"), ("goodbye", "P: hello world\ngoodbye")):
        out = io.StringIO()
        stream = cli.TextStream(tokenizer, out, head="P: ")
        stream.update(tokenizer.encode("hello world").ids)
        stream.finish(final)
        assert out.getvalue() == written


def test_ctrl_c_is_caught_only_from_the_main_thread():
    """Python runs signal handlers in the main thread and refuses to install one from another
    (ValueError): decoding driven from a worker thread keeps the default Ctrl-C."""
    import threading
    ctrl_c, errors = cli.CtrlC(), []
    worker = threading.Thread(target=lambda: _record_errors(ctrl_c.check, errors))
    worker.start()
    worker.join()
    assert errors == [] and not ctrl_c.installed
    before = signal.getsignal(signal.SIGINT)
    ctrl_c.check()  # the main thread: installed, and restored after
    assert ctrl_c.installed and signal.getsignal(signal.SIGINT) == ctrl_c.press
    ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) == before


def _record_errors(call, errors):
    try:
        call()
    except Exception as err:  # noqa: BLE001 (the test reports it)
        errors.append(err)


def test_numeric_flag_types_take_their_bounds_exactly():
    """The argparse types of counts and rates: POSITIVE >= 1, COUNT >= 0, RATE > 0 (a learning
    rate of 0 trains nothing), WEIGHT >= 0; checked here as types, since a bound let through
    would start a whole training run in the command tests."""
    import argparse
    for parse, edge, below in ((cli.POSITIVE, "1", "0"), (cli.COUNT, "0", "-1"), (cli.WEIGHT, "0", "-0.5")):
        assert parse(edge) == float(edge)
        with pytest.raises(argparse.ArgumentTypeError, match=rf"must be >= .*, got {below}"):
            parse(below)
    assert cli.RATE("1e-9") == 1e-9
    for below in ("0", "-0.001"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"must be > 0\.0, got {below}"):
            cli.RATE(below)


@pytest.mark.parametrize("word", ["-1", "0.-1", "a", "0..1", ""])
def test_paths_words_are_ranks_joined_by_dots(word):
    with pytest.raises(ValueError, match=rf"--paths: each node is child ranks joined by dots.*got {re.escape(repr(word))}"):
        cli.tree_paths(["0", word])


def test_layerskip_skips_every_other_inner_layer_by_default(llama):
    """Without --skip-layers: layers 1, 3, ... below the last (the first and last stay); a
    2-layer model, with no inner layer, skips its last (else it would draft with itself)."""
    args = cli.parser().parse_args(["generate", "--method", "layerskip"])
    target = jaxdec.load("demo-target")
    assert target.config.num_hidden_layers == 6
    assert cli.build_speculative(args, target).skip_layers == (1, 3)
    assert llama.config.num_hidden_layers == 2
    assert cli.build_speculative(args, llama).skip_layers == (1,)
    one_layer = model_from_params(dataclasses.replace(llama.config, num_hidden_layers=1), llama.params)
    with pytest.raises(ValueError, match=r"skips all 1 layers"):
        jaxdec.generate(one_layer, [[1, 2]], max_new_tokens=2, speculative=cli.build_speculative(args, one_layer))


def test_sampling_options_and_the_kernel_reach_generate(capsys, monkeypatch, llama_dir, loaded_models):
    """--temperature, --top-k, --min-p and --seed are generate's; --attn-impl pallas loads the
    target to verify with the Pallas kernel (interpret mode here)."""
    prompt = "def add(a, b):"
    options = dict(temperature=1.5, top_k=50, min_p=0.2, seed=3)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    code, out, err = run(capsys, monkeypatch, ["generate", prompt, "--model", llama_dir, "--draft", llama_dir,
                                               "--method", "tree", "--tree", "2x2x3", "--max-new-tokens", "10",
                                               "--attn-impl", "pallas", *flags])
    assert code == 0, err
    target, draft = loaded_models
    assert target.config.attn_impl == "pallas" and draft.config.attn_impl == "xla"

    def text(**changed):
        return jaxdec.generate(target, [prompt], max_new_tokens=10, speculative=jaxdec.spec.DraftTree(draft, 2, 2, 3),
                               **{**options, **changed}).texts[0]

    assert out == prompt + text() + "\n"
    assert text() != text(min_p=0.0)  # so a --min-p left out would show


def test_dtype_casts_the_target_and_its_drafter(capsys, monkeypatch, loaded_models):
    """--dtype bfloat16 loads the target and the heads (as the draft: one `place` serves every
    drafter) in bfloat16 and prints what generate gives with them (the same method: in
    bfloat16 plain decoding may differ at a near-tie, README "Numerics")."""
    import jax.numpy as jnp
    loaded = loaded_models
    prompt = "def add(a, b):"
    code, out, _ = run(capsys, monkeypatch, ["generate", prompt, "--method", "medusa", "--max-new-tokens", "8",
                                             "--dtype", "bfloat16"])
    assert code == 0 and len(loaded) == 2
    assert all(leaf.dtype == jnp.bfloat16 for m in loaded for leaf in jax.tree.leaves(m.params))
    target, heads = loaded
    expected = jaxdec.generate(target, [prompt], max_new_tokens=8, speculative=jaxdec.spec.Medusa(heads)).texts[0]
    assert out == prompt + expected + "\n"


def test_reads_the_prompt_from_stdin(capsys, monkeypatch, llama_dir):
    code, out, _ = run(capsys, monkeypatch, ["generate", "--model", llama_dir, "--method", "ar",
                                             "--max-new-tokens", "5"], stdin="x = 1\n")
    assert code == 0 and out.startswith("x = 1\n")
    code, out, _ = run(capsys, monkeypatch, ["generate", "--model", llama_dir, "--method", "ar",
                                             "--max-new-tokens", "2"], stdin=" \n\n")  # nothing but blanks
    assert code == 0 and out.startswith(cli.DEMO_PROMPT)
    code, out, err = run(capsys, monkeypatch, ["generate", "--model", llama_dir, "--method", "ar"],
                         stdin=b"x = '\xff'\n")  # Latin-1, not UTF-8: one line, not a traceback
    assert code == 2 and out == "" and err.strip() == "jaxdec: error: stdin is not UTF-8 text: invalid start byte at byte 5"


def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, llama_dir):
    code, out, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "layerskip",
                                               "--skip-layers", "7"])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["jaxdec: error: skipped layer index 7 is out of range for a model with 2 layers"]
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "tree",
                                             "--draft", llama_dir, "--tree", "5x4"])
    assert code == 2 and err.strip() == "jaxdec: error: --tree must be DEPTHxTOP_KxMAX_NODES of positive integers, e.g. 5x4x32, got '5x4'"
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "tree",
                                             "--draft", llama_dir, "--tree", "5x0x32"])  # refused here, not by DraftTree
    assert code == 2 and err.strip().endswith("got '5x0x32'") and "positive integers" in err
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "tree",
                                             "--draft", llama_dir, "--tree", "\u00b2x4x32"])  # '²'.isdigit(), not an int
    assert code == 2 and err.strip().endswith("got '\u00b2x4x32'") and "positive integers" in err
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "static",
                                             "--draft", llama_dir, "--paths", "0", "0.x"])
    assert code == 2 and err.strip() == ("jaxdec: error: --paths: each node is child ranks joined by dots, "
                                         "e.g. 0 1 0.0 0.1, got '0.x'")
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--method", "static",
                                             "--draft", llama_dir, "--paths", "0", "1", "0.0", "1"])
    assert code == 2 and err.strip() == "jaxdec: error: path (1,) is listed twice: each path is one node of the tree"
    code, _, err = run(capsys, monkeypatch, ["generate", "hi", "--model", "/no/such/checkpoint"])
    assert code == 2 and "no checkpoint at '/no/such/checkpoint'" in err
    with pytest.raises(SystemExit) as refused:  # argparse's own one line, before anything loads
        run(capsys, monkeypatch, ["generate", "hi", "--model", llama_dir, "--dtype", "float16"])
    assert refused.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def test_a_model_without_a_tokenizer_is_refused(capsys, monkeypatch, llama_dir, tmp_path):
    """The command line takes and prints text, so it needs the checkpoint's tokenizer."""
    bare = shutil.copytree(llama_dir, tmp_path / "bare")
    for path in bare.glob("tokenizer*"):
        path.unlink()
    assert jaxdec.load(bare).tokenizer is None
    code, out, err = run(capsys, monkeypatch, ["generate", "hi", "--model", str(bare), "--method", "ar"])
    assert code == 2 and out == ""
    assert err.strip() == f"jaxdec: error: model {str(bare)!r} has no tokenizer; the command line needs text"


def test_a_reader_that_left_stops_it_quietly():
    """`jaxdec generate | head`: once the pipe's reader is gone the command stops with status 1
    and no traceback (here the reader is gone before the first write)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "jaxdec.cli", "generate", "--method", "ar", "--max-new-tokens", "4"],
                              stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              timeout=300)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_ctrl_c_stops_it_with_status_130_and_no_traceback():
    # `python -m jaxdec`, the command line where the console script is not on PATH
    proc = subprocess.Popen([sys.executable, "-m", "jaxdec", "generate", "--method", "ar", "--max-new-tokens", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.read(len(cli.DEMO_PROMPT)) == cli.DEMO_PROMPT  # decoding has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.endswith("jaxdec: interrupted\n") and "Traceback" not in err, err


def test_version_names_jaxdec_and_the_jax_that_runs_it(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (f"jaxdec {jaxdec.__version__} (jax {jax.__version__}, "
                                              f"jaxlib {jax.lib.__version__})")


def test_no_options_runs_the_demo_pair_speculatively(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # no piped prompt: the demo prompt is used
    code, out, err = run(capsys, monkeypatch, ["generate", "--max-new-tokens", "24"])
    assert code == 0 and out.startswith(cli.DEMO_PROMPT)
    expected = jaxdec.generate(jaxdec.load("demo-target"), [cli.DEMO_PROMPT], max_new_tokens=24).texts[0]
    assert out == cli.DEMO_PROMPT + expected + "\n"
    stats = re.search(r"\[draft\] \d+ new tokens in (\d+) target steps, mean accepted ([\d.]+)", err)
    assert stats and float(stats.group(2)) > 1.5  # the trained draft really gets accepted


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_methods_with_the_shipped_heads(capsys, monkeypatch, method):
    prompt = "def add(a, b):"
    code, out, err = run(capsys, monkeypatch, ["generate", prompt, "--method", method, "--max-new-tokens", "16",
                                               "--tree", "4x2x6"])
    assert code == 0
    expected = jaxdec.generate(jaxdec.load("demo-target"), [prompt], max_new_tokens=16).texts[0]
    assert out == prompt + expected + "\n"
    stats = re.search(rf"\[{method}\] \d+ new tokens in \d+ target steps, mean accepted ([\d.]+)", err)
    assert stats and float(stats.group(1)) > 1.3


def test_heads_of_the_wrong_kind_are_refused(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, ["generate", "hi", "--method", "eagle", "--heads", "demo-medusa"])
    assert code == 2 and out == ""
    assert err.strip() == "jaxdec: error: Eagle needs eagle heads (from jaxdec.load_heads), got medusa heads"
