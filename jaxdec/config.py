"""Model hyper-parameters, under their Hugging Face names.

`ModelConfig` is a frozen (hashable) dataclass: it is a static argument of every jitted step,
so two models with the same shapes share compiled code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxdec.checks import is_int, is_real

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Families whose Hugging Face configs give sliding windows per layer (use_sliding_window,
# layer_types or max_window_layers); Mistral's window covers every layer.
PER_LAYER_WINDOW_TYPES = ("qwen2", "qwen3")
# The settings each supported RoPE scaling reads (jaxdec.rope), every one a number.
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
SUPPORTED_ROPE_TYPES = tuple(ROPE_SCALING_KEYS)
# Families whose attention biases are fixed: transformers' Qwen2 and Mistral ignore an
# attention_bias entry in config.json (Qwen2 always has q/k/v biases, Mistral none).
FIXED_ATTENTION_BIAS = {"qwen2": True, "mistral": False}
# What transformers' config classes assume for a key that config.json leaves out, where that is
# not what from_hf falls back to (num_key_value_heads = heads, head_dim = hidden / heads, no
# window, every layer windowed): a hand-written Mistral config without sliding_window still
# means a 4096-token window.
CLASS_DEFAULTS = {
    "qwen2": {"num_key_value_heads": 32, "max_window_layers": 28},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_window_layers": 28},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
}
RUNTIME_FIELDS = ("attn_impl", "mesh")  # how a model runs, not what it is: never saved


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs so the config stays hashable; () means none.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    # Biases on the attention projections, as each family's transformers class reads the switch:
    # Llama and Qwen3 put them on q, k, v and o; Qwen2 always has them on q, k, v (never o);
    # Mistral never has them. See `o_proj_bias`.
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Attention window per layer (None = full attention); empty tuple = all layers full.
    layer_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # How attention runs ("xla" reference or "pallas" kernels), not a hyper-parameter: set by
    # `jaxdec.load`, never saved. It lives here because the config is the static argument
    # every step function already takes.
    attn_impl: str = "xla"
    # Where the model lives (a jax.sharding.Mesh, or None for one device), likewise set by
    # `jaxdec.load` and never saved: the step functions pin the cache to it.
    mesh: Any = None

    def __post_init__(self):
        # A bad value would otherwise fail deep in tracing (a negative shape) or decode garbage
        # (a negative theta gives NaN frequencies).
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        finite = lambda v: is_real(v) and math.isfinite(v)
        if not (finite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ValueError(f"rms_norm_eps must be a finite number, 0 <= rms_norm_eps, got {self.rms_norm_eps!r}")
        if not (finite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a finite number, 0 < rope_theta, got {self.rope_theta!r}")
        for name in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, value in (("bos_token_id", self.bos_token_id), *(("eos_token_id", t) for t in self.eos_token_id)):
            if value is not None and not (is_int(value) and value >= 0):
                raise ValueError(f"{name} must hold token ids (integers >= 0), got {value!r}")
            # else every generate() call would refuse its default stop ids, naming an argument
            # the user never passed
            if value is not None and value >= self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        bad_window = next((w for w in self.layer_windows if w is not None and (not is_int(w) or w < 1)), None)
        if bad_window is not None:
            raise ValueError(f"layer_windows entries must be positive integers or None, got {bad_window!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.layer_windows and len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries, "
                             f"expected num_hidden_layers={self.num_hidden_layers}")
        fixed_bias = FIXED_ATTENTION_BIAS.get(self.model_type)
        if fixed_bias is not None and self.attention_bias != fixed_bias:
            raise ValueError(f"attention_bias={self.attention_bias} for model_type={self.model_type!r}: "
                             f"that family's attention {'always has' if fixed_bias else 'has no'} biases")
        scaling = dict(self.rope_scaling)
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling rope_type={rope_type!r}; "
                             f"supported: {SUPPORTED_ROPE_TYPES}")
        try:  # the config is a static argument of every step: hashable
            hash(self.rope_scaling)
        except TypeError:
            raise ValueError(f"rope_scaling values must be numbers or strings, got {scaling!r:.80}") from None
        # A missing one failed deep in tracing with a KeyError; a factor <= 0 decoded garbage
        # (negative) or NaN (zero).
        for key in ROPE_SCALING_KEYS[rope_type]:
            if not (finite(scaling.get(key)) and scaling[key] > 0):
                raise ValueError(f"rope_scaling rope_type={rope_type!r} needs {key} as a finite number > 0, "
                                 f"got {scaling.get(key)!r}")
        from jaxdec.rope import inverse_frequencies  # local: rope reads this module's config
        inverse_frequencies(self)  # refuses settings whose frequencies are not finite (NaN logits)

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes each head's query and key (RMSNorm over head_dim) before RoPE."""
        return self.model_type == "qwen3"

    @property
    def o_proj_bias(self) -> bool:
        """Llama's and Qwen3's attention_bias includes the output projection; Qwen2's does not."""
        return self.attention_bias and self.model_type != "qwen2"

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}
        d["rope_scaling"] = dict(self.rope_scaling) or None
        d["layer_windows"] = list(self.layer_windows)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        scaling, windows = d.get("rope_scaling") or {}, d.get("layer_windows") or []
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object of RoPE-scaling settings or null, got {scaling!r:.60}")
        if not isinstance(windows, (list, tuple)):
            raise ValueError(f"layer_windows must be a list (a window or null per layer) or null, got {windows!r:.60}")
        d["rope_scaling"] = tuple(sorted(scaling.items()))
        d["layer_windows"] = tuple(windows)
        d["eos_token_id"] = _eos_ids(d.get("eos_token_id"))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                             f"(architectures={hf.get('architectures')}); "
                             f"supported model types: {SUPPORTED_MODEL_TYPES}")
        hf = {**CLASS_DEFAULTS.get(model_type, {}), **hf}
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act={hf['hidden_act']!r}; only 'silu'")
        if hf.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=True")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = hf.get(key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{key} must be an object of RoPE settings or null, got {rope!r:.60}")
        rope = dict(rope)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        # transformers 5 moves partial_rotary_factor into rope_parameters too.
        partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial is not None and partial != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor={partial!r}: RoPE on every channel only")
        if rope.get("rope_type", "default") == "default":
            rope = {}
        layers = hf["num_hidden_layers"]
        windows: tuple = ()
        window = hf.get("sliding_window")
        if model_type == "mistral" and window:
            windows = (int(window),) * layers
        elif model_type in PER_LAYER_WINDOW_TYPES and hf.get("use_sliding_window") and window:
            types = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
                for i in range(layers)]
            windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
        eos = _eos_ids((generation_config or {}).get("eos_token_id", hf.get("eos_token_id")))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf["max_position_embeddings"],
            model_type=model_type,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            attention_bias=FIXED_ATTENTION_BIAS.get(model_type, bool(hf.get("attention_bias", False))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer_windows=windows,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )


def _eos_ids(value) -> tuple:
    """eos_token_id as a config file gives it (one id, a list of them, or null) as a tuple;
    ModelConfig then checks that each is a token id."""
    if value is None:
        return ()
    if is_int(value):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"eos_token_id must be a token id, a list of them or null, got {value!r:.60}")
    return tuple(value)
