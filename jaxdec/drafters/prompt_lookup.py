"""Prompt lookup: draft the tokens that followed an earlier occurrence of the last n-gram.

Draft-free and deterministic: q is a point mass on each drafted token. For n from max_ngram
down to 1, the row's last n tokens (ending with the pending token) are searched for in its
prompt and output; the longest n with a match wins, and its earliest match with a
continuation (as in Hugging Face's prompt lookup) gives up to num_tokens following tokens. A
row with no match drafts nothing (Draft.lengths = 0) and advances by one token, like plain
decoding.

With num_candidates > 1 the earliest num_candidates matches of that n-gram each give a
continuation, merged into a token tree by common prefixes (a trie): a repeated line that went
on differently in different places is drafted both ways at once, and the target keeps the
deepest branch it agrees with.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdec.drafters import Drafter
from jaxdec.verify import Draft


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter(Drafter):
    max_ngram: int
    continuation: int  # K: tokens taken after each match
    vocab_size: int
    num_candidates: int = 1

    @property
    def num_tokens(self) -> int:
        """The draft slots (`jaxdec.drafters`): a continuation per candidate, merged into one tree."""
        return self.num_candidates * self.continuation

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        tokens, lengths = state.tokens, state.lengths
        C, K = self.num_candidates, self.continuation
        starts = _matches(tokens, lengths, self.max_ngram, C)                     # [B, C]
        S = tokens.shape[1]
        found = starts >= 0
        index = starts[:, :, None] + jnp.arange(K)[None, None, :]                # [B, C, K]
        valid = found[:, :, None] & (index < lengths[:, None, None])
        cand = jnp.where(valid, jnp.take_along_axis(tokens[:, None, :], jnp.clip(index, 0, S - 1), axis=2), 0)
        if C == 1:
            draft_tokens, count = cand[:, 0], jnp.sum(valid[:, 0], axis=1, dtype=jnp.int32)
            return Draft(tokens=draft_tokens, probs=self._point_masses(draft_tokens), lengths=count), cache, dstate
        draft_tokens, parents, count = _trie(cand, valid)
        draft = Draft(tokens=draft_tokens, probs=self._point_masses(draft_tokens), lengths=count, parents=parents)
        return draft, cache, dstate

    def _point_masses(self, draft_tokens):
        return jax.nn.one_hot(draft_tokens, self.vocab_size, dtype=jnp.float32)


def _matches(tokens, lengths, max_ngram: int, num_candidates: int):
    """Where the continuations of the earliest C matches start [B, C] (-1 past the last match),
    for the longest n <= max_ngram whose last-n-gram has any earlier match with a known
    continuation other than the pattern's own end."""
    B, S = tokens.shape
    ends = jnp.arange(S)[None, :]                                      # a match's last token e
    last = lambda back: jnp.take_along_axis(tokens, jnp.clip(lengths[:, None] - 1 - back, 0, S - 1), axis=1)
    # Matches are indexed by where they end, so the (n+1)-gram's matches are the n-gram's that
    # also agree one token further back: one comparison per n. No longer n-gram can match once
    # none of length n does, so the loop stops after the longest match, not at max_ngram
    # (which may be anything: an n-gram longer than the row never matches).
    ones = (tokens == last(0)) & (ends + 1 < lengths[:, None])         # the 1-grams; e + 1: a continuation

    def longer(carry):
        n, match, chosen = carry
        chosen = jnp.where(jnp.any(match, axis=1)[:, None], match, chosen)  # longer n-grams overwrite shorter
        # No check that the row is longer than n: a match ends at e >= n and below length - 1.
        agrees = (jnp.roll(tokens, n, axis=1) == last(n)) & (ends >= n)
        return n + 1, match & agrees, chosen

    _, _, chosen = jax.lax.while_loop(lambda c: (c[0] <= min(max_ngram, S)) & jnp.any(c[1]), longer,
                                      (jnp.int32(1), ones, jnp.zeros((B, S), bool)))
    if num_candidates == 1:  # the earliest match: a min, cheaper than a top-k
        earliest = jnp.min(jnp.where(chosen, ends, S), axis=1, keepdims=True)
        return jnp.where(earliest < S, earliest + 1, -1).astype(jnp.int32)
    # The earliest C matches: the C largest of S - e over matching e. A row of S tokens has
    # fewer than S matches, so candidates past S stay empty (-1).
    key, _ = jax.lax.top_k(jnp.where(chosen, S - ends, 0), min(num_candidates, S))
    key = jnp.pad(key, ((0, 0), (0, num_candidates - key.shape[1])))
    return jnp.where(key > 0, S - key + 1, -1).astype(jnp.int32)


def _trie(cand, valid):
    """Merges C candidate continuations [B, C, K] (valid: which tokens exist) into a tree.

    Node (c, d) is token d of candidate c; it is the same node as (c', d) for the first c'
    that agrees with c on tokens 0..d. The distinct nodes, in order of c * K + d (parents
    come first), are returned compacted to the front: (tokens [B, C*K], parents [B, C*K],
    count [B]); the rest is padding.
    """
    B, C, K = cand.shape
    same = (cand[:, :, None, :] == cand[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]
    prefix = jnp.cumprod(same, axis=-1).astype(bool)                  # [B, c', c, d]: agree on 0..d
    earlier = jnp.arange(C)[:, None] <= jnp.arange(C)[None, :]         # c' <= c
    owner = jnp.argmax(prefix & earlier[None, :, :, None], axis=1)    # [B, c, d]: first c' agreeing
    node = owner * K + jnp.arange(K)[None, None, :]                    # flat index of (c, d)'s node
    distinct = (owner == jnp.arange(C)[None, :, None]) & valid
    parent = jnp.where(jnp.arange(K)[None, None, :] > 0, jnp.roll(node, 1, axis=2), -1)
    flat = lambda x: x.reshape(B, C * K)
    order = jnp.argsort(~flat(distinct), axis=1, stable=True)          # distinct nodes first, in order
    position = jnp.zeros((B, C * K), jnp.int32).at[jnp.arange(B)[:, None], order].set(
        jnp.arange(C * K, dtype=jnp.int32))
    parents = jnp.take_along_axis(flat(parent), order, axis=1)
    parents = jnp.where(parents >= 0, jnp.take_along_axis(position, jnp.maximum(parents, 0), axis=1), -1)
    count = jnp.sum(distinct, axis=(1, 2), dtype=jnp.int32)
    real = jnp.arange(C * K)[None, :] < count[:, None]
    tokens = jnp.where(real, jnp.take_along_axis(flat(cand), order, axis=1), 0)
    return tokens, jnp.where(real, parents, -1).astype(jnp.int32), count
