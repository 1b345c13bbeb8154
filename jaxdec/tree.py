"""Token trees: the index arithmetic of verifying a drafted tree in one step.

A draft of N nodes per row hangs below the row's pending token (the root). `parents[b, i]`
is node i's parent: -1 for the root, otherwise a node index below i (nodes are in
topological order). A chain is `parents = i - 1`. In the verify step the root is step token 0
and node i is step token i + 1; a node's position is the root's position plus its depth, and
it sees (besides the cached prefix) exactly its ancestors and itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.checks import is_int


def chain_parents(batch_size: int, num_nodes: int):
    """int32 [B, N]: the parents of a chain (node i hangs below node i - 1)."""
    return jnp.broadcast_to(jnp.arange(num_nodes, dtype=jnp.int32) - 1, (batch_size, num_nodes))


def ancestor_mask(parents):
    """bool [B, N+1, N+1] over step tokens: [t, u] is True when u is t or an ancestor of t.

    The transitive closure of the parent relation by repeated squaring: log2(N + 1) small
    boolean matmuls, whatever the tree's depth.
    """
    B, N = parents.shape
    steps = jnp.arange(N + 1)
    parent_step = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), parents + 1], axis=1)  # root: none
    reach = (steps[None, :, None] == steps[None, None, :]) | (parent_step[:, :, None] == steps[None, None, :])
    for _ in range(max(1, N.bit_length())):
        reach = reach | (jnp.einsum("btu,buv->btv", reach.astype(jnp.float32), reach.astype(jnp.float32)) > 0)
    return reach


def step_depths(ancestors):
    """int32 [B, N+1]: each step token's depth below the root (the root is 0)."""
    return jnp.sum(ancestors, axis=-1, dtype=jnp.int32) - 1


def path_to(ancestors, depths, node):
    """int32 [B, N]: the nodes from the root's child down to `node` [B] (-1: the root itself,
    an empty path), in order of depth; entries past the path's length are 0."""
    B, T, _ = ancestors.shape
    on_path = ancestors[jnp.arange(B), node + 1, 1:]                     # [B, N] nodes on the path
    slot = jnp.where(on_path, depths[:, 1:] - 1, T)                       # depth d sits at d - 1
    nodes = jnp.broadcast_to(jnp.arange(T - 1, dtype=jnp.int32), (B, T - 1))
    return jnp.zeros((B, T - 1), jnp.int32).at[jnp.arange(B)[:, None], slot].set(nodes, mode="drop")


def gather_steps(new_kv, path):
    """The step's keys and values reordered so that the root and then the accepted path come
    first: entry 1 + d is the path's node at depth d + 1. new_kv: per layer [B, N+1, Hkv, D]
    (None for a skipped layer); path: [B, N]."""
    order = jnp.concatenate([jnp.zeros((path.shape[0], 1), jnp.int32), path + 1], axis=1)   # [B, N+1]
    take = lambda x: None if x is None else jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    return jax.tree.map(take, new_kv, is_leaf=lambda x: x is None)


def _rank(r) -> int:
    if not is_int(r):
        raise TypeError(r)
    return int(r)


class StaticTree:
    """A fixed tree shape given as paths of child ranks (Medusa / Sequoia style).

    Each path names a node by the ranks of the choices leading to it: (0,) is the root's
    likeliest child, (1,) its second, (0, 2) the third likeliest child of (0,). Every prefix
    of a path must be a path too, and no path is listed twice. Nodes are numbered in order of
    (depth, path), so parents come first. Plain tuples and numpy arrays only: the shape is
    static, known when tracing.
    """

    def __init__(self, paths):
        # int() alone would take 1.5 as rank 1 and "1" as 1: a different tree, silently.
        try:
            given = [tuple(_rank(r) for r in p) for p in paths]
        except (TypeError, ValueError):
            raise ValueError(f"paths must be a list of tuples of child ranks, e.g. [(0,), (1,), (0, 0)], "
                             f"got {paths!r:.80}") from None
        if not given or any(len(p) == 0 or min(p) < 0 for p in given):
            raise ValueError(f"paths must be non-empty tuples of ranks >= 0, got {paths!r:.80}")
        # A path listed twice would be one node: a smaller tree than the list says.
        seen = set()
        for path in given:
            if path in seen:
                raise ValueError(f"path {path} is listed twice: each path is one node of the tree")
            seen.add(path)
        nodes = sorted(given, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(nodes)}
        missing = [p[:-1] for p in nodes if len(p) > 1 and p[:-1] not in index]
        if missing:
            raise ValueError(f"path {missing[0]} is missing: every prefix of a path must be a path too")
        self.paths = tuple(nodes)
        self.parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in nodes)
        self.ranks = tuple(p[-1] for p in nodes)
        self.depths = tuple(len(p) for p in nodes)

    def __len__(self):
        return len(self.paths)

    def __eq__(self, other):
        return isinstance(other, StaticTree) and self.paths == other.paths

    def __hash__(self):
        return hash(self.paths)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def children(self, node: int) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.parents) if p == node)
