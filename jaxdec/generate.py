"""`jaxdec.generate` and `jaxdec.logits`: the host side of decoding.

generate() validates and tokenizes the prompts, pads them into fixed-shape buckets, runs the
prefill step once and then the jitted decode step (many tokens per dispatch) until every row
is done, and unpads the result. The steps themselves live in `jaxdec.steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterable
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import sharding, spec, speculative as spec_steps, steps
from jaxdec.cache import init_cache
from jaxdec.checks import check_draft_window, is_int
from jaxdec.loading import Model
from jaxdec.sampling import SamplingParams, row_keys

MAX_STOP_TOKENS = 16  # stop ids are padded to this many, so their number compiles nothing new
STREAM_STEPS = 4      # plain decoding steps per dispatch when streaming


@dataclasses.dataclass(frozen=True)
class Stats:
    new_tokens: int            # all rows together
    target_steps: int          # target forwards after prefill
    mean_accepted: float       # tokens per target step per active row (1.0 for plain decoding,
                               # and when no target step ran)
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float   # new_tokens / decode_seconds
    # Target steps summed over the rows active in each (mean_accepted's denominator): to pool
    # several calls, divide their summed emitted tokens by their summed active_row_steps.
    active_row_steps: int = 0
    rounds_drafted_ahead: int = 0  # spec.Pearl: rounds whose chain was drafted while the last one verified


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: list[list[int]]
    texts: list[str] | None
    stats: Stats


def _first_bad_token_id(ids, vocab: int) -> str | None:
    """'<id> outside the vocabulary [0, V)' (or '<value>, not an integer token id, ...') for the
    first id that is not a token of the vocabulary; None when all are."""
    for t in ids:
        if not is_int(t):
            return f"{t!r}, not an integer token id of the vocabulary [0, {vocab})"
        if not 0 <= t < vocab:
            return f"{t!r} outside the vocabulary [0, {vocab})"
    return None


def _checked_ids(ids, vocab: int, what: str) -> list[int]:
    """`ids` (a sequence) as Python ints, after a ValueError naming `what` for an empty one or
    for the first id outside the vocabulary."""
    if isinstance(ids, (bytes, bytearray, memoryview)):  # a sequence of ints, but of bytes, not of token ids
        raise ValueError(f"{what} is bytes ({bytes(ids)!r:.40}), not token ids: decode it to text first")
    ids = list(ids)
    bad = _first_bad_token_id(ids, vocab)
    if bad:
        raise ValueError(f"{what} has token id {bad}")
    if not ids:
        raise ValueError(f"{what} is empty")
    return [int(t) for t in ids]


def _as_lists(value):
    """A NumPy, JAX or torch array (anything with __array__ that is not a list) as nested lists of
    Python numbers, so ids given the way Hugging Face's `input_ids` are go through the checks
    (and their messages) of lists."""
    if hasattr(value, "__array__") and not isinstance(value, (Sequence, str, bytes)):
        return np.asarray(value).tolist()
    return value


def encode_prompts(model: Model, prompts) -> list[list[int]]:
    """Token ids of each prompt, checked: non-empty, ids inside the vocabulary. A 2-D array of
    ids is a batch of equal-length rows."""
    prompts = _as_lists(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings or of token-id lists, got {prompts!r:.80}")
    vocab = model.config.vocab_size
    rows = []
    for i, prompt in enumerate(prompts):
        prompt = _as_lists(prompt)
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError(f"prompt {i} is text ({prompt!r:.40}) but the model has no tokenizer; "
                                 f"pass token ids instead")
            try:  # lone surrogates: bytes that were not UTF-8, read with errors="surrogateescape"
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"prompt {i} is not valid text: {err.reason} {prompt[err.start]!r} at character "
                                 f"{err.start} (bytes that are not UTF-8?)") from None
            ids = model.tokenizer.encode(prompt).ids
            # A tokenizer with tokens past the model's embeddings (added tokens) would index
            # outside them, which XLA does not refuse.
            bad = _first_bad_token_id(ids, vocab)
            if bad:
                raise ValueError(f"prompt {i} ({prompt!r:.40}) encodes to token id {bad}: the tokenizer has "
                                 f"tokens the model does not")
        elif isinstance(prompt, Sequence):
            ids = _checked_ids(prompt, vocab, f"prompt {i}")
        elif is_int(prompt):  # a flat list (or 1-D array) of ids: one prompt, not a batch of them
            raise ValueError(f"prompt {i} must be a string or a list of token ids, got the id {prompt!r}; "
                             f"for one prompt of ids pass a list of it, [ids]")
        else:
            raise ValueError(f"prompt {i} must be a string or a list of token ids, got {prompt!r:.40}")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        rows.append(ids)
    return rows


def _check_model(model) -> None:
    # Else an AttributeError on model.config that names nothing (a checkpoint's name, say).
    if not isinstance(model, Model):
        raise ValueError(f"model must be a jaxdec.Model (from jaxdec.load), got {model!r:.80}")


def _stop_ids(model: Model, stop_token_ids) -> np.ndarray:
    ids = model.stop_token_ids if stop_token_ids is None else _as_lists(stop_token_ids)
    # A bare id (or any non-iterable) would fail in list() with a TypeError that names nothing.
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"stop_token_ids must be a list of token ids or None, got {ids!r:.80}")
    ids = list(ids)
    bad = _first_bad_token_id(ids, model.config.vocab_size)
    if bad:
        raise ValueError(f"stop token id {bad}")
    if len(ids) > MAX_STOP_TOKENS:
        whose = "" if stop_token_ids is not None else " (the checkpoint's eos_token_id: pass stop_token_ids= yourself)"
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop_token_ids are supported, got {len(ids)}{whose}")
    return np.array(ids + [-1] * (MAX_STOP_TOKENS - len(ids)), np.int32)


def float32_products(fn):
    """Runs `fn(model, ...)` with the matrix products of a float32 model in float32. JAX's
    default on GPUs and TPUs is TF32 or a bfloat16 pass, which rounds a verify's wide products
    and a 1-token step's apart enough to flip a near-tie (README, "Numerics"): the lossless
    guarantee is for float32 weights, so they get float32 arithmetic. A precision the user set
    (jax_default_matmul_precision) is kept; on a CPU nothing changes."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        exact = (isinstance(model, Model) and model.dtype == jnp.float32
                 and jax.config.jax_default_matmul_precision is None)
        with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
            return fn(model, *args, **kwargs)
    return run


@float32_products
def generate(model: Model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
             stop_token_ids=None, speculative=None, on_progress=None) -> GenerateOutput:
    """Generates up to `max_new_tokens` new tokens for every prompt: `prompts` is a list of
    strings or of token-id lists (rows may differ in length), or a 2-D integer array of ids.

    temperature 0 is greedy; otherwise tokens are drawn from the distribution after
    temperature, top-k, top-p and min-p. Each row ends after a stop token (included) or
    after max_new_tokens. `stop_token_ids` (at most 16): None uses the checkpoint's EOS ids,
    [] never stops.
    `speculative`: None (plain decoding) or a `jaxdec.spec` method; the output is the same
    (except for spec.LossySparseDecode, an explicitly lossy opt-in).
    `on_progress(tokens)`, if given, is called with each row's new tokens so far after every
    dispatch (dispatches are then kept short, for streaming).
    """
    _check_model(model)
    if speculative is not None and not isinstance(speculative, spec.METHODS):
        raise ValueError(f"speculative must be None or one of jaxdec.spec."
                         f"{{{', '.join(m.__name__ for m in spec.METHODS)}}}, got {speculative!r:.80}")
    rows = encode_prompts(model, prompts)
    if on_progress is not None and not callable(on_progress):  # else a TypeError after the prefill
        raise ValueError(f"on_progress must be a function of the rows' new tokens, or None; got {on_progress!r:.80}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # jax.random.key takes a C long: a larger seed would fail later with an OverflowError.
    if not is_int(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    # Python ints from here: a NumPy int8 of 120 plus a prompt's length would wrap around.
    max_new_tokens, seed = int(max_new_tokens), int(seed)
    sampling = SamplingParams.create(temperature, top_k, top_p, min_p)
    stop_ids = _stop_ids(model, stop_token_ids)
    cfg = model.config
    longest = max(len(r) for r in rows)
    for what, context in [("the model", cfg.max_position_embeddings), *spec.draft_contexts(speculative)]:
        if longest + max_new_tokens > context:
            raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                             f"{what}'s max_position_embeddings={context}")
    batch = steps.bucket(len(rows))
    slots = steps.cache_bucket(cfg, longest + max_new_tokens)
    prompt_bucket = min(steps.bucket(longest, steps.MIN_PROMPT_BUCKET), slots)
    tokens = np.zeros((batch, slots), np.int32)
    prompt_lengths = np.ones((batch,), np.int32)  # padding rows: one dummy token
    for b, ids in enumerate(rows):
        tokens[b, :len(ids)] = ids
        prompt_lengths[b] = len(ids)
    row_valid = np.arange(batch) < len(rows)
    max_new = np.int32(max_new_tokens)
    keys = row_keys(seed, batch)
    if cfg.mesh is not None:  # every input placed explicitly: rows over "data", the rest replicated
        tokens, prompt_lengths, row_valid, key_data = sharding.put_batch(
            cfg.mesh, tokens, prompt_lengths, row_valid, jax.random.key_data(keys))
        keys = jax.random.wrap_key_data(key_data)
        sampling, stop_ids, max_new = sharding.put_replicated(cfg.mesh, (sampling, stop_ids, max_new))

    if speculative is not None:
        drafter, dparams, dstate = speculative.build(model, batch, slots)
        if drafter is not None:  # the verify step scores the pending token and every draft slot
            check_draft_window(type(speculative).__name__, drafter.num_tokens, cfg.max_position_embeddings)
    if max_new_tokens == 0:  # after every check, so that a bad call fails the same way at any length
        return GenerateOutput([[] for _ in rows], [""] * len(rows) if model.tokenizer else None,
                              Stats(0, 0, 1.0, 0.0, 0.0, 0.0))

    start = time.perf_counter()
    cache = init_cache(cfg, batch, slots, model.dtype)
    overlapped = isinstance(speculative, spec.Pearl)  # its own host loop (jaxdec.overlap)
    lossy = isinstance(speculative, spec.LossySparseDecode)  # plain decoding over sparse attention
    if speculative is None:
        state, cache = steps.prefill(cfg, model.params, cache, tokens, prompt_lengths, row_valid, sampling,
                                     keys, stop_ids, max_new, prompt_bucket=prompt_bucket)
    elif lossy:
        state, cache, dstate = steps.sparse_prefill(cfg, model.params, cache, dstate, tokens, prompt_lengths,
                                                    row_valid, sampling, keys, stop_ids, max_new,
                                                    prompt_bucket=prompt_bucket)
    elif overlapped:
        state, cache, dstate = drafter.prefill(cache, dstate, tokens, prompt_lengths, row_valid, sampling, keys,
                                               stop_ids, max_new, prompt_bucket)
    else:
        state, cache, dstate = spec_steps.prefill(cfg, drafter, model.params, dparams, cache, dstate, tokens,
                                                  prompt_lengths, row_valid, sampling, keys, stop_ids,
                                                  max_new, prompt_bucket=prompt_bucket)
    # Prefill ends here: the target's, and the drafter's (Pearl's first chain, on its own devices).
    jax.block_until_ready(state if speculative is None else (state, dstate.draft if overlapped else dstate))
    done = sharding.to_host(state.done)
    prefill_seconds = time.perf_counter() - start

    def new_tokens_of(state):
        out_tokens, lengths = sharding.to_host(state.tokens), sharding.to_host(state.lengths)
        return [out_tokens[b, len(ids):lengths[b]].tolist() for b, ids in enumerate(rows)]

    start = time.perf_counter()
    if on_progress is not None:
        on_progress(new_tokens_of(state))
    while not done.all():
        plain_steps = STREAM_STEPS if on_progress else steps.DECODE_STEPS_PER_DISPATCH
        if speculative is None:
            state, cache = steps.decode(cfg, model.params, cache, state, sampling, stop_ids, max_new,
                                        num_steps=plain_steps)
        elif lossy:
            state, cache, dstate = steps.sparse_decode(cfg, model.params, cache, state, dstate, sampling, stop_ids,
                                                       max_new, num_steps=plain_steps)
        elif overlapped:
            state, cache, dstate = drafter.decode(cache, dstate, state, sampling, stop_ids, max_new,
                                                  num_rounds=1 if on_progress else spec_steps.ROUNDS_PER_DISPATCH)
        else:
            state, cache, dstate = spec_steps.speculative_decode(
                cfg, drafter, model.params, dparams, cache, dstate, state, sampling, stop_ids, max_new,
                num_rounds=1 if on_progress else spec_steps.ROUNDS_PER_DISPATCH)
        done = sharding.to_host(state.done)  # one host sync per dispatch of many steps
        if on_progress is not None:
            on_progress(new_tokens_of(state))
    decode_seconds = time.perf_counter() - start

    new = new_tokens_of(state)
    new_tokens = sum(len(t) for t in new)
    active_row_steps = int(sharding.to_host(state.active_row_steps))
    stats = Stats(
        new_tokens=new_tokens,
        target_steps=int(sharding.to_host(state.target_steps)),
        # The first token of each row comes from prefill; the others from target steps.
        mean_accepted=(new_tokens - len(rows)) / active_row_steps if active_row_steps else 1.0,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        tokens_per_second=new_tokens / decode_seconds if decode_seconds > 0 else 0.0,
        active_row_steps=active_row_steps,
        rounds_drafted_ahead=dstate.hits if overlapped else 0,
    )
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return GenerateOutput(tokens=new, texts=texts, stats=stats)


@float32_products
def logits(model: Model, token_ids) -> np.ndarray:
    """Next-token logits [len(token_ids), vocab_size] (float32) at every position."""
    _check_model(model)
    token_ids = _as_lists(token_ids)
    if isinstance(token_ids, (str, bytes)):
        raise ValueError("token_ids must be a sequence of token ids, not text")
    if not isinstance(token_ids, Sequence):  # an id, None, or a generator (read once, not checkable)
        raise ValueError(f"token_ids must be a sequence of token ids (a list or a 1-D array), got {token_ids!r:.60}")
    ids = _checked_ids(token_ids, model.config.vocab_size, "token_ids")
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(f"{len(ids)} tokens exceed the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    padded = np.zeros((1, steps.bucket(len(ids), steps.MIN_PROMPT_BUCKET)), np.int32)
    padded[0, :len(ids)] = ids
    if model.config.mesh is not None:
        (padded,) = sharding.put_batch(model.config.mesh, padded)
    out = steps.score(model.config, model.params, padded)
    return sharding.to_host(out)[0, :len(ids)].astype(np.float32)
