"""Host-side predicates shared by the argument checks that raise ValueError before any tracing."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for bool: True is an int in Python, but
    `top_k=True` or `data=True` is a mistake, not a 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
