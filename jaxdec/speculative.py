"""The speculative decoding round: drafter.propose -> verify -> accept -> commit.

A round in one place: the drafter proposes a `Draft` (a chain or a token tree), the target
scores it in one forward (`jaxdec.verify`), the acceptance rule picks each row's path, and
commit appends its tokens and writes its keys and values to the cache.

Every method goes through `speculative_decode`; only the drafter differs. All shapes are fixed
(K draft slots per row), rows accept different numbers of tokens, keep their own lengths and
finish on their own stop tokens. Several rounds run per dispatch inside a lax.while_loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdec.config import ModelConfig
from jaxdec import steps
from jaxdec.steps import DecodeState
from jaxdec.cache import write
from jaxdec.verify import accept, commit_entries, path_tokens, verify_forward

ROUNDS_PER_DISPATCH = 16


def commit(state: DecodeState, draft_tokens, num_accepted, next_token, stop_ids, max_new_tokens):
    """Appends each active row's accepted draft tokens (draft_tokens [B, K], the accepted
    path first) and its next token to state.tokens,
    cut after the first stop token and at max_new_tokens. Returns (state, tokens emitted [B])."""
    B, K = draft_tokens.shape
    rows = jnp.arange(B)[:, None]
    index = jnp.arange(K + 1)[None, :]
    emitted = jnp.concatenate([draft_tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
    emitted = emitted.at[jnp.arange(B), num_accepted].set(next_token)
    # A stop among the rejected drafts past the next token lies at or past `count` below, so it
    # neither cuts the row nor ends it: no mask needed.
    is_stop = jnp.any(emitted[..., None] == stop_ids, axis=-1)
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), K + 1)
    remaining = max_new_tokens - (state.lengths - state.prompt_lengths)
    active = ~state.done
    count = jnp.minimum(jnp.minimum(num_accepted + 1, first_stop + 1), remaining)
    count = jnp.where(active, count, 0).astype(jnp.int32)
    slots = jnp.where(index < count[:, None], state.lengths[:, None] + index, state.tokens.shape[1])
    finished = (first_stop < count) | (count == remaining)
    state = state.replace(
        tokens=state.tokens.at[rows, slots].set(emitted, mode="drop"),
        lengths=state.lengths + count,
        done=state.done | (active & finished),
        target_steps=state.target_steps + 1,
        active_row_steps=state.active_row_steps + jnp.sum(active, dtype=jnp.int32))
    return state, count


def round_keys(state: DecodeState):
    """[B, 3] keys of a row's round: draft, accept, next token. Fresh per row and round, since
    a row's length only grows between its rounds."""
    keys = jax.vmap(jax.random.fold_in)(state.keys, state.lengths)
    return jax.vmap(lambda k: jax.random.split(k, 3))(keys)


def verify_and_commit(cfg: ModelConfig, params, cache, state: DecodeState, draft, sampling, stop_ids, max_new_tokens):
    """The target's half of a round: verify the draft in one forward, accept, commit.
    Returns (state, cache, (num_accepted [B], next_token [B], path, the verify step's hidden
    states, committed: (keys per layer, slots) as `jaxdec.drafters` describes)), with
    cache.lengths == state.lengths - 1 again."""
    keys = round_keys(state)
    rows = jnp.arange(state.lengths.shape[0])
    pending = state.tokens[rows, state.lengths - 1]
    logits, hidden, new_kv = verify_forward(cfg, params, cache, pending, draft, ~state.done)
    num_accepted, next_token, path = accept(logits, draft, sampling, keys[:, 1], keys[:, 2])
    state, _ = commit(state, path_tokens(draft, path), num_accepted, next_token, stop_ids, max_new_tokens)
    # The pending token's entries and the accepted path's land in contiguous slots; the rest
    # (rejected drafts) lie past the new length, out of view.
    new_k, new_v = commit_entries(draft, new_kv, path)
    slots = cache.lengths[:, None] + jnp.arange(new_k[0].shape[1], dtype=jnp.int32)[None, :]
    cache = write(cache, new_k, new_v, slots)
    committed = (new_k, jnp.where(slots < (state.lengths - 1)[:, None], slots, -1))
    return state, cache.replace(lengths=state.lengths - 1), (num_accepted, next_token, path, hidden, committed)


# keep_unused: see steps.prefill.
@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "prompt_bucket"), donate_argnames=("cache", "dstate"),
                   keep_unused=True)
def prefill(cfg: ModelConfig, drafter, params, dparams, cache, dstate, tokens, prompt_lengths, row_valid, sampling,
            keys, stop_ids, max_new_tokens, *, prompt_bucket: int):
    """The target's prefill (`jaxdec.steps`) and the drafter's, in one program: the drafter
    reads the prompts too, and drafters on the target's features take its hidden states.
    Returns (state, cache, dstate)."""
    state, cache, hidden = steps.prefill_with_hidden(cfg, params, cache, tokens, prompt_lengths, row_valid, sampling,
                                                     keys, stop_ids, max_new_tokens, prompt_bucket)
    dstate = drafter.prefill(cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, hidden)
    return state, cache, dstate


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "num_rounds"),
                   donate_argnames=("cache", "dstate", "state"))
def speculative_decode(cfg: ModelConfig, drafter, params, dparams, cache, dstate, state: DecodeState,
                       sampling, stop_ids, max_new_tokens, *, num_rounds: int = ROUNDS_PER_DISPATCH):
    """Up to `num_rounds` speculative rounds, stopping early once every row is done.

    Invariant between rounds: cache.lengths == state.lengths - 1 (the pending token, last of
    state.tokens, is not in the cache yet).
    """
    def one_round(carry):
        i, cache, dstate, state = carry
        draft, cache, dstate = drafter.propose(cfg, params, cache, dparams, dstate, state, sampling,
                                               round_keys(state)[:, 0])
        state, cache, (num_accepted, _, path, hidden, committed) = verify_and_commit(
            cfg, params, cache, state, draft, sampling, stop_ids, max_new_tokens)
        dstate = drafter.update(dstate, draft, num_accepted, path, hidden, committed)
        return i + 1, cache, dstate, state

    def keep_going(carry):
        i, _, _, state = carry
        return (i < num_rounds) & ~jnp.all(state.done)

    _, cache, dstate, state = jax.lax.while_loop(keep_going, one_round, (jnp.int32(0), cache, dstate, state))
    return state, cache, dstate
