"""Rotary position embeddings, with the RoPE-scaling variants of Llama 3.1 and linear scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdec.config import ModelConfig


@np.errstate(all="ignore")  # bad settings are refused at the end, not warned about on the way
def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The per-channel-pair rotation frequencies, exactly as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = dict(cfg.rope_scaling)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    if not np.all(np.isfinite(inv_freq)):  # e.g. rope_theta=1e-300: every position would decode to NaN
        raise ValueError(f"rope_theta={cfg.rope_theta!r} and rope_scaling={dict(cfg.rope_scaling)} give RoPE "
                         f"frequencies that are not finite")
    return inv_freq.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray):
    """cos and sin of shape positions.shape + [head_dim], in float32."""
    inv_freq = jnp.asarray(inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, H, D]; cos, sin: [B, T, D]. The rotate-half convention of Hugging Face."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
