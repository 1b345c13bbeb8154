"""Exports a jaxdec checkpoint as a Hugging Face folder (the converter run backwards).

    python -m jaxdec.export SRC DST_DIR [--overwrite]

SRC is anything `jaxdec.load` takes (a converted folder or a shipped name such as
demo-target). DST_DIR gets config.json, generation_config.json, model.safetensors and the
tokenizer files, loadable by `transformers.AutoModelForCausalLM.from_pretrained` with the
same logits; `python -m jaxdec.convert` of it gives back the same parameters. Written into
a temporary sibling folder and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxdec import storage
from jaxdec.config import PER_LAYER_WINDOW_TYPES, ModelConfig
from jaxdec.convert import ConversionError, expected_tensors

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json for transformers (the inverse of ModelConfig.from_hf)."""
    out = {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) or None,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else
        (cfg.eos_token_id[0] if cfg.eos_token_id else None),
    }
    windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
    sliding = sorted({w for w in windows if w is not None})
    if len(sliding) > 1:
        raise ConversionError(f"layers use different attention windows {sliding}: Hugging Face configs hold one")
    if cfg.model_type == "mistral":
        if sliding and None in windows:
            raise ConversionError("a Mistral config cannot mix sliding-window and full-attention layers")
        out["sliding_window"] = sliding[0] if sliding else None
    elif cfg.model_type in PER_LAYER_WINDOW_TYPES:
        out["use_sliding_window"] = bool(sliding)
        out["sliding_window"] = sliding[0] if sliding else None
        out["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
        full = [i for i, w in enumerate(windows) if w is None]
        out["max_window_layers"] = len(full) if full == list(range(len(full))) else cfg.num_hidden_layers
    elif sliding:
        raise ConversionError("a Llama config has no sliding-window attention")
    return out


def export(src, dst, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Writes the Hugging Face folder DST for the jaxdec checkpoint SRC; ConversionError (a
    one-line reason) when it cannot."""
    from safetensors.numpy import save_file
    from jaxdec.loading import _resolve
    dst = Path(dst)
    storage.check_destination(dst, overwrite)
    try:
        directory = _resolve(src)
        storage.check_not_source(dst, directory)
        storage.refuse_heads(directory, "only models have a Hugging Face form")
        cfg, dtype = storage.read_config(directory)
        params = storage.read_params(directory)
        storage.check_params(directory, cfg, params)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err
    config = hf_config(cfg, dtype)
    tensors = {}
    for name, (shape, path, transpose) in tqdm(expected_tensors(cfg).items(), desc="exporting", unit="tensor",
                                               leave=False, disable=None if progress else True):
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(node)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
        assert tensors[name].shape == shape, (name, tensors[name].shape, shape)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"]}

    with storage.written_atomically(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in storage.TOKENIZER_FILES:
            if name != "generation_config.json" and (directory / name).is_file():
                shutil.copy2(directory / name, tmp / name)
        if (tmp / "tokenizer.json").is_file() and not (tmp / "tokenizer_config.json").is_file():
            # transformers needs this file to pick the fast tokenizer class for tokenizer.json.
            (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a jaxdec checkpoint folder or shipped name")
    parser.add_argument("dst", help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST_DIR")
    args = parser.parse_args(argv)
    try:
        out = export(args.src, args.dst, overwrite=args.overwrite)
    except ConversionError as err:
        print(f"jaxdec.export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
