"""The shipped demo checkpoints (`demo-target`, `demo-draft`) and the code that trains them."""

from __future__ import annotations

import json
import math
import re
import shutil
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdec
from jaxdec import corpus, train
from jaxdec.loading import _resolve

ROOT = Path(__file__).resolve().parent.parent
CODE = ('class Stack:\n    """A LIFO stack."""\n\n    def __init__(self):\n        self._items = []\n\n'
        '    def push(self, item):\n\tif item is None:\n\t\traise ValueError("no None, s\'il vous plaît")\n'
        '        self._items.append(item)  # O(1)\n\n\n\nprint(f"{len([1, 2]):>4}") \n')


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(target, draft), loaded by name from a directory that is not the repository."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        yield jaxdec.load("demo-target"), jaxdec.load("demo-draft")
    finally:
        mp.undo()


def _record(name: str) -> dict:
    return json.loads((_resolve(name) / "training.json").read_text())


def test_names_resolve_from_another_directory(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("demo-target", "demo-draft"):
        path = _resolve(name)
        assert path.is_absolute() and (path / "jaxdec_config.json").is_file(), path
    target, draft = demo
    for model in demo:
        cfg = model.config
        assert cfg.model_type == "llama"
        assert cfg.max_position_embeddings >= 4096
        assert model.tokenizer is not None
        assert cfg.eos_token_id == (corpus.EOS_ID,) and cfg.bos_token_id == corpus.BOS_ID
        assert model.tokenizer.token_to_id("</s>") == corpus.EOS_ID
        assert model.tokenizer.token_to_id("<s>") == corpus.BOS_ID
        assert model.dtype == np.float32
    assert target.config.vocab_size == draft.config.vocab_size == target.tokenizer.get_vocab_size()
    assert target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
    assert draft.config.num_hidden_layers < target.config.num_hidden_layers


def test_draft_costs_at_most_an_eighth_of_the_target(demo):
    target, draft = demo
    t_flops, d_flops = train.flops_per_token(target.config), train.flops_per_token(draft.config)
    assert 8 * d_flops <= t_flops, (d_flops, t_flops)
    recorded = _record("demo-draft")
    assert recorded["flops_per_token"] == d_flops and recorded["teacher_flops_per_token"] == t_flops
    assert _record("demo-target")["flops_per_token"] == t_flops


def test_tokenizer_round_trips_code(demo):
    for model in demo:
        ids = model.tokenizer.encode(CODE).ids
        assert corpus.UNK_ID not in ids
        assert len(ids) < len(CODE.encode()) / 2  # BPE merges, not bytes
        assert model.tokenizer.decode(ids) == CODE


def test_shipped_weights_are_trained(demo):
    """On the held-out sample recorded at export: the target's loss is far below a uniform
    model's and equals the recorded value; the draft agrees with it as recorded."""
    target, draft = demo
    t_rec, d_rec = _record("demo-target"), _record("demo-draft")
    windows = np.asarray(t_rec["probe"]["token_ids"], np.int32)
    assert windows.shape == (train.PROBE_WINDOWS, train.PROBE_LEN + 1)
    assert d_rec["probe"]["token_ids"] == t_rec["probe"]["token_ids"]
    step = train.make_eval_step(draft.config, target.config)
    got = train.evaluate(step, draft.params, windows, windows.shape[0], target.params)
    uniform = math.log(target.config.vocab_size)
    assert got["teacher_loss"] < 0.5 * uniform
    assert got["teacher_loss"] == pytest.approx(t_rec["probe"]["loss"], abs=0.01)
    assert abs(t_rec["held_out"]["loss"] - got["teacher_loss"]) < 0.75  # the sample is typical
    assert got["loss"] == pytest.approx(d_rec["probe"]["loss"], abs=0.01)
    assert got["teacher_loss"] < got["loss"] < 0.6 * uniform
    assert got["greedy_agreement"] == pytest.approx(d_rec["probe"]["greedy_agreement"], abs=0.01)
    assert got["greedy_agreement"] > 0.4


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_shipped_heads_are_trained(demo, kind):
    """The shipped heads fit the demo target and, on the held-out sample recorded at export,
    give the recorded accuracies, well above chance; Medusa's shipped tree is the best tree of
    its size for the held-out accuracies."""
    from jaxdec.heads import best_static_tree
    from jaxdec.train_heads import EagleObjective, MedusaObjective, held_out_accuracy
    target, _ = demo
    heads = jaxdec.load_heads(f"demo-{kind}")
    assert heads.kind == kind and heads.config.hidden_size == target.config.hidden_size
    record = _record(f"demo-{kind}")
    windows = np.asarray(record["probe"]["token_ids"], np.int32)
    objective = (MedusaObjective if kind == "medusa" else EagleObjective)(heads.config, target.config)
    got = np.asarray(held_out_accuracy(objective, heads.params, target.params, windows, len(windows)))
    np.testing.assert_allclose(got, record["probe"]["accuracy_by_depth_and_rank"], atol=3e-3)
    assert got[0, 0] > 0.3 and got[0, 0] > 10 * got[0, -1]  # the top guess is right far more than chance
    # The config keeps the accuracies on the target's own held-out text when they were measured.
    measured = record.get("held_out_generations", record["held_out"])
    assert np.allclose(heads.config.accuracy, measured["accuracy_by_depth_and_rank"])
    if kind == "medusa":
        assert heads.config.tree == best_static_tree(heads.config.accuracy, len(heads.config.tree))


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_shipped_heads_speed_up_the_demo_target(demo, method):
    """Through generate on held-out-style code: exactly plain decoding's tokens, with several
    tokens per target step (ragged rows, batch 3)."""
    target, _ = demo
    heads = jaxdec.load_heads(f"demo-{method}")
    spec = (jaxdec.spec.Medusa(heads) if method == "medusa"
            else jaxdec.spec.Eagle(heads, depth=6, top_k=2, max_nodes=8))
    prompts = ["def fib(n):", "import os\n\n\nclass Config:\n    def __init__(self, path):", CODE[:60]]
    plain = jaxdec.generate(target, prompts, max_new_tokens=48, stop_token_ids=[])
    out = jaxdec.generate(target, prompts, max_new_tokens=48, stop_token_ids=[], speculative=spec)
    assert out.tokens == plain.tokens
    # The heads before their fine-tuning on the target's own text gave 2.10 (Medusa) and 4.27 here.
    assert out.stats.mean_accepted > {"medusa": 2.2, "eagle": 3.8}[method], out.stats

# How far below the model's best logit a token may be and still count as tied with it after
# bfloat16 rounding: the divergences measured on the demo pair were 0.0006-0.009 below
# (README, "Numerics"), while only about 4% of the positions of a greedy output have their two
# best logits this close, so a divergence for any other reason fails the test.
BFLOAT16_TIE = 0.05


def test_bfloat16_speculation_leaves_plain_decoding_only_at_near_ties():
    """In bfloat16 a 9-token verify rounds differently from a 1-token step, so greedy
    speculation may take the other token where the target's two best are within rounding
    (README, "Numerics"). Every row equals plain decoding's or first differs at such a tie:
    both tokens within BFLOAT16_TIE of the best logit of the model's own forward there."""
    from benchmarks.decode import category_prompts, first_differences, load_prompts
    target, draft = jaxdec.load("demo-target", dtype="bfloat16"), jaxdec.load("demo-draft", dtype="bfloat16")
    prompts = category_prompts(target.tokenizer, load_prompts(["code"])["code"], 8, 256)
    plain = jaxdec.generate(target, prompts, max_new_tokens=64, stop_token_ids=[]).tokens
    for spec in (jaxdec.spec.DraftModel(draft, 8), jaxdec.spec.DraftTree(draft, 8, 2, 8)):
        out = jaxdec.generate(target, prompts, max_new_tokens=64, stop_token_ids=[], speculative=spec)
        assert out.stats.mean_accepted > 3, out.stats
        for where in first_differences(target, prompts, plain, out.tokens):
            assert where["below_best"] is not None and where["below_best"] < BFLOAT16_TIE, (type(spec).__name__, where)


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly (for `jaxdec.checkpoints`): none may be missing."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    setup = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("jaxdec", "pallas_kernels")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    assert setup["package-dir"]["jaxdec.checkpoints"] == "checkpoints"
    assert (ROOT / "checkpoints" / "__init__.py").is_file()


# --------------------------------------------------------------------------- training code

def test_corpus_split_and_filters(tmp_path):
    for rel, text in {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "test/t.py": "t\n", "pkg/tests/u.py": "u\n",
                      "site-packages/s.py": "s\n", "notes.txt": "n\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\x00bad")
    files, skipped = corpus.corpus_files(tmp_path)
    assert [p for p, _ in files] == ["a.py", "pkg/b.py"]
    assert skipped == {"test_dirs": 2, "undecodable": 1}
    assert [p for p, _ in corpus.corpus_files(tmp_path, include_tests=True)[0]] == [
        "a.py", "pkg/b.py", "pkg/tests/u.py", "test/t.py"]
    # the split is a fixed function of the path (not of the machine, the order or a seed)
    names = [f"pkg/m{i}.py" for i in range(2000)]
    held = [n for n in names if corpus.is_held_out(n)]
    assert 0.02 < len(held) / len(names) < 0.06
    assert held == [n for n in names if corpus.is_held_out(n)]
    assert corpus.is_held_out("json/decoder.py") is (
        int.from_bytes(__import__("hashlib").sha256(b"json/decoder.py").digest()[:8], "big") % 1000 < 40)


def test_windows_are_slices_of_the_stream_at_each_epochs_own_offset():
    """batch_at: every row is seq_len + 1 consecutive tokens; an epoch's windows do not
    overlap; and each epoch cuts the stream at its own random offset, so windows do not always
    start at multiples of seq_len (the same token pairs would always straddle window edges)."""
    tokens, seq_len = np.arange(1000, dtype=np.uint16), 32
    starts = []
    for step in range(30):  # 120 windows: about 4 epochs of 30
        batch = corpus.batch_at(tokens, step, 4, seq_len, seed=3)
        assert batch.shape == (4, seq_len + 1)
        assert (np.diff(batch, axis=1) == 1).all()
        starts += batch[:, 0].tolist()
    first_epoch = starts[:(1000 - 1 - seq_len) // seq_len]
    assert len(set(first_epoch)) == len(first_epoch)
    assert len({s % seq_len for s in first_epoch}) == 1                  # one offset per epoch
    assert any(s % seq_len for s in starts)


def test_distillation_loss_adds_the_weighted_cross_entropy():
    """loss_fn with a teacher: KL(teacher || model) + ce_weight x cross-entropy, the two also
    reported on their own."""
    from jaxdec.model import init_params
    cfg = train.make_config(64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8)
    student, teacher = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1), init_std=0.5)
    batch = jax.random.randint(jax.random.key(2), (2, 9), 0, 64)
    for weight in (0.0, 0.5):
        loss, metrics = train.loss_fn(cfg, student, batch, cfg, teacher, ce_weight=weight)
        assert metrics["kl"] > 0.01 and metrics["ce"] > 1.0
        np.testing.assert_allclose(loss, metrics["kl"] + weight * metrics["ce"], rtol=1e-6)


def _tiny_data():
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\nclass C{i}:\n    pass\n" for i in range(300)]
    tokenizer = corpus.train_tokenizer(texts, vocab_size=320)
    assert [tokenizer.token_to_id(t) for t in corpus.SPECIAL_TOKENS] == [0, 1, 2]
    tokens = corpus.encode_documents(tokenizer, texts)
    assert tokens[-1] == corpus.EOS_ID and tokenizer.decode(tokenizer.encode(texts[5]).ids) == texts[5]
    return tokenizer, tokens


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    tokenizer, tokens = _tiny_data()
    cfg = train.make_config(tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    draft_cfg = train.make_config(cfg.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    opts = train.RunOptions(steps=24, batch_size=4, seq_len=32, lr=1e-2, warmup=2, save_every=6, log_every=6)
    held = corpus.eval_windows(tokens, opts.seq_len, 8)
    # one evaluation program for everything: the draft's metrics against the target ("teacher")
    step = train.make_eval_step(draft_cfg, cfg)
    draft_init = train.init_params(draft_cfg, jax.random.key(0))
    target_loss = lambda params: train.evaluate(step, draft_init, held, 8, params)["teacher_loss"]
    before = target_loss(train.init_params(cfg, jax.random.key(opts.seed)))

    # interrupted after 12 steps (checkpoints at 6 and 12), then rerun: continues at 12
    params, info = train.train_run(tmp_path / "run", cfg, tokens, opts, progress=False, stop_after=12)
    assert info["step"] == 12 and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["12", "6"]
    logs = []
    params, info = train.train_run(tmp_path / "run", cfg, tokens, opts, progress=False, log=logs.append)
    assert info["step"] == 24 and [h["step"] for h in info["history"]] == [18, 24]
    assert any("resumed" in line and "at step 12" in line for line in logs)
    after = target_loss(params)
    assert after < before - 1.0, (before, after)

    unbroken, _ = train.train_run(tmp_path / "unbroken", cfg, tokens, opts, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(unbroken)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(ValueError, match="different settings"):
        train.train_run(tmp_path / "run", cfg, tokens, train.RunOptions(**{**opts.__dict__, "lr": 1e-3}),
                        progress=False)
    # fewer steps than were trained: refused (the export would be the 24-step model), run.json kept
    with pytest.raises(ValueError, match="--steps 12 is fewer than the 24 steps"):
        train.train_run(tmp_path / "run", cfg, tokens, train.RunOptions(**{**opts.__dict__, "steps": 12}),
                        progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["options"]["steps"] == 24

    out = train.export(tmp_path / "export", cfg, params, _save_tokenizer(tokenizer, tmp_path), {"steps": 24})
    model = jaxdec.load(out)
    assert model.config == cfg and model.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == corpus.EOS_ID
    d_before = train.evaluate(step, draft_init, held, 8, model.params)
    assert d_before["teacher_loss"] == pytest.approx(after, rel=1e-6)

    # distillation from the exported target: KL(target || draft) falls, greedy agreement rises
    d_opts = train.RunOptions(steps=16, batch_size=4, seq_len=32, lr=1e-2, warmup=2, save_every=16)
    d_params, _ = train.train_run(tmp_path / "draft", draft_cfg, tokens, d_opts, teacher=model, progress=False)
    d_after = train.evaluate(step, d_params, held, 8, model.params)
    assert d_after["kl"] < 0.5 * d_before["kl"], (d_before, d_after)
    assert d_after["greedy_agreement"] > d_before["greedy_agreement"]


def _save_tokenizer(tokenizer, directory: Path) -> Path:
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


TINY_DRAFT = ["--hidden", "16", "--intermediate", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "8"]


def refused(capsys, argv, pattern):
    """`python -m jaxdec.train ARGV` stops with exit status 2 and a one-line reason matching pattern."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    reason = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(pattern, reason), reason


@pytest.mark.parametrize("command", ["target", "draft", "medusa", "eagle"])
def test_training_command_refuses_bad_settings_before_any_work(tmp_path, capsys, command):
    """Each refusal comes before the corpus is read or a model is loaded (the work folder stays
    empty), and nothing the user had is deleted: an --out that is not an export of this kind,
    a --run that is a path (--fresh removes the run's folder)."""
    work = ["--workdir", str(tmp_path / "w")] + (["--teacher", "demo-target"] if command != "target" else [])
    refused(capsys, [command, *work, "--steps", "0"], r"--steps: must be >= 1, got 0")
    refused(capsys, [command, *work, "--lr", "-0.001"], r"--lr: must be > 0.0, got -0.001")
    refused(capsys, [command, *work, "--batch-size", "-2"], r"--batch-size: must be >= 1")
    refused(capsys, [command, *work, "--warmup", "-1"], r"--warmup: must be >= 0")
    # an infinite rate trained to NaN weights and exported them; a huge count overflowed in JAX
    refused(capsys, [command, *work, "--lr", "inf"], r"--lr: must be finite, got inf")
    refused(capsys, [command, *work, "--warmup", str(10**20)], rf"--warmup: must be below 2\*\*31, got {10**20}")
    refused(capsys, [command, *work, "--seed", "-1"], r"--seed: must be >= 0, got -1")
    refused(capsys, [command, "--workdir", "", *work[2:]], r"--workdir: must name a folder, got ''")  # not the cwd
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    marker = "heads.json" if command in ("medusa", "eagle") else "jaxdec_config.json"
    refused(capsys, [command, *work, "--out", str(mine)], rf"{re.escape(str(mine))} exists .*no {marker}.*refusing")
    assert (mine / "notes.txt").read_text() == "keep me"
    if command in ("target", "draft"):
        for run in ("..", "/", "a/b"):
            refused(capsys, [command, *work, "--run", run, "--fresh"], rf"--run must be a folder name.*{re.escape(repr(run))}")
    refused(capsys, [command, *work, "--log-every", "0"], r"--log-every: must be >= 1")
    assert not (tmp_path / "w").exists()


def test_a_work_folder_must_be_one(tmp_path, capsys):
    """Preparing writes tokenizer.json, corpus.json and the tokens into --workdir: a checkpoint
    given there lost its tokenizer (and decoded garbage after); a file, a damaged corpus.json or
    a folder below a file ended in a traceback. Each is refused before the corpus is read."""
    checkpoint = shutil.copytree(Path(jaxdec.__file__).parents[1] / "checkpoints" / "demo-draft", tmp_path / "ckpt")
    before = (checkpoint / "tokenizer.json").read_bytes()
    refused(capsys, ["tokenizer", "--workdir", str(checkpoint)], r"--workdir .*ckpt is a checkpoint \(jaxdec_config\.json\)")
    assert (checkpoint / "tokenizer.json").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tokenizer.json").write_bytes(before)
    refused(capsys, ["tokenizer", "--workdir", str(foreign)], r"holds a tokenizer\.json but no corpus\.json")
    (tmp_path / "a_file").write_text("keep")
    refused(capsys, ["tokenizer", "--workdir", str(tmp_path / "a_file")], r"--workdir .*a_file is a file, not a folder")
    refused(capsys, ["tokenizer", "--workdir", str(tmp_path / "a_file" / "w")], r"w cannot be made: .*a_file is a file")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for text, says in (("{}", r"corpus\.json is damaged"), ("[]", r"corpus\.json is damaged"),
                       ("garbage", r"cannot read .*corpus\.json: Expecting value")):
        (damaged / "corpus.json").write_text(text)
        refused(capsys, ["tokenizer", "--workdir", str(damaged)], says)


def test_ctrl_c_stops_training_in_one_line(tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt (from anywhere in the run) ends as exit status 130 and a line that
    says how to resume, not a traceback of 58 lines."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "run_stage", interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(["target", "--workdir", str(tmp_path / "w")])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == ("python -m jaxdec.train target: interrupted; the same command resumes "
                                               "from the last checkpoint")


def test_fresh_deletes_only_a_training_run(tiny_work, capsys):
    """--fresh removed any folder of the --run's name in the work folder, the user's too."""
    work, tiny = tiny_work
    mine = Path(work[work.index("--workdir") + 1]) / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(capsys, ["target", *work, *TINY_DRAFT, "--steps", "1", "--run", "mine", "--fresh"],
            r"--fresh: .*mine is not only a training run \(it holds notes\.txt\); refusing to delete it")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_exports_do_not_replace_other_folders(tmp_path):
    """The functions themselves refuse too (they remove the old export whole)."""
    from jaxdec.heads import save_heads
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no jaxdec_config.json"):
        train.export(mine, None, {}, tmp_path / "tokenizer.json", {})
    with pytest.raises(ValueError, match="no heads.json"):
        save_heads(mine, None, {})
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_exports_replace_the_old_one_whole_or_not_at_all(tmp_path):
    """storage.written_atomically, under every export (convert, export, the trained models and
    heads): the new folder replaces the old one only when its writing finished."""
    from jaxdec.storage import written_atomically
    dst = tmp_path / "out"
    with written_atomically(dst) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(RuntimeError):
        with written_atomically(dst) as tmp:
            (tmp / "a").write_text("second, half-written")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (dst / "a").read_text() == "first"
    with written_atomically(dst) as tmp:
        (tmp / "b").write_text("third")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dst.iterdir()] == ["b"]
    (tmp_path / "made").mkdir()  # the folder's mode is what mkdir gives, not mkdtemp's private 0700
    assert dst.stat().st_mode & 0o777 == (tmp_path / "made").stat().st_mode & 0o777


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory):
    """(a work folder's options for `python -m jaxdec.train`, the folder) holding a tiny corpus
    and a tiny target trained on it for 24 steps (`target` beside the work folder, and
    `other-target`, a copy whose tokenizer disagrees with the work folder's)."""
    tmp_path = tmp_path_factory.mktemp("tiny-work")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(300):
        (corpus / f"m{i:03d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\nclass C{i}:\n    pass\n")
    work = ["--workdir", str(tmp_path / "w"), "--corpus-root", str(corpus), "--vocab-size", "320",
            "--seq-len", "32", "--batch-size", "4", "--eval-windows", "8", "--no-progress", "--save-every", "100"]
    train.main(["target", *work, "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2",
                "--kv-heads", "1", "--head-dim", "16", "--steps", "24", "--lr", "1e-2", "--warmup", "2",
                "--out", str(tmp_path / "target")])
    # `other-target`: the same target with a tokenizer that numbers two tokens the other way round
    other = tmp_path / "other-target"
    shutil.copytree(tmp_path / "target", other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return work, tmp_path


def test_work_folder_refuses_a_corpus_it_cannot_train_on(tiny_work, tmp_path, capsys):
    """A work folder's corpus settings are its first command's: later commands may leave them
    out, and one that gives others is refused rather than silently trained on the old corpus.
    A corpus too small for its split or for --seq-len is refused before anything is written
    (a written corpus.json would be reused as is); a window search never runs forever."""
    work, tiny = tiny_work
    workdir = work[work.index("--workdir") + 1]
    assert train.main(["tokenizer", "--workdir", workdir]) == 0  # the folder's own settings
    for flag, value in (("--vocab-size", "400"), ("--corpus-root", str(tmp_path)), ("--include-tests", None)):
        refused(capsys, ["tokenizer", "--workdir", workdir, flag, *([value] if value else [])],
                rf"^python -m jaxdec.train tokenizer: error: {flag} .* differs from .*corpus.json was prepared with")
    refused(capsys, ["target", *work, "--seq-len", "100000", "--run", "long"],
            r"--seq-len 100000 needs at least 200000 training tokens, but .* holds \d+: use a shorter --seq-len")
    held = int(np.load(Path(workdir) / "held_out_tokens.npy").size)
    refused(capsys, ["target", *work, "--seq-len", str(held), "--run", "long"],
            rf"--seq-len {held} needs at least {held + 1} held-out tokens")

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    for root, counts in ((tmp_path / "none", "0 training and 0 held-out"), (tmp_path / "one", "1 training and 0 held-out")):
        refused(capsys, ["tokenizer", "--workdir", str(tmp_path / "w"), "--corpus-root", str(root)],
                rf"--corpus-root .*{root.name} has {counts} \*\.py files")
    for size in ("3", "258", "65537"):
        refused(capsys, ["tokenizer", "--workdir", str(tmp_path / "w"), "--vocab-size", size],
                rf"--vocab-size must be in \[259, 65536\] .*got {size}$")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="holds no window of seq_len 32"):
        corpus.batch_at(np.zeros(20, np.uint16), 0, 2, 32, seed=0)


def test_on_policy_distillation_command(tiny_work, capsys):
    """`python -m jaxdec.train draft --init D --on-policy N`: the target writes N continuations
    (cached, resumable), the draft is fine-tuned on them mixed with corpus windows, and the
    export records how it predicts held-out continuations before and after."""
    work, tmp_path = tiny_work
    draft = ["draft", *work, *TINY_DRAFT, "--teacher", str(tmp_path / "target"), "--warmup", "2",
             "--prompt-len", "8", "--eval-generations", "6"]
    train.main([*draft, "--steps", "4", "--out", str(tmp_path / "d0")])
    train.main([*draft, "--steps", "16", "--lr", "1e-2", "--init", str(tmp_path / "d0"), "--on-policy", "6",
                "--run", "ft", "--out", str(tmp_path / "d1")])

    target = jaxdec.load(tmp_path / "target")
    train_tokens = np.load(tmp_path / "w" / "train_tokens.npy")
    rows = np.load(tmp_path / "w" / "ft-continuations.npy")
    assert rows.shape == (6, 33)
    from jaxdec import on_policy
    for row, start in zip(rows, on_policy.prompt_starts(train_tokens.size, 6, 8, 0)):
        np.testing.assert_array_equal(row[:8], train_tokens[start:start + 8])  # a corpus prompt, then
        assert row[8] == np.argmax(jaxdec.logits(target, row[:8].tolist())[-1])  # the target's greedy token
    record = json.loads((tmp_path / "d1" / "training.json").read_text())
    assert record["options"]["on_policy"] == 6 and record["options"]["init"] == str(tmp_path / "d0")
    generated = record["held_out_generations"]
    # the init's metrics are d0's, recomputed here on the cached held-out continuations
    held = np.load(tmp_path / "w" / "held-out-continuations-32.npy")
    assert held.shape == (6, 33)
    d0 = jaxdec.load(tmp_path / "d0")
    step = train.make_eval_step(d0.config, target.config)
    again = train.evaluate(step, d0.params, held, 8, target.params, first=7)
    assert again["tokens"] == 6 * 25 == generated["init"]["tokens"]
    assert again["kl"] == pytest.approx(generated["init"]["kl"], rel=1e-5)
    assert generated["draft"]["kl"] < 0.8 * generated["init"]["kl"], generated

    # interrupted generation resumes from the cache; a changed request starts over
    cache = tmp_path / "w" / "again.npy"
    logs = []
    full = on_policy.continuations(target, train_tokens, 4, 8, 33, 0, cache, batch_size=2, progress=False)
    np.save(cache, full[:2])
    resumed = on_policy.continuations(target, train_tokens, 4, 8, 33, 0, cache, batch_size=2, progress=False,
                                      log=logs.append)
    np.testing.assert_array_equal(resumed, full)
    assert any("2 of 4" in line for line in logs)
    logs.clear()
    other = on_policy.continuations(target, train_tokens, 2, 8, 33, 1, cache, progress=False, log=logs.append)
    assert other.shape == (2, 33) and "0 of 2" in logs[0]

    batch = on_policy.mixed_batch_at(train_tokens, rows, 0, 4, 32, 0, 0.75)
    assert batch.shape == (4, 33) and all(any((r == s).all() for s in rows) for r in batch[:3])
    epoch = np.concatenate([on_policy.mixed_batch_at(train_tokens, rows, s, 4, 32, 0, 0.75)[:3] for s in (0, 1)])
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, rows))  # every row once per epoch
    with pytest.raises(ValueError, match="33"):
        on_policy.mixed_batch_at(train_tokens, rows, 0, 4, 16, 0, 0.75)
    with pytest.raises(ValueError, match="prompt_len"):
        on_policy.continuations(target, train_tokens, 2, 33, 33, 0, cache)
    refused(capsys, [*draft[:-4], "--hidden", "24", "--teacher", str(tmp_path / "target"), "--init",
                     str(tmp_path / "d0"), "--run", "bad"], "--init")
    refused(capsys, [*draft, "--on-policy", "2", "--on-policy-fraction", "0", "--run", "bad"], "on-policy-fraction")
    refused(capsys, [*draft, "--on-policy", "-1", "--run", "bad"], "--on-policy: must be >= 0")
    with pytest.raises(ValueError, match="count must be >= 1"):
        on_policy.continuations(target, train_tokens, 0, 8, 33, 0, cache)
    with pytest.raises(ValueError, match=r"the training stream \(8 tokens\) must be longer than prompt_len=8"):
        on_policy.continuations(target, train_tokens[:8], 2, 8, 33, 0, cache)
    refused(capsys, [*draft[:-6], "--teacher", str(tmp_path / "other-target"), "--run", "bad"], "another tokenizer")
    refused(capsys, [*draft, "--out", str(tmp_path / "target") + "/", "--run", "bad"],
            "--out .* is the --teacher's folder: the draft would replace the target")
    assert jaxdec.load(tmp_path / "target").config == target.config


def test_on_policy_continuations_sampled_at_a_temperature(tiny_work, capsys):
    """`--on-policy-temperature T`: the teacher's continuations, for training and for the
    held-out evaluation, are sampled at T instead of greedy (kept apart from greedy ones); a
    seed gives the same rows every time, and a resumed generation the rows of an unbroken one."""
    from jaxdec import on_policy
    work, tmp_path = tiny_work
    draft = ["draft", *work, *TINY_DRAFT, "--teacher", str(tmp_path / "target"), "--warmup", "2",
             "--prompt-len", "8", "--eval-generations", "4"]
    train.main([*draft, "--steps", "2", "--on-policy", "4", "--on-policy-temperature", "1", "--run", "t1",
                "--out", str(tmp_path / "t1")])
    record = json.loads((tmp_path / "t1" / "training.json").read_text())
    assert record["options"]["on_policy_temperature"] == 1.0
    assert "sampled at temperature 1 by the teacher" in record["held_out_generations"]["what"]
    target = jaxdec.load(tmp_path / "target")
    train_tokens = np.load(tmp_path / "w" / "train_tokens.npy")
    sampled = np.load(tmp_path / "w" / "t1-continuations.npy")
    held = np.load(tmp_path / "w" / "held-out-continuations-32-t1.npy")
    assert sampled.shape == held.shape == (4, 33)
    # Greedy rows would follow the target's argmax everywhere after the prompt; samples do not.
    off_argmax = lambda rows: sum(int(np.sum(np.argmax(jaxdec.logits(target, row[:-1].tolist())[7:], axis=-1)
                                             != row[8:])) for row in rows)
    assert off_argmax(sampled) > 0 and off_argmax(held) > 0

    cache, logs = tmp_path / "w" / "sampled.npy", []
    sample = lambda **kw: on_policy.continuations(target, train_tokens, 4, 8, 33, 0, cache, progress=False,
                                                  temperature=1.0, **kw)
    np.testing.assert_array_equal(sample(), sampled)  # the same seed: the rows the command wrote
    cache.unlink()
    full = sample(batch_size=2)
    np.save(cache, full[:2])
    np.testing.assert_array_equal(sample(batch_size=2, log=logs.append), full)
    assert any("2 of 4" in line for line in logs)
    logs.clear()
    greedy = on_policy.continuations(target, train_tokens, 4, 8, 33, 0, cache, batch_size=2, progress=False,
                                     log=logs.append)
    assert "0 of 4" in logs[0] and not np.array_equal(greedy, full)  # another temperature starts over
    for bad in (-1.0, float("nan"), float("inf"), 1e39):  # 1e39: infinite in float32
        with pytest.raises(ValueError, match=r"temperature must be (>= 0|a real number|finite)"):
            on_policy.continuations(target, train_tokens, 2, 8, 33, 0, cache, temperature=bad)
    refused(capsys, [*draft, "--on-policy-temperature", "-1", "--run", "bad"], "--on-policy-temperature: must be >= 0")
    refused(capsys, [*draft, "--on-policy-temperature", "inf", "--run", "bad"],
            "--on-policy-temperature: must be finite, got inf")  # argparse's type (cli.at_least)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_heads_on_policy_fine_tuning_command(tiny_work, capsys, kind):
    """`python -m jaxdec.train medusa|eagle --init H --on-policy N`: heads fine-tuned on the
    target's own continuations; the export records their accuracies on held-out continuations
    (recomputed here, for them and for the heads they started from), and its config keeps
    those (Medusa's tree is built from them)."""
    from jaxdec.heads import best_static_tree
    from jaxdec.train_heads import EagleObjective, MedusaObjective, held_out_accuracy
    work, tmp_path = tiny_work
    heads = [kind, *work, "--teacher", str(tmp_path / "target"), "--warmup", "2", "--prompt-len", "8",
             "--eval-generations", "6", *(["--num-heads", "2"] if kind == "medusa" else [])]
    h0, h1 = tmp_path / f"{kind}0", tmp_path / f"{kind}1"
    train.main([*heads, "--steps", "2", "--eval-generations", "0", "--out", str(h0)])
    assert "held_out_generations" not in json.loads((h0 / "training.json").read_text())
    # the run trained 2 steps: fewer is refused, unless --fresh starts it over
    refused(capsys, [*heads, "--steps", "1", "--eval-generations", "0"], "--steps 1 is fewer than the 2 steps")
    train.main([*heads, "--steps", "1", "--eval-generations", "0", "--fresh", "--no-progress"])
    out = capsys.readouterr().out
    assert out.startswith("step 1 ") and "resumed" not in out, out
    train.main([*heads, "--steps", "12", "--lr", "1e-2", "--init", str(h0), "--on-policy", "6",
                "--run", f"{kind}-ft", "--out", str(h1)])
    assert np.load(tmp_path / "w" / f"{kind}-ft-continuations.npy").shape == (6, 33)

    target = jaxdec.load(tmp_path / "target")
    before, after = jaxdec.load_heads(h0), jaxdec.load_heads(h1)
    record = json.loads((h1 / "training.json").read_text())
    assert record["options"]["on_policy"] == 6 and record["options"]["init"] == str(h0)
    generated = record["held_out_generations"]
    held = np.load(tmp_path / "w" / "held-out-continuations-32.npy")
    objective = (MedusaObjective if kind == "medusa" else EagleObjective)(after.config, target.config)
    accuracy = lambda h: np.asarray(held_out_accuracy(objective, h.params, target.params, held, 8, first=7))
    np.testing.assert_allclose(accuracy(before), generated["init"], atol=1e-4)
    np.testing.assert_allclose(accuracy(after), generated["accuracy_by_depth_and_rank"], atol=1e-4)
    top2 = lambda a: a[0, :2].sum()  # depth 1's two best guesses (a tiny target's text is repetitive)
    assert top2(accuracy(after)) > top2(accuracy(before)), generated
    assert np.allclose(after.config.accuracy, generated["accuracy_by_depth_and_rank"])
    if kind == "medusa":
        assert after.config.tree == best_static_tree(after.config.accuracy, len(after.config.tree))
    # scored from `first` on: the prompt's positions are left out
    assert not np.allclose(accuracy(after), held_out_accuracy(objective, after.params, target.params, held, 8))

    refused(capsys, [*heads, "--init", str(tmp_path / "target"), "--run", "bad"], "heads.json")
    other_kind = [("eagle" if kind == "medusa" else "medusa"), *heads[1:heads.index("--eval-generations") + 2]]
    refused(capsys, [*other_kind, "--init", str(h0), "--run", "bad"], "--init .* holds heads of config")
    refused(capsys, [*heads, "--on-policy", "2", "--on-policy-fraction", "1.5", "--run", "bad"], "on-policy-fraction")
    refused(capsys, [*heads, "--prompt-len", "31" if kind == "medusa" else "33", "--run", "bad"],
            "--prompt-len .* leaves no generated token")
    refused(capsys, [*heads, "--teacher", str(tmp_path / "other-target"), "--run", "bad"], "another tokenizer")
    # too short a window leaves the deepest head no position: a NaN loss, NaN heads
    deep = ["--num-heads", "32"] if kind == "medusa" else ["--seq-len", "1"]
    refused(capsys, [*heads, *deep, "--eval-generations", "0", "--run", "bad"],
            f"{kind} heads need windows of at least {33 if kind == 'medusa' else 2} tokens .* but --seq-len is "
            f"{32 if kind == 'medusa' else 1}")
    if kind == "medusa":
        refused(capsys, [*heads, "--num-heads", "256", "--seq-len", "512", "--eval-generations", "0", "--run", "bad"],
                "at least 257 tokens .* but the probe window is 256 tokens: use fewer --num-heads")
