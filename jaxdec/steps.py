"""The jitted, fixed-shape step functions of plain decoding, and their shape buckets.

Shapes are padded to buckets so a stream of requests compiles only a handful of programs:
batch to a power of two, prompt length to a power of two (at least 16), and the cache (and
the token buffer) to a power of two at least prompt + max_new_tokens. Every step donates the
cache (and the decode state) and returns them updated, so XLA updates them in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.cache import KVCache
from jaxdec.config import ModelConfig
from jaxdec.model import forward, kernel_slots, lm_head, prefill_hidden, sequence_logits
from jaxdec.sampling import SamplingParams, sample
from jaxdec.sparse import fold_entries, summarize_cache

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
DECODE_STEPS_PER_DISPATCH = 32  # tokens per host round trip in plain decoding


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def cache_bucket(cfg: ModelConfig, needed: int) -> int:
    """Cache slots for `needed` tokens: a power of two, capped at the model's context. With
    attn_impl="pallas", a cache longer than one kernel block (`BLOCK_S` slots) is whole
    blocks (`model.kernel_slots`): a context that is not (say 1100) gets slots past it (1152),
    never read, as slots at or past each row's length are masked."""
    slots = max(needed, min(bucket(needed, MIN_CACHE_BUCKET), cfg.max_position_embeddings))
    return kernel_slots(slots) if cfg.attn_impl == "pallas" else slots


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries besides the cache.

    `tokens[b, :lengths[b]]` is row b's prompt and output so far; the last of them is the
    pending token, sampled but not yet in the cache (cache.lengths == lengths - 1).
    """
    tokens: jax.Array          # int32 [B, S]
    lengths: jax.Array         # int32 [B]
    prompt_lengths: jax.Array  # int32 [B]
    done: jax.Array            # bool [B]
    keys: jax.Array            # PRNG keys [B]
    target_steps: jax.Array    # int32: target forwards after prefill
    active_row_steps: jax.Array  # int32: sum over target steps of the rows still active


def _finished(state: DecodeState, new_tokens, stop_ids, max_new_tokens):
    is_stop = jnp.any(new_tokens[:, None] == stop_ids[None, :], axis=-1)
    return is_stop | (state.lengths - state.prompt_lengths >= max_new_tokens)


def prefill_with_hidden(cfg: ModelConfig, params, cache: KVCache, tokens, prompt_lengths, row_valid,
                        sampling: SamplingParams, keys, stop_ids, max_new_tokens, prompt_bucket: int):
    """Runs the prompts through the model and samples each row's first new token:
    (state, cache, the prompts' hidden states [B, prompt_bucket, D]: the features that
    drafters built on the target's own hidden states start from).

    tokens: int32 [B, S] prompts left-aligned (S = cache slots); rows with row_valid False are
    batch padding and start out done.
    """
    B = tokens.shape[0]
    hidden, cache = prefill_hidden(cfg, params, cache, tokens, prompt_bucket)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(lm_head(cfg, params, last), sampling, keys, jnp.zeros((B,), jnp.int32))
    rows = jnp.arange(B)
    tokens = tokens.at[rows, prompt_lengths].set(first, mode="drop")
    state = DecodeState(
        tokens=tokens, lengths=prompt_lengths + 1, prompt_lengths=prompt_lengths,
        done=~row_valid, keys=keys, target_steps=jnp.int32(0), active_row_steps=jnp.int32(0))
    state = state.replace(done=state.done | _finished(state, first, stop_ids, max_new_tokens))
    return state, cache.replace(lengths=prompt_lengths), hidden


# keep_unused: prefill overwrites cache.lengths without reading it, and jit prunes unused
# arguments, so without it that buffer would silently be neither donated nor reused.
@functools.partial(jax.jit, static_argnames=("cfg", "prompt_bucket"), donate_argnames=("cache",),
                   keep_unused=True)
def prefill(cfg: ModelConfig, params, cache: KVCache, tokens, prompt_lengths, row_valid,
            sampling: SamplingParams, keys, stop_ids, max_new_tokens, *, prompt_bucket: int):
    """`prefill_with_hidden` for plain decoding: (state, cache)."""
    state, cache, _ = prefill_with_hidden(cfg, params, cache, tokens, prompt_lengths, row_valid, sampling, keys,
                                          stop_ids, max_new_tokens, prompt_bucket)
    return state, cache


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_bucket"), donate_argnames=("cache", "sparse"),
                   keep_unused=True)
def sparse_prefill(cfg: ModelConfig, params, cache: KVCache, sparse, tokens, prompt_lengths, row_valid,
                   sampling: SamplingParams, keys, stop_ids, max_new_tokens, *, prompt_bucket: int):
    """`prefill`, then the page summaries of the prompts (jaxdec.sparse.SparsePages) for
    `sparse_decode`: (state, cache, sparse)."""
    state, cache, _ = prefill_with_hidden(cfg, params, cache, tokens, prompt_lengths, row_valid, sampling, keys,
                                          stop_ids, max_new_tokens, prompt_bucket)
    return state, cache, summarize_cache(sparse, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"), donate_argnames=("cache", "state"))
def decode(cfg: ModelConfig, params, cache: KVCache, state: DecodeState, sampling: SamplingParams,
           stop_ids, max_new_tokens, *, num_steps: int = DECODE_STEPS_PER_DISPATCH):
    """Up to `num_steps` plain decoding steps in one dispatch (a lax.while_loop), stopping
    early once every row is done. Finished rows keep their lengths: their writes are dropped
    from view because their cache length no longer moves."""
    state, cache, _ = decode_steps(cfg, params, cache, state, sampling, stop_ids, max_new_tokens, num_steps)
    return state, cache


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"), donate_argnames=("cache", "state", "sparse"))
def sparse_decode(cfg: ModelConfig, params, cache: KVCache, state: DecodeState, sparse, sampling: SamplingParams,
                  stop_ids, max_new_tokens, *, num_steps: int = DECODE_STEPS_PER_DISPATCH):
    """`decode` with attention over chosen cache pages (jaxdec.sparse.SparsePages): lossy.
    Returns (state, cache, sparse)."""
    return decode_steps(cfg, params, cache, state, sampling, stop_ids, max_new_tokens, num_steps, sparse)


def decode_steps(cfg: ModelConfig, params, cache: KVCache, state: DecodeState, sampling: SamplingParams,
                 stop_ids, max_new_tokens, num_steps: int, sparse=None):
    """The loop of `decode`; with `sparse`, each step attends over the chosen pages and folds
    the key it commits into the page summaries."""
    B = state.tokens.shape[0]
    rows = jnp.arange(B)
    one = jnp.ones((B, 1, 1), bool)

    def step(carry):
        i, cache, state, sparse = carry
        pending = state.tokens[rows, state.lengths - 1]
        active = ~state.done
        logits, _, cache = forward(cfg, params, pending[:, None], (state.lengths - 1)[:, None], cache, one,
                                   sparse=sparse)
        if sparse is not None:
            # The step's keys, read back after the write (read before it, XLA would copy the
            # cache on every step), folded into the summaries where the row commits them.
            slots = cache.lengths[:, None]
            new_k = [None if kmin is None else layer_k[rows[:, None], :, slots]   # [B, 1, kv_heads, D]
                     for kmin, layer_k in zip(sparse.kmin, cache.k)]
            sparse = fold_entries(sparse, new_k, jnp.where(active[:, None], slots, -1))
        new = sample(logits[:, 0], sampling, state.keys, state.lengths - state.prompt_lengths)
        state = state.replace(
            # Finished rows write out of bounds (dropped); negative indices would wrap around.
            tokens=state.tokens.at[rows, jnp.where(active, state.lengths, state.tokens.shape[1])].set(
                new, mode="drop"),
            lengths=state.lengths + active,
            target_steps=state.target_steps + 1,
            active_row_steps=state.active_row_steps + jnp.sum(active, dtype=jnp.int32))
        state = state.replace(done=state.done | (active & _finished(state, new, stop_ids, max_new_tokens)))
        return i + 1, cache.replace(lengths=cache.lengths + active), state, sparse

    def keep_going(carry):
        i, _, state, _ = carry
        return (i < num_steps) & ~jnp.all(state.done)

    _, cache, state, sparse = jax.lax.while_loop(keep_going, step, (jnp.int32(0), cache, state, sparse))
    return state, cache, sparse


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(cfg: ModelConfig, params, tokens):
    """Next-token logits at every position of tokens [B, T], from an empty cache."""
    return sequence_logits(cfg, params, tokens)
