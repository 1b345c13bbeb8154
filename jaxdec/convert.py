"""Converts a local Hugging Face Llama / Qwen2 / Qwen3 / Mistral folder into a jaxdec checkpoint.

    python -m jaxdec.convert SRC_DIR DST_DIR [--dtype float32|bfloat16] [--overwrite] [--allow-pickle]

Every tensor is mapped to the parameter tree of `jaxdec.model`, checked against the shape
the config implies, and every expected tensor must be present (and nothing unexpected).
The output is written into a temporary sibling folder and renamed into place at the end, so
a failed run leaves no partial DST_DIR. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxdec import storage
from jaxdec.config import ModelConfig
from jaxdec.loading import read_tokenizer
from jaxdec.storage import ConversionError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]]:
    """HF tensor name -> (HF shape, jaxdec param path, transpose?)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    table = {"model.embed_tokens.weight": ((V, D), ("embed_tokens", "embedding"), False),
             "model.norm.weight": ((D,), ("norm", "scale"), False)}
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = ((V, D), ("lm_head", "kernel"), True)
    for i in range(cfg.num_hidden_layers):
        hf, jd = f"model.layers.{i}.", f"layers_{i}"
        table[hf + "input_layernorm.weight"] = ((D,), (jd, "input_layernorm", "scale"), False)
        table[hf + "post_attention_layernorm.weight"] = ((D,), (jd, "post_attention_layernorm", "scale"), False)
        for name, out, inp in (("q_proj", q_out, D), ("k_proj", kv_out, D), ("v_proj", kv_out, D), ("o_proj", D, q_out)):
            table[f"{hf}self_attn.{name}.weight"] = ((out, inp), (jd, "self_attn", name, "kernel"), True)
            biased = cfg.o_proj_bias if name == "o_proj" else cfg.attention_bias
            if biased:
                table[f"{hf}self_attn.{name}.bias"] = ((out,), (jd, "self_attn", name, "bias"), False)
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                table[f"{hf}self_attn.{name}.weight"] = ((cfg.head_dim,), (jd, "self_attn", name, "scale"), False)
        for name, out, inp in (("gate_proj", F, D), ("up_proj", F, D), ("down_proj", D, F)):
            table[f"{hf}mlp.{name}.weight"] = ((out, inp), (jd, "mlp", name, "kernel"), True)
    return table


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, and UnicodeDecodeError for non-UTF-8
        raise ConversionError(f"cannot read {path}: {err}") from err


def _weight_files(src: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map", {}) if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ConversionError(f"{index} is damaged: expected {{\"weight_map\": {{tensor name: file name}}}}")
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise ConversionError(f"{index} has an empty weight_map")
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise ConversionError(f"missing weight file {src / missing[0]} named in {index.name}")
        return "safetensors", [src / s for s in shards]
    files = sorted(src.glob("*.safetensors"))
    if files:
        return "safetensors", files
    # Only the model's own pickles: folders often hold other *.bin files (training_args.bin).
    pickles = sorted(src.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise ConversionError(f"{src} has only pickle weights ({pickles[0].name}); pickle can run "
                                  f"arbitrary code, pass --allow-pickle to load it anyway")
        return "pickle", pickles
    raise ConversionError(f"no weight files (*.safetensors) in {src}")


def _iter_tensors(kind: str, files: list[Path]):
    """Yields (name, numpy array) from every weight file; bfloat16 stays bfloat16 (ml_dtypes)."""
    if kind == "pickle":
        import torch
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:
                raise ConversionError(f"corrupt weight file {path}: {err}") from err
            for name, tensor in state.items():
                yield name, _torch_to_numpy(tensor)
        return
    from safetensors import safe_open
    for path in files:
        try:
            with safe_open(str(path), framework="flax") as f:
                for name in f.keys():
                    yield name, np.asarray(f.get_tensor(name))
        except ConversionError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ConversionError(f"corrupt weight file {path}: {err}") from err


def _torch_to_numpy(tensor):
    import ml_dtypes
    import torch
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def convert(src, dst, *, dtype: str | None = None, overwrite: bool = False,
            allow_pickle: bool = False, progress: bool = True) -> Path:
    """Converts SRC (a local HF folder) into DST; raises ConversionError with a one-line reason."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"source {src} is a file, not a model folder" if src.exists()
                              else f"source folder {src} does not exist")
    storage.check_destination(dst, overwrite)
    storage.check_not_source(dst, src)
    if dtype is not None and dtype not in storage.DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(storage.DTYPES)}, got {dtype!r}")
    if not (src / "config.json").is_file():
        for marker, reader in ((storage.CONFIG_FILE, "jaxdec.load"), (storage.HEADS_FILE, "jaxdec.load_heads")):
            if (src / marker).is_file():
                raise ConversionError(f"{src} has no config.json: it is already a jaxdec checkpoint ({marker}); "
                                      f"{reader} reads it as is")
        raise ConversionError(f"{src} has no config.json")
    hf = _read_json(src / "config.json")
    if not isinstance(hf, dict):
        raise ConversionError(f"{src / 'config.json'} is not a JSON object")
    architectures = hf.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        found = f"architectures={architectures}" if architectures else "no 'architectures' entry"
        raise ConversionError(f"unsupported architecture ({found}, model_type={hf.get('model_type')!r}); "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    generation = _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else None
    try:  # tokenizer.json is copied as it is: jaxdec.load must be able to read it
        read_tokenizer(src)
    except ValueError as err:
        raise ConversionError(str(err)) from err
    try:
        cfg = ModelConfig.from_hf(hf, generation)
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as err:
        raise ConversionError(f"unsupported or incomplete config.json: {err!r}") from err

    kind, files = _weight_files(src, allow_pickle)
    table = expected_tensors(cfg)
    params: dict = {}
    seen: set[str] = set()
    out_dtype = None
    tied_head = None
    # The bar shows only on a terminal (disable=None) and is erased when the loop ends or raises
    # (leave=False), so that a refusal's stderr is its one-line reason and nothing else.
    with tqdm(total=len(table), desc="converting", unit="tensor", leave=False,
              disable=None if progress else True) as bar:
        for name, array in _iter_tensors(kind, files):
            if IGNORED.match(name):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                tied_head = array  # a tied head saved anyway: it must equal the embedding (checked below)
                continue
            if name not in table:
                raise ConversionError(f"unexpected tensor {name!r} in the weights: the config does not match "
                                      f"the weights (model_type={cfg.model_type}, layers={cfg.num_hidden_layers})")
            shape, path, transpose = table[name]
            if tuple(array.shape) != shape:
                raise ConversionError(f"tensor {name!r} has shape {tuple(array.shape)}, but config.json implies "
                                      f"{shape}: the config does not match the weights")
            if name in seen:
                raise ConversionError(f"tensor {name!r} appears twice in the weight files")
            seen.add(name)
            if out_dtype is None:
                out_dtype = dtype or {"bfloat16": "bfloat16"}.get(str(array.dtype), "float32")
            array = array.T if transpose else array
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = np.ascontiguousarray(array).astype(storage.DTYPES[out_dtype])
            bar.update(1)
    missing = sorted(set(table) - seen)
    if missing:
        raise ConversionError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more): the weight files "
                              f"are incomplete or the config does not match them")
    if tied_head is not None and not np.array_equal(tied_head.astype(storage.DTYPES[out_dtype]),
                                                    params["embed_tokens"]["embedding"]):
        raise ConversionError("config.json has tie_word_embeddings=true but lm_head.weight differs from the "
                              "embedding: the config does not match the weights")

    with storage.written_atomically(dst) as tmp:
        storage.save(tmp, cfg, params, out_dtype)
        for name in storage.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a local Hugging Face model folder")
    parser.add_argument("dst", help="the jaxdec checkpoint folder to write")
    parser.add_argument("--dtype", choices=sorted(storage.DTYPES), default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST_DIR")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle *.bin weights")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                      allow_pickle=args.allow_pickle)
    except ConversionError as err:
        print(f"jaxdec.convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
