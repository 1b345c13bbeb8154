"""An EAGLE layer (Li et al., 2024) grows dynamic token trees (EAGLE-2) from the target's features.

The layer reads pairs (the target's feature at t - 1, the token at t) and predicts the
feature at t; the target's LM head turns it into the next token's logits. Its one-layer KV
cache holds the pairs of the committed tokens, all with the target's true features:

  * prefill writes the prompt's pairs;
  * each round first reads the pairs of the tokens committed since the last round (at most
    depth + 1: the last round's pending token and accepted path had their features computed
    by the target's verify step, kept by `update`), the last of which (the pending token's)
    gives the root's children;
  * the tree then grows as `DraftTree`'s does, each node's pair made of its parent's
    predicted feature and its own token.

Accepted nodes' entries (made from predicted features) are not kept: the next round re-reads
their pairs with the target's features, so the cache never holds a prediction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import KVCache
from jaxdec.drafters import Drafter
from jaxdec.drafters.draft_tree import grow_tree
from jaxdec.heads import HeadsConfig, eagle_forward, eagle_inputs
from jaxdec.model import causal_mask, lm_head, prefill_hidden


@struct.dataclass
class EagleState:
    cache: KVCache        # the layer's KV cache: pair t at slot t
    features: jax.Array   # [B, W, D]: the target's features at positions fed - 1, fed, ... (W = depth + 1)
    fed: jax.Array        # int32 [B]: pairs below this position are in the cache


@dataclasses.dataclass(frozen=True)
class EagleDrafter(Drafter):
    heads: HeadsConfig
    depth: int
    top_k: int
    max_nodes: int

    @property
    def num_tokens(self) -> int:
        return self.max_nodes

    @property
    def catch_up_width(self) -> int:
        """Most tokens a round commits: the accepted path (at most the tree's depth) and one more."""
        return min(self.depth, self.max_nodes) + 1

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        B, P = tokens.shape[0], prompt_bucket
        shifted = jnp.concatenate([jnp.zeros_like(features[:, :1]), features[:, :P - 1]], axis=1)
        pairs = eagle_inputs(params, dparams, shifted, tokens[:, :P])
        _, cache = prefill_hidden(self.heads.layer, dparams["layer"], dstate.cache, None, P, inputs=pairs)
        # The pending token's pair (its feature: the last prompt position's) is read next round.
        last = features[jnp.arange(B), prompt_lengths - 1]
        return dstate.replace(cache=cache, features=jnp.zeros_like(dstate.features).at[:, 0].set(last),
                              fed=prompt_lengths)

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        B, W = state.lengths.shape[0], self.catch_up_width
        rows = jnp.arange(B)
        # The pairs committed since the last round: positions fed .. lengths - 1 (pairs past
        # lengths - 1 are padding, written to slots the tree overwrites or never shows).
        positions = dstate.fed[:, None] + jnp.arange(W, dtype=jnp.int32)[None, :]
        tokens = state.tokens[rows[:, None], jnp.minimum(positions, state.tokens.shape[1] - 1)]
        dcache = dstate.cache.replace(lengths=dstate.fed)
        predicted, dcache = eagle_forward(self.heads, params, dparams, dstate.features, tokens, positions, dcache,
                                          causal_mask(B, W))
        root = predicted[rows, jnp.clip(state.lengths - 1 - dstate.fed, 0, W - 1)]         # [B, D]
        dcache = dcache.replace(lengths=state.lengths)

        def expand(tokens, parent_feature, positions, dcache, alone, seen, slots):
            feature, dcache = eagle_forward(self.heads, params, dparams, parent_feature, tokens, positions, dcache,
                                            alone, extra_visible=seen, slots=slots)
            return lm_head(cfg, params, feature), feature, dcache

        draft, dcache, _ = grow_tree(self.depth, self.top_k, self.max_nodes, lm_head(cfg, params, root), root, expand,
                                     state.lengths, dcache, sampling, keys)
        return draft, cache, dstate.replace(cache=dcache, fed=state.lengths)

    def update(self, dstate, draft, num_accepted, path, features, committed):
        # The pending token's feature and the accepted path's (path entries past the accepted
        # length are read but never used: their pairs lie past the next round's lengths).
        W = self.catch_up_width
        steps = jnp.concatenate([jnp.zeros_like(path[:, :1]), path[:, :W - 1] + 1], axis=1)
        return dstate.replace(features=jnp.take_along_axis(features, steps[:, :, None], axis=1))
