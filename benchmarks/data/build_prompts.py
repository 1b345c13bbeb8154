"""Builds benchmarks/data/prompts.json, the benchmark's prompt set, from text on the machine.

    python benchmarks/data/build_prompts.py [--per-category 12]

Four Spec-Bench-like categories, each prompt a long `context` and a short `task` after it
(`benchmarks/decode.py --context N` keeps the last N tokens of the context):
  code     held-out files of the demo corpus (stdlib Python, split as in `jaxdec.train`):
           the file up to a function, then the function's `def` line to continue;
  rewrite  the file up to a function and the function, then asked for again with comments
           added, its header given: editing with long context, the output repeats it;
  qa       a passage of English prose (the licences in /usr/share/common-licenses, IDLE's
           text files in the stdlib: none of it is Python, so none is in the demo corpus),
           then a question about it;
  free     the same prose sources, continued from the start of a paragraph.
The output is deterministic: the same machine gives the same file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from benchmarks.common import results_path  # noqa: E402
from jaxdec.cli import POSITIVE  # noqa: E402

OUT = Path(__file__).resolve().parent / "prompts.json"
CONTEXT_CHARS = 12000  # about 4k tokens of the demo tokenizer on code, more than any --context used
PROSE_DIRS = ("/usr/share/common-licenses",)
QUESTIONS = ("What is the passage above about? Answer in one sentence.",
             "Quote the sentence of the passage that matters most, word for word.",
             "Which names, programs or documents does the passage mention?",
             "Summarise the passage in two sentences.")


def functions(per_category: int):
    """(file, text before a function, the function) from held-out corpus files, evenly spread."""
    from jaxdec.corpus import corpus_files, is_held_out
    files, _ = corpus_files()
    found = []
    for path, text in files:
        if not is_held_out(path):
            continue
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not re.match(r"\s*def \w+\(.*\):\s*$", line):
                continue
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            body = "".join(lines[i:end])
            before = "".join(lines[:i])
            if end - i >= 6 and len(body) <= 1200 and len(before) >= 2000:
                found.append((path, before[-CONTEXT_CHARS:], body))
    # Two functions from each of `per_category` files spread over the corpus (one for code,
    # one for rewrite), so no single large file dominates.
    by_file = {}
    for item in found:
        by_file.setdefault(item[0], []).append(item)
    names = [n for n in sorted(by_file) if len(by_file[n]) >= 2]
    names = names[::max(1, len(names) // per_category)][:per_category]
    return [by_file[n][len(by_file[n]) * j // 3] for n in names for j in (1, 2)]


def prose_paragraphs():
    """(source, paragraphs) of every prose file: licences, IDLE's text files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for d in PROSE_DIRS for p in Path(d).glob("*") if p.is_file() and not p.is_symlink())
    paths += sorted((stdlib / "idlelib").glob("*.txt"))
    out = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 200]
        if len(paragraphs) >= 4:
            out.append((str(path), paragraphs))
    return out


def build(per_category: int) -> dict:
    code = functions(per_category)
    prompts = {"code": [], "rewrite": [], "qa": [], "free": []}
    for i, (path, before, body) in enumerate(code):
        header = body.splitlines(keepends=True)[0]
        if i % 2 == 0:
            prompts["code"].append({"source": path, "context": before, "task": header})
        else:
            prompts["rewrite"].append({"source": path, "context": before + body + "\n",
                                       "task": f"# The same function again, with comments added:\n{header}"})
    sources = prose_paragraphs()
    for i in range(2 * per_category):
        path, paragraphs = sources[i % len(sources)]
        # Each time round a source, start a few paragraphs further; take paragraphs until the
        # context is long, keeping one after it for the free-text task.
        start = (i // len(sources)) * 3 % max(1, len(paragraphs) - 4)
        at = start + 2
        while at < len(paragraphs) - 1 and len("\n\n".join(paragraphs[start:at])) < CONTEXT_CHARS:
            at += 1
        context = "\n\n".join(paragraphs[start:at])[-CONTEXT_CHARS:] + "\n\n"
        if i % 2 == 0:
            question = QUESTIONS[(i // 2) % len(QUESTIONS)]
            prompts["qa"].append({"source": path, "context": context, "task": f"Question: {question}\nAnswer:"})
        else:
            first = " ".join(paragraphs[at].split()[:6])
            prompts["free"].append({"source": path, "context": context, "task": first})
    return {"about": __doc__.split("\n\n")[0], "built_by": "python benchmarks/data/build_prompts.py",
            "categories": {k: v[:per_category] for k, v in prompts.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-category", type=POSITIVE, default=12)
    parser.add_argument("--out", type=results_path, default=str(OUT))
    args = parser.parse_args(argv)
    data = build(args.per_category)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in data["categories"].items()))


if __name__ == "__main__":
    main()
