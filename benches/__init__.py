"""pagehint's benchmark suite (pytest-benchmark); run it with ``python benches/report.py``.

A package so that its modules are ``benches.*`` for pytest and mypy and cannot collide with
``tests/`` (both may have a ``conftest``).
"""
