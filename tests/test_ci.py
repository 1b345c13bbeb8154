"""CI's own scripts: which tests the JAX 0.11 step leaves to the main run."""

from __future__ import annotations

import ast
import collections
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _redundant_module():
    spec = importlib.util.spec_from_file_location("redundant_on_jax_0_11", ROOT / ".ci" / "redundant_on_jax_0_11.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_test_is_left_out_only_while_its_lines_stay_run():
    r = _redundant_module()
    seconds = collections.Counter({"t::slow_twin": 30.0, "t::fast_twin": 20.0, "t::wide": 10.0, "t::alone": 40.0,
                                   "t::quick": 1.0, "tests/test_tree_attention.py::k": 50.0, "t::x": 8.0, "t::y": 7.0})
    lines = {"t::slow_twin": {("a", 1), ("a", 2)}, "t::fast_twin": {("a", 1), ("a", 2)},
             "t::wide": {("a", 1), ("a", 2), ("b", 1)}, "t::alone": {("c", 1), ("a", 1)},
             "t::quick": {("d", 1)}, "tests/test_tree_attention.py::k": {("a", 1)}, "t::x": {("e", 1)},
             "t::y": {("e", 1)}}
    # Of two tests with the same lines, the slower goes; then `wide` still runs them, and the
    # faster twin, now redundant too, goes as well. Of x and y, only x: y is then the last to
    # run its line. `alone` has a line no one else runs; `quick` is under MIN_SECONDS; the
    # kernel module is always kept.
    dropped = r.redundant(lines, seconds)
    assert dropped == ["t::slow_twin", "t::fast_twin", "t::x"]
    kept = [t for t in seconds if t not in dropped]
    assert set().union(*lines.values()) == set().union(*(lines[t] for t in kept))


def test_durations_report_sums_each_tests_phases(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("12.50s call     tests/test_x.py::test_a[1-True]\n0.50s setup    tests/test_x.py::test_a[1-True]\n"
                   "3.00s teardown tests/test_y.py::test_b\n397 passed in 1.00s\n")
    assert _redundant_module().seconds_per_test(str(log)) == {"tests/test_x.py::test_a[1-True]": 13.0,
                                                               "tests/test_y.py::test_b": 3.0}


def test_every_test_the_0_11_step_deselects_exists():
    """A renamed test would silently come back into the step (and its time with it)."""
    script = (ROOT / ".ci" / "suite_on_jax_0_11").read_text()
    deselected = re.findall(r"--deselect '?([^'\s]+)'?", script)
    assert len(deselected) >= 3
    for node in deselected:
        path, name = node.split("::")
        tree = ast.parse((ROOT / path).read_text())
        functions = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert name.split("[")[0] in functions, node
