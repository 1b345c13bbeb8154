"""The README's Python examples run as written (in order, sharing one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

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
