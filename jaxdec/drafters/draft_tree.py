"""A dynamic token tree grown from a draft model (EAGLE-2 / DySpec style), in fixed shapes.

Each round, per row:
  1. the draft reads the last two tokens (as the chain drafter does) and proposes the root's
     top_k children, scored by their draft log-probability;
  2. `depth - 1` times, the top_k frontier nodes run through the draft together, each
     attending to the prefix and to its own ancestors (kept in draft-cache slots past the
     prefix), and each proposes its top_k children, scored by cumulative log-probability; the
     best top_k of those children become the next frontier;
  3. of all candidates, the best `max_nodes` by score are the tree (sampled children: the
     best sibling groups by their parent's score, see below; sampled children are scored
     by draw order, see SAMPLED_ACCEPTANCE). A child never outscores its
     parent (log-probabilities are <= 0) and comes after it, so a stable sort keeps parents
     first and the result is a tree in topological order.
Greedy decoding takes the draft's top-k children, deterministic given the context (point
masses). Sampling draws each expanded node's k children from the processed draft
distribution q without replacement (Gumbel-top-k): a target that samples at temperature 1
accepts a draw of a close draft far more often than a fixed top-k token, and distinct
siblings never waste a node on a repeat. The child drawn s-th was drawn from q with the s - 1
before it removed and renormalised, and that is the q it carries into verification, where the
multi-draft rule (each sibling against the residual the earlier ones left) becomes recursive
rejection sampling (Jeon et al., 2024). Either way the output is exactly the target's
(DESIGN.md). After acceptance the draft-cache entries of the
accepted path move to the slots their positions name, so the next round's draft reads a
prefix as if it had drafted that path as a chain.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import KVCache, copy_slots
from jaxdec.config import ModelConfig
from jaxdec.drafters import Drafter
from jaxdec.drafters.draft_model import UsesDraftModel
from jaxdec.model import forward_hidden, lm_head
from jaxdec.sampling import probabilities
from jaxdec.verify import Draft


# Scores estimate how likely the target accepts a node. Greedy verification accepts exactly
# the target's argmax, and a draft's top token is that far more often than its probability
# says (and a sibling far less), so greedy scores use the draft sharpened to this temperature.
# On the demo pair (shipped draft, the 12 held-out code prompts at 256 tokens, batch 1, 128 new
# tokens, all emitted tokens over all target steps), an 8x3x16 tree gave 4.33 tokens per step
# at 1.0, 5.88 at 0.5, 6.46 at 0.3, 6.66 at 0.25, 6.60 at 0.2 and 6.46 at 0.1; an 8x2x8 tree
# 3.65, 5.13, 5.60, 5.69, 5.71 and 5.54. Sampling scores use q itself.
SCORE_TEMPERATURE_GREEDY = 0.25
# Sampled children are scored by their draw order, not their value: a sample of a close draft
# is accepted with about the same probability whatever token it is (sum_x min(p, q); 85% for
# the demo pair at temperature 1), and the s-th draw is tried only after s rejections. So a
# first draw scores log(a) and the s-th later one s * log(1 - a): trees grow deep along first
# draws. Scoring by log q(x) instead spent nodes on shallow siblings: on the 12 held-out code
# prompts at temperature 1 (batch 1, seeds 0 and 1, all emitted tokens over all target steps),
# a 6x2x12 tree gave 3.19 tokens per step that way, 4.52 this way with a = 0.8 or 0.9 (the
# same trees), and a chain of 4 gave 3.60.
SAMPLED_ACCEPTANCE = 0.8


@struct.dataclass
class DraftTreeState:
    cache: KVCache          # the draft model's own KV cache
    node_slots: jax.Array   # int32 [B, max_nodes]: draft-cache slot of each node the draft ran, else -1
    tree_start: jax.Array   # int32 [B]: the first slot past the root (depth-1 nodes' position)


def num_candidates(depth: int, top_k: int) -> int:
    """Nodes a tree of `depth` levels scores: the root's top_k children, then top_k children
    of each of top_k frontier nodes per further level."""
    return top_k + (depth - 1) * top_k * top_k


@dataclasses.dataclass(frozen=True)
class DraftTreeDrafter(UsesDraftModel, Drafter):
    draft_cfg: ModelConfig
    depth: int
    top_k: int
    max_nodes: int
    drafts_with_target: bool = False  # see DraftModelDrafter

    @property
    def num_tokens(self) -> int:
        return self.max_nodes

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        dcfg, weights = self.draft_cfg, self._weights(params, dparams)
        logits, dcache = self._catch_up(weights, dstate.cache, state)                   # after the root
        dcache = dcache.replace(lengths=state.lengths)      # the prefix; tree nodes live in slots from here

        def expand(tokens, carry, positions, dcache, alone, seen, slots):
            hidden, dcache = forward_hidden(dcfg, weights, tokens, positions, dcache, alone, extra_visible=seen,
                                            slots=slots)
            return lm_head(dcfg, weights, hidden), None, dcache

        draft, dcache, node_slots = grow_tree(self.depth, self.top_k, self.max_nodes, logits, None, expand,
                                              state.lengths, dcache, sampling, keys)
        return draft, cache, dstate.replace(cache=dcache, node_slots=node_slots, tree_start=state.lengths)

    def update(self, dstate, draft, num_accepted, path, features, committed):
        return keep_accepted_path(dstate, num_accepted, path)


def grow_tree(depth: int, top_k: int, max_nodes: int, root_logits, root_carry, expand, start, dcache, sampling,
              keys):
    """Grows the tree of the module docstring: (Draft, draft cache, each node's draft-cache slot
    [B, max_nodes] (-1 for nodes never run)).

    root_logits [B, V]: the draft's logits after the root (the pending token). Tree nodes run
    in draft-cache slots from `start` [B] on (the prefix lies below; the cache's lengths must
    be `start`). `expand(tokens [B, k], carry [B, k, ...], positions, dcache, alone, seen, slots)
    -> (logits [B, k, V], carry [B, k, ...], dcache)` runs a frontier through the draft, each
    node attending to the prefix, to the `seen` slots (its ancestors') and to itself (`alone`),
    written at `slots` first. `carry` is what a node hands its children besides its token (an
    EAGLE layer's predicted feature; None for a draft model); the root's is `root_carry` [B, ...].
    """
    k = top_k
    B = start.shape[0]
    rows = jnp.arange(B)[:, None]
    num_slots = dcache.num_slots
    C = num_candidates(depth, k)
    G = 1 + (depth - 1) * k                                                          # sibling groups
    children = lambda logits, level: _children(logits, k, sampling, keys, level)
    token, score, q = children(root_logits[:, None], 0)                              # the root's children
    cand_token = jnp.zeros((B, C), jnp.int32).at[:, :k].set(token[:, 0])
    cand_score = jnp.full((B, C), -jnp.inf, jnp.float32).at[:, :k].set(score[:, 0])
    cand_parent = jnp.full((B, C), -1, jnp.int32)
    cand_slot = jnp.full((B, C), -1, jnp.int32)
    group_q = jnp.zeros((B, G, q.shape[-1]), jnp.float32).at[:, :1].set(q)           # q of each sibling group
    frontier = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (B, k))             # candidate indices
    carry = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (B, k) + x.shape[1:]), root_carry)
    seen = jnp.zeros((B, k, num_slots), bool)                                       # ancestors' slots
    alone = jnp.broadcast_to(jnp.eye(k, dtype=bool), (B, k, k))                     # frontier nodes are not each other's ancestors

    def grow(level, grown):
        # One level: the frontier runs through the draft and proposes its children. A loop
        # rather than unrolled levels: on the demo pair (CPU) that halved the compile and cut
        # a greedy 8x1x8 tree round's cost over a chain of 8 from 0.30 ms to about 0.1 ms
        # (verify_cost.py --tree-rounds). The last level's frontier update is never read.
        cand_token, cand_score, cand_parent, cand_slot, group_q, frontier, carry, seen, dcache = grown
        slots = start[:, None] + (level - 1) * k + jnp.arange(k)[None, :]
        positions = jnp.broadcast_to((start + level - 1)[:, None], (B, k))
        # Written first, then read (in place; the other order makes XLA copy the cache):
        # a frontier node's own slot is in no node's `seen`, so the write changes no result.
        logits, carry, dcache = expand(cand_token[rows, frontier], carry, positions, dcache, alone, seen, slots)
        cand_slot = cand_slot.at[rows, frontier].set(slots)
        child_token, child_score, q = children(logits, level)                         # [B, k, k]
        child_score = child_score + cand_score[rows, frontier][:, :, None]
        first = k + (level - 1) * k * k
        put = lambda into, x: jax.lax.dynamic_update_slice_in_dim(into, x.reshape(B, k * k), first, axis=1)
        cand_token, cand_score = put(cand_token, child_token), put(cand_score, child_score)
        cand_parent = put(cand_parent, jnp.repeat(frontier, k, axis=1))
        group_q = jax.lax.dynamic_update_slice_in_dim(group_q, q, 1 + (level - 1) * k, axis=1)
        _, best = jax.lax.top_k(child_score.reshape(B, k * k), k)
        parent = best // k                                                           # index within the frontier
        seen = (jnp.take_along_axis(seen, parent[:, :, None], axis=1)
                | (jnp.arange(num_slots)[None, None, :] == jnp.take_along_axis(slots, parent, axis=1)[:, :, None]))
        carry = jax.tree.map(lambda x: x[rows, parent], carry)
        return cand_token, cand_score, cand_parent, cand_slot, group_q, first + best, carry, seen, dcache

    if depth > 1:  # (a tree of depth 1 is the root's children: no level to grow, nor room for one)
        grown = (cand_token, cand_score, cand_parent, cand_slot, group_q, frontier, carry, seen, dcache)
        cand_token, cand_score, cand_parent, cand_slot, group_q, _, _, _, dcache = jax.lax.fori_loop(1, depth, grow,
                                                                                                     grown)

    # Keep the best max_nodes. Top-k children (greedy) are ranked by their own score. Sampled
    # children must stay draws of their parent's q in draw order, so no child may be kept or
    # dropped for its own value: sibling groups are ranked by their parent's score, and a
    # group cut short keeps its first draws. Either way parents come before children.
    # (Sampled children ranked by their own score, the parent's plus draw order, would be
    # exact too, since that score ignores the tokens; on the 12 held-out code prompts at
    # temperature 1, seeds 0 and 1, it gave 4.44 / 3.92 / 4.10 tokens per step for 6x2x12 /
    # 4x3x12 / 5x2x8 trees against 4.56 / 3.72 / 3.79 for the groups: no clear winner.)
    parent_score = jnp.where(cand_parent >= 0, cand_score[rows, jnp.maximum(cand_parent, 0)], 0.0)
    rank_by = jnp.where(sampling.temperature > 0, parent_score, cand_score)
    order = jnp.argsort(-rank_by, axis=1, stable=True)[:, :max_nodes]
    rank = jnp.full((B, C), -1, jnp.int32).at[rows, order].set(jnp.arange(max_nodes, dtype=jnp.int32))
    parent = cand_parent[rows, order]
    parents = jnp.where(parent >= 0, rank[rows, jnp.maximum(parent, 0)], -1)
    tokens = cand_token[rows, order]
    # Candidates come in sibling groups of k (the root's children first), in draw order.
    group, drawn = order // k, order % k
    one_hot = jax.nn.one_hot(tokens, root_logits.shape[-1], dtype=jnp.float32)
    probs = jnp.where(sampling.temperature > 0,
                      _without_earlier_siblings(group_q[rows, group], cand_token.reshape(B, G, k)[rows, group], drawn,
                                                one_hot), one_hot)
    draft = Draft(tokens=tokens, probs=probs, lengths=jnp.full((B,), max_nodes, jnp.int32), parents=parents)
    return draft, dcache, cand_slot[rows, order]


def keep_accepted_path(dstate: DraftTreeState, num_accepted, path) -> DraftTreeState:
    """The draft cache with the accepted path's entries at the slots of their positions (depth
    d at tree_start + d - 1), so the next round reads them as a prefix. Nodes the draft never
    ran (leaves) have no entries; the next round's catch-up reads the last of them anyway."""
    B, N = path.shape
    depth = jnp.arange(N)[None, :]
    source = jnp.take_along_axis(dstate.node_slots, path, axis=1)
    keep = (depth < num_accepted[:, None]) & (source >= 0)
    dest = jnp.where(keep, dstate.tree_start[:, None] + depth, dstate.cache.num_slots)
    return dstate.replace(cache=copy_slots(dstate.cache, source, dest))


def _without_earlier_siblings(q, siblings, drawn, one_hot):
    """The q each sampled node was drawn from: its group's q [B, N, V] without the siblings
    [B, N, k] drawn before it (the first `drawn` [B, N]), renormalised; a point mass at the
    node's own token once no mass is left (Gumbel-top-k then picks a zero-mass token, which
    is a deterministic function of the earlier draws)."""
    B, N, k = siblings.shape
    earlier = jnp.where(jnp.arange(k)[None, None, :] < drawn[:, :, None], siblings, q.shape[-1])   # V: dropped
    q = q.at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None], earlier].set(0.0, mode="drop")
    mass = jnp.sum(q, axis=-1, keepdims=True)
    return jnp.where(mass > 0, q / jnp.where(mass > 0, mass, 1.0), one_hot)


def _children(logits, k: int, sampling, keys, level: int):
    """k children for each of G nodes from their draft logits [B, G, V]: (tokens [B, G, k],
    log-probability scores [B, G, k], the q they were drawn from [B, G, V]).

    Greedy: the top-k, point masses (q is unused: zeros), scored by the draft sharpened to
    SCORE_TEMPERATURE_GREEDY. Sampling: k draws without replacement from the processed draft
    distribution q (Gumbel-top-k, in draw order), scored by draw order (SAMPLED_ACCEPTANCE).
    """
    B, G, V = logits.shape

    def greedy(logits):
        score, token = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32) / SCORE_TEMPERATURE_GREEDY), k)
        return token.astype(jnp.int32), score, jnp.zeros((B, G, V), jnp.float32)

    def sampled(logits):
        q = probabilities(logits, sampling)
        gumbel = jax.vmap(lambda key: jax.random.gumbel(jax.random.fold_in(key, level), (G, V)))(keys)
        _, token = jax.lax.top_k(jnp.where(q > 0, jnp.log(q) + gumbel, -jnp.inf), k)
        token = token.astype(jnp.int32)
        drawn = jnp.arange(k, dtype=jnp.float32)
        score = jnp.where(drawn == 0, jnp.log(SAMPLED_ACCEPTANCE), jnp.log(1 - SAMPLED_ACCEPTANCE) * drawn)
        return token, jnp.broadcast_to(score, token.shape), q

    return jax.lax.cond(sampling.temperature > 0, sampled, greedy, logits)
