"""Medusa heads (Cai et al., 2024) fill a static token tree from the target's own feature.

The feature is the target's hidden state at the node whose logits gave the pending token
(kept from the last verify step, or from prefill). Head d's top tokens are the candidates at
depth d, whatever their parents: a node of rank r at depth d takes head d's r-th token. No
draft model runs, so a round costs the target's verify step and a few small matmuls. The
children are deterministic given the feature (point masses), so the multi-draft rule keeps
sampling exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.drafters import Drafter
from jaxdec.heads import HeadsConfig, medusa_logits
from jaxdec.tree import StaticTree
from jaxdec.verify import Draft


@struct.dataclass
class FeatureState:
    features: jax.Array  # [B, D]: the target's hidden state that produced each row's pending token


def last_accepted_feature(features, num_accepted, path):
    """[B, D]: the verify step's hidden state at the last accepted node (the pending token's
    when none was accepted), whose logits gave the next pending token."""
    rows = jnp.arange(features.shape[0])
    step = jnp.where(num_accepted > 0, path[rows, jnp.maximum(num_accepted - 1, 0)] + 1, 0)
    return features[rows, step]


@dataclasses.dataclass(frozen=True)
class MedusaDrafter(Drafter):
    heads: HeadsConfig
    tree: StaticTree

    @property
    def num_tokens(self) -> int:
        return len(self.tree)

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        return dstate.replace(features=features[jnp.arange(features.shape[0]), prompt_lengths - 1])

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        tree = self.tree
        B = state.lengths.shape[0]
        logits = medusa_logits(cfg, params, dparams, dstate.features)[:, :tree.depth]     # [B, depth, V]
        _, top = jax.lax.top_k(logits, max(tree.ranks) + 1)                              # [B, depth, width]
        tokens = top[:, np.asarray(tree.depths) - 1, np.asarray(tree.ranks)]              # [B, N]
        draft = Draft(tokens=tokens, probs=jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.float32),
                      lengths=jnp.full((B,), len(tree), jnp.int32),
                      parents=jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (B, len(tree))))
        return draft, cache, dstate

    def update(self, dstate, draft, num_accepted, path, features, committed):
        return dstate.replace(features=last_accepted_feature(features, num_accepted, path))
