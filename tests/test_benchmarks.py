"""The benchmark scripts' arithmetic, and a smoke run of the round-cost benchmark at a tiny shape."""

import json
import re

import numpy as np
import pytest

from benchmarks import verify_cost


def test_expected_tokens_matches_the_geometric_series():
    for a in (0.0, 0.3, 0.6, 0.8, 0.99):
        for k in range(1, 9):
            # 1 + a + ... + a**k: the prefix accepted with probability a**i, plus the target's token.
            assert verify_cost.expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
    assert verify_cost.expected_tokens(1.0, 4) == 5.0


def test_token_cost_is_the_slope_over_widths_from_two():
    # 1 ms a step plus 0.25 ms a token from width 2 on; the 1-token step is off that line.
    steps = {1: 0.5e-3, **{T: 1e-3 + 0.25e-3 * T for T in (2, 3, 5, 9)}}
    assert verify_cost.token_cost(steps) == pytest.approx(0.25e-3)
    assert verify_cost.token_cost({1: 1e-3, 2: 2e-3}) is None  # one width from 2 on: no slope


def test_verify_cost_times_the_pallas_kernels_too(tmp_path, monkeypatch):
    """--attn-impl pallas: the steps run the tree-attention kernel (interpret mode on CPU)."""
    from pallas_kernels import tree_attention as kernel_module
    calls = []
    kernel = kernel_module.tree_attention
    monkeypatch.setattr(kernel_module, "tree_attention", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    out = tmp_path / "cost.json"
    result = verify_cost.main(["--target-shape", "llama-10m", "--draft-shape", "llama-10m", "--dtype", "float32",
                               "--context", "16", "--max-draft", "1", "--tree-tokens", "3", "--iterations", "1",
                               "--repeats", "1", "--attn-impl", "pallas", "--out", str(out)])
    assert result["attn_impl"] == "pallas" and set(result["target_step_ms"]) == {"1", "2", "3"}
    assert {shape[1] for shape in calls} == {1, 2, 3}  # traced for every step width (each layer)
    assert json.loads(out.read_text())["result"]["attn_impl"] == "pallas"


def test_formula_speedup_is_tokens_per_round_over_round_cost():
    # Free drafts and a verify as cheap as a step: the speedup is the tokens per round.
    assert verify_cost.formula_speedup(0.8, 4, 1.0, 1.0, 0.0) == pytest.approx(3.3616)
    # Drafts costing 0.1 of a step and a verify of 1.2 steps: 3.3616 / (0.4 + 1.2).
    assert verify_cost.formula_speedup(0.8, 4, 1.0, 1.2, 0.1) == pytest.approx(3.3616 / 1.6)


def test_verify_cost_runs_and_writes_its_results(tmp_path):
    out = tmp_path / "cost.json"
    result = verify_cost.main(["--target-shape", "llama-10m", "--draft-shape", "llama-10m", "--dtype", "float32",
                               "--context", "16", "--max-draft", "2", "--tree-tokens", "5", "--iterations", "2", "--repeats", "1",
                               "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["result"] == json.loads(json.dumps(result))
    assert set(result["target_step_ms"]) == {"1", "2", "3", "5"}
    assert result["verify_over_step"]["1"] == 1.0
    steps = {int(T): ms for T, ms in result["target_step_ms"].items()}
    assert result["verify_token_ms"] == pytest.approx(verify_cost.token_cost(steps))
    gflops = result["verify_token_gflop_per_s"]  # None only where noise made the slope <= 0
    assert (gflops is None) == (result["verify_token_ms"] <= 0)
    assert result["large_matmul_gflop_per_s"] > 0
    best = result["formula_speedup"]["0.8"]
    assert best["best_speedup"] == max(best["per_num_drafts"].values())
    assert "command" in saved and "machine" in saved and "versions" in saved


def test_verify_cost_times_whole_rounds_on_the_decoding_programs(tmp_path):
    """--rounds: plain decoding's step and DraftModel rounds, each timed on generate()'s own
    program, beside the formula's sum of separately timed steps."""
    out = tmp_path / "cost.json"
    result = verify_cost.main(["--target-shape", "demo-draft", "--draft-shape", "demo-draft", "--dtype", "float32",
                               "--context", "16", "--max-draft", "2", "--rounds", "1", "2", "--tree-rounds", "3x2x2",
                               "--iterations", "2", "--repeats", "1", "--acceptance", "0.5", "--out", str(out)])
    assert json.loads(out.read_text())["result"] == json.loads(json.dumps(result))
    assert set(result["round_ms"]) == {"0", "1", "2"} and all(ms > 0 for ms in result["round_ms"].values())
    assert set(result["tree_round_ms"]) == {"3x2x2"} and result["tree_round_ms"]["3x2x2"] > 0
    assert result["round_cache_slots"] >= 16 + 2 * 3 + 1
    for k in (0, 1, 2):
        formula = k * result["draft_step_ms"] + result["target_step_ms"][str(k + 1)]
        assert result["formula_round_ms"][str(k)] == pytest.approx(formula)
    speedup = result["measured_round_speedup"]["0.5"]
    assert set(speedup) == {"1", "2"}
    for k in (1, 2):
        tokens = verify_cost.expected_tokens(0.5, k)
        assert speedup[str(k)] == pytest.approx(tokens * result["round_ms"]["0"] / result["round_ms"][str(k)])
    # Each round's halves, looped alone and together.
    assert set(result["round_parts_ms"]) == {"1", "2"}
    for parts in result["round_parts_ms"].values():
        assert set(parts) == {part for part, *_ in verify_cost.PARTS} and all(ms > 0 for ms in parts.values())


def test_parts_timer_refuses_a_loop_with_nothing_in_it():
    with pytest.raises(ValueError, match="chain=True, verify=True or a sweep buffer"):
        verify_cost.parts_timer(None, None, None, None, 1, 16, 2, 1, 32, chain=False, verify=False)


def test_sweep_buffer_holds_as_many_bytes_as_the_weights():
    import jax.numpy as jnp
    params = {"a": jnp.zeros((10, 4), jnp.float32), "b": jnp.zeros((6,), jnp.bfloat16)}
    buffer = verify_cost.sweep_buffer(params)
    assert buffer.nbytes - verify_cost.SWEEP_SLACK * 4 == (160 + 12) // 4 * 4


def test_the_demo_shapes_are_the_shipped_checkpoints():
    from benchmarks.bandwidth import SHAPES
    import jaxdec
    for name in ("demo-target", "demo-draft"):
        config = jaxdec.load(name).config
        assert {k: getattr(config, k) for k in SHAPES[name]} == SHAPES[name]


@pytest.mark.parametrize("args, says", [
    (["--max-draft", "2", "--rounds", "3"], "--rounds"),
    (["--rounds", "0"], "--rounds"),
    (["--tree-rounds", "8x2x8"], "give --rounds too"),
    (["--rounds", "2", "--tree-rounds", "8x2"], "DEPTHxTOP_KxMAX_NODES"),
    (["--rounds", "2", "--tree-rounds", "8x0x8"], "DEPTHxTOP_KxMAX_NODES"),
    # Checked against the draft's shape before any timing: demo-draft's vocabulary is 4096.
    (["--draft-shape", "demo-draft", "--rounds", "2", "--tree-rounds", "2x5000x8"], "--tree-rounds 2x5000x8: top_k=5000"),
])
def test_verify_cost_refuses_rounds_it_cannot_compare(args, says, capsys):
    with pytest.raises(SystemExit):
        verify_cost.main(args + ["--out", "/nonexistent/never-written.json"])
    assert says in capsys.readouterr().err


def test_verify_cost_refuses_a_bad_acceptance_rate():
    with pytest.raises(SystemExit):
        verify_cost.main(["--acceptance", "1.5"])


def test_tree_attention_benchmark_runs_and_agrees(tmp_path):
    """At a tiny shape (the kernel in interpret mode on CPU): both sides timed, and they agree."""
    from benchmarks import tree_attention
    out = tmp_path / "kernel.json"
    rows = tree_attention.main(["--contexts", "128", "--nodes", "5", "--heads", "4", "--kv-heads", "2",
                                "--head-dim", "16", "--dtype", "float32", "--iterations", "2", "--repeats", "1",
                                "--batch-size", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(rows) == 1 and saved["results"][0]["context"] == 128 and saved["results"][0]["nodes"] == 5
    assert rows[0]["max_abs_diff"] < 1e-4 and rows[0]["kernel_us"] > 0 and rows[0]["reference_us"] > 0
    assert "machine" in saved and "versions" in saved and "command" in saved


def test_long_context_attention_benchmark_runs(tmp_path):
    """A tiny shape, one case: dense and sparse timed, the page choice too; on a CPU the Pallas
    kernels are recorded as skipped, not timed in interpret mode."""
    from benchmarks import long_context_attention
    out = tmp_path / "attention.json"
    rows = long_context_attention.main(["--shapes", "4x2x16:float32", "--contexts", "64", "--budgets", "32", "64",
                                        "--batch-sizes", "2", "--tokens", "3", "--iterations", "1", "--repeats", "1",
                                        "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(rows))
    assert "machine" in saved and "versions" in saved and "command" in saved
    timed = {(r["impl"], r["budget"]): r for r in rows if "us" in r}
    assert set(timed) == {("dense_xla", None), ("sparse_xla", 32), ("select_pages", 32)}  # budget 64 >= context
    assert all(r["us"] > 0 and r["context"] == 64 and r["batch_size"] == 2 and r["tokens"] == 3 for r in timed.values())
    assert timed["sparse_xla", 32]["kv_mb"] == timed["dense_xla", None]["kv_mb"] / 2
    assert timed["dense_xla", None]["dense_xla_over_this"] == 1.0
    skipped = {(r["impl"], r["budget"]): r["skipped"] for r in rows if "skipped" in r}
    assert skipped == {(k, b): "interpret mode: not a timing"
                       for k, b in (("tree_pallas", None), ("decode_splitk_pallas", None), ("sparse_pallas", 32))}


@pytest.mark.parametrize("args", [["--shapes", "5x2x16"], ["--shapes", "4x2x16:float16"], ["--contexts", "100"],
                                  ["--budgets", "40"], ["--repeats", "0"], ["--batch-sizes", "0"]])
def test_long_context_attention_refuses_bad_settings(args, capsys):
    from benchmarks import long_context_attention
    with pytest.raises(SystemExit):
        long_context_attention.main(args + ["--out", "/nonexistent/never-written.json"])
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("module, args", [
    ("tree_attention", ["--kv-heads", "0"]), ("tree_attention", ["--nodes", "16", "-4"]),
    ("tree_attention", ["--iterations", "0"]), ("bandwidth", ["--batch-size", "0"]),
    ("bandwidth", ["--copy-gib", "0"]), ("scaling_model", ["--efficiency", "0"]),
    ("scaling_model", ["--model-sizes", "0"]), ("vs_hf", ["--num-tokens", "0"]), ("vs_hf", ["--repeats", "-1"]),
    ("draft_agreement", ["--context", "-1"]),
])
def test_counts_and_rates_are_refused_in_one_line(module, args, capsys):
    """A zero or negative count stops at the argument (it was a ZeroDivisionError or an empty
    table), before anything is built or loaded."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.{module}").main(args + ["--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    assert f"argument {args[0]}: must be" in capsys.readouterr().err


OUT_MODULES = ["bandwidth", "decode", "draft_agreement", "long_context_attention", "lossy_agreement", "prefill",
               "sampling_cost", "scaling_model", "tree_attention", "verify_cost", "vs_hf", "xla_flags"]


@pytest.mark.parametrize("module", OUT_MODULES)
def test_an_unwritable_out_is_refused_before_the_run(module, tmp_path, capsys):
    """--out was written only at the end: a folder, or a path under a file, failed after the
    whole run with a traceback."""
    import importlib
    main = importlib.import_module(f"benchmarks.{module}").main
    (tmp_path / "a-file").write_text("")
    for out, says in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "r.json", "is not a folder this user may write")):
        with pytest.raises(SystemExit) as stop:
            main(["--out", str(out)])
        assert stop.value.code == 2
        assert re.search(rf"argument --out: .*{says}", capsys.readouterr().err)


def test_every_benchmark_with_out_is_checked():
    import pathlib
    found = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "benchmarks").glob("*.py")
                   if 'add_argument("--out"' in p.read_text())
    assert found == sorted(OUT_MODULES)


@pytest.mark.parametrize("module, args, reason", [
    ("prefill", ["--target", "/nonexistent/model"], r"no checkpoint at '/nonexistent/model'"),
    ("lossy_agreement", ["--target", "demo-medusa"], r"holds draft heads, not a model"),
    ("lossy_agreement", ["--budgets", "0"], r"--budgets must be .*>= 1, got '0'"),
    ("lossy_agreement", ["--selection-layers", "default,x"], r"--selection-layers: 'x' is neither"),
    ("vs_hf", ["--draft", "/nonexistent/model"], r"no checkpoint at '/nonexistent/model'"),
    ("vs_hf", ["--batch-sizes", "1,0"], r"--batch-sizes must be .*>= 1, got '1,0'"),
    ("vs_hf", ["--category", "poetry"], r"unknown category 'poetry'"),
    ("draft_agreement", ["--category", "poetry"], r"unknown category 'poetry'"),
    ("draft_agreement", ["--draft", "demo-medusa"], r"holds draft heads, not a model"),
    ("draft_agreement", ["--confidence-thresholds", "0", "-0.5"], r"argument --confidence-thresholds: must be >= 0"),
    ("draft_agreement", ["--num-tokens", "4", "0"], r"argument --num-tokens: must be >= 1"),
    # no room left for a prompt in the model's positions: a ValueError traceback from generate
    ("draft_agreement", ["--max-new-tokens", "5000"], r"--max-new-tokens leaves room for prompts of -904 tokens"),
    ("lossy_agreement", ["--max-new-tokens", "4095", "--context", "16"],
     r"--max-new-tokens leaves room for prompts of 1 tokens .* a task alone has \d+"),
    ("decode", ["--max-new-tokens", "4095", "--methods", "ar", "--num-prompts", "1", "--context", "16"],
     r"--max-new-tokens leaves room for prompts of 1 tokens"),
    ("sampling_cost", ["--vocab", str(10**20)], r"argument --vocab: must be below 2\*\*31"),  # an OverflowError
])
def test_checkpoints_and_lists_are_refused_in_one_line(module, args, reason, capsys):
    """A missing checkpoint or a bad list was a traceback from deep in the script."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.{module}").main(args + ["--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"\S+: error: ", last) and re.search(reason, last), last  # argparse's "PROG: error: ..."


def test_draft_agreement_replays_greedy_chains():
    """Rounds accept the run of agreements from their start, at most the chain (ended early
    after an unsure token), then emit one token of the target's, never past the row's end."""
    from benchmarks.draft_agreement import predicted
    agree, sure = np.array([1, 1, 0, 1, 1, 1], bool), np.ones(6)
    assert predicted([(agree, sure)], 2) == (6, 2)     # 2 accepted + 1, then 2 + 1
    assert predicted([(agree, sure)], 4) == (6, 2)     # 2 + 1, then 3 accepted, cut at the end
    assert predicted([(agree, sure)], 1) == (6, 4)     # 1 + 1, 0 + 1, 1 + 1, 1 + 0 (end)
    unsure = np.array([0.9, 0.4, 0.9, 0.9, 0.9, 0.9])
    assert predicted([(agree, unsure)], 4, threshold=0.5) == (6, 2)  # the chain ends after token 1
    assert predicted([(np.ones(6, bool), unsure)], 8) == (6, 1)  # all 6 accepted, nothing after
    assert predicted([(np.ones(6, bool), unsure)], 8, threshold=0.5) == (6, 2)  # 2 + 1, then 3 (end)
    assert predicted([(agree, sure), (np.zeros(3, bool), sure[:3])], 2) == (9, 5)


def test_draft_agreement_predicts_what_generate_reports(tmp_path):
    """The script's tokens and rounds for each chain length and threshold are exactly those of
    greedy DraftModel decoding of the same prompts (pooled: tokens after each row's first, and
    the rows' target steps): the replay is the acceptance rule, not an estimate of it."""
    import jaxdec
    from benchmarks import draft_agreement, decode
    out = tmp_path / "agree.json"
    payload = draft_agreement.main(["--num-prompts", "3", "--context", "48", "--max-new-tokens", "24",
                                    "--num-tokens", "2", "5", "--confidence-thresholds", "0", "0.1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["chains"] == payload["chains"] and len(saved["chains"]) == 4
    assert 0 < saved["summary"]["agreement"] < 1 and saved["summary"]["tokens"] == 3 * 23
    target, draft = jaxdec.load("demo-target"), jaxdec.load("demo-draft")
    texts = decode.load_prompts(["code"])["code"]
    prompts = decode.category_prompts(target.tokenizer, texts, 3, 48)
    for chain in saved["chains"]:
        method = jaxdec.spec.DraftModel(draft, chain["num_tokens"], confidence_threshold=chain["confidence_threshold"])
        stats = jaxdec.generate(target, prompts, max_new_tokens=24, speculative=method).stats
        assert (chain["tokens"], chain["rounds"]) == (stats.new_tokens - len(prompts), stats.active_row_steps), chain


def test_vs_hf_without_transformers_says_what_to_install(monkeypatch, capsys):
    """Where torch or transformers is missing, vs_hf.py says so in one line (after checking its
    arguments and checkpoints), not with an ImportError's traceback."""
    import importlib.util
    from benchmarks import vs_hf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        vs_hf.main(["--num-prompts", "1", "--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"needs (torch and )?transformers, not installed here: pip install -e '\.\[bench\]'", last), last


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_benchmark_runs_end_to_end(tmp_path):
    """The benchmark command on the demo pair, tiny settings, one device and a 1x2 mesh:
    valid JSON with the contract's fields, lossless greedy rows, and its plots."""
    from benchmarks import decode
    out = tmp_path / "bench.json"
    decode.main(["--methods", "ar,draft", "--num-prompts", "2", "--max-new-tokens", "6", "--context", "16",
                 "--repeats", "1", "--mesh", "none", "data=1,model=2", "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {"machine", "versions", "command", "settings", "methods"} <= set(saved)
    assert {"jax", "jaxlib", "flax", "jaxdec"} <= set(saved["versions"])
    # The tests' XLA_FLAGS (tests/conftest.py) change the numbers, so the file says so.
    assert "xla_force_host_platform_device_count=8" in saved["machine"]["xla_flags"]
    entries = saved["methods"]
    assert [(e["mesh"], e["method"]) for e in entries] == [
        ("one device", "ar"), ("one device", "draft"), ("data=1,model=2", "ar"), ("data=1,model=2", "draft")]
    for e in entries:
        assert {"method", "tokens_per_second", "mean_accepted", "speedup_vs_ar", "new_tokens", "decode_seconds",
                "compile_seconds", "category", "context", "batch_size", "devices"} <= set(e)
        assert e["tokens_per_second"] > 0 and e["new_tokens"] == 2 * 6
        assert e["rows_identical_to_first_method"] == 1.0
        # Pooled over the prompts: all emitted tokens over all active row steps.
        assert e["mean_accepted"] == pytest.approx((e["new_tokens"] - 2) / e["active_row_steps"])
    assert [e["speedup_vs_ar"] for e in entries if e["method"] == "ar"] == [1.0, 1.0]
    # Bandwidth achieved (weights only): every float32 weight but the untied embedding table,
    # read once per target step, counted here from the config.
    import jaxdec
    cfg = jaxdec.load("demo-target").config
    D, F, L, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.head_dim
    per_layer = D * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * D * F + 2 * D
    weights = 4 * (L * per_layer + D + (0 if cfg.tie_word_embeddings else V * D))
    for e in entries:
        assert e["target_weight_gb_per_s"] == pytest.approx(weights * e["target_steps"] / e["decode_seconds"] / 1e9)
    assert [e["devices"] for e in entries] == [1, 1, 2, 2]
    assert all(e["context_tokens"] == [16, 16] and e["cache_slots"] == [64] for e in entries)
    assert _is_png(tmp_path / "bench_tokens_per_second.png") and _is_png(tmp_path / "bench_scaling_vs_devices.png")
    assert not (tmp_path / "bench_speedup_vs_batch.png").exists()  # one batch size: nothing to plot


def test_decode_benchmark_builds_sparse_self_from_its_name():
    """sparse (budget 1024, --num-tokens), sparse:B (a budget), sparse:BxK (and a draft length).
    (A run end to end compiles SparseSelf for half a minute on a CPU: tests/test_sparse_self.py
    covers its tokens; the benchmark's long-context runs check them against plain decoding.)"""
    from benchmarks import decode
    from jaxdec import spec
    build = lambda name: decode.build_method(name, None, None, 4, [])
    assert build("sparse") == spec.SparseSelf(budget=1024, num_tokens=4)
    assert build("sparse:256") == spec.SparseSelf(budget=256, num_tokens=4)
    assert build("sparse:128x6") == spec.SparseSelf(budget=128, num_tokens=6)
    import jaxdec
    draft = jaxdec.load("demo-draft")
    triforce = decode.build_method("triforce:256x6", None, draft, 4, [])
    assert (triforce.budget, triforce.num_tokens, triforce.draft) == (256, 6, draft)
    assert decode.METHODS["sparse"].startswith("spec.SparseSelf")
    with pytest.raises(ValueError, match="budget"):
        build("sparse:8")


def test_decode_method_options_take_only_their_forms():
    """Each name takes its own count of integers after the colon, and nothing else: a tree's
    shape with a part missing was run with max_nodes' default in its place."""
    from benchmarks import decode
    assert decode.method_options("tree:8x2x8") == ("tree", (8, 2, 8))
    assert decode.method_options("lookup:8") == ("lookup", (8,)) and decode.method_options("ar") == ("ar", ())
    assert decode.method_options("sparse:256x6") == ("sparse", (256, 6))
    for bad, says in [("tree:8x2", "tree takes tree:DxKxN"), ("ar:4", "ar takes no options"),
                      ("lookup:8x4x2", "lookup:K or lookup:KxC"), ("medusa:8x2", "medusa:N"), ("draft:x", "draft:K"),
                      ("tree:", "tree:DxKxN"), ("trees:8", "unknown method 'trees'")]:
        with pytest.raises(ValueError, match=says):
            decode.method_options(bad)
    assert set(decode.METHOD_OPTIONS) == set(decode.METHODS)


def test_decode_prompts_reach_long_contexts_and_fit_the_model():
    """A context longer than a prompt's own is preceded by the other prompts' contexts; one that
    would leave no room for the new tokens is cut."""
    from benchmarks import decode
    import jaxdec
    tokenizer = jaxdec.load("demo-target").tokenizer
    items = decode.load_prompts(["code"])["code"]
    own = len(tokenizer.encode(items[0]["context"]).ids)
    task = tokenizer.encode(items[0]["task"]).ids
    others = [p["context"] for p in items[1:]]
    ids = decode.prompt_ids(tokenizer, items[0], own + 1000, others)
    assert len(ids) == own + 1000 + len(task) and ids[-len(task):] == task
    assert decode.prompt_ids(tokenizer, items[0], own + 1000) == decode.prompt_ids(tokenizer, items[0], own)
    assert len(decode.prompt_ids(tokenizer, items[0], 8000, others, max_tokens=4000)) == 4000


def test_plots_cover_every_swept_axis(tmp_path):
    from benchmarks import plots
    entries = [{"method": m, "mesh": mesh, "category": "code", "context": c, "batch_size": b,
                "tokens_per_second": 100.0 * b * (2 if m == "draft" else 1), "speedup_vs_ar": 2.0 if m == "draft" else 1.0}
               for mesh in ("one device", "data=1,model=2") for c in (16, 64) for b in (1, 4) for m in ("ar", "draft")]
    written = plots.write_plots(entries, tmp_path / "r.json")
    names = sorted(p.name for p in written)
    assert names == sorted(f"r_{n}.png" for n in ("tokens_per_second", "speedup_vs_batch", "speedup_vs_context",
                                                    "scaling_vs_devices"))
    assert all(_is_png(p) for p in written)


def test_prompt_set_has_every_category_and_honours_the_context():
    from benchmarks import decode
    import jaxdec
    prompts = decode.load_prompts(["code", "rewrite", "qa", "free"])
    assert all(len(v) >= 8 for v in prompts.values())
    tokenizer = jaxdec.load("demo-target").tokenizer
    for category, items in prompts.items():
        task = len(tokenizer.encode(items[0]["task"]).ids)
        assert len(decode.prompt_ids(tokenizer, items[0], 100)) == 100 + task, category
        assert len(decode.prompt_ids(tokenizer, items[0], 0)) == task


def test_prompt_builder_writes_every_category_and_refuses_bad_counts(tmp_path, capsys):
    """benchmarks/data/build_prompts.py: the prompt set's shape, as decode.py reads it; its
    code prompts are held-out corpus files (never trained on); a count < 1 is refused (a
    negative one cut from the end of each list)."""
    from benchmarks.data import build_prompts
    from jaxdec.corpus import is_held_out
    build_prompts.main(["--per-category", "2", "--out", str(tmp_path / "p.json")])
    built = json.loads((tmp_path / "p.json").read_text())["categories"]
    assert {k: len(v) for k, v in built.items()} == {"code": 2, "rewrite": 2, "qa": 2, "free": 2}
    assert all(item["context"] and item["task"] for items in built.values() for item in items)
    assert all(is_held_out(item["source"]) for item in built["code"])
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            build_prompts.main(["--per-category", bad, "--out", str(tmp_path / "never.json")])
        assert f"--per-category: must be >= 1, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_decode_benchmark_runs_the_pallas_kernels(tmp_path, monkeypatch):
    """--attn-impl pallas loads the target with the Pallas attention (interpreted on CPU; plain
    decoding only: the speculative loop's program is huge with the interpreted kernel inside)."""
    from benchmarks import decode
    from pallas_kernels import tree_attention as kernel_module
    calls = []
    kernel = kernel_module.tree_attention
    monkeypatch.setattr(kernel_module, "tree_attention", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    out = tmp_path / "bench.json"
    decode.main(["--methods", "ar", "--num-prompts", "1", "--max-new-tokens", "4", "--context", "16",
                 "--repeats", "1", "--attn-impl", "pallas", "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["attn_impl"] == "pallas" and saved["methods"][0]["new_tokens"] == 4
    assert calls  # the kernel was traced into the decoding program


def test_decode_first_differences_measure_the_tie():
    """A row that leaves the reference at new token 3 for the target's second-best token there
    is reported at 3 with the gap between the two best logits (the lower one that far below the
    best); a row that stops after the
    reference's first 4 tokens is reported at 4 with no gap; equal rows are not reported."""
    import jaxdec
    from benchmarks import decode
    target = jaxdec.load("demo-target")
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    reference = jaxdec.generate(target, prompts, max_new_tokens=6, stop_token_ids=[]).tokens
    logits = jaxdec.logits(target, prompts[1] + list(reference[1][:3]))[-1]
    best, second = np.argsort(-logits)[:2]
    assert best == reference[1][3]
    reference = [list(r) for r in reference]
    other = [list(reference[0]), list(reference[1][:3]) + [int(second), 7]]
    got = decode.first_differences(target, prompts, reference, other)
    gap = pytest.approx(float(logits[best] - logits[second]))
    assert got == [{"at": 3, "logit_gap": gap, "below_best": gap}]
    assert "at most" in decode.largest_gap({"first_differences": got})
    stopped = decode.first_differences(target, prompts, reference, [reference[0][:4], reference[1]])
    assert stopped == [{"at": 4, "logit_gap": None, "below_best": None}]
    assert decode.largest_gap({"first_differences": stopped}) == ""


def test_decode_benchmark_casts_every_model_to_its_dtype(tmp_path, loaded_models):
    """--dtype bfloat16: the target, the draft and the heads are all loaded in bfloat16, the
    file records it (and JAX's default matmul precision, which moves numbers too), and the
    target's bandwidth counts 2 bytes per weight."""
    import jax
    import jax.numpy as jnp
    from benchmarks import decode
    loaded = loaded_models
    out = tmp_path / "bench.json"
    with jax.default_matmul_precision("highest"):
        decode.main(["--methods", "ar,draft,medusa", "--num-prompts", "1", "--max-new-tokens", "6", "--context",
                     "16", "--repeats", "1", "--dtype", "bfloat16", "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["dtype"] == "bfloat16"
    assert saved["machine"]["default_matmul_precision"] == "highest"
    assert len(loaded) == 3 and all(leaf.dtype == jnp.bfloat16 for m in loaded for leaf in jax.tree.leaves(m.params))
    target = loaded[0]
    weights = sum(leaf.size for leaf in jax.tree.leaves(target.params)) - target.params["embed_tokens"]["embedding"].size
    for e in saved["methods"]:
        assert e["target_weight_gb_per_s"] == pytest.approx(2 * weights * e["target_steps"] / e["decode_seconds"] / 1e9)


@pytest.mark.parametrize("args", [["--context", "16,x"], ["--batch-size", "0"], ["--category", "poetry"],
                                  ["--mesh", "data=64,model=2"], ["--methods", "ar,telepathy"],
                                  ["--cpu-devices", "0"], ["--methods", "ar,sparse:8"], ["--methods", "sparse:abc"],
                                  ["--attn-impl", "cuda"], ["--temperature", "1", "--top-p", "1.5"],
                                  ["--temperature", "1", "--top-k", "-2"], ["--num-prompts", "0"],
                                  ["--max-new-tokens", "0"], ["--target", "/nonexistent/model"],
                                  ["--methods", "draft", "--draft", "demo-medusa"],
                                  ["--methods", "layerskip", "--skip-layers", "99"], ["--skip-layers", "1,a"],
                                  ["--methods", "ar,tree:8x2"], ["--methods", "eagle:6x2x8x1"], ["--methods", "ar:4"],
                                  ["--methods", "lookup:8x4x2"], ["--methods", "draft:"], ["--methods", "tree:8x-2x8"],
                                  ["--dtype", "float16"]])
def test_decode_benchmark_refuses_bad_settings(args, capsys):
    from benchmarks import decode
    with pytest.raises(SystemExit):
        decode.main(args + ["--no-progress", "--out", "/nonexistent/never-written.json"])
    assert "error" in capsys.readouterr().err


@pytest.mark.torch  # the script's other side is transformers
def test_vs_hf_runs_every_pair_on_identical_weights(tmp_path):
    """HF generate (plain, assistant_model, prompt lookup) against jaxdec's equivalents on the
    exported demo pair, tiny settings: both sides greedy on the same weights, so the same tokens."""
    from benchmarks import vs_hf
    out = tmp_path / "vs.json"
    payload = vs_hf.main(["--num-prompts", "1", "--max-new-tokens", "6", "--batch-sizes", "1", "--repeats", "1",
                          "--context", "32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    assert [r["method"] for r in saved["results"]] == ["plain", "assisted", "lookup"]
    for r in saved["results"]:
        assert r["rows_identical_to_hf"] == 1.0 and r["hf_tokens_per_second"] > 0 and r["jaxdec_tokens_per_second"] > 0
        assert "jaxdec_speedup_vs_plain" in r and "hf_speedup_vs_plain" in r
    assert {"torch", "transformers"} <= set(saved["versions"])


def test_scaling_model_adds_up(tmp_path):
    """One device: no communication, the step is the time to read the weights and the cache.
    More model devices: less memory time each, more communication; the JSON says it is a model."""
    from benchmarks import scaling_model
    from benchmarks.bandwidth import SHAPES
    shape, device = SHAPES["llama3-8b"], scaling_model.DEVICES["h100-nvlink"]
    one = scaling_model.step_seconds(shape, device, model=1, data=1, batch=1, context=0, tokens=1, efficiency=1.0)
    streamed = scaling_model.weight_count(shape) - shape["vocab_size"] * shape["hidden_size"]
    assert one["comms"] == 0 and one["step"] == pytest.approx(2 * streamed / device["hbm"])
    parts = [scaling_model.step_seconds(shape, device, model=m, data=1, batch=1, context=4096, tokens=1)
             for m in (1, 2, 4, 8)]
    assert all(a["memory"] > b["memory"] and a["comms"] <= b["comms"] for a, b in zip(parts, parts[1:]))
    out = tmp_path / "model.json"
    rows = scaling_model.main(["--model-sizes", "1", "2", "--tokens", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert "MODEL, not a measurement" in saved["benchmark"] and len(rows) == 2 == len(saved["rows"])
    assert saved["rows"][0]["speedup_vs_one_device"] == 1.0


def test_prefill_benchmark_runs_and_chunks_use_less_memory(tmp_path):
    from benchmarks import prefill
    out = tmp_path / "prefill.json"
    rows = prefill.main(["--contexts", "256", "--chunks", "0", "64", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == rows and "machine" in saved and "command" in saved
    whole, chunked = rows
    assert whole["one_forward"] and not chunked["one_forward"] and chunked["chunk"] == 64
    assert chunked["temp_bytes"] < whole["temp_bytes"] and all(r["seconds"] > 0 for r in rows)


@pytest.mark.parametrize("args", [["--chunks", "-1"], ["--contexts", "0"], ["--contexts", "8192"]])
def test_prefill_benchmark_refuses_bad_settings(args, capsys):
    from benchmarks import prefill
    with pytest.raises(SystemExit):
        prefill.main(args)
    assert "--c" in capsys.readouterr().err


def test_xla_flags_runs_decode_under_each_setting_and_folds_the_runs(tmp_path):
    """One real decode.py process per setting and pass, each under its own XLA_FLAGS; the
    folded means are those of the runs' own files. Plain decoding alone: each process compiles
    at XLA's full optimization level, and a draft's programs took it from 6 s to 14 s; the
    speedups' arithmetic is test_xla_flags_averages_a_settings_passes'."""
    from benchmarks import xla_flags
    out = tmp_path / "flags.json"
    payload = xla_flags.main(["--settings", "default,single_thread", "--passes", "1", "--out", str(out), "--",
                              "--methods", "ar", "--num-prompts", "1", "--max-new-tokens", "4",
                              "--context", "16", "--repeats", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    runs = payload["runs"]
    assert [(r["setting"], r["pass"]) for r in runs] == [("default", 1), ("single_thread", 1)]
    # Each run's own file says which flags it ran under (not the tests' device-count flag).
    assert [r["run"]["machine"]["xla_flags"] for r in runs] == ["", "--xla_cpu_multi_thread_eigen=false"]
    for r in runs:
        tps = {e["method"]: e["tokens_per_second"] for e in r["run"]["methods"]}
        assert payload["mean_tokens_per_second"][r["setting"]] == tps and set(tps) == {"ar"} and tps["ar"] > 0
        assert payload["speedup_within_setting"][r["setting"]] == {}
    plain = {s: m["ar"] for s, m in payload["mean_tokens_per_second"].items()}
    fastest = max(plain, key=plain.get)
    assert payload["fastest_plain_decoding"] == {"setting": fastest, "tokens_per_second": plain[fastest]}


def test_xla_flags_averages_a_settings_passes():
    from benchmarks import xla_flags
    config = {"category": "code", "context": 256, "batch_size": 1, "mesh": "one device"}
    run = lambda setting, ar, draft: {"setting": setting, "run": {"methods": [
        {"method": "ar", "tokens_per_second": ar, **config}, {"method": "draft:8", "tokens_per_second": draft, **config}]}}
    folded = xla_flags.fold([run("a", 100.0, 150.0), run("b", 120.0, 300.0), run("a", 200.0, 250.0)])
    assert folded["mean_tokens_per_second"] == {"a": {"ar": 150.0, "draft:8": 200.0}, "b": {"ar": 120.0, "draft:8": 300.0}}
    assert folded["speedup_within_setting"] == {"a": {"draft:8": 200.0 / 150.0}, "b": {"draft:8": 300.0 / 120.0}}
    assert folded["speedup_vs_fastest_plain_decoding"] == {"a": {"draft:8": 200.0 / 150.0}, "b": {"draft:8": 2.0}}
    with pytest.raises(ValueError, match="'ar'"):
        xla_flags.fold([{"setting": "a", "run": {"methods": [{"method": "draft:8", "tokens_per_second": 1.0, **config}]}}])
    # Means over runs, never over configurations: a file of two batch sizes is refused.
    two = run("a", 100.0, 150.0)
    two["run"]["methods"][1]["batch_size"] = 8
    with pytest.raises(ValueError, match="one configuration"):
        xla_flags.fold([two])


@pytest.mark.parametrize("args", [["--settings", "turbo"], ["--passes", "0"], ["--", "--out", "x.json"]])
def test_xla_flags_refuses_bad_settings(args, capsys):
    from benchmarks import xla_flags
    with pytest.raises(SystemExit):
        xla_flags.main(args)
    assert "error" in capsys.readouterr().err


def test_sampling_cost_sorts_to_the_same_cut_as_jaxdec():
    """The benchmark's baseline (a vocabulary sort) keeps exactly the tokens jaxdec's bit-by-bit
    cut keeps, on full-size vocabularies: the two implementations check each other."""
    import jax
    import jax.numpy as jnp
    from benchmarks import sampling_cost
    from jaxdec.sampling import SamplingParams, process_logits
    x = 3 * jax.random.normal(jax.random.key(0), (6, 4096), jnp.float32)
    x = x.at[0, :100].set(1.5)  # a tie across the top-k cut
    for top_k, top_p in ((50, 1.0), (0, 0.95), (50, 0.9), (0, 0.3), (4000, 0.999)):
        ours = process_logits(x, SamplingParams.create(0.8, top_k, top_p))
        theirs = sampling_cost.sorted_cut(x / 0.8, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(np.asarray(ours)), np.isfinite(np.asarray(theirs)), err_msg=f"{top_k}, {top_p}")
        assert 0 < np.isfinite(np.asarray(ours)).sum() < x.size


def test_sampling_cost_runs_and_writes_its_results(tmp_path):
    from benchmarks import sampling_cost
    out = tmp_path / "sampling.json"
    results = sampling_cost.main(["--vocab", "256", "--rows", "1", "3", "--filters", "top_p", "--iterations", "2",
                                  "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and len(results) == 2
    assert all(r["cut_us"] > 0 and r["sort_us"] > 0 and r["sort_over_cut"] == pytest.approx(r["sort_us"] / r["cut_us"])
               for r in results)


@pytest.mark.parametrize("args", [["--temperature", "0"], ["--vocab", "0"], ["--rows", "0"], ["--iterations", "0"],
                                  ["--repeats", "0"], ["--filters", "top_z"]])
def test_sampling_cost_refuses_bad_settings(args, capsys):
    from benchmarks import sampling_cost
    with pytest.raises(SystemExit):
        sampling_cost.main(args + ["--out", "/nonexistent/never-written.json"])
    assert args[0] in capsys.readouterr().err


def test_every_results_file_names_the_code_that_made_it(tmp_path):
    import subprocess
    from pathlib import Path
    from benchmarks.common import write_results
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
    saved = json.loads(write_results(tmp_path / "result.json", {"benchmark": "b", "results": [1]}).read_text())
    assert saved["benchmark"] == "b" and saved["results"] == [1]
    assert saved["git"]["commit"] == head.strip() and isinstance(saved["git"]["modified"], list)


def test_git_revision_names_edited_and_uncommitted_code(tmp_path):
    """A result made by an edited file, or by a script not committed yet, says so."""
    import subprocess
    from benchmarks.common import git_revision
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                                    check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "kept.py").write_text("x = 1\n")
    git("add", "kept.py")
    git("commit", "-q", "-m", "one")
    clean = git_revision(tmp_path)
    assert clean["modified"] == [] and clean["untracked_code"] == [] and len(clean["commit"]) == 40
    (tmp_path / "kept.py").write_text("x = 2\n")
    (tmp_path / "new_script.py").write_text("")
    (tmp_path / "notes.txt").write_text("")  # not code
    dirty = git_revision(tmp_path)
    assert dirty["modified"] == ["kept.py"] and dirty["untracked_code"] == ["new_script.py"]
    assert dirty["commit"] == clean["commit"]
