"""Speculative methods: pass one of these as `jaxdec.generate(..., speculative=...)`.

Each object names a way to draft tokens; the target model verifies them, so every method here
is lossless: greedy output equals plain greedy decoding, sampled output follows the plain
sampling distribution exactly. The one exception says so in its name: `LossySparseDecode`
verifies nothing (sparse attention in plain decoding, an explicit opt-in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax.numpy as jnp

from jaxdec import sharding
from jaxdec.cache import init_cache
from jaxdec.checks import check_draft_window, is_int, is_real
from jaxdec.drafters.draft_model import DraftModelDrafter, DraftModelState
from jaxdec.drafters.draft_tree import DraftTreeDrafter, DraftTreeState, num_candidates
from jaxdec.drafters.layer_skip import LayerSkipDrafter
from jaxdec.drafters.sparse_self import SparseSelfDrafter
from jaxdec.drafters.triforce import TriForceDrafter, TriForceState
from jaxdec.drafters.static_tree import StaticTreeDrafter
from jaxdec.tree import StaticTree as TreeShape
from jaxdec.drafters.prompt_lookup import PromptLookupDrafter
from jaxdec.drafters.medusa import FeatureState, MedusaDrafter
from jaxdec.drafters.eagle import EagleDrafter, EagleState
from jaxdec.heads import Heads, cast_params, check_heads_fit, check_same_mesh
from jaxdec.loading import Model
from jaxdec.sparse import init_pages


def _check_positive(name, value, meaning):
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({meaning}), got {value!r}")


def _check_num_tokens(num_tokens):
    _check_positive("num_tokens", num_tokens, "draft tokens per step")


def _check_draft_model(method, model, target, same_devices=True):
    """The checks every separate draft model needs: a jaxdec.Model and the target's
    vocabulary (room for a call's positions: `draft_contexts`)."""
    if not isinstance(model, Model):
        raise ValueError(f"{method} needs a jaxdec.Model (from jaxdec.load), got {model!r:.60}")
    if target is None:
        return
    draft_vocab, target_vocab = model.config.vocab_size, target.config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"the draft model's vocabulary (vocab_size={draft_vocab}) differs from the "
                         f"target's (vocab_size={target_vocab})")
    if same_devices:
        check_same_mesh("the draft model's parameters", model.config.mesh, target)


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
        if not is_real(self.confidence_threshold) or not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold!r}")
        if not isinstance(self.adaptive_schedule, bool):
            raise ValueError(f"adaptive_schedule must be True or False, got {self.adaptive_schedule!r}")
        _check_draft_model("DraftModel", self.model, None)

    def build(self, target: Model, batch_size: int, num_slots: int):
        """(static drafter, draft params, draft state) for `target`."""
        _check_draft_model("DraftModel", self.model, target)
        # Before the state below: a num_tokens past int64 would be an OverflowError there.
        check_draft_window("DraftModel", int(self.num_tokens), target.config.max_position_embeddings)
        same = self.model.params is target.params
        drafter = DraftModelDrafter(self.model.config, int(self.num_tokens), float(self.confidence_threshold),
                                    bool(self.adaptive_schedule), drafts_with_target=same)
        state = DraftModelState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                                num_tokens=jnp.full((batch_size,), self.num_tokens, jnp.int32))
        return drafter, None if same else self.model.params, state


@dataclasses.dataclass(frozen=True, eq=False)
class Pearl:
    """A draft model on devices of its own drafts the next chain while the target verifies
    this one (PEARL's post-verify, over JAX's asynchronous dispatch): when the target accepts
    all `num_tokens` and its next token is the one the draft guessed, the next round starts
    at once. Load the draft on other devices than the target, e.g. `jaxdec.load(draft,
    mesh=jaxdec.sharding.spare_device_mesh(target.config.mesh))`; on the same devices it
    still works, without the overlap. `overlap=False` runs the same schedule sequentially
    (the baseline it is measured against). Runs a host round trip per round, in one process:
    a multi-process run (jax.distributed) is refused."""
    model: Model
    num_tokens: int = 4
    overlap: bool = True

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        _check_draft_model("Pearl", self.model, None)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False, got {self.overlap!r}")

    def build(self, target: Model, batch_size: int, num_slots: int):
        from jaxdec.overlap import Overlapped, OverlapState
        sharding.check_one_process("spec.Pearl")
        _check_draft_model("Pearl", self.model, target, same_devices=False)
        cache = init_cache(self.model.config, batch_size, num_slots, self.model.dtype)
        return Overlapped(target, self.model, int(self.num_tokens), self.overlap), None, OverlapState(cache)


@dataclasses.dataclass(frozen=True, eq=False)
class DraftTree:
    """A token tree grown from a draft model each round (EAGLE-2 / DySpec style): `depth`
    levels, expanding the `top_k` likeliest frontier nodes by their `top_k` likeliest
    children, scored by cumulative draft log-probability; the best `max_nodes` nodes are
    verified in one target step, and each row keeps the deepest path the target accepts.
    `max_nodes` is a cap: a tree that scores fewer nodes (depth=2, top_k=4: 4 + 16) verifies
    them all, and a depth above max_nodes grows only max_nodes levels (deeper nodes could
    never be kept)."""
    model: Model
    depth: int = 5
    top_k: int = 4
    max_nodes: int = 32

    def __post_init__(self):
        _check_draft_model("DraftTree", self.model, None)
        _check_tree_options(self.depth, self.top_k, self.max_nodes, self.model.config.vocab_size)

    num_tokens = property(lambda self: _kept_nodes(self.depth, self.top_k, self.max_nodes))

    def build(self, target: Model, batch_size: int, num_slots: int):
        _check_draft_model("DraftTree", self.model, target)
        same = self.model.params is target.params
        nodes = self.num_tokens
        drafter = DraftTreeDrafter(self.model.config, _grown_levels(self.depth, nodes), int(self.top_k), nodes,
                                   drafts_with_target=same)
        state = DraftTreeState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                               node_slots=jnp.full((batch_size, nodes), -1, jnp.int32),
                               tree_start=jnp.zeros((batch_size,), jnp.int32))
        return drafter, None if same else self.model.params, state


@dataclasses.dataclass(frozen=True, eq=False)
class StaticTree:
    """A fixed token-tree shape filled in by a draft model each round (Sequoia / Medusa
    style): `paths` lists the nodes as tuples of child ranks, (0,) the root's likeliest
    child, (0, 1) the second likeliest child of that, and so on; every prefix of a path must
    be listed too, and each path once. Each row keeps the deepest path the target accepts."""
    model: Model
    paths: tuple

    def __post_init__(self):
        _check_draft_model("StaticTree", self.model, None)
        _set_tree_paths(self, self.paths, self.model.config.vocab_size)

    num_tokens = property(lambda self: len(self.paths))
    depth = property(lambda self: max(len(p) for p in self.paths))

    def build(self, target: Model, batch_size: int, num_slots: int):
        _check_draft_model("StaticTree", self.model, target)
        same = self.model.params is target.params
        drafter = StaticTreeDrafter(self.model.config, TreeShape(self.paths), drafts_with_target=same)
        state = DraftTreeState(cache=init_cache(self.model.config, batch_size, num_slots, self.model.dtype),
                               node_slots=jnp.full((batch_size, len(self.paths)), -1, jnp.int32),
                               tree_start=jnp.zeros((batch_size,), jnp.int32))
        return drafter, None if same else self.model.params, state


def _set_tree_paths(method, paths, vocab_size):
    """Validates a static tree's paths (ValueError) and stores them, normalised, on `method`."""
    shape = TreeShape(paths)
    if max(shape.ranks) >= vocab_size:
        raise ValueError(f"child rank {max(shape.ranks)} in paths is outside the draft's vocabulary ({vocab_size})")
    object.__setattr__(method, "paths", shape.paths)


def _check_heads(method, heads, kind):
    if not isinstance(heads, Heads) or heads.kind != kind:
        got = f"{heads.kind} heads" if isinstance(heads, Heads) else f"{heads!r:.60}"
        raise ValueError(f"{method} needs {kind} heads (from jaxdec.load_heads), got {got}")


def _check_tree_options(depth, top_k, max_nodes, vocab_size):
    _check_positive("depth", depth, "levels of the tree")
    _check_positive("top_k", top_k, "children per expanded node")
    _check_positive("max_nodes", max_nodes, "tree nodes verified per step")
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the draft's vocabulary ({vocab_size})")


def _kept_nodes(depth, top_k, max_nodes) -> int:
    """The nodes verified per step: max_nodes, or all a tree of depth levels and top_k
    children scores when that is fewer (the defaults' max_nodes=32 with depth=2 or top_k=2)."""
    return min(int(max_nodes), num_candidates(int(depth), int(top_k)))


def _grown_levels(depth, max_nodes) -> int:
    """The levels worth growing: a node below level max_nodes is never kept (its ancestors
    alone fill the tree: none ranks below its descendants, and ties keep the shallower), so
    deeper levels would only cost each round a draft step that can change nothing."""
    return min(int(depth), int(max_nodes))


@dataclasses.dataclass(frozen=True, eq=False)
class Medusa:
    """Medusa heads (`jaxdec.load_heads`) trained on the target's own features draft a
    static token tree: the node of rank r at depth d takes head d's r-th likeliest token.
    `paths` as in `StaticTree`; None uses the tree shipped with the heads (chosen from their
    held-out accuracies). No draft model runs: a round is one target step."""
    heads: Heads
    paths: tuple | None = None

    def __post_init__(self):
        _check_heads("Medusa", self.heads, "medusa")
        cfg = self.heads.config
        if self.paths is None and not cfg.tree:
            raise ValueError("these Medusa heads ship no tree: pass paths=[(0,), (0, 0), ...]")
        _set_tree_paths(self, cfg.tree if self.paths is None else self.paths, cfg.vocab_size)
        if self.depth > cfg.num_heads:
            raise ValueError(f"the tree is {self.depth} deep but there are only {cfg.num_heads} Medusa heads")

    num_tokens = property(lambda self: len(self.paths))
    depth = property(lambda self: max(len(p) for p in self.paths))

    def build(self, target: Model, batch_size: int, num_slots: int):
        check_heads_fit(self.heads, target)
        drafter = MedusaDrafter(self.heads.config, TreeShape(self.paths))
        state = FeatureState(features=jnp.zeros((batch_size, self.heads.config.hidden_size), target.dtype))
        return drafter, cast_params(self.heads.params, target.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class Eagle:
    """An EAGLE layer (`jaxdec.load_heads`) trained on the target's features grows a dynamic
    token tree each round (EAGLE-2): as `DraftTree`, with the one layer over (feature, token)
    pairs in place of a draft model, and the target's own LM head."""
    heads: Heads
    depth: int = 5
    top_k: int = 4
    max_nodes: int = 32

    def __post_init__(self):
        _check_heads("Eagle", self.heads, "eagle")
        _check_tree_options(self.depth, self.top_k, self.max_nodes, self.heads.config.vocab_size)

    num_tokens = property(lambda self: _kept_nodes(self.depth, self.top_k, self.max_nodes))

    def build(self, target: Model, batch_size: int, num_slots: int):
        check_heads_fit(self.heads, target)
        layer = self.heads.config.layer
        nodes = self.num_tokens
        drafter = EagleDrafter(self.heads.config, _grown_levels(self.depth, nodes), int(self.top_k), nodes)
        width = drafter.catch_up_width
        state = EagleState(cache=init_cache(layer, batch_size, num_slots, target.dtype),
                           features=jnp.zeros((batch_size, width, layer.hidden_size), target.dtype),
                           fed=jnp.zeros((batch_size,), jnp.int32))
        return drafter, cast_params(self.heads.params, target.dtype), state


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
        if layers is None or not all(is_int(i) for i in layers):
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


def _check_sparse_settings(method):
    """budget, page_size and recent of a sparse method (ValueError naming the value)."""
    _check_positive("page_size", method.page_size, "cache slots per page")
    _check_positive("budget", method.budget, "cache tokens attention reads")
    if method.recent is not None and (not is_int(method.recent) or method.recent < 0):
        raise ValueError(f"recent must be None or an integer >= 0 (most recent tokens always read), "
                         f"got {method.recent!r}")
    if method.budget < method.page_size:
        raise ValueError(f"budget={method.budget} must hold at least one page of page_size={method.page_size} tokens")
    # The first page and the pages of the recent tokens (one more than they fill when they
    # straddle a page edge) must fit, or the selection would drop some of them.
    forced = 2 + -(-method.recent_tokens // method.page_size)
    if method.budget < forced * method.page_size:
        raise ValueError(f"budget={method.budget} is too small: the first page and the last {method.recent_tokens} "
                         f"tokens can take {forced} pages of {method.page_size}, a budget of at least "
                         f"{forced * method.page_size}")


def _check_pages_fit(method, cfg, num_slots):
    if cfg.attn_impl == "pallas" and num_slots % method.page_size:
        raise ValueError(f"the Pallas sparse kernel needs the cache ({num_slots} slots) to be whole pages: "
                         f"page_size={method.page_size} must divide it")


@dataclasses.dataclass(frozen=True)
class SparseSelf:
    """The target itself drafts `num_tokens` tokens attending only to `budget` tokens of its
    KV cache (TriForce / MagicDec self-speculation), then verifies them with full attention.
    The cache is cut into pages of `page_size` slots; each full-attention layer and kv head
    reads the first page, the pages holding the last `recent` tokens (default one page, and
    always every token since the last verify) and the pages with the best Quest bound
    (per-page min/max keys against the layer's query), up to `budget` tokens. Pays off at long
    context, where decoding reads mostly the cache; a budget covering the context drafts
    exactly what the target would.

    draft: a smaller model with the target's tokenizer makes it hierarchical (TriForce): the
    draft model proposes `draft_tokens` tokens at a time to the sparse target, which keeps
    what it accepts (speculative sampling of its own) until it holds its chain of
    `num_tokens` for the dense target."""
    budget: int = 1024
    num_tokens: int = 4
    page_size: int = 16
    recent: int | None = None
    draft: Model | None = None
    draft_tokens: int = 2

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        _check_sparse_settings(self)
        _check_positive("draft_tokens", self.draft_tokens, "tokens the draft model proposes to the sparse target")
        if self.draft is not None:
            _check_draft_model("SparseSelf", self.draft, None)

    @property
    def recent_tokens(self) -> int:
        """The most recent tokens always read: `recent` (default one page), and at least every
        token since the last verify step (the drafts are not in the summaries)."""
        return max(self.page_size if self.recent is None else int(self.recent), int(self.num_tokens) + 1)

    def build(self, target: Model, batch_size: int, num_slots: int):
        cfg = target.config
        _check_pages_fit(self, cfg, num_slots)
        recent = self.recent_tokens
        choosing = [i for i in range(cfg.num_hidden_layers) if cfg.window(i) is None]
        pages = init_pages(cfg, batch_size, num_slots, int(self.page_size), int(self.budget), recent, choosing)
        if self.draft is None:
            return SparseSelfDrafter(int(self.num_tokens)), None, pages
        _check_draft_model("SparseSelf", self.draft, target)
        # The sparse target scores the draft model's guesses (and its last token) in one forward.
        check_draft_window("SparseSelf's draft model (draft_tokens)", int(self.draft_tokens),
                           min(cfg.max_position_embeddings, self.draft.config.max_position_embeddings))
        drafter = TriForceDrafter(self.draft.config, int(self.num_tokens), int(self.draft_tokens))
        state = TriForceState(pages=pages, cache=init_cache(self.draft.config, batch_size, num_slots, self.draft.dtype))
        return drafter, self.draft.params, state


@dataclasses.dataclass(frozen=True)
class LossySparseDecode:
    """LOSSY, NOT speculative: plain decoding whose attention reads only `budget` tokens of the
    KV cache (TidalDecode style), so its output drifts from plain decoding's; nothing verifies
    it. Layers before the first of `selection_layers` attend to the whole cache; each
    selection layer chooses pages by Quest's bound (one choice for all its kv heads: the
    first page, the pages of the last `recent` tokens, the best others) and the layers after
    it reuse that choice. Default selection layers: (1, num_hidden_layers // 2). Never a
    default anywhere; measure its agreement with plain decoding on your data first
    (benchmarks/lossy_agreement.py)."""
    budget: int = 1024
    page_size: int = 16
    selection_layers: tuple[int, ...] | None = None
    recent: int | None = None

    def __post_init__(self):
        _check_sparse_settings(self)
        if self.selection_layers is not None:
            layers = tuple(self.selection_layers) if isinstance(self.selection_layers, Iterable) else None
            if not layers or not all(is_int(i) for i in layers):
                raise ValueError(f"selection_layers must be a non-empty sequence of layer indices, "
                                 f"got {self.selection_layers!r}")
            object.__setattr__(self, "selection_layers", tuple(sorted(set(int(i) for i in layers))))

    @property
    def recent_tokens(self) -> int:
        return self.page_size if self.recent is None else int(self.recent)

    def build(self, target: Model, batch_size: int, num_slots: int):
        """(None, None, the page summaries decoding carries)."""
        cfg = target.config
        L = cfg.num_hidden_layers
        layers = self.selection_layers or tuple(sorted({min(1, L - 1), L // 2}))
        for i in layers:
            if not 0 <= i < L:
                raise ValueError(f"selection layer {i} is out of range for a model with {L} layers")
            if cfg.window(i) is not None:
                raise ValueError(f"selection layer {i} is a sliding-window layer; choose full-attention layers")
        _check_pages_fit(self, cfg, num_slots)
        return None, None, init_pages(cfg, batch_size, num_slots, int(self.page_size), int(self.budget),
                                      self.recent_tokens, layers, shared_heads=True)


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


def draft_contexts(method) -> list[tuple[str, int]]:
    """(what, max_position_embeddings) of each model `method` drafts with besides the target.
    A call's positions (prompt plus max_new_tokens) must fit each, as they fit the target; its
    cache has the target's slots, past its context where those do (slots at or past a row's
    length are never read)."""
    if isinstance(method, (DraftModel, Pearl, DraftTree, StaticTree)):
        return [("the draft model", method.model.config.max_position_embeddings)]
    if isinstance(method, SparseSelf) and method.draft is not None:
        return [("the draft model", method.draft.config.max_position_embeddings)]
    if isinstance(method, Eagle):
        return [("the EAGLE layer", method.heads.config.layer.max_position_embeddings)]
    return []


METHODS = (DraftModel, Pearl, DraftTree, StaticTree, Medusa, Eagle, LayerSkip, SparseSelf, PromptLookup,
           LossySparseDecode)

__all__ = ["DraftModel", "Pearl", "DraftTree", "StaticTree", "Medusa", "Eagle", "LayerSkip", "SparseSelf",
           "PromptLookup", "LossySparseDecode"]
