"""Drafters: each proposes draft tokens (a `jaxdec.verify.Draft`) for the one verify path.

A drafter is a small frozen (hashable) dataclass, a static argument of the jitted round:
    num_tokens: int                         K, the fixed number of draft slots
    prefill(cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features) -> dstate
        after the target's prefill (`cache` holds the prompts)
    propose(cfg, params, cache, dparams, dstate, state, sampling, keys) -> (Draft, cache, dstate)
    update(dstate, draft, num_accepted, path, features, committed) -> dstate
        after acceptance (adaptive drafters, trees that keep their draft's cache, heads that
        draft from the target's features, page summaries of the target's cache)
`features` are the target's hidden states (what its LM head reads): over the prompt bucket
at prefill [B, P, D], over the verify step at update [B, K+1, D] (the pending token's, then
each draft node's; `path` picks the accepted ones).
`committed` = (keys, slots): the keys the round wrote to the target's cache, per layer
[B, K+1, kv_heads, D] in cache order, and the slot each landed at, int32 [B, K+1] (-1 for
entries past the row's new length); a drafter that tracks the cache reads them here rather
than from the cache, which inside the decode loop would make XLA copy it.
`dparams` (e.g. a draft model's weights) and `dstate` (e.g. its KV cache) are pytrees that
travel beside the target's; `propose` must leave `cache.lengths` as it found it.
"""


class Drafter:
    """Defaults for drafters that keep no state of their own."""

    def prefill(self, cfg, params, dparams, dstate, cache, tokens, prompt_lengths, prompt_bucket, features):
        return dstate

    def update(self, dstate, draft, num_accepted, path, features, committed):
        return dstate
