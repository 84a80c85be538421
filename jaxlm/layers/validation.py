"""Constructor checks for the layers: a bad configuration raises ValueError naming the argument."""

from __future__ import annotations

from typing import Any


def check_positive(**values: Any) -> None:
    """Each keyword must be a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """value must be a multiple of divisor."""
    if value % divisor != 0:
        raise ValueError(f"{name}={value} must be a multiple of {divisor_name}={divisor}")


def check_positive_float(**values: Any) -> None:
    """Each keyword must be a finite float > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
