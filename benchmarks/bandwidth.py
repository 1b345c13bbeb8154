"""Plain decoding speed at real model shapes, and the share of memory bandwidth it achieves.

    python benchmarks/bandwidth.py --shape llama3-8b --dtype bfloat16 --batch-size 1 \
        --out benchmarks/results/bandwidth_h100.json

Random weights (speed does not depend on them). Each decode step reads every weight except
the embedding table (one row of it) plus the KV cache; bandwidth achieved is those bytes times
steps per second, divided by the bandwidth of a plain device-to-device copy measured in the
same run. Meant for a GPU; on CPU use a small --shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from jaxdec.cli import POSITIVE, RATE  # noqa: E402

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
    "llama-50m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048),
    "llama-10m": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048),
    # The shipped demo pair (checkpoints/demo-target, demo-draft), for CPU cost measurements.
    "demo-target": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
    "demo-draft": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
}


def copy_bandwidth(num_bytes: int, repeats: int = 10) -> float:
    """Bytes per second of a jitted device-to-device copy (read + write counted)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)  # a real kernel: reads and writes every byte
    copy(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        y = copy(x)
    y.block_until_ready()
    return 2 * x.nbytes * repeats / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch-size", type=POSITIVE, default=1)
    parser.add_argument("--prompt-length", type=POSITIVE, default=128)
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=256)
    parser.add_argument("--copy-gib", type=RATE, default=2.0, help="buffer size of the copy measurement")
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import jaxdec
    from benchmarks.common import RESULTS_DIR, command_line, machine_info, streamed_weight_bytes, versions, write_results
    from jaxdec import steps
    from jaxdec.config import ModelConfig
    from jaxdec.loading import model_from_params
    from jaxdec.model import init_params

    cfg = ModelConfig(**SHAPES[args.shape])
    dtype = jnp.dtype(args.dtype)
    model = model_from_params(cfg, init_params(cfg, jax.random.key(0), dtype))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch_size, args.prompt_length)).tolist()
    run = lambda: jaxdec.generate(model, prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=[])
    start = time.perf_counter()
    run()
    compile_seconds = time.perf_counter() - start
    stats = min((run().stats for _ in range(3)), key=lambda s: s.decode_seconds)

    leaves = jax.tree_util.tree_leaves(model.params)
    weight_bytes = streamed_weight_bytes(model)
    batch = steps.bucket(args.batch_size)
    slots = steps.cache_bucket(cfg, args.prompt_length + args.max_new_tokens)
    # The reference attention reads every cache slot of the bucket, valid or not.
    cache_bytes = 2 * cfg.num_hidden_layers * batch * slots * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    steps_per_second = stats.target_steps / stats.decode_seconds
    achieved = (weight_bytes + cache_bytes) * steps_per_second
    copy = copy_bandwidth(int(args.copy_gib * 2**30))
    result = {
        "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size,
        "prompt_length": args.prompt_length, "max_new_tokens": args.max_new_tokens,
        "parameters": int(sum(x.size for x in leaves)),
        "tokens_per_second": stats.tokens_per_second,
        "steps_per_second": steps_per_second,
        "ms_per_step": 1000 / steps_per_second,
        "bytes_per_step": weight_bytes + cache_bytes,
        "achieved_bandwidth_gb_s": achieved / 1e9,
        "copy_bandwidth_gb_s": copy / 1e9,
        "share_of_copy_bandwidth": achieved / copy,
        "first_call_seconds_incl_compile": compile_seconds,
    }
    print("\n".join(f"{k}: {v}" for k, v in result.items()))
    out = args.out or RESULTS_DIR / f"bandwidth_{args.shape}_{jax.default_backend()}.json"
    payload = {"benchmark": "plain decoding bandwidth", "command": command_line(),
               "machine": machine_info(), "versions": versions(), "result": result}
    print(f"wrote {write_results(out, payload)}")


if __name__ == "__main__":
    main()
