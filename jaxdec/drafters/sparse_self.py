"""Self-speculation over a sparse KV cache (TriForce, MagicDec): the target drafts a chain
attending only to a `budget` of its cache, chosen per layer and kv head by Quest's bound,
and verifies it with full attention.

At long context decoding reads mostly the cache, so a draft that reads only the budget is
cheap, and it is the target's own model, so it agrees with the target far more often than a
small draft model. Like layer skipping, the draft reads the target's exact cache and writes
its guesses at the slots the verify step overwrites next.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdec.drafters import Drafter
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.sparse import fold_entries, summarize_cache


@dataclasses.dataclass(frozen=True)
class SparseSelfDrafter(Drafter):
    num_tokens: int

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        return summarize_cache(dstate, cache)

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        lengths = cache.lengths
        rows = jnp.arange(state.lengths.shape[0])
        pending = (state.lengths - 1)[:, None]
        draft, cache = draft_chain(cfg, params, cache, state.tokens[rows[:, None], pending], pending,
                                   self.num_tokens, sampling, keys, sparse=dstate)
        return draft, cache.replace(lengths=lengths), dstate

    def update(self, dstate, draft, num_accepted, path, features, committed):
        # The summaries catch up with what the verify step committed (never the draft's own
        # guesses, which lie in the recent pages every draft step reads anyway).
        return fold_entries(dstate, *committed)
