"""Drafters: each proposes draft tokens (a `jaxdec.verify.Draft`) for the one verify path.

A drafter is a small frozen (hashable) dataclass, a static argument of the jitted round, with
    num_tokens: int                         K, the fixed number of draft slots
    prefill(cfg, params, dparams, dstate, tokens, prompt_lengths, prompt_bucket) -> dstate
    propose(cfg, params, cache, dparams, dstate, state, sampling, keys) -> (Draft, cache, dstate)
`dparams` (e.g. a draft model's weights) and `dstate` (e.g. its KV cache) are pytrees that
travel beside the target's; `propose` must leave `cache.lengths` as it found it.
"""
