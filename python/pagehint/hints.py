"""Applying free-page hints to a dirty bitmap through a guest memory map.

``apply_hints`` and its ``HintResult`` live in the Rust core (``pagehint._core``), which owns the
rounding rule (only pages a hint fully covers are cleared); this module re-exports them under the
names other modules import.
"""

from pagehint._core import HintResult, apply_hints

__all__ = ["HintResult", "apply_hints"]
