"""Logits processing and sampling.

`process_logits` is the one definition of the sampling distribution: temperature, then top-k,
then top-p, then min-p (the order of Hugging Face's warpers). Plain sampling draws from it and
the speculative acceptance rule compares the processed target and draft distributions, so
both always agree on what "the distribution" is.

The parameters are traced arrays, not static: a new temperature or top-p compiles nothing.
`temperature == 0` means greedy (argmax of the raw logits), a lax.cond branch in the same
program. (Greedy as a static field instead, tried 2026-12-07: a greedy call on the demo draft
compiled a third faster, but each mode was then a program of its own, compiled again on a
switch, and the test suite, which runs both modes on the same shapes, took as long: 1127 s
against 1117-1137 s.)

Every row has its own random stream: the key of row b's n-th new token is
fold_in(fold_in(PRNGKey(seed), b), n).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.checks import is_int, is_real


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # float32 scalar; 0 = greedy
    top_k: jax.Array        # int32 scalar; 0 = off
    top_p: jax.Array        # float32 scalar in (0, 1]; 1 = off
    min_p: jax.Array        # float32 scalar in [0, 1]; 0 = off

    @classmethod
    def create(cls, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "SamplingParams":
        """Validates on the host, so bad values fail here with their name, not inside XLA."""
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
            if not is_real(value):
                raise ValueError(f"{name} must be a real number, got {value!r}")
        # NumPy floats as Python floats: compared with a float16, float32's largest value would
        # be cast to float16's inf, and float16's inf would pass for finite.
        temperature, top_p, min_p = (float(v) if isinstance(v, np.floating) else v for v in (temperature, top_p, min_p))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
        # An infinite one (or one past float32's range, which becomes inf on the device) would
        # flatten every row to the uniform distribution, ignoring the model.
        largest = float(np.finfo(np.float32).max)  # a Python float: comparing with numpy's would cast (and warn)
        if temperature > largest:
            raise ValueError(f"temperature must be finite (at most {largest:.3g}), got {temperature!r}")
        if not is_int(top_k) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        # A top_k at or above the vocabulary keeps every token, so a larger one than int32 holds
        # (top_k=10**12) means the same as 2**31 - 1 rather than an OverflowError.
        top_k = min(int(top_k), 2**31 - 1)
        # Any top_p up to float32's smallest normal number keeps the same set, the most likely
        # token(s); a smaller one would become 0 on the device (or be flushed to it), and a cut
        # whose mass is 0 would keep no token at all.
        top_p = max(top_p, float(np.finfo(np.float32).tiny))
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p))


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Float32 logits [..., V] of the sampling distribution; filtered-out tokens get -inf.

    Ties at a cut-off are all kept (as Hugging Face's top-k keeps them).
    """
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    x = logits.astype(jnp.float32) / temperature
    # The cuts run only when top-k or top-p can cut something.
    x = jax.lax.cond((params.top_k > 0) | (params.top_p < 1), lambda x: _top_k_top_p(x, params), lambda x: x, x)
    # min-p: drop tokens less likely than min_p times the most likely one.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= params.min_p * jnp.max(probs, axis=-1, keepdims=True), x, -jnp.inf)
    return x


def _top_k_top_p(x, params: SamplingParams):
    """x with what top-k, then top-p, drop set to -inf. Each cut is found by its value, bit by
    bit (`_largest_cut`), not by sorting the vocabulary: XLA:CPU sorts 4096 logits in 0.47 ms,
    more than a small model's whole step."""
    vocab = x.shape[-1]
    keys = _sortable(x)
    # top-k: keep values >= the k-th largest. By value, not by position: the ties at the cut-off
    # stay too, so top-p below weighs the same set that top-k keeps.
    k = jnp.minimum(params.top_k, vocab)
    everything = lambda keys: jnp.ones(keys.shape, bool)
    kept = jax.lax.cond(params.top_k > 0,
                        lambda keys: keys >= _largest_cut(keys, lambda above: jnp.sum(above, axis=-1) >= k)[..., None],
                        everything, keys)
    # top-p: keep the largest values whose mass (among those top-k kept) reaches top_p, ties at
    # the cut included: the smallest head of the ranking, at least one value. top_p = 1 is off:
    # float32 sums can reach 1 before the tail, which would drop it.
    weight = jnp.where(kept, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    wanted = params.top_p * jnp.sum(weight, axis=-1)
    reaches = lambda above: jnp.sum(jnp.where(above, weight, 0.0), axis=-1) >= wanted
    kept &= jax.lax.cond(params.top_p < 1, lambda keys: keys >= _largest_cut(keys, reaches)[..., None],
                         everything, keys)
    return jnp.where(kept, x, -jnp.inf)


def _sortable(x):
    """uint32 keys [..., V] in the order of the float32 values x (negative floats flipped; -0.0
    made 0.0 first, so that the two zeros tie as values do)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_cut(keys, reaches):
    """The largest key t [...] such that reaches(keys >= t) holds, for a `reaches` that holds
    at t = 0 and fails from some key on: set bit by bit from the top, 32 steps of O(V)."""
    def set_bit(i, cut):
        candidate = cut | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(reaches(keys >= candidate[..., None]), candidate, cut)
    return jax.lax.fori_loop(0, 32, set_bit, jnp.zeros(keys.shape[:-1], jnp.uint32))


def argmax(x: jax.Array) -> jax.Array:
    """int32 index of the first maximum along the last axis, as jnp.argmax.

    Written as a max and a min: XLA:CPU runs jnp.argmax's two-operand reduce 3-6x slower, and
    the greedy paths take an argmax over the vocabulary several times per speculative round.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1] - 1), axis=-1)


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The sampling distribution [..., V]; a one-hot argmax when greedy."""
    def sampled(logits):
        return jax.nn.softmax(process_logits(logits, params), axis=-1)

    def greedy(logits):
        return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)

    return jax.lax.cond(params.temperature > 0, sampled, greedy, logits)


def row_keys(seed: int, batch_size: int) -> jax.Array:
    """One PRNG key per row, independent of the other rows."""
    # jax.random.key keeps a seed's low 32 bits only (without jax_enable_x64): seeds 5 and
    # 2**32 + 5 drew the same tokens. The high bits are folded in where there are any, so
    # every seed in [0, 2**32) keeps its stream.
    high, low = int(seed) >> 32, int(seed) & 0xFFFFFFFF
    base = jax.random.key(low)
    if high:
        base = jax.random.fold_in(base, high & 0xFFFFFFFF)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch_size))


def sample(logits: jax.Array, params: SamplingParams, keys: jax.Array, counters: jax.Array) -> jax.Array:
    """One token per row. logits [B, V]; keys: row keys [B]; counters [B]: new tokens so far."""
    # A real branch, not a select: greedy decoding skips process_logits.
    return jax.lax.cond(params.temperature > 0, lambda x: _draw(process_logits(x, params), keys, counters),
                        argmax, logits)


def sample_with_probabilities(logits: jax.Array, params: SamplingParams, keys: jax.Array, counters: jax.Array):
    """(`sample(...)`, `probabilities(logits, params)`) in one branch: a drafter that draws a
    token from q and keeps q processes the logits once, and decides greedy or not once."""
    def sampled(logits):
        processed = process_logits(logits, params)
        return _draw(processed, keys, counters), jax.nn.softmax(processed, axis=-1)

    def greedy(logits):
        tokens = argmax(logits)
        return tokens, jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.float32)

    return jax.lax.cond(params.temperature > 0, sampled, greedy, logits)


def _draw(processed, keys, counters):
    """int32 [B]: row b's token from its processed logits, with key fold_in(keys[b], counters[b])."""
    step_keys = jax.vmap(jax.random.fold_in)(keys, counters)
    return jax.vmap(jax.random.categorical)(step_keys, processed).astype(jnp.int32)
