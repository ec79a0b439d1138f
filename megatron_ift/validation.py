"""Small validation helpers shared by the frozen config dataclasses.

Every error names the offending field, the value given and what is allowed, so that a bad YAML
key or override fails at construction, before any process group or model exists.
"""

from __future__ import annotations

from typing import Any, Iterable

from megatron_ift.errors import ConfigError

__all__ = ["ConfigError", "check_choice", "check_range", "check_positive_int"]


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_range(
    field: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field}={value!r} must be a number")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = "[" if low_inclusive else "("
        raise ConfigError(f"{field}={value!r} must be {'>=' if low_inclusive else '>'} {low} ({bound}{low}, ...)")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ConfigError(f"{field}={value!r} must be {'<=' if high_inclusive else '<'} {high}")


def check_positive_int(field: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{field}={value!r} must be {kind} integer")
