"""Draft and target on separate devices, overlapped (PEARL's post-verify), for `spec.Pearl`.

The usual round (`jaxdec.speculative`) runs drafting and verification one after the other in
one program. Here the draft model lives on its own devices, and while the target verifies
round r's chain x1..xK, the draft already drafts round r + 1 on the guess that all K tokens
are accepted: it drafts K + 1 more tokens y1..y(K+1) after x1..xK, y1 standing for the
target's bonus token. Both are dispatched before the host waits for either (JAX's
asynchronous dispatch), so they run at the same time. If every active row accepted all K
tokens and the target's next token equals y1, round r + 1 verifies y2..y(K+1) at once;
otherwise the draft drafts afresh from what was accepted (and the target waits for it).

Lossless, and more: the chain drafted ahead is bit for bit the chain the sequential schedule
would draft after the same tokens (same keys, same cache entries; see `_draft_ahead`), so
overlapping changes when drafts are computed, never the output. The draft cache needs no
fix-ups: a round's draft re-reads the last two tokens (as `DraftModelDrafter` does), and the
guess writes only entries that a later draft re-reads before trusting them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdec import sharding, steps
from jaxdec.drafters.autoregressive import draft_chain
from jaxdec.drafters.draft_model import DraftModelDrafter, DraftModelState, prefill_draft_cache
from jaxdec.speculative import round_keys, verify_and_commit
from jaxdec.verify import Draft


@dataclasses.dataclass
class OverlapState:
    """What the host loop carries between dispatches (generate() holds it as the dstate)."""
    cache: Any             # the draft model's KV cache, on the draft's devices
    draft: Draft | None = None  # the chain the next round verifies, on the draft's devices
    sampling: Any = None   # the sampling parameters, on the draft's devices
    hits: int = 0          # rounds that verified a chain drafted during the previous verify


def _placement(cfg, params):
    """Where a model's per-round inputs go: replicated over its mesh, or its one device."""
    if cfg.mesh is not None:
        return NamedSharding(cfg.mesh, P())
    return jax.tree_util.tree_leaves(params)[0].sharding


@functools.partial(jax.jit, static_argnames=("drafter", "prompt_bucket"), donate_argnames=("dcache",))
def _draft_prefill(drafter, dparams, dcache, tokens, prompt_bucket: int):
    return prefill_draft_cache(drafter.draft_cfg, dparams, dcache, tokens, prompt_bucket)


def fresh_chain(drafter, dparams, dcache, state, sampling):
    """(a chain of drafter.num_tokens after the state's tokens, dcache), with the keys the
    sequential round would use."""
    dstate = DraftModelState(dcache, jnp.full(state.lengths.shape, drafter.num_tokens, jnp.int32))
    draft, _, dstate = drafter.propose(None, None, None, dparams, dstate, state, sampling, round_keys(state)[:, 0])
    return draft, dstate.cache


_draft_fresh = jax.jit(fresh_chain, static_argnames=("drafter",), donate_argnames=("dcache",))


def _appended(state, tokens):
    """The state with tokens [B, N] appended to every row (a guess, for the draft only)."""
    B, N = tokens.shape
    slots = state.lengths[:, None] + jnp.arange(N)[None, :]
    return state.replace(tokens=state.tokens.at[jnp.arange(B)[:, None], slots].set(tokens, mode="drop"),
                         lengths=state.lengths + N)


@functools.partial(jax.jit, static_argnames=("drafter",), donate_argnames=("dcache",))
def _draft_ahead(drafter, dparams, dcache, state, draft: Draft, sampling):
    """The guess that all of `draft` (x1..xK) is accepted: y1, the draft's stand-in for the
    target's next token, then the chain the next round would draft after y1. Returns (y1 [B],
    that chain, dcache).

    The chain is exactly what `fresh_chain` computes from the committed state when the guess
    comes true (same tokens, same keys, same trusted cache entries): y1 is drawn after feeding
    only xK (the entries of x1..x(K-1) are already written), and the chain re-reads xK and y1
    as any fresh draft does. So a hit changes when the draft is computed, never what it is."""
    B, K = draft.tokens.shape
    guess = _appended(state, draft.tokens)
    last = guess.lengths - 1
    dcache = dcache.replace(lengths=last)
    first, dcache = draft_chain(drafter.draft_cfg, dparams, dcache, draft.tokens[:, -1:], last[:, None], 1, sampling,
                                round_keys(guess)[:, 0])
    y1 = first.tokens[:, 0]
    following, dcache = fresh_chain(drafter, dparams, dcache, _appended(guess, y1[:, None]), sampling)
    return y1, following, dcache


# The state is not donated: its copy for the draft's devices may still be in flight.
@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _verify(cfg, params, cache, state, draft, sampling, stop_ids, max_new_tokens):
    state, cache, (num_accepted, next_token, *_) = verify_and_commit(cfg, params, cache, state, draft, sampling,
                                                                      stop_ids, max_new_tokens)
    return state, cache, num_accepted, next_token


def guess_came_true(num_accepted, next_token, guess, active, num_tokens: int) -> bool:
    """Whether every active row accepted its whole chain and the target's next token is the
    draft's guess y1 (host arrays [B]): only then is the chain drafted ahead the one the next
    round would draft. A row that stopped early whose next token happens to equal y1 is no hit:
    its chain was drafted after tokens that were not committed."""
    return bool(np.all((num_accepted[active] == num_tokens) & (next_token[active] == guess[active])))


@dataclasses.dataclass(frozen=True, eq=False)
class Overlapped:
    """The host side of the overlapped schedule (what `spec.Pearl.build` returns as its drafter)."""
    target: Any       # jaxdec.Model
    draft: Any        # jaxdec.Model, on its own devices
    num_tokens: int
    overlap: bool = True

    def __post_init__(self):
        object.__setattr__(self, "drafter", DraftModelDrafter(self.draft.config, self.num_tokens))

    def to_target(self, x):
        return jax.device_put(x, _placement(self.target.config, self.target.params))

    def to_draft(self, x):
        return jax.device_put(x, _placement(self.draft.config, self.draft.params))

    def prefill(self, cache, ostate: OverlapState, tokens, prompt_lengths, row_valid, sampling, keys, stop_ids,
                max_new, prompt_bucket: int):
        """The target's prefill, the draft's (on its devices, at the same time) and the first chain."""
        state, cache = steps.prefill(self.target.config, self.target.params, cache, tokens, prompt_lengths, row_valid,
                                     sampling, keys, stop_ids, max_new, prompt_bucket=prompt_bucket)
        ostate.sampling = self.to_draft(sampling)
        dcache = _draft_prefill(self.drafter, self.draft.params, ostate.cache, self.to_draft(tokens),
                                prompt_bucket=prompt_bucket)
        ostate.draft, ostate.cache = _draft_fresh(self.drafter, self.draft.params, dcache, self.to_draft(state),
                                                  ostate.sampling)
        return state, cache, ostate

    def decode(self, cache, ostate: OverlapState, state, sampling, stop_ids, max_new, num_rounds: int):
        """Up to num_rounds rounds, ending early once every row is done: (state, cache, ostate)."""
        cfg, params, dparams = self.target.config, self.target.params, self.draft.params
        done = sharding.to_host(state.done)
        for _ in range(num_rounds):
            if done.all():
                break
            active = ~done
            on_draft = self.to_draft(state)
            # Both dispatched before the host waits: the target verifies while the draft guesses.
            state, cache, num_accepted, next_token = _verify(cfg, params, cache, state, self.to_target(ostate.draft),
                                                             sampling, stop_ids, max_new)
            if self.overlap:
                guess, following, ostate.cache = _draft_ahead(self.drafter, dparams, ostate.cache, on_draft,
                                                              ostate.draft, ostate.sampling)
            num_accepted, next_token, done = map(sharding.to_host, (num_accepted, next_token, state.done))
            if done.all():
                break
            if self.overlap and guess_came_true(num_accepted, next_token, sharding.to_host(guess), active,
                                                self.num_tokens):
                ostate.hits += 1
                ostate.draft = following
            else:
                ostate.draft, ostate.cache = _draft_fresh(self.drafter, dparams, ostate.cache, self.to_draft(state),
                                                          ostate.sampling)
        return state, cache, ostate
