"""Speculative methods: pass one of these as `jaxdec.generate(..., speculative=...)`.

Each object names a way to draft tokens; the target model verifies them, so every method here
is lossless: greedy output equals plain greedy decoding, sampled output follows the plain
sampling distribution exactly.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable

import jax.numpy as jnp

from jaxdec.cache import init_cache
from jaxdec.drafters.draft_model import DraftModelDrafter, DraftModelState
from jaxdec.drafters.draft_tree import DraftTreeDrafter, DraftTreeState, num_candidates
from jaxdec.drafters.layer_skip import LayerSkipDrafter
from jaxdec.drafters.static_tree import StaticTreeDrafter
from jaxdec.tree import StaticTree as TreeShape
from jaxdec.drafters.prompt_lookup import PromptLookupDrafter
from jaxdec.loading import Model


def _check_positive(name, value, meaning):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({meaning}), got {value!r}")


def _check_num_tokens(num_tokens):
    _check_positive("num_tokens", num_tokens, "draft tokens per step")


def _check_draft_model(method, model, target, num_slots):
    """The checks every separate draft model needs: a jaxdec.Model, the target's vocabulary,
    and room for the cache."""
    if not isinstance(model, Model):
        raise ValueError(f"{method} needs a jaxdec.Model (from jaxdec.load), got {model!r:.60}")
    if target is None:
        return
    draft_vocab, target_vocab = model.config.vocab_size, target.config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"the draft model's vocabulary (vocab_size={draft_vocab}) differs from the "
                         f"target's (vocab_size={target_vocab})")
    if num_slots > model.config.max_position_embeddings:
        raise ValueError(f"{num_slots} cache slots exceed the draft model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
    """A smaller model with the same tokenizer drafts a chain of `num_tokens` tokens.

    Adaptive draft length (both keep the output lossless; `num_tokens` is then the maximum):
    * confidence_threshold > 0: a row stops drafting after a token whose draft top
      probability is below the threshold (a rejection is likely next);
    * adaptive_schedule=True: each row's draft length grows by 2 after a fully accepted draft
      and shrinks by 1 otherwise (Hugging Face's heuristic), between 1 and num_tokens.
    """
    model: Model
    num_tokens: int = 4
    confidence_threshold: float = 0.0
    adaptive_schedule: bool = False

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        if not isinstance(self.confidence_threshold, numbers.Real) or not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold!r}")
        if not isinstance(self.adaptive_schedule, bool):
            raise ValueError(f"adaptive_schedule must be True or False, got {self.adaptive_schedule!r}")
        _check_draft_model("DraftModel", self.model, None, 0)

    def build(self, target: Model, batch_size: int, num_slots: int):
        """(static drafter, draft params, draft state) for `target`."""
        _check_draft_model("DraftModel", self.model, target, num_slots)
        same = self.model.params is target.params
        drafter = DraftModelDrafter(self.model.config, int(self.num_tokens), float(self.confidence_threshold),
                                    bool(self.adaptive_schedule), drafts_with_target=same)
        state = DraftModelState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                                num_tokens=jnp.full((batch_size,), self.num_tokens, jnp.int32))
        return drafter, None if same else self.model.params, state


@dataclasses.dataclass(frozen=True, eq=False)
class DraftTree:
    """A token tree grown from a draft model each round (EAGLE-2 / DySpec style): `depth`
    levels, expanding the `top_k` likeliest frontier nodes by their `top_k` likeliest
    children, scored by cumulative draft log-probability; the best `max_nodes` nodes are
    verified in one target step, and each row keeps the deepest path the target accepts."""
    model: Model
    depth: int = 5
    top_k: int = 4
    max_nodes: int = 32

    def __post_init__(self):
        _check_positive("depth", self.depth, "levels of the tree")
        _check_positive("top_k", self.top_k, "children per expanded node")
        _check_positive("max_nodes", self.max_nodes, "tree nodes verified per step")
        _check_draft_model("DraftTree", self.model, None, 0)
        if self.top_k > self.model.config.vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds the draft's vocabulary ({self.model.config.vocab_size})")
        available = num_candidates(self.depth, self.top_k)
        if self.max_nodes > available:
            raise ValueError(f"max_nodes={self.max_nodes} exceeds the {available} nodes a tree of depth={self.depth} "
                             f"and top_k={self.top_k} scores")

    def build(self, target: Model, batch_size: int, num_slots: int):
        _check_draft_model("DraftTree", self.model, target, num_slots)
        same = self.model.params is target.params
        drafter = DraftTreeDrafter(self.model.config, int(self.depth), int(self.top_k), int(self.max_nodes),
                                   drafts_with_target=same)
        state = DraftTreeState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                               node_slots=jnp.full((batch_size, self.max_nodes), -1, jnp.int32),
                               tree_start=jnp.zeros((batch_size,), jnp.int32))
        return drafter, None if same else self.model.params, state


@dataclasses.dataclass(frozen=True, eq=False)
class StaticTree:
    """A fixed token-tree shape filled in by a draft model each round (Sequoia / Medusa
    style): `paths` lists the nodes as tuples of child ranks, (0,) the root's likeliest
    child, (0, 1) the second likeliest child of that, and so on; every prefix of a path must
    be listed too. Each row keeps the deepest path the target accepts."""
    model: Model
    paths: tuple

    def __post_init__(self):
        _check_draft_model("StaticTree", self.model, None, 0)
        shape = TreeShape(self.paths)  # validates
        if max(shape.ranks) >= self.model.config.vocab_size:
            raise ValueError(f"child rank {max(shape.ranks)} in paths is outside the draft's vocabulary "
                             f"({self.model.config.vocab_size})")
        object.__setattr__(self, "paths", shape.paths)

    @property
    def num_tokens(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    def build(self, target: Model, batch_size: int, num_slots: int):
        _check_draft_model("StaticTree", self.model, target, num_slots)
        same = self.model.params is target.params
        drafter = StaticTreeDrafter(self.model.config, TreeShape(self.paths), drafts_with_target=same)
        state = DraftTreeState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                               node_slots=jnp.full((batch_size, len(self.paths)), -1, jnp.int32),
                               tree_start=jnp.zeros((batch_size,), jnp.int32))
        return drafter, None if same else self.model.params, state


@dataclasses.dataclass(frozen=True)
class LayerSkip:
    """The target itself drafts `num_tokens` tokens with the listed layers skipped."""
    skip_layers: tuple[int, ...]
    num_tokens: int = 4

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        # Only iterables go through tuple(): None or a float would fail there with a TypeError
        # that names nothing.
        layers = tuple(self.skip_layers) if isinstance(self.skip_layers, Iterable) else None
        if layers is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"skip_layers must be a sequence of layer indices, got {self.skip_layers!r}")
        object.__setattr__(self, "skip_layers", tuple(sorted(set(int(i) for i in layers))))

    def build(self, target: Model, batch_size: int, num_slots: int):
        layers = target.config.num_hidden_layers
        bad = [i for i in self.skip_layers if not 0 <= i < layers]
        if bad:
            raise ValueError(f"skipped layer index {bad[0]} is out of range for a model with {layers} layers")
        if len(self.skip_layers) == layers:
            raise ValueError(f"skip_layers={list(self.skip_layers)} skips all {layers} layers: keep at least one to draft with")
        return LayerSkipDrafter(self.skip_layers, int(self.num_tokens)), None, None


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Drafts up to `num_tokens` tokens that followed an earlier match of the last n-gram
    (n = max_ngram down to 1) in the prompt and output so far. Needs no draft model.
    num_candidates > 1: the earliest num_candidates matches each give a continuation, merged
    into a token tree by common prefixes (up to num_candidates * num_tokens nodes)."""
    max_ngram: int = 3
    num_tokens: int = 8
    num_candidates: int = 1

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        _check_positive("max_ngram", self.max_ngram, "longest n-gram searched")
        _check_positive("num_candidates", self.num_candidates, "matches drafted at once")

    def build(self, target: Model, batch_size: int, num_slots: int):
        drafter = PromptLookupDrafter(int(self.max_ngram), int(self.num_tokens), target.config.vocab_size,
                                      int(self.num_candidates))
        return drafter, None, None


METHODS = (DraftModel, DraftTree, StaticTree, LayerSkip, PromptLookup)

__all__ = ["DraftModel", "DraftTree", "StaticTree", "LayerSkip", "PromptLookup"]
