"""Virtqueues read from guest RAM: the elements a driver made available, as numpy arrays.

The queue readers and their results live in the Rust core (``pagehint._core``); this module
re-exports them under the names other modules import. ``SplitQueue.pop`` returns ``Elements``
(parallel arrays, no Python object per element); ``drain_hints`` returns a ``HintDrain``
carrying a ``HintResult`` and, when a cmd id stopped it, a ``ControlElement``.
"""

from pagehint._core import ControlElement, Elements, HintDrain, PackedQueue, SplitQueue

__all__ = ["ControlElement", "Elements", "HintDrain", "PackedQueue", "SplitQueue"]
