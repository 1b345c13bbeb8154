#!/usr/bin/env bash
# Everything that needs a GPU, in one call of a lent machine: about 9 minutes on one H100/H200.
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh      # results and logs to $OUT (default benchmarks/results)
#
# Runs the project from the checkout (PYTHONPATH=., nothing installed) and gives each step a
# time limit, so one slow or failing step leaves the others their time; each step's log is
# $OUT/<step>.log. Steps:
#   kernels     the Pallas kernels' tests, compiled for the GPU this time (on a GPU the tests'
#               kernels run natively, not in the interpreter), against their references;
#   tree        the tree-attention kernels (Mosaic GPU and Triton) against XLA, 1k-32k slots,
#               16-64 nodes, at Llama-3-8B's attention shapes (issue goal: >= 2x);
#   verify      a round's parts at Llama-3-8B / Llama-3.2-1B shapes, bfloat16: the step over
#               1..4 tokens and the 9/17/65-token verifies (goal: 65 tokens <= 1.2x one; each
#               width is a 32-layer program to compile, so few widths);
#   verify_pallas the same through the Pallas kernels (attn_impl="pallas"): 1, 2 and 65 tokens;
#   decode      the demo pair end to end with attn_impl="pallas" (float32: the Triton tree
#               kernel in every verify): tokens/s, and every method's tokens equal plain decoding's
#               (generate() runs a float32 model's products in true float32, not JAX's TF32
#               default: README, "Numerics");
#   long        one layer's attention at 8B shapes up to 128k slots: dense, sparse and the
#               kernels (split-K decode, sparse pages, tree);
#   sampling    the top-k / top-p cut (32 passes over the vocabulary) against a sort, at a
#               128k vocabulary, last: the one step the 600 s of a call may cut short.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
gpu=$(python -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null | tr ' ' '-' | tr 'A-Z' 'a-z' | tr -cd 'a-z0-9-')
gpu=${gpu:-gpu}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($limit s at most): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after ${SECONDS}s in all"
  tail -n 25 "$OUT/$name.log"
}

step kernels 80 python -m pytest -q -p no:xdist -o addopts="-ra" tests/test_tree_attention.py \
    tests/test_decode_attention.py tests/test_sparse_attention.py
step tree 120 python benchmarks/tree_attention.py --contexts 1024 4096 16384 32768 --nodes 16 32 64 \
    --dtype bfloat16 --out "$OUT/tree_attention_$gpu.json"
step verify 140 python benchmarks/verify_cost.py --target-shape llama3-8b --draft-shape llama3.2-1b \
    --dtype bfloat16 --context 1024 --max-draft 3 --tree-tokens 9 17 65 --out "$OUT/verify_cost_$gpu.json"
step verify_pallas 80 python benchmarks/verify_cost.py --target-shape llama3-8b --draft-shape llama3.2-1b \
    --dtype bfloat16 --context 1024 --max-draft 1 --tree-tokens 65 --attn-impl pallas \
    --out "$OUT/verify_cost_pallas_$gpu.json"
step decode 60 python benchmarks/decode.py --methods ar,draft:8,tree:16x2x16,eagle:8x3x16 --category code \
    --num-prompts 4 --repeats 2 --attn-impl pallas --no-progress --out "$OUT/decode_code_b1_pallas_$gpu.json"
step long 80 python benchmarks/long_context_attention.py --shapes llama3-8b --contexts 4096 32768 131072 \
    --batch-sizes 1 --no-progress --out "$OUT/long_context_attention_$gpu.json"
step sampling 30 python benchmarks/sampling_cost.py --vocab 128256 --rows 1 9 \
    --out "$OUT/sampling_cost_$gpu.json"
