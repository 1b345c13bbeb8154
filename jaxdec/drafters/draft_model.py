"""A separate, smaller draft model with the target's tokenizer (Leviathan et al.; Chen et al.)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdec.config import ModelConfig
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.model import causal_mask, forward_hidden


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    draft_cfg: ModelConfig
    num_tokens: int

    def prefill(self, cfg, params, dparams, dcache, tokens, prompt_lengths, prompt_bucket):
        B = tokens.shape[0]
        positions = jnp.broadcast_to(jnp.arange(prompt_bucket, dtype=jnp.int32), (B, prompt_bucket))
        dcache = dcache.replace(lengths=jnp.zeros_like(dcache.lengths))
        _, dcache = forward_hidden(self.draft_cfg, dparams, tokens[:, :prompt_bucket], positions, dcache,
                                   causal_mask(B, prompt_bucket))
        return dcache

    def propose(self, cfg, params, cache, dparams, dcache, state, sampling, keys):
        # The draft cache is trusted only below lengths - 2: each round re-reads the last two
        # tokens (the previous one may be a bonus token the draft never saw), so nothing needs
        # fixing up after acceptance.
        rows = jnp.arange(state.lengths.shape[0])
        last_two = jnp.stack([state.lengths - 2, state.lengths - 1], axis=1)
        dcache = dcache.replace(lengths=state.lengths - 2)
        draft, dcache = draft_chain(self.draft_cfg, dparams, dcache, state.tokens[rows[:, None], last_two],
                                    last_two, self.num_tokens, sampling, keys)
        return draft, cache, dcache
