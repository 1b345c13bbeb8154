"""The benchmark scripts' arithmetic, and a smoke run of the round-cost benchmark at a tiny shape."""

import json

import pytest

from benchmarks import verify_cost


def test_expected_tokens_matches_the_geometric_series():
    for a in (0.0, 0.3, 0.6, 0.8, 0.99):
        for k in range(1, 9):
            # 1 + a + ... + a**k: the prefix accepted with probability a**i, plus the target's token.
            assert verify_cost.expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
    assert verify_cost.expected_tokens(1.0, 4) == 5.0


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
    best = result["formula_speedup"]["0.8"]
    assert best["best_speedup"] == max(best["per_num_drafts"].values())
    assert "command" in saved and "machine" in saved and "versions" in saved


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
