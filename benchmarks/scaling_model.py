"""A MODEL, not a measurement: expected decode step time over "model" x "data" meshes, from
bytes read, FLOPs and the collectives jaxdec's sharding rules imply.

    python benchmarks/scaling_model.py --shape llama3-8b --device h100-nvlink --batch-size 1 \
        --context 4096 --tokens 1 5 --out benchmarks/results/scaling_model_h100.json

Per device and step of T tokens (T = 1 plain decoding, T = K + 1 a chain verify):
  memory   = (weight bytes / M + KV bytes of its rows and kv heads) / (HBM bandwidth x efficiency)
  compute  = 2 x weights x rows x T / (M x peak FLOP/s)
  comms    = per layer two all-reduces of [rows, T, hidden] (after o_proj and down_proj, the
             row-parallel halves of Megatron-style attention and MLP, which is what GSPMD makes
             of ShardingRules), one for the vocabulary-sharded embedding lookup, and an
             all-gather of the float32 logits; a ring all-reduce moves 2 (M - 1) / M of the
             buffer over each link and pays a fixed latency plus 2 (M - 1) hops
  step     = max(memory, compute) + comms
M devices on "model", D on "data" (rows = batch / D; weights replicated over "data"). KV heads
shard only when M divides them (ShardingRules), else every model device reads all of them.
The device numbers are vendor peak figures with an assumed efficiency: change them with the
flags, and trust measured numbers (benchmarks/bandwidth.py, verify_cost.py) over this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from benchmarks.bandwidth import SHAPES  # noqa: E402
from jaxdec.cli import COUNT, POSITIVE, RATE  # noqa: E402

# Vendor peak figures (bf16 dense FLOP/s, HBM bytes/s, one direction of the interconnect per
# device along one mesh axis, bytes/s) and assumed latencies: a fixed cost per collective, and
# one per ring hop (0 behind an NVSwitch, where every GPU is one hop from every other).
DEVICES = {
    "h100-nvlink": dict(flops=989e12, hbm=3.35e12, link=450e9, collective_latency=8e-6, hop_latency=0.0),
    "tpu-v5e": dict(flops=197e12, hbm=819e9, link=100e9, collective_latency=2e-6, hop_latency=1e-6),
    "tpu-v5p": dict(flops=459e12, hbm=2.76e12, link=200e9, collective_latency=2e-6, hop_latency=1e-6),
}


def weight_count(shape: dict) -> int:
    D, F, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim") or D // shape["num_attention_heads"]
    attn = D * hd * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    head = 0 if shape.get("tie_word_embeddings") else V * D
    return L * (attn + 3 * D * F + 2 * D) + V * D + head + D


def step_seconds(shape: dict, device: dict, *, model: int, data: int, batch: int, context: int, tokens: int,
                 bytes_per_weight: int = 2, efficiency: float = 0.8) -> dict:
    """The modeled time of one step and its parts, in seconds."""
    L, D, V = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    hd = shape.get("head_dim") or D // shape["num_attention_heads"]
    kv_heads = shape["num_key_value_heads"]
    rows = -(-batch // data) if batch % data == 0 else batch  # a batch that does not divide is replicated
    weights = weight_count(shape)
    kv_split = model if kv_heads % model == 0 else 1
    kv_bytes = rows * context * L * 2 * kv_heads * hd * bytes_per_weight / kv_split
    # One embedding row per token is read, not the table: leave the table out of the stream.
    streamed = weights - V * D * (0 if shape.get("tie_word_embeddings") else 1)
    memory = (streamed * bytes_per_weight / model + kv_bytes) / (device["hbm"] * efficiency)
    compute = 2 * weights * rows * tokens / (model * device["flops"] * efficiency)
    comms = 0.0
    if model > 1:
        activation = rows * tokens * D * bytes_per_weight
        latency = lambda hops: device["collective_latency"] + hops * device["hop_latency"]
        all_reduce = 2 * (model - 1) / model * activation / device["link"] + latency(2 * (model - 1))
        gather = (model - 1) / model * rows * tokens * V * 4 / device["link"] + latency(model - 1)
        comms = (2 * L + 1) * all_reduce + gather
    return {"memory": memory, "compute": compute, "comms": comms, "step": max(memory, compute) + comms}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100-nvlink")
    parser.add_argument("--batch-size", type=POSITIVE, default=1)
    parser.add_argument("--context", type=COUNT, default=4096)
    parser.add_argument("--tokens", type=POSITIVE, nargs="+", default=[1, 5], help="tokens per step (1, or K+1 to verify)")
    parser.add_argument("--model-sizes", type=POSITIVE, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--data-sizes", type=POSITIVE, nargs="+", default=[1])
    parser.add_argument("--efficiency", type=RATE, default=0.8, help="share of peak bandwidth and FLOP/s reached")
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)

    shape, device = SHAPES[args.shape], DEVICES[args.device]
    rows = []
    for data in args.data_sizes:
        for model in args.model_sizes:
            for tokens in args.tokens:
                t = step_seconds(shape, device, model=model, data=data, batch=args.batch_size, context=args.context,
                                 tokens=tokens, efficiency=args.efficiency)
                rows.append({"data": data, "model": model, "devices": data * model, "tokens_per_step": tokens,
                             **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                             "steps_per_second": 1 / t["step"], "batch_tokens_per_second": args.batch_size / t["step"]})
    base = {r["tokens_per_step"]: r["step_ms"] for r in rows if r["devices"] == 1}
    print(f"MODEL (not a measurement): {args.shape}, {args.device}, batch {args.batch_size}, context {args.context}")
    print("| data x model | tokens/step | memory ms | compute ms | comms ms | step ms | speedup vs 1 device |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        r["speedup_vs_one_device"] = base[r["tokens_per_step"]] / r["step_ms"] if r["tokens_per_step"] in base else None
        print(f"| {r['data']} x {r['model']} | {r['tokens_per_step']} | {r['memory_ms']:.3f} | {r['compute_ms']:.3f} | "
              f"{r['comms_ms']:.3f} | {r['step_ms']:.3f} | {r['speedup_vs_one_device'] or float('nan'):.2f}x |")
    if args.out:
        from benchmarks.common import command_line, write_results
        payload = {"benchmark": "MODEL, not a measurement: decode step time over meshes", "command": command_line(),
                   "assumptions": {"device": {args.device: device}, "efficiency": args.efficiency,
                                   "shape": {args.shape: shape}},
                   "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
        print(f"wrote {write_results(args.out, payload)}")
    return rows


if __name__ == "__main__":
    main()
