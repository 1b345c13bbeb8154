"""Shared bits of the benchmarks: machine/version metadata and the results file."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import jax
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "processes": jax.process_count(),  # > 1: the devices of that many hosts, "host" is process 0's
        # Not on the command line, yet it changes the numbers (device count, CPU code paths).
        "xla_flags": os.environ.get("XLA_FLAGS"),
        # None is the backend's default: TF32 on recent GPUs, one bfloat16 pass on TPUs.
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def versions(*extra: str) -> dict:
    import importlib.metadata as md
    names = ("jax", "jaxlib", "flax", "jaxdec", *extra)
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_revision(root: Path | None = None) -> dict:
    """The repository's commit, the tracked files that differ from it, and untracked code files
    (a script not committed yet made the result; None outside git)."""
    import subprocess
    root = root or Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10,
                                        check=True).stdout
        changed = run("status", "--porcelain", "--untracked-files=no").splitlines()  # "XY path"
        untracked = run("ls-files", "--others", "--exclude-standard", "--", "*.py", "*.sh").splitlines()
        return {"commit": run("rev-parse", "HEAD").strip(), "modified": [line[3:] for line in changed if line.strip()],
                "untracked_code": untracked}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None, "untracked_code": None}


def results_path(text: str) -> str:
    """argparse type of every --out: a path the results cannot be written to is refused at
    once, not after the whole run (the folders up to it are made at the end). The text is
    kept as given (it is recorded in some results files)."""
    import argparse
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the results file's path (a .json)")
    ancestor = next(p for p in (path.parent.absolute(), *path.parent.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {ancestor} is not a folder this user may write in")
    return text


@contextlib.contextmanager
def refused_in_one_line(parser, prefix: str = ""):
    """Bad settings or inputs the block raises (ValueError; FileNotFoundError: a missing
    checkpoint) end as argparse's one-line error, exit status 2, not as a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"{prefix}{err}")


def streamed_weight_bytes(model) -> int:
    """Bytes of weights one forward reads: every parameter but the embedding table, of which a
    step reads a row or a few (unless it is tied to the LM head, which reads it all)."""
    import jax
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    return total - (0 if model.config.tie_word_embeddings else model.params["embed_tokens"]["embedding"].nbytes)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(path, payload: dict) -> Path:
    """Writes a benchmark's JSON with the git revision it was measured at (`git_revision`;
    a payload may hold its own, as xla_flags.py's does, which returns it), so every results
    file names the code that made it."""
    from jaxdec.storage import write_json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, payload if "git" in payload else {**payload, "git": git_revision()})


def results_payload(benchmark: str, args, rows: list, skip=("out",), **extra_options) -> dict:
    """What every benchmark's JSON holds: its name, the command, machine and versions, the
    options it ran with (`args` without `skip`, plus `extra_options`) and rows (write_results
    adds the git revision)."""
    options = {k: v for k, v in vars(args).items() if k not in skip} | extra_options
    return {"benchmark": benchmark, "command": command_line(), "machine": machine_info(), "versions": versions(),
            "options": options, "results": rows}
