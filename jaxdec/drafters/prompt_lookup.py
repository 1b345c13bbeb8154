"""Prompt lookup: draft the tokens that followed an earlier occurrence of the last n-gram.

Draft-free and deterministic: q is a point mass on each drafted token. For n from max_ngram
down to 1, the row's last n tokens (ending with the pending token) are searched for in its
prompt and output; the earliest match with a continuation wins (as in Hugging Face's prompt
lookup) and up to num_tokens following tokens become the draft. A row with no match drafts
nothing (Draft.lengths = 0) and advances by one token, like plain decoding.
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
    num_tokens: int
    vocab_size: int

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        tokens, lengths = state.tokens, state.lengths
        B, S = tokens.shape
        K = self.num_tokens
        starts = jnp.arange(S)[None, :]                                    # match start j
        best_start = jnp.full((B,), -1, jnp.int32)                         # continuation start
        for n in range(1, self.max_ngram + 1):  # longer n-grams overwrite shorter ones
            pattern = jnp.take_along_axis(tokens, jnp.clip(lengths[:, None] - n + jnp.arange(n), 0, S - 1), axis=1)
            match = jnp.ones((B, S), bool)
            for o in range(n):
                shifted = jnp.roll(tokens, -o, axis=1)                     # shifted[:, j] = tokens[:, j + o]
                match &= shifted == pattern[:, o:o + 1]
            # The continuation j + n must be a known token other than the pattern's own end.
            match &= (starts + n < lengths[:, None]) & (lengths[:, None] >= n)
            earliest = jnp.min(jnp.where(match, starts, S), axis=1).astype(jnp.int32)
            best_start = jnp.where(earliest < S, earliest + n, best_start)
        found = best_start >= 0
        index = jnp.clip(best_start[:, None] + jnp.arange(K)[None, :], 0, S - 1)
        draft_tokens = jnp.where(found[:, None], jnp.take_along_axis(tokens, index, axis=1), 0)
        count = jnp.where(found, jnp.minimum(K, lengths - best_start), 0).astype(jnp.int32)
        probs = jax.nn.one_hot(draft_tokens, self.vocab_size, dtype=jnp.float32)
        return Draft(tokens=draft_tokens, probs=probs, lengths=count), cache, dstate
