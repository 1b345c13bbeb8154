"""A static token tree drafted by a draft model (Sequoia / Medusa-style tree shapes).

The shape is fixed (`jaxdec.tree.StaticTree`: paths of child ranks); each round fills it in
level by level: the draft reads the last two tokens (as the chain drafter does), then runs
the nodes of each level that have children together, each attending to the prefix and its
own ancestors (kept in draft-cache slots past the prefix), and a child of rank r takes its
parent's r-th likeliest draft token. The children are deterministic given the context, so
each node's q is a point mass and the multi-draft rule keeps sampling exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.config import ModelConfig
from jaxdec.drafters import Drafter
from jaxdec.drafters.draft_model import UsesDraftModel
from jaxdec.drafters.draft_tree import keep_accepted_path
from jaxdec.model import forward_hidden, lm_head
from jaxdec.tree import StaticTree
from jaxdec.verify import Draft


@dataclasses.dataclass(frozen=True)
class StaticTreeDrafter(UsesDraftModel, Drafter):
    draft_cfg: ModelConfig
    tree: StaticTree
    drafts_with_target: bool = False  # see DraftModelDrafter

    @property
    def num_tokens(self) -> int:
        return len(self.tree)

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        dcfg, weights, tree = self.draft_cfg, self._weights(params, dparams), self.tree
        B, N = state.lengths.shape[0], len(tree)
        logits, dcache = self._catch_up(weights, dstate.cache, state)                   # after the root
        start = state.lengths              # run nodes live in slots from here; the prefix is below
        dcache = dcache.replace(lengths=start)

        ranks = np.asarray(tree.ranks)
        parents = np.asarray(tree.parents)
        depths = np.asarray(tree.depths)
        run = [i for i in range(N) if tree.children(i)]                  # nodes the draft reads
        run_slot = {node: j for j, node in enumerate(run)}               # their slot offsets
        widest = int(ranks.max()) + 1

        def fill(tokens, node_logits, nodes):
            """Children of `nodes` (static list) from their logits [B, len(nodes), V]."""
            _, top = jax.lax.top_k(node_logits, widest)
            for j, node in enumerate(nodes):
                for child in tree.children(node):
                    tokens = tokens.at[:, child].set(top[:, j, ranks[child]])
            return tokens

        tokens = fill(jnp.zeros((B, N), jnp.int32), logits[:, None], [-1])
        for level in range(1, tree.depth):
            nodes = [i for i in run if depths[i] == level]
            if not nodes:
                continue
            T = len(nodes)
            slots = start[:, None] + jnp.asarray([run_slot[i] for i in nodes])[None, :]
            # Each node sees the slots of its ancestors (all of them were run: they have children).
            seen = np.zeros((T, len(run)), bool)
            for j, node in enumerate(nodes):
                up = parents[node]
                while up >= 0:
                    seen[j, run_slot[up]] = True
                    up = parents[up]
            slot_index = start[:, None, None] + jnp.arange(len(run))[None, None, :]
            extra_visible = jnp.zeros((B, T, dcache.num_slots), bool).at[
                jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], slot_index].set(
                jnp.broadcast_to(jnp.asarray(seen), (B, T, len(run))), mode="drop")
            positions = jnp.broadcast_to((start + level - 1)[:, None], (B, T))
            alone = jnp.broadcast_to(jnp.eye(T, dtype=bool), (B, T, T))
            # Written first, then read (in place); a node's own slot is in no node's `seen`.
            hidden, dcache = forward_hidden(dcfg, weights, tokens[:, jnp.asarray(nodes)], positions, dcache, alone,
                                            extra_visible=extra_visible, slots=slots)
            tokens = fill(tokens, lm_head(dcfg, weights, hidden), nodes)

        node_slots = np.full((N,), -1, np.int64)
        for node, j in run_slot.items():
            node_slots[node] = j
        node_slots = jnp.where(jnp.asarray(node_slots)[None, :] >= 0, start[:, None] + jnp.asarray(node_slots)[None, :], -1)
        draft = Draft(tokens=tokens, probs=jax.nn.one_hot(tokens, dcfg.vocab_size, dtype=jnp.float32),
                      lengths=jnp.full((B,), N, jnp.int32),
                      parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (B, N)))
        return draft, cache, dstate.replace(cache=dcache, node_slots=node_slots.astype(jnp.int32), tree_start=start)

    def update(self, dstate, draft, num_accepted, path, features, committed):
        return keep_accepted_path(dstate, num_accepted, path)
