"""The README's Python examples run as written (in order, sharing one namespace), and so does
examples/quickstart.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import jaxdec

README = Path(__file__).resolve().parent.parent / "README.md"
MAX_NEW_TOKENS = 16  # the examples' own lengths (up to 128) only add decoding time to the suite


def test_readme_python_examples_run(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    generate = jaxdec.generate
    calls = []

    def shorter(*args, max_new_tokens=128, **kwargs):
        calls.append(kwargs.get("speculative"))
        return generate(*args, max_new_tokens=min(max_new_tokens, MAX_NEW_TOKENS), **kwargs)

    monkeypatch.setattr(jaxdec, "generate", shorter)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = namespace["out"]
    assert len(out.tokens) == 2 and out.stats.mean_accepted >= 1.0
    assert {type(method).__name__ for method in calls if method is not None} >= {
        "DraftModel", "DraftTree", "Medusa", "Eagle", "LayerSkip", "PromptLookup", "SparseSelf"}


@pytest.mark.torch
def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py, as the README tells a newcomer to run it: build, convert, decode,
    and compare with transformers (the script exits 1 when the tokens differ)."""
    script = README.parent / "examples" / "quickstart.py"
    done = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical to transformers' greedy output: True" in done.stdout
