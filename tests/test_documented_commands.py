"""Every shell command the docs, the scripts' docstrings and gpu_session.sh show is one the
program accepts.

A flag renamed in a script but not in the README, or a method name that decode.py no longer
knows, would otherwise be found by a user pasting the command, or by the one timed call of a
lent GPU machine. Each command is parsed by its program's own argument parser, which is then
stopped before any work; decode.py's --methods are also built into spec objects.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "benchmarks/README.md", "checkpoints/README.md"]
GPU_SESSION = "benchmarks/gpu_session.sh"
NOT_OURS = {"pip", "echo", "cd", "export", "mkdir"}  # and `python -m pytest`: pytest's own flags


def shell_blocks(path: Path) -> list[str]:
    """The fenced ```bash / ```sh / ```console blocks of a Markdown file."""
    blocks, lines, inside = [], None, False
    for line in path.read_text().splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and not inside:
            inside, lines = True, [] if fence.group(1) in ("bash", "sh", "console", "shell") else None
        elif fence:
            if lines is not None:
                blocks.append("\n".join(lines))
            inside = False
        elif inside and lines is not None:
            lines.append(line)
    return blocks


def commands(text: str):
    """Each simple command of a shell text, as argv (comments, `&&`, `|` and `;` split off)."""
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s#.*", "", line).strip()
        if line and not line.startswith("#"):
            for part in re.split(r"&&|\|\|?|;", line):
                if part.strip():
                    yield shlex.split(part)


def program(argv: list[str]):
    """(module, args) of a command that runs one of ours, or None for anyone else's. Leading
    `VAR=value`s, `env`, `srun ... env` are the environment, not the program; `[--flag value]`
    in the docs is an optional part, checked like the rest."""
    argv = [a.strip("[]") for a in argv if a not in ("...", "[...]")]
    while argv and (re.match(r"\w+=", argv[0]) or argv[0] in ("env", "srun") or argv[0].startswith("--")):
        argv = argv[1:]
    if not argv or argv[0] in NOT_OURS:
        return None
    if argv[0] == "step":  # gpu_session.sh: step NAME SECONDS COMMAND...
        return program(argv[3:])
    if argv[0] == "jaxdec":
        return "jaxdec.cli", argv[1:]
    if argv[0] == "bash" and argv[1] == GPU_SESSION:
        return GPU_SESSION, []
    if argv[:2] == ["python", "-m"] and argv[2].startswith("jaxdec."):
        return argv[2], argv[3:]
    if argv[:2] == ["python", "-m"] and argv[2] == "pytest":
        return None
    if argv[0] == "python" and argv[1].startswith("benchmarks/") and argv[1].endswith(".py"):
        return argv[1][:-3].replace("/", "."), argv[2:]
    if argv[0] == "python" and argv[1] == "-c":  # gpu_session.sh asks JAX for the GPU's name
        return None
    raise AssertionError(f"a documented command this test does not know how to check: {shlex.join(argv)}")


def docstring_commands(path: Path) -> str:
    """The commands a script's docstring shows (indented `python ...` lines), all but synopses
    with `[optional]` parts and placeholders."""
    text = (ast.get_docstring(ast.parse(path.read_text())) or "").replace("\\\n", " ")
    return "\n".join(line for line in text.splitlines() if line.startswith("    python ") and "[" not in line)


def documented():
    found = []
    for name in DOCS:
        for block in shell_blocks(ROOT / name):
            found += [(name, argv) for argv in commands(block)]
    for path in sorted(ROOT.glob("benchmarks/*.py")) + [ROOT / "jaxdec" / "train.py"]:
        found += [(str(path.relative_to(ROOT)), argv) for argv in commands(docstring_commands(path))]
    # The script's steps only: its other lines are shell plumbing.
    steps = [line for line in (ROOT / GPU_SESSION).read_text().replace("\\\n", " ").splitlines()
             if line.startswith("step ")]
    found += [(GPU_SESSION, argv) for argv in commands("\n".join(steps))]
    return [(name, program(argv), shlex.join(argv)) for name, argv in found if program(argv)]


class Parsed(Exception):
    """Raised in place of running the program, once its arguments parsed."""

    def __init__(self, namespace):
        self.namespace = namespace


def parse(module: str, args: list[str], monkeypatch) -> argparse.Namespace:
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        raise Parsed(parse_args(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(module).main(args)
    return parsed.value.namespace


COMMANDS = documented()


def test_the_docs_show_commands_of_every_kind():
    modules = {module for _, (module, _), _ in COMMANDS}
    assert {"jaxdec.cli", "jaxdec.convert", "jaxdec.export", "jaxdec.train", "benchmarks.decode",
            "benchmarks.verify_cost", "benchmarks.tree_attention", GPU_SESSION} <= modules
    assert sum(source == GPU_SESSION for source, _, _ in COMMANDS) >= 6


@pytest.fixture(scope="module")
def demo_methods():
    """name -> the spec object decode.py builds for it, with the demo checkpoints."""
    import jaxdec
    from benchmarks import decode
    target, draft = jaxdec.load("demo-target"), jaxdec.load("demo-draft")
    heads = {kind: jaxdec.load_heads(f"demo-{kind}") for kind in ("medusa", "eagle")}

    def build(name):  # a ValueError for a bad setting, e.g. tree:16x2x0
        assert name.partition(":")[0] in decode.METHODS, f"decode.py has no method {name!r}"
        return decode.build_method(name, target, draft, 4, [1], heads=heads, pearl_draft=draft)
    return build


RUNS_A_PROGRAM = [c for c in COMMANDS if c[1][0] != GPU_SESSION]  # the script's own steps are in COMMANDS


@pytest.mark.parametrize("source, command, text", RUNS_A_PROGRAM, ids=[f"{s}:{t[:60]}" for s, _, t in RUNS_A_PROGRAM])
def test_documented_command_parses(source, command, text, monkeypatch, demo_methods):
    module, args = command
    parts = [command]
    if module == "benchmarks.xla_flags" and "--" in args:  # what follows "--" goes to decode.py
        parts = [(module, args[:args.index("--")]), ("benchmarks.decode", args[args.index("--") + 1:])]
    for module, args in parts:
        try:
            namespace = parse(module, args, monkeypatch)
        except SystemExit as exit_:  # argparse's error: its message is on stderr
            pytest.fail(f"{source}: `{text}` is refused by {module} (exit {exit_.code})")
        if module == "benchmarks.decode":
            for method in namespace.methods.split(","):
                demo_methods(method)
