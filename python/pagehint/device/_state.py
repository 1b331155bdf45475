"""Checks for saved device and transport state (``save_state`` / ``restore_state``): each
raises ``ValueError`` naming the field, so a restore refuses a malformed state before it
changes anything. JSON gives ints, strs, bools, lists, dicts and None; bools are not ints here.
"""

from __future__ import annotations

from collections.abc import Iterable

STATE_VERSION = 1
"""The saved state's format; ``restore_state`` takes only this one."""

U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1


def fields(value: object, what: str, keys: Iterable[str]) -> dict[str, object]:
    """``value`` as a dict with exactly ``keys``, and ``version`` checked if it is one."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, not {type(value).__name__}")
    want = set(keys)
    unknown = sorted(str(k) for k in value if k not in want)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    missing = sorted(want - set(value))
    if missing:
        raise ValueError(f"{what} lacks keys {missing}")
    if "version" in want and value["version"] != STATE_VERSION:
        raise ValueError(f"{what}: version {value['version']!r} is not {STATE_VERSION}")
    return value


def integer(d: dict[str, object], key: str, what: str, high: int = U64, low: int = 0) -> int:
    """``d[key]`` as an int in ``[low, high]``."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what}.{key} must be an int, not {type(v).__name__}")
    if not low <= v <= high:
        raise ValueError(f"{what}.{key} must be in [{low}, {high:#x}], not {v}")
    return v


def boolean(d: dict[str, object], key: str, what: str) -> bool:
    """``d[key]`` as a bool."""
    v = d[key]
    if not isinstance(v, bool):
        raise ValueError(f"{what}.{key} must be a bool, not {type(v).__name__}")
    return v


def listing(d: dict[str, object], key: str, what: str) -> list[object]:
    """``d[key]`` as a list."""
    v = d[key]
    if not isinstance(v, list):
        raise ValueError(f"{what}.{key} must be a list, not {type(v).__name__}")
    return v
