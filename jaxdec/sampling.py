"""Logits processing and sampling.

`process_logits` is the one definition of the sampling distribution: temperature, then top-k,
then top-p, then min-p (the order of Hugging Face's warpers). Plain sampling draws from it and
the speculative acceptance rule compares the processed target and draft distributions, so
both always agree on what "the distribution" is.

The parameters are traced arrays, not static: a new temperature or top-p compiles nothing.
`temperature == 0` means greedy (argmax of the raw logits).

Every row has its own random stream: the key of row b's n-th new token is
fold_in(fold_in(PRNGKey(seed), b), n).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # float32 scalar; 0 = greedy
    top_k: jax.Array        # int32 scalar; 0 = off
    top_p: jax.Array        # float32 scalar in (0, 1]; 1 = off
    min_p: jax.Array        # float32 scalar in [0, 1]; 0 = off

    @classmethod
    def create(cls, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "SamplingParams":
        """Validates on the host, so bad values fail here with their name, not inside XLA."""
        import numbers
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
            if not isinstance(value, numbers.Real) or value != value:
                raise ValueError(f"{name} must be a real number, got {value!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p))

    @property
    def is_greedy(self) -> bool:
        return float(self.temperature) == 0.0


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Float32 logits [..., V] of the sampling distribution; filtered-out tokens get -inf.

    Ties at a cut-off are all kept (as Hugging Face's top-k keeps them).
    """
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    x = logits.astype(jnp.float32) / temperature
    # The vocabulary sort costs more than a small model's whole step on XLA:CPU (0.5 ms at
    # 4096 tokens), so it runs only when top-k or top-p can cut something.
    x = jax.lax.cond((params.top_k > 0) | (params.top_p < 1), lambda x: _top_k_top_p(x, params), lambda x: x, x)
    # min-p: drop tokens less likely than min_p times the most likely one.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= params.min_p * jnp.max(probs, axis=-1, keepdims=True), x, -jnp.inf)
    return x


def _top_k_top_p(x, params: SamplingParams):
    vocab = x.shape[-1]
    ranked = jnp.sort(x, axis=-1)[..., ::-1]                       # descending
    # top-k: keep values >= the k-th largest. By value, not by position: the ties at the cut-off
    # stay in the ranking too, so top-p below weighs the same set that top-k keeps.
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth = jnp.take(ranked, k - 1, axis=-1)[..., None]
    ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
    # top-p: keep the smallest head of the ranking whose mass reaches top_p (at least one).
    # top_p = 1 is off: float32 cumsums can reach 1 before the tail, which would drop it.
    ranked_probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(ranked_probs, axis=-1) - ranked_probs
    in_head = (mass_before < params.top_p) | (params.top_p >= 1)
    num_kept = jnp.sum(in_head & (ranked > -jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ranked, jnp.maximum(num_kept, 1) - 1, axis=-1)
    return jnp.where(x >= threshold, x, -jnp.inf)


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
    base = jax.random.key(seed)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch_size))


def sample(logits: jax.Array, params: SamplingParams, keys: jax.Array, counters: jax.Array) -> jax.Array:
    """One token per row. logits [B, V]; keys: row keys [B]; counters [B]: new tokens so far."""
    def draw(logits):
        step_keys = jax.vmap(jax.random.fold_in)(keys, counters)
        return jax.vmap(jax.random.categorical)(step_keys, process_logits(logits, params)).astype(jnp.int32)

    # A real branch, not a select: greedy decoding skips the vocabulary sort of process_logits.
    return jax.lax.cond(params.temperature > 0, draw, argmax, logits)
