"""The on-disk format of a converted checkpoint, read by `jaxdec.load`, written by the converter.

    DIR/jaxdec_config.json   {"format": 1, "dtype": ..., "config": ModelConfig as HF-named keys}
    DIR/params/              the parameter pytree (orbax)
    DIR/tokenizer.json ...   the Hugging Face tokenizer files, when the source had them
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxdec.config import ModelConfig

CONFIG_FILE = "jaxdec_config.json"
HEADS_FILE = "heads.json"  # what a folder of draft heads holds instead (jaxdec.heads)
PARAMS_DIR = "params"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(dtype) -> jnp.dtype | None:
    """None, "float32" or "bfloat16" (or the jnp dtypes) -> a jnp dtype or None."""
    if dtype is None:
        return None
    try:  # a type (jnp.bfloat16, np.float32) or a dtype; numpy's TypeError for anything else (5, True)
        name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
    return jnp.dtype(DTYPES[name])


def write_json(path, obj) -> Path:
    """`obj` as indented JSON at `path`, all or nothing: written beside it, then renamed over
    it, so an interrupted run never leaves a half-written file that a later one reads."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ConversionError(ValueError):
    """A refusal of convert / export, with a one-line reason (the CLIs print it alone)."""


def check_destination(dst, overwrite: bool) -> Path:
    """`dst` may be written by convert / export: it does not exist, or is an empty folder, or
    is a folder and `overwrite` is set. A file is never replaced by a folder: a path such as
    .../model.safetensors is a slip, not a request."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} is a file, not a folder: give the folder to write")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"destination {dst} exists and is not empty (pass --overwrite to replace it)")
    check_makeable(dst, ConversionError)
    return dst


def check_makeable(folder, error=ValueError) -> None:
    """`error` when the folder does not exist and cannot be made because a file stands where
    one of its parents would: checked before the work, not found when the folder is made at the end."""
    folder = Path(folder)
    ancestor = next(p for p in folder.absolute().parents if p.exists())
    if not folder.exists() and not ancestor.is_dir():
        raise error(f"{folder} cannot be made: {ancestor} is a file")


def check_not_source(dst, src) -> None:
    """ConversionError when `dst` is `src` or a folder holding it: writing it replaces the
    whole folder (with --overwrite), the source with it."""
    if Path(dst).resolve() in (Path(src).resolve(), *Path(src).resolve().parents):
        raise ConversionError(f"destination {dst} is or holds the source folder {src}: choose another folder")


def check_replaceable(directory, marker: str) -> Path:
    """`directory` may be replaced by an export: it does not exist, or is an empty folder, or
    holds `marker` (what an earlier export wrote). Anything else is refused before a byte is
    deleted: an export's target is removed whole, and `--out .` must not take the user's folder."""
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and (not any(directory.iterdir())
                                                          or (directory / marker).is_file())):
        raise ValueError(f"{directory} exists and is not an export of this kind (no {marker}): "
                         f"refusing to replace it; choose another output folder")
    check_makeable(directory)
    return directory


@contextlib.contextmanager
def written_atomically(dst):
    """Yields an empty temporary folder beside `dst` to write into; when the block ends, the
    folder replaces `dst` (or is removed, if the block raised). A failed or interrupted export
    leaves the old `dst` (or no `dst`), never a half-written one."""
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as err:  # a read-only or missing file system, no permission
        raise ConversionError(f"cannot write {dst}: {err}") from err
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay with the export: the mode mkdir gives
    try:
        yield tmp
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, dst: Path) -> None:
    """Moves `new` to `dst`; an old `dst` is moved aside first and deleted only afterwards,
    so a crash in between leaves the old checkpoint (as .NAME.old-*) rather than nothing."""
    if not dst.exists():
        new.rename(dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    dst.rename(old)
    try:
        new.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old)  # a folder: check_destination / check_replaceable refuse a file


def write_params(directory: Path, params) -> None:
    """The parameter pytree into DIR/params (orbax); `read_params` reads it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save((directory / PARAMS_DIR).absolute(), params)


def save(directory: Path, cfg: ModelConfig, params, dtype: str) -> None:
    write_params(directory, params)
    (Path(directory) / CONFIG_FILE).write_text(
        json.dumps({"format": FORMAT_VERSION, "dtype": dtype, "config": cfg.to_dict()}, indent=2))


def refuse_heads(directory: Path, instead: str) -> None:
    """For readers of a model: a folder of draft heads is named as such (with `instead`, what
    to do with it), not reported as a model missing its config."""
    if (Path(directory) / HEADS_FILE).is_file():
        raise ValueError(f"{directory} holds draft heads, not a model: {instead}")


def read_config(directory: Path) -> tuple[ModelConfig, str]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a jaxdec checkpoint: {CONFIG_FILE} is missing "
                         f"(convert Hugging Face folders with `python -m jaxdec.convert`)")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):  # valid JSON, but .get below would raise AttributeError
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
        return ModelConfig.from_dict(meta["config"]), meta["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"unreadable checkpoint config {path}: {err}") from err


def check_params(directory: Path, cfg: ModelConfig, params) -> None:
    """The stored parameters must be exactly the tree the config describes.

    Otherwise a config that does not match its weights loads fine and fails later inside the
    model with a Flax error (or, with fewer layers than stored, silently ignores weights).
    """
    from jaxdec.model import init_params  # local: only needed to trace the expected shapes
    try:
        expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    except Exception as err:  # e.g. a size that is not an integer
        raise ValueError(f"the config in {Path(directory) / CONFIG_FILE} describes no valid model: {err}") from err

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}

    want, got = shapes(expected), shapes(params)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise ValueError(
                f"the parameters in {Path(directory) / PARAMS_DIR} do not match {CONFIG_FILE}: {name} is "
                f"stored as {got.get(name, 'absent')}, the config implies {want.get(name, 'absent')}")


def read_params(directory: Path, dtype=None):
    path = (Path(directory) / PARAMS_DIR).absolute()
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            params = checkpointer.restore(path)
    except Exception as err:  # orbax raises many types for damaged folders
        raise ValueError(f"unreadable checkpoint parameters {path}: {err}") from err
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return params
