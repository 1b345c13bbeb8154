"""A separate, smaller draft model with the target's tokenizer (Leviathan et al.; Chen et al.),
with optional adaptive draft length."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import KVCache
from jaxdec.config import ModelConfig
from jaxdec.drafters import Drafter
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.model import causal_mask, forward, prefill_hidden


def prefill_draft_cache(draft_cfg: ModelConfig, weights, cache: KVCache, tokens, prompt_bucket: int) -> KVCache:
    """The draft model's cache after reading the prompts (tokens [B, S], left-aligned)."""
    return prefill_hidden(draft_cfg, weights, cache, tokens, prompt_bucket)[1]


class UsesDraftModel:
    """What every drafter built on a separate draft model shares (it needs `draft_cfg` and
    `drafts_with_target` fields): its weights, reading the prompts, and the catch-up read
    of the last two tokens at the start of each round."""

    def _weights(self, params, dparams):
        return params if self.drafts_with_target else dparams

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        return dstate.replace(cache=prefill_draft_cache(self.draft_cfg, self._weights(params, dparams), dstate.cache,
                                                        tokens, prompt_bucket))

    def _catch_up(self, weights, dcache: KVCache, state):
        """(draft logits [B, V] after the pending token, the draft cache through it). The
        cache is trusted only below lengths - 2: the token before the pending one may be a
        bonus token the draft never saw, so both are re-read."""
        B = state.lengths.shape[0]
        last_two = jnp.stack([state.lengths - 2, state.lengths - 1], axis=1)
        dcache = dcache.replace(lengths=state.lengths - 2)
        logits, _, dcache = forward(self.draft_cfg, weights, state.tokens[jnp.arange(B)[:, None], last_two], last_two,
                                    dcache, causal_mask(B, 2))
        return logits[:, -1], dcache


@struct.dataclass
class DraftModelState:
    cache: KVCache          # the draft model's own KV cache
    num_tokens: jax.Array   # int32 [B]: each row's current draft length (the adaptive schedule)


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter(UsesDraftModel, Drafter):
    draft_cfg: ModelConfig
    num_tokens: int
    confidence_threshold: float = 0.0
    adaptive_schedule: bool = False
    # The draft is the target itself (a perfect draft, for tests): its weights are not passed
    # a second time, since the same buffers as two jit arguments make XLA copy them each round.
    drafts_with_target: bool = False

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        # The draft cache is trusted only below lengths - 2: each round re-reads the last two
        # tokens (the previous one may be a bonus token the draft never saw), so nothing needs
        # fixing up after acceptance.
        rows = jnp.arange(state.lengths.shape[0])
        last_two = jnp.stack([state.lengths - 2, state.lengths - 1], axis=1)
        dcache = dstate.cache.replace(lengths=state.lengths - 2)
        draft, dcache = draft_chain(self.draft_cfg, self._weights(params, dparams), dcache, state.tokens[rows[:, None], last_two],
                                    last_two, self.num_tokens, sampling, keys, max_lengths=dstate.num_tokens,
                                    confidence_threshold=self.confidence_threshold)
        return draft, cache, dstate.replace(cache=dcache)

    def update(self, dstate, draft, num_accepted, path, features, committed):
        if not self.adaptive_schedule:
            return dstate
        # Hugging Face's heuristic: two more tokens after a fully accepted draft, one fewer otherwise.
        grown = jnp.where(num_accepted >= draft.lengths, dstate.num_tokens + 2, dstate.num_tokens - 1)
        return dstate.replace(num_tokens=jnp.clip(grown, 1, self.num_tokens).astype(jnp.int32))
