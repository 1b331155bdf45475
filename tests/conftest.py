"""Shared pytest set-up. ``tests/`` is on the path (``pyproject.toml``), so test files import
the shared rigs from ``helpers``; this file holds the fixtures and the hypothesis profiles."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs the default profile; PAGEHINT_HYPOTHESIS=thorough asks for ten times the examples.
settings.register_profile("thorough", max_examples=1000)
settings.load_profile(os.environ.get("PAGEHINT_HYPOTHESIS", "default"))
