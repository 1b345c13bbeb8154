"""Pallas attention kernels, each beside its pure-JAX reference and its test.

The XLA reference path lives in `jaxdec.attention`. With `attn_impl="pallas"`:
`tree_attention.py` runs steps over a plain cached prefix (trees, chains, plain steps; on a
GPU in half precision through its Mosaic GPU form, `tree_attention_mgpu.py`),
`decode_attention.py` a plain decoding step over a long cache (split-K), and
`sparse_attention.py` the sparse layers (only the cache pages chosen for each kv head).
"""
