"""Self-speculation: the target drafts with some of its layers skipped (SWIFT, LayerSkip, DEL).

The draft reads the target's own KV cache for the prefix (exact, written by the full model)
and writes its guesses for the kept layers at the slots the verify step overwrites next.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdec.drafters import Drafter
from jaxdec.drafters.autoregressive import draft_chain


@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter(Drafter):
    skip_layers: tuple[int, ...]
    num_tokens: int

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        lengths = cache.lengths
        rows = jnp.arange(state.lengths.shape[0])
        pending = (state.lengths - 1)[:, None]
        draft, cache = draft_chain(cfg, params, cache, state.tokens[rows[:, None], pending], pending,
                                   self.num_tokens, sampling, keys, skip_layers=self.skip_layers)
        return draft, cache.replace(lengths=lengths), dstate
