"""Pallas attention kernels, each beside its pure-JAX reference and its test.

The XLA reference path lives in `jaxdec.attention`. With `attn_impl="pallas"`:
`tree_attention.py` runs steps over a plain cached prefix (trees, chains, plain steps),
`decode_attention.py` a plain decoding step over a long cache (split-K), and
`sparse_attention.py` the sparse layers (only the cache pages chosen for each kv head). On a
GPU in half precision all three hand over to `tree_attention_mgpu.py`, one Mosaic GPU kernel
that reads contiguous cache blocks (split or not) or chosen pages.
"""
