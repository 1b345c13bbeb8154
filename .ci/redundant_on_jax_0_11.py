"""Which slow tests the JAX 0.11 leg (.ci/suite_on_jax_0_11) can leave to the main run: those
whose every line of jaxdec/, pallas_kernels/ and benchmarks/ other tests of the leg also run.

The leg is there to run the project's code under the GPU machines' JAX; a test that runs no
line another does not adds nothing to that (it still runs in the main leg, under JAX 0.10).
From a coverage run of the leg with one context per test (in a venv made as the leg makes
its own, plus `pip install coverage pytest-cov`):

    COVERAGE_FILE=/tmp/cov/.coverage <venv>/bin/python -m pytest -q -n 2 -m "not torch" tests \\
        --durations=0 --cov=jaxdec --cov=pallas_kernels --cov=benchmarks --cov-context=test \\
        --cov-report= <the leg's --deselect arguments> > /tmp/cov/run.log
    <venv>/bin/python .ci/redundant_on_jax_0_11.py /tmp/cov/.coverage /tmp/cov/run.log

it prints the tests to deselect, slowest first, each dropped only while every one of its
lines stays run by a test still kept. Kept whatever their lines: tests under MIN_SECONDS, the
kernel modules (the Pallas and Mosaic interpreters and lowerings differ between JAX versions
for the same lines, shape by shape), and tests that run the project in subprocesses (their
lines are not measured).
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

MIN_SECONDS = 5.0
ALWAYS_KEPT = ("tests/test_tree_attention.py", "tests/test_decode_attention.py", "tests/test_sparse_attention.py",
               "tests/test_sharding.py::test_two_processes_run_the_cli_as_one_program")


def lines_per_test(coverage_file: str) -> dict[str, set]:
    """{node id: {(path, line number)}} from a coverage file with pytest-cov's test contexts."""
    from coverage import CoverageData  # not a dependency of the project: only this script needs it
    data = CoverageData(basename=coverage_file)
    data.read()
    lines = collections.defaultdict(set)
    for path in data.measured_files():
        for number, contexts in (data.contexts_by_lineno(path) or {}).items():
            for context in filter(None, contexts):  # "" is code run outside any test
                lines[context.rsplit("|", 1)[0]].add((path, number))  # "<node id>|setup", "|run", "|teardown"
    return lines


def seconds_per_test(durations_log: str) -> collections.Counter:
    """{node id: seconds of setup, call and teardown} from pytest's --durations=0 report."""
    seconds = collections.Counter()
    for line in Path(durations_log).read_text().splitlines():
        found = re.match(r"([0-9.]+)s (?:setup|call|teardown)\s+(\S.*)$", line.strip())
        if found:
            seconds[found.group(2)] += float(found.group(1))
    return seconds


def redundant(lines: dict[str, set], seconds: collections.Counter) -> list[str]:
    """The tests to leave out, slowest first: each one's lines are all run by tests kept."""
    runs = collections.Counter(line for test in seconds for line in lines.get(test, ()))
    dropped = []
    for test in sorted(seconds, key=seconds.get, reverse=True):
        mine = lines.get(test, set())
        if seconds[test] < MIN_SECONDS or test.startswith(ALWAYS_KEPT) or not mine:
            continue
        if all(runs[line] >= 2 for line in mine):
            dropped.append(test)
            runs.subtract(mine)
    return dropped


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    seconds = seconds_per_test(sys.argv[2])
    tests = redundant(lines_per_test(sys.argv[1]), seconds)
    for test in tests:
        print(f"    --deselect '{test}'  # {seconds[test]:.0f} s")
    print(f"{len(tests)} tests, {sum(seconds[t] for t in tests):.0f} of {sum(seconds.values()):.0f} s", file=sys.stderr)
