"""Host-side predicates shared by the argument checks that raise ValueError before any tracing."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for bool: True is an int in Python, but
    `top_k=True` or `data=True` is a mistake, not a 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a Python or NumPy real number that is not NaN; False for bool, as in is_int
    (`temperature=True` is a mistake, not a 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def check_draft_window(drafter: str, num_tokens: int, max_positions: int) -> None:
    """A forward that scores the pending token and `num_tokens` drafts at once needs that many
    positions; a wider window would only fail later, in XLA (out of memory, or an int32
    overflow)."""
    if num_tokens + 1 > max_positions:
        raise ValueError(f"{drafter} drafts {num_tokens} tokens per step: with the pending token more than the "
                         f"model's max_position_embeddings={max_positions}")
