"""Pallas attention kernels, each beside its pure-JAX reference and its test.

The XLA reference path lives in `jaxdec.attention`; the kernels (tree, sparse and split-K
decode attention) are added here with `attn_impl="pallas"`.
"""
