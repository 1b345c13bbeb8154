"""Trained draft heads on the target's own features: Medusa heads and an EAGLE layer.

Both read the target's features (its final hidden states, what its LM head reads) and turn
their outputs into tokens with the target's own LM head (shared and frozen, so a head adds
only a few D x D matrices):

* Medusa (Cai et al., 2024): K heads; head k maps the feature at position t to the token at
  t + 1 + k (the target's own head gives t + 1):
      logits_k(f) = lm_head(f + silu(f W_k + b_k)),  W_k = 0 at initialisation.
  The heads see only f, not the tokens drafted before, so they fill a static tree: every
  node at depth d takes one of head d's top tokens.
* EAGLE (Li et al., 2024): one decoder layer over pairs (feature at t - 1, token at t),
  projected from 2D to D by `fc`; its output predicts the feature at t, which the target's
  LM head turns into the next token's logits and which feeds the next pair when drafting
  deeper. It keeps a one-layer KV cache and grows dynamic trees (EAGLE-2).

On disk (`save_heads` / `load_heads`):
    DIR/heads.json    {"format": 1, "dtype": ..., "config": HeadsConfig.to_dict()}
    DIR/params/       the parameter pytree (orbax)
    DIR/training.json how they were trained (`python -m jaxdec.train medusa|eagle`)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import sharding, storage
from jaxdec.checks import is_int, is_real
from jaxdec.config import ModelConfig
from jaxdec.model import Decoder, forward_hidden, lm_head, random_like, step_hidden

KINDS = ("medusa", "eagle")
HEADS_FILE = storage.HEADS_FILE


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    kind: str                       # "medusa" or "eagle"
    hidden_size: int                # the target's
    vocab_size: int                 # the target's
    num_heads: int = 0              # medusa: K heads, for depths 1..K
    layer: ModelConfig | None = None  # eagle: the one decoder layer (the target's shapes)
    tree: tuple = ()                # medusa: the default tree (paths of child ranks)
    # Held-out accuracy[d][r] after training: how often the target's argmax at depth d + 1 is
    # the draft's rank-r token, on the target's own greedy continuations of held-out prompts
    # when they were measured (what decoding sees), else on held-out corpus text
    # (`best_static_tree` builds Medusa trees of any size from it).
    accuracy: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"heads kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"heads {name} must be a positive integer, got {value!r}")
        if self.kind == "medusa" and not (is_int(self.num_heads) and self.num_heads >= 1):
            raise ValueError(f"Medusa heads need num_heads >= 1, got {self.num_heads!r}")
        # Measured shares: a tree built from anything else would be silently wrong.
        bad = next((a for row in self.accuracy for a in row if not 0.0 <= a <= 1.0), None)
        if bad is not None:
            raise ValueError(f"heads accuracy entries are shares in [0, 1], got {bad!r}")
        if self.kind == "eagle" and self.layer is None:
            raise ValueError("EAGLE heads need the layer's config")
        # The layer reads the target's features and the target's embeddings of the same width;
        # another width failed in JAX, as a TypeError about broadcasting.
        widths = lambda c: (c.hidden_size, c.vocab_size)
        if self.layer is not None and widths(self.layer) != widths(self):
            raise ValueError(f"the EAGLE layer's hidden_size={self.layer.hidden_size} and vocab_size="
                             f"{self.layer.vocab_size} differ from the heads' {self.hidden_size} and {self.vocab_size}")

    @classmethod
    def medusa(cls, target: ModelConfig, num_heads: int, tree=()) -> "HeadsConfig":
        return cls("medusa", target.hidden_size, target.vocab_size, num_heads=num_heads,
                   tree=tuple(tuple(p) for p in tree))

    @classmethod
    def eagle(cls, target: ModelConfig) -> "HeadsConfig":
        layer = dataclasses.replace(target, num_hidden_layers=1, layer_windows=(), attn_impl="xla")
        return cls("eagle", target.hidden_size, target.vocab_size, layer=layer)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_heads": self.num_heads, "layer": None if self.layer is None else self.layer.to_dict(),
                "tree": [list(p) for p in self.tree], "accuracy": [list(a) for a in self.accuracy]}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsConfig":
        d = dict(d)
        if not isinstance(d.get("layer"), (dict, type(None))):
            raise ValueError(f"heads layer must be a model config (an object) or null, got {d['layer']!r:.80}")
        d["layer"] = None if d.get("layer") is None else ModelConfig.from_dict(d["layer"])
        for name, kind, what in (("tree", is_int, "child ranks"), ("accuracy", is_real, "shares")):
            rows = d.get(name) or []
            if not (isinstance(rows, list) and all(isinstance(r, list) and all(map(kind, r)) for r in rows)):
                raise ValueError(f"heads {name} must be a list of lists of {what}, got {rows!r:.80}")
            d[name] = tuple(tuple(r) for r in rows)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Heads:
    """Loaded draft heads: their config and parameters (pass them to `jaxdec.spec.Medusa` or
    `jaxdec.spec.Eagle`)."""
    config: HeadsConfig
    params: Any
    mesh: Any = None  # the jax.sharding.Mesh the parameters live on (None: one device)

    @property
    def kind(self) -> str:
        return self.config.kind


# --------------------------------------------------------------------------- the networks

def init_heads(cfg: HeadsConfig, rng, dtype=jnp.float32, init_std: float = 0.02):
    """Fresh parameters. Medusa: zero residual blocks, so every head starts as the target's
    own next-token head. EAGLE: normal(init_std) weights, unit norms."""
    D = cfg.hidden_size
    if cfg.kind == "medusa":
        return {"w": jnp.zeros((cfg.num_heads, D, D), dtype), "b": jnp.zeros((cfg.num_heads, D), dtype)}
    layer = cfg.layer
    x, positions = jnp.zeros((1, 1, D), dtype), jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: Decoder(layer, read_cache=False).init(
        rng, None, positions, None, jnp.ones((1, 1, 1), bool), inputs=x)["params"])
    fc = jax.ShapeDtypeStruct((2 * D, D), dtype)
    return random_like({"fc": {"kernel": fc}, "layer": shapes}, rng, dtype, init_std)


def medusa_logits(target_cfg: ModelConfig, target_params, params, features):
    """Logits [..., K, V] (float32) of the K heads from features [..., D]."""
    f = features.astype(params["w"].dtype)
    h = f[..., None, :] + jax.nn.silu(jnp.einsum("...d,kde->...ke", f, params["w"]) + params["b"])
    return lm_head(target_cfg, target_params, h.astype(features.dtype))


def eagle_inputs(target_params, params, features, tokens):
    """fc(concat(feature at t - 1, embedding of the token at t)): [B, T, D]."""
    embedding = target_params["embed_tokens"]["embedding"][tokens]
    kernel = params["fc"]["kernel"]
    return jnp.concatenate([features.astype(kernel.dtype), embedding.astype(kernel.dtype)], axis=-1) @ kernel


def eagle_forward(cfg: HeadsConfig, target_params, params, features, tokens, positions, cache, step_mask,
                  extra_visible=None, slots=None, read_cache=True):
    """The EAGLE layer over pairs (features [B, T, D], tokens [B, T]) at `positions`:
    (predicted features [B, T, D], its cache with the pairs' entries written)."""
    x = eagle_inputs(target_params, params, features, tokens)
    return forward_hidden(cfg.layer, params["layer"], None, positions, cache, step_mask, read_cache=read_cache,
                          extra_visible=extra_visible, slots=slots, inputs=x)


def eagle_sequence(cfg: HeadsConfig, target_params, params, features, tokens):
    """Predicted features [B, T, D] over whole sequences with no cache (training): pair t
    is (features[t - 1], tokens[t]), the first pair's feature zeros."""
    B, T = tokens.shape
    shifted = jnp.concatenate([jnp.zeros_like(features[:, :1]), features[:, :-1]], axis=1)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    hidden, _ = step_hidden(cfg.layer, params["layer"], None, positions, None, mask, read_cache=False,
                            inputs=eagle_inputs(target_params, params, shifted, tokens))
    return hidden


# --------------------------------------------------------------------------- on disk

def save_heads(directory, cfg: HeadsConfig, params, training: dict | None = None) -> Path:
    """Writes `directory` atomically (a temporary folder renamed into place)."""
    directory = storage.check_replaceable(directory, HEADS_FILE)
    with storage.written_atomically(directory) as tmp:
        storage.write_params(tmp, jax.device_get(params))
        dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
        (tmp / HEADS_FILE).write_text(json.dumps({"format": storage.FORMAT_VERSION, "dtype": dtype,
                                                  "config": cfg.to_dict()}, indent=2))
        if training is not None:
            (tmp / "training.json").write_text(json.dumps(training, indent=2))
    return directory


def load_heads(path_or_name, *, dtype=None, mesh=None) -> Heads:
    """Loads draft heads saved by `save_heads` (or `python -m jaxdec.train medusa|eagle`), or a
    shipped set by name ("demo-medusa", "demo-eagle"). dtype: None keeps the stored one.
    mesh: the target's mesh (`jaxdec.make_mesh`), to shard the heads like the target."""
    from jaxdec.loading import _resolve
    cast = storage.parse_dtype(dtype)
    directory = _resolve(path_or_name)
    path = directory / HEADS_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no draft heads: {HEADS_FILE} is missing"
                         + (" (it is a model: load it with jaxdec.load)" if (directory / storage.CONFIG_FILE).is_file()
                            else ""))
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != storage.FORMAT_VERSION:
            raise ValueError(f"unknown heads format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        cfg = HeadsConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"unreadable heads config {path}: {err}") from err
    params = storage.read_params(directory, cast)
    want = jax.eval_shape(lambda: init_heads(cfg, jax.random.key(0)))
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if shapes(want) != shapes(params):
        raise ValueError(f"the parameters in {directory / storage.PARAMS_DIR} do not match {path}")
    return heads_on_mesh(Heads(cfg, params), mesh)


def heads_on_mesh(heads: Heads, mesh) -> Heads:
    """The heads with their parameters sharded over `mesh` like the target's (None: as they are)."""
    if mesh is None:
        return heads
    from jaxdec.loading import checked_mesh
    mesh = checked_mesh(mesh)
    cfg = heads.config
    if cfg.layer is not None:
        cfg = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, mesh=mesh))
    return Heads(cfg, sharding.place_params(mesh, heads.params, cfg.layer.head_dim if cfg.layer else 1), mesh)


def check_heads_fit(heads: Heads, target) -> None:
    """The heads were built for a target of this hidden size and vocabulary (ValueError if not)."""
    cfg = heads.config
    for name in ("hidden_size", "vocab_size"):
        mine, theirs = getattr(cfg, name), getattr(target.config, name)
        if mine != theirs:
            raise ValueError(f"the {cfg.kind} heads were trained for a target with {name}={mine}, "
                             f"this target has {name}={theirs}")
    check_same_mesh(f"the {cfg.kind} heads", heads.mesh, target)


def check_same_mesh(what: str, mesh, target) -> None:
    """A drafter runs inside the target's jitted rounds, so it must live on the same devices."""
    if mesh != target.config.mesh:
        where = lambda m: "one device" if m is None else f"mesh {dict(m.shape)} of devices {[d.id for d in m.devices.flat]}"
        raise ValueError(f"{what} are on {where(mesh)} but the target is on {where(target.config.mesh)}: "
                         f"load both with the same mesh=")


def cast_params(params, dtype):
    """The heads' parameters in the target's dtype (float32 heads on a bfloat16 target)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)


def best_static_tree(accuracy, num_nodes: int) -> tuple:
    """The tree of `num_nodes` nodes with the largest expected accepted length, if the token
    at depth d is head d's rank-r token with probability accuracy[d - 1][r], independently
    (Medusa's construction): greedily add the child whose path is likeliest. Paths of ranks."""
    accuracy = np.asarray(accuracy, np.float64)
    depth, width = accuracy.shape
    chosen, frontier = [], {(r,): accuracy[0, r] for r in range(width)}
    while len(chosen) < num_nodes and frontier:
        path = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))
        value = frontier.pop(path)
        chosen.append(path)
        if len(path) < depth:
            for r in range(width):
                frontier[path + (r,)] = value * accuracy[len(path), r]
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))
