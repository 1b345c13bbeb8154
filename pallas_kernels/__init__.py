"""Pallas attention kernels, each beside its pure-JAX reference and its test.

The XLA reference path lives in `jaxdec.attention`. `tree_attention.py` holds the tree (and
chain, and plain-step) attention kernel used with `attn_impl="pallas"`; the sparse and
split-K decode kernels come next.
"""
