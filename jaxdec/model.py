"""One Flax decoder for Llama, Qwen2, Qwen3 and Mistral, and the single forward every step uses.

The families differ only by config switches: grouped-query attention (num_key_value_heads),
attention biases (attention_bias: q/k/v in Qwen2, q/k/v/o in Llama and Qwen3), per-head
query/key norms (qk_norm, Qwen3), tied embeddings (tie_word_embeddings), RoPE scaling
(rope_scaling) and sliding-window attention (layer_windows, Mistral).

At the jit boundary everything is a pure function of pytrees:
    forward(cfg, params, tokens[B,T], positions[B,T], cache, step_mask[B,T,T])
        -> (logits[B,T,V], hidden[B,T,D], cache)
is the decoder (each layer writes the step's keys and values into the cache at their slots,
then attends to the cache, so the whole cache is never copied) and the LM head.
Prefill, decode (T = 1) and verification (T = k + 1 or tree size) differ only in T and the mask.

Parameter tree (what the converter writes; `kernel`s are [in, out]):
    embed_tokens/embedding [V, D]
    layers_{i}/input_layernorm/scale, post_attention_layernorm/scale [D]
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel (+ q,k,v bias when attention_bias, o bias when o_proj_bias)
    layers_{i}/self_attn/{q,k}_norm/scale [head_dim]  (when qk_norm)
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale [D]
    lm_head/kernel [D, V]  (absent when tie_word_embeddings)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdec.attention import prefix_mask, reference_attention, step_visibility
from jaxdec.cache import KVCache, init_cache, write, write_slots
from jaxdec.config import ModelConfig
from jaxdec.rope import apply_rope, rope_tables
from jaxdec.sharding import attention_over_mesh, constrain_cache
from jaxdec.sparse import sparse_attention


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, cache_mask, step_mask, slots=None, lengths=None, pages=None):
        """Returns (output, the step's keys, values [B, T, Hkv, D], page ids) and leaves the cache alone;
        with `slots`, writes the step's keys and values there first and returns the updated
        cache instead. Writing first lets XLA update the cache in place: a step that reads the
        old buffer and writes it afterwards makes XLA copy the whole cache. The cache mask hides
        the written slots (>= lengths), so the result is the same. Given `lengths` (the cache
        mask is then exactly slots < lengths), the Pallas tree-attention kernel computes it.
        `pages` (with `lengths`): sparse attention over chosen cache pages, (SparsePages, this
        layer's index, page ids [B, Hkv, N] an earlier layer chose): the layer chooses its own
        pages from its queries when it has summaries, else reuses the earlier choice. The page
        ids used are returned (else None)."""
        cfg = self.cfg
        B, T, _ = x.shape
        dense = lambda n, name, bias: nn.Dense(n * cfg.head_dim, use_bias=bias, name=name)
        q = dense(cfg.num_attention_heads, "q_proj", cfg.attention_bias)(x)
        k = dense(cfg.num_key_value_heads, "k_proj", cfg.attention_bias)(x)
        v = dense(cfg.num_key_value_heads, "v_proj", cfg.attention_bias)(x)
        q = q.reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if slots is not None:
            k_cache, v_cache = write_slots(k_cache, k, slots), write_slots(v_cache, v, slots)
        page_ids = None
        if pages is not None:
            sparse, layer, page_ids = pages
            if sparse.kmin[layer] is not None:
                page_ids = sparse.choose(layer, q, lengths)
            out = sparse_attention(cfg, q, k_cache, v_cache, page_ids, lengths, k, v, step_mask, sparse.page_size)
        elif lengths is not None:
            # The cache mask is a plain prefix (slots < lengths): the kernels' case.
            out = attention_over_mesh(cfg, dense_kernel(T, k_cache.shape[2]), q, k_cache, v_cache, lengths, k, v,
                                      step_mask)
        else:
            out = reference_attention(q, k_cache, v_cache, cache_mask, k, v, step_mask)
        out = nn.Dense(cfg.hidden_size, use_bias=cfg.o_proj_bias, name="o_proj")(out.reshape(B, T, -1))
        return (out, k_cache, v_cache, page_ids) if slots is not None else (out, k, v, page_ids)


def kernel_slots(num_slots: int) -> int:
    """The fewest cache slots, at least `num_slots`, that the Pallas kernels take: one block of
    up to BLOCK_S slots, or whole blocks. steps.cache_bucket sizes a Pallas model's cache so;
    a cache of other slots (a Pallas draft's, which has its target's) stays on the reference."""
    from pallas_kernels.tree_attention import BLOCK_S
    return num_slots if num_slots <= BLOCK_S else -(-num_slots // BLOCK_S) * BLOCK_S


SPLIT_K_MIN_SLOTS = 1024  # from here on a plain decoding step splits the cache across programs


def dense_kernel(num_tokens: int, num_slots: int):
    """The Pallas kernel for a step of `num_tokens` over a plain prefix: split-K decode
    attention (FlashDecoding) for one token over a long cache, where one program per (row, kv
    head) would leave most of a GPU idle; the tree kernel otherwise (a wider step gives each
    program G * T query rows to work on)."""
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.tree_attention import tree_attention
    if num_tokens == 1 and num_slots >= SPLIT_K_MIN_SLOTS:
        return decode_attention
    return tree_attention


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.cfg.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(self.cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(self.cfg.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, cache_mask, step_mask, slots=None, lengths=None, pages=None):
        h, k, v, page_ids = Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(x),
            cos, sin, k_cache, v_cache, cache_mask, step_mask, slots, lengths, pages)
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, k, v, page_ids


class Decoder(nn.Module):
    """Embeddings, the decoder layers and the final norm.

    Returns the hidden states and each layer's new keys and values (None for a skipped
    layer); the cache is only read, and only when `read_cache` (a prefill from an empty
    cache reads nothing). With `write_cache` (and `read_cache`) each layer writes its new
    entries into its cache first and the per-layer caches are returned instead (skipped
    layers' unchanged). The layers are a Python loop (not a scan) so each layer's cache is
    its own buffer, updated in place under donation, and so a drafter can skip a static set
    of layers. With `sparse` (a `jaxdec.sparse.SparsePages`), full-attention layers read only
    the cache pages chosen for them.
    """
    cfg: ModelConfig
    skip_layers: tuple[int, ...] = ()
    read_cache: bool = True
    write_cache: bool = False

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache, step_mask, extra_visible=None, slots=None, inputs=None,
                 sparse=None):
        """extra_visible: optional bool [B, T, S], cache slots each token sees besides the
        prefix below `lengths` (a draft tree's ancestors, kept in slots past it). slots:
        optional int32 [B, T], where `write_cache` writes the step (default: from `lengths` on).
        inputs: optional [B, T, D] input vectors in place of the token embeddings (an EAGLE
        drafter's layer reads features; `tokens` is then None and there is no embedding)."""
        cfg = self.cfg
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")(tokens) if inputs is None else inputs
        cos, sin = rope_tables(cfg, positions)
        masks = {}  # (cache mask, step mask) per distinct window
        writes = self.write_cache and self.read_cache
        if writes and slots is None:
            slots = cache.lengths[:, None] + jnp.arange(positions.shape[1])[None, :]
        slots = slots if writes else None
        new_k, new_v = (list(cache.k), list(cache.v)) if writes else ([None] * cfg.num_hidden_layers, [None] * cfg.num_hidden_layers)
        page_ids = None  # the pages the last choosing layer took
        for i in range(cfg.num_hidden_layers):
            window = cfg.window(i)
            if window not in masks:
                cache_mask = prefix_mask(cache.lengths, positions, cache.num_slots, window) if self.read_cache else None
                if extra_visible is not None:
                    cache_mask = cache_mask | extra_visible
                masks[window] = (cache_mask, step_visibility(positions, step_mask, window))
            layer = DecoderLayer(cfg, name=f"layers_{i}")
            if i in self.skip_layers:
                continue
            k_cache, v_cache = (cache.k[i], cache.v[i]) if self.read_cache else (None, None)
            # The kernel takes full-attention layers reading a plain prefix of whole blocks;
            # sliding windows, a draft tree's extra visible slots and a cache of other slots
            # (a Pallas draft's cache has the target's) stay on the reference.
            kernel = (cfg.attn_impl == "pallas" and self.read_cache and window is None and extra_visible is None
                      and kernel_slots(cache.num_slots) == cache.num_slots)
            # Sparse: the layers from the first choosing one on (full attention, a plain prefix).
            pages = None
            if (sparse is not None and self.read_cache and window is None and extra_visible is None
                    and (sparse.kmin[i] is not None or page_ids is not None)):
                pages = (sparse, i, page_ids)
            x, new_k[i], new_v[i], chosen = layer(x, cos, sin, k_cache, v_cache, *masks[window], slots,
                                                  cache.lengths if kernel or pages is not None else None, pages)
            page_ids = page_ids if chosen is None else chosen
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        return x, (tuple(new_k), tuple(new_v))


def lm_head(cfg: ModelConfig, params, hidden):
    """Logits in float32 from hidden states [..., D]."""
    if cfg.tie_word_embeddings:
        weight = params["embed_tokens"]["embedding"].T
    else:
        weight = params["lm_head"]["kernel"]
    return jnp.dot(hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)


def step_hidden(cfg: ModelConfig, params, tokens, positions, cache, step_mask, skip_layers=(), read_cache=True,
                extra_visible=None, inputs=None, sparse=None):
    """The decoder without the LM head, reading the cache but not writing it:
    (hidden [B,T,D], (new keys, new values) per layer, for `jaxdec.cache.write`)."""
    return Decoder(cfg, tuple(skip_layers), read_cache).apply({"params": params}, tokens, positions, cache, step_mask,
                                                              extra_visible, inputs=inputs, sparse=sparse)


def forward_hidden(cfg: ModelConfig, params, tokens, positions, cache, step_mask, skip_layers=(), read_cache=True,
                   extra_visible=None, slots=None, inputs=None, sparse=None):
    """The decoder without the LM head: (hidden [B,T,D], cache with the new entries written
    at `slots` [B, T], by default from cache.lengths on)."""
    if not read_cache:
        hidden, new_kv = step_hidden(cfg, params, tokens, positions, cache, step_mask, skip_layers, read_cache=False,
                                     inputs=inputs)
        return hidden, constrain_cache(cfg, write(cache, *new_kv, slots=slots))
    hidden, (k, v) = Decoder(cfg, tuple(skip_layers), write_cache=True).apply(
        {"params": params}, tokens, positions, cache, step_mask, extra_visible, slots, inputs, sparse)
    # Pinned to the cache's own sharding, so the donated input buffers are reused in place.
    return hidden, constrain_cache(cfg, cache.replace(k=k, v=v))


PREFILL_CHUNK = 512  # prompt tokens per forward in a long prefill


def prefill_hidden(cfg: ModelConfig, params, cache: KVCache, tokens, prompt_bucket: int, chunk: int | None = None,
                   inputs=None):
    """Reads the first `prompt_bucket` tokens of each row (tokens [B, S], left-aligned; or input
    vectors `inputs` [B, S', D] with tokens None, as an EAGLE layer reads) into an empty cache:
    (hidden [B, prompt_bucket, D], the cache with their entries at slots 0 .. prompt_bucket - 1;
    its lengths are left at 0 for the caller to set).

    A prompt longer than `chunk` (default PREFILL_CHUNK) goes through in chunks, each reading
    the cache the earlier ones wrote, so attention scores are [B, H, chunk, slots] rather than
    [B, H, P, P]: at 32k tokens one forward would need 128 GB of scores for an 8B model's
    heads. The chunks always use the XLA attention (the Pallas kernels are decode kernels).
    """
    chunk = PREFILL_CHUNK if chunk is None else chunk
    B = (tokens if inputs is None else inputs).shape[0]
    cache = cache.replace(lengths=jnp.zeros_like(cache.lengths))
    if prompt_bucket <= chunk:
        positions = jnp.broadcast_to(jnp.arange(prompt_bucket, dtype=jnp.int32), (B, prompt_bucket))
        head = lambda a: None if a is None else a[:, :prompt_bucket]
        return forward_hidden(cfg, params, head(tokens), positions, cache, causal_mask(B, prompt_bucket),
                              read_cache=False, inputs=head(inputs))
    num_chunks = -(-prompt_bucket // chunk)
    # Padding past the buffer is never read: every row's prompt ends by prompt_bucket, and
    # writes past the cache's last slot are dropped.
    pad = lambda a: None if a is None else jnp.pad(
        a, ((0, 0), (0, max(0, num_chunks * chunk - a.shape[1])), *[(0, 0)] * (a.ndim - 2)))
    tokens, inputs = pad(tokens), pad(inputs)
    chunk_cfg = dataclasses.replace(cfg, attn_impl="xla")
    dtype = jax.tree_util.tree_leaves(params)[0].dtype

    def read_chunk(c, carry):
        hidden, cache = carry
        start = c * chunk
        positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (B, chunk))
        piece = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1)
        h, cache = forward_hidden(chunk_cfg, params, piece(tokens), positions,
                                  cache.replace(lengths=jnp.full((B,), start)), causal_mask(B, chunk),
                                  inputs=piece(inputs))
        return jax.lax.dynamic_update_slice_in_dim(hidden, h.astype(dtype), start, axis=1), cache

    hidden = jnp.zeros((B, num_chunks * chunk, cfg.hidden_size), dtype)
    hidden, cache = jax.lax.fori_loop(0, num_chunks, read_chunk, (hidden, cache))
    return hidden[:, :prompt_bucket], cache.replace(lengths=jnp.zeros_like(cache.lengths))


def forward(cfg: ModelConfig, params, tokens, positions, cache, step_mask, skip_layers=(), sparse=None):
    """The general forward: (logits [B,T,V] float32, hidden [B,T,D], cache). With `sparse`
    (jaxdec.sparse.SparsePages), full-attention layers read only chosen cache pages."""
    hidden, cache = forward_hidden(cfg, params, tokens, positions, cache, step_mask, skip_layers, sparse=sparse)
    return lm_head(cfg, params, hidden), hidden, cache


def sequence_logits(cfg: ModelConfig, params, tokens, skip_layers=()):
    """Next-token logits [B, T, V] (float32) of whole sequences, with no cache: scoring and
    training. Positions start at 0; T must not exceed max_position_embeddings."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, _ = step_hidden(cfg, params, tokens, positions, None, causal_mask(B, T), skip_layers, read_cache=False)
    return lm_head(cfg, params, hidden)


def causal_mask(batch_size: int, num_tokens: int):
    return jnp.broadcast_to(jnp.tril(jnp.ones((num_tokens, num_tokens), bool)),
                            (batch_size, num_tokens, num_tokens))


def init_params(cfg: ModelConfig, rng, dtype=jnp.float32, init_std: float = 0.02):
    """Random parameters (normal(init_std) weights, unit norms), e.g. for benchmarks."""
    def init():
        return Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                 init_cache(cfg, 1, 1, dtype), jnp.ones((1, 1, 1), bool))["params"]
    shapes = jax.eval_shape(init)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, cfg.vocab_size), dtype)}
    return random_like(shapes, rng, dtype, init_std)


def random_like(shapes, rng, dtype=jnp.float32, init_std: float = 0.02):
    """Random arrays of the pytree `shapes`: normal(init_std) weights, unit norm scales, zero biases."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        if path[-1].key == "scale":
            out.append(jnp.ones(leaf.shape, dtype))
        elif path[-1].key == "bias":
            out.append(jnp.zeros(leaf.shape, dtype))
        else:
            out.append((init_std * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
