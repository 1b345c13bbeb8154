"""`jaxdec.Model` and `jaxdec.load`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from jax.sharding import AxisType, Mesh

from jaxdec import sharding, storage
from jaxdec.config import ModelConfig

SHIPPED_CHECKPOINTS = ("demo-target", "demo-draft", "demo-medusa", "demo-eagle")
ATTN_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: hyper-parameters, the parameter pytree and the tokenizer (or None)."""
    config: ModelConfig
    params: Any
    tokenizer: Any = None  # tokenizers.Tokenizer

    @property
    def attn_impl(self) -> str:
        return self.config.attn_impl

    @property
    def dtype(self):
        return self.params["embed_tokens"]["embedding"].dtype

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_id


def _shipped_roots() -> list[Path]:
    """Where the shipped checkpoints may live: the package `jaxdec.checkpoints` (the top-level
    `checkpoints/` folder, installed under that name by pyproject.toml in both editable and
    regular installs), then the `checkpoints/` folder of a source checkout (no install)."""
    roots = []
    try:
        from importlib.resources import files
        roots.append(Path(str(files("jaxdec.checkpoints"))))
    except (ImportError, TypeError, ValueError):  # not installed (e.g. an uninstalled checkout)
        pass
    roots.append(Path(__file__).resolve().parent.parent / "checkpoints")
    return roots


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No checkpoint at the path or name given: a missing file, and bad input to `load`, so
    callers catching either (API.md: bad input raises ValueError) see it."""


def _resolve(path_or_name) -> Path:
    # "" would be Path("") == ".", the working directory: an unset variable, not a choice of it.
    if not isinstance(path_or_name, (str, os.PathLike)) or str(path_or_name) == "":
        raise ValueError(f"expected a checkpoint directory or a shipped name ({', '.join(map(repr, SHIPPED_CHECKPOINTS))}), "
                         f"got {path_or_name!r:.80}")
    path = Path(path_or_name).expanduser()
    if path.is_file():  # one of a checkpoint's files given for its folder, say
        raise ValueError(f"{path} is a file; a checkpoint is a directory (a converted model's, or draft heads')")
    shipped_name = str(path_or_name) in SHIPPED_CHECKPOINTS
    if path.exists():
        # A local path wins over a shipped name (as in Hugging Face's from_pretrained); a folder
        # that merely has the name would otherwise be reported as a broken checkpoint.
        if shipped_name and not any((path / f).is_file() for f in (storage.CONFIG_FILE, storage.HEADS_FILE)):
            raise ValueError(f"{path.resolve()} is not a checkpoint, and it shadows the shipped {str(path_or_name)!r}: "
                             f"a local path wins over a shipped name; run from another folder or rename that one")
        return path
    if shipped_name:
        roots = _shipped_roots()
        for root in roots:
            shipped = root / str(path_or_name)
            if shipped.is_dir():  # a damaged one then fails in read_config with ValueError
                return shipped
        raise CheckpointNotFoundError(f"shipped checkpoint {path_or_name!r} is not installed "
                                      f"(looked in {', '.join(map(str, roots))})")
    raise CheckpointNotFoundError(f"no checkpoint at {path_or_name!r} (a converted directory, "
                                  f"or one of the shipped names {SHIPPED_CHECKPOINTS})")


def read_tokenizer(directory: Path):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer` (None without one)."""
    from tokenizers import Tokenizer
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"unreadable tokenizer {path}: {err}") from err


def load(path_or_name, *, dtype=None, mesh=None, attn_impl=None) -> Model:
    """Loads a converted checkpoint (see `python -m jaxdec.convert`) or a shipped one by name.

    dtype: None keeps the stored dtype; "float32" or "bfloat16" casts on load.
    mesh: a jax.sharding.Mesh with axes ("data", "model"), as `jaxdec.make_mesh` makes (Explicit
    axes are taken as Auto): the parameters are sharded over it by
    `jaxdec.sharding.RULES` and every step runs on it; None means one device.
    attn_impl: "xla" (the jax.numpy reference) or "pallas" (the Pallas tree-attention kernel for
    every full-attention layer that reads the cache; interpret mode on CPU, which is slow and
    meant for checking); None picks "xla".
    """
    if attn_impl is None:
        attn_impl = "xla"
    if not isinstance(attn_impl, str) or attn_impl not in ATTN_IMPLS:  # (an array's `in` compares elementwise)
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS} or None, got {attn_impl!r}")
    if mesh is not None:
        mesh = checked_mesh(mesh)
    cast = storage.parse_dtype(dtype)
    directory = _resolve(path_or_name)
    storage.refuse_heads(directory, "load it with jaxdec.load_heads")
    cfg, _ = storage.read_config(directory)
    params = storage.read_params(directory, cast)
    storage.check_params(directory, cfg, params)
    cfg = dataclasses.replace(cfg, attn_impl=attn_impl)
    return on_mesh(Model(config=cfg, params=params, tokenizer=read_tokenizer(directory)), mesh)


def checked_mesh(mesh) -> Mesh:
    """The mesh to place a model on, ValueError if it cannot be one: its axes are made Auto
    (jax.make_mesh makes Explicit ones, under which every step's sharding constraints and
    gathers would need an out_sharding of their own; Auto leaves them to XLA, as on
    jaxdec.make_mesh's meshes)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (jaxdec.make_mesh) or None, got {mesh!r:.80}")
    if tuple(mesh.axis_names) != sharding.AXES:
        raise ValueError(f"mesh axes must be {sharding.AXES} (jaxdec.make_mesh), got {tuple(mesh.axis_names)}")
    sharding.check_distinct(list(mesh.devices.flat), "mesh")
    # Every process runs the same program over the mesh (README, "Sharding"), so each must hold
    # a part of it; checked alike on every process, so that all of them stop here together.
    held = sorted({d.process_index for d in mesh.devices.flat})
    if len(held) != jax.process_count():
        raise ValueError(f"mesh data={mesh.shape['data']} x model={mesh.shape['model']} holds devices of process"
                         f"{'es' * (len(held) > 1)} {', '.join(map(str, held))} only; in a multi-process run it must span all "
                         f"{jax.process_count()} processes (jax.devices() lists {jax.device_count()})")
    if any(kind != AxisType.Auto for kind in mesh.axis_types):
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return mesh


def on_mesh(model: Model, mesh) -> Model:
    """The model with its parameters sharded over `mesh` (None: as it is)."""
    if mesh is None:
        return model
    params = sharding.place_params(mesh, model.params, model.config.head_dim)
    return dataclasses.replace(model, config=dataclasses.replace(model.config, mesh=mesh), params=params)


def model_from_params(cfg: ModelConfig, params, tokenizer=None) -> Model:
    """Wraps in-memory parameters (e.g. `jaxdec.model.init_params`) as a Model."""
    return Model(config=cfg, params=jax.tree_util.tree_map(jax.numpy.asarray, params), tokenizer=tokenizer)
