"""Hierarchical self-speculation (TriForce): a small draft model drafts for the target
attending to a sparse budget of its cache, which in turn drafts for the dense target.

Each round the sparse target builds a chain of `num_tokens` tokens by speculative decoding of
its own: the draft model proposes `draft_tokens` tokens, the sparse target checks them in one
forward (the rule of `jaxdec.verify.accept`) and keeps the accepted ones and its own next
token, until every row holds the chain. Speculative sampling makes each chain token's law,
given the tokens before it, exactly the sparse target's distribution at its position, which
goes to the dense verify as q: the dense target's acceptance stays lossless. For that the
sparse target's distribution must not depend on the guesses it checks, so its pages are
chosen by the chain's last token alone (`SparsePages.choose`).

Caches. The sparse target writes its guesses past the committed length, where the verify
step overwrites them (as `SparseSelfDrafter` does). The draft model's cache is trusted below
the chain's length - 2: every inner round re-reads the chain's last two tokens (the one
before may be a bonus or correction token it never read). The inner loop runs until every
row holds num_tokens + 1 tokens, so after any acceptance the draft cache is still trusted
below the next round's length - 2 and the next round starts like a DraftModel round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import KVCache
from jaxdec.config import ModelConfig
from jaxdec.drafters import Drafter
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.drafters.draft_model import prefill_draft_cache
from jaxdec.model import causal_mask, forward
from jaxdec.sampling import probabilities
from jaxdec.sparse import SparsePages, fold_entries, summarize_cache
from jaxdec.verify import Draft, accept


@struct.dataclass
class TriForceState:
    pages: SparsePages  # the page summaries of the target's committed cache
    cache: KVCache      # the draft model's own KV cache


@dataclasses.dataclass(frozen=True)
class TriForceDrafter(Drafter):
    draft_cfg: ModelConfig
    num_tokens: int
    draft_tokens: int

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        return dstate.replace(pages=summarize_cache(dstate.pages, cache),
                              cache=prefill_draft_cache(self.draft_cfg, dparams, dstate.cache, tokens, prompt_bucket))

    def propose(self, cfg, params, cache, dparams, dstate, state, sampling, keys):
        B, S = state.tokens.shape
        K, k = self.num_tokens, self.draft_tokens
        rows = jnp.arange(B)
        committed = cache.lengths
        # The chain so far lives in a copy of the token buffer: row b's context is
        # tokens[b, :length[b]], the pending token (the first unverified one) at committed[b].
        wanted = state.lengths + K + 1

        def inner_round(carry):
            i, cache, dcache, tokens, probs, length = carry
            live = length < wanted
            inner_keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, i), 3))(keys)
            last_two = length[:, None] + jnp.array([-2, -1], jnp.int32)[None, :]
            guess, dcache = draft_chain(self.draft_cfg, dparams, dcache.replace(lengths=length - 2),
                                        tokens[rows[:, None], last_two], last_two, k, sampling, inner_keys[:, 0])
            # The sparse target reads the chain's last token and the guesses in one forward.
            step = jnp.concatenate([tokens[rows, length - 1][:, None], guess.tokens], axis=1)
            positions = (length - 1)[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
            logits, _, cache = forward(cfg, params, step, positions, cache.replace(lengths=length - 1),
                                       causal_mask(B, k + 1), sparse=dstate.pages)
            num_accepted, next_token, _ = accept(logits, guess, sampling, inner_keys[:, 1], inner_keys[:, 2])
            # Row b appends guesses[:num_accepted] and next_token, each with the sparse target's
            # distribution at its position (the law the chain follows).
            j = jnp.arange(k + 1)[None, :]
            emitted = jnp.where(j < num_accepted[:, None], jnp.pad(guess.tokens, ((0, 0), (0, 1))), next_token[:, None])
            keep = (j <= num_accepted[:, None]) & live[:, None]
            slots = jnp.where(keep, length[:, None] + j, S)
            tokens = tokens.at[rows[:, None], slots].set(emitted, mode="drop")
            chain_slots = jnp.where(keep, length[:, None] + j - state.lengths[:, None], K + 1)
            probs = probs.at[rows[:, None], chain_slots].set(probabilities(logits, sampling), mode="drop")
            length = jnp.where(live, length + num_accepted + 1, length)
            return i + 1, cache, dcache, tokens, probs, length

        def keep_going(carry):  # at most K + 1 rounds: each adds at least one token to every live row
            *_, length = carry
            return jnp.any(length < wanted)

        V = cfg.vocab_size
        start = (jnp.int32(0), cache, dstate.cache, state.tokens, jnp.zeros((B, K + 1, V), jnp.float32), state.lengths)
        _, cache, dcache, tokens, probs, _ = jax.lax.while_loop(keep_going, inner_round, start)
        chain = tokens[rows[:, None], jnp.minimum(state.lengths[:, None] + jnp.arange(K)[None, :], S - 1)]
        draft = Draft(tokens=chain, probs=probs[:, :K], lengths=jnp.full((B,), K, jnp.int32))
        return draft, cache.replace(lengths=committed), dstate.replace(cache=dcache)

    def update(self, dstate, draft, num_accepted, path, features, committed):
        return dstate.replace(pages=fold_entries(dstate.pages, *committed))
