"""The figures the migration commands print: the change column and the plots' scale."""

from __future__ import annotations

import pytest

from pagehint.cli.report import change_text


@pytest.mark.parametrize(
    "before, after, text",
    [
        (100.0, 15.0, "-85%"),
        (100.0, 100.0, "+0%"),
        (100.0, 250.0, "+150%"),
        (100.0, 1000.0, "+900%"),  # tenfold: still a percentage
        (0.1, 85.73, "x857"),  # a near-zero baseline: a factor, not +85630%
        (3, 45_000, "x15,000"),
        (0.0, 5.0, ""),  # no baseline, no change
    ],
)
def test_the_change_is_a_percentage_or_past_tenfold_a_factor(
    before: float, after: float, text: str
) -> None:
    assert change_text(before, after) == text


def test_bars_spanning_orders_of_magnitude_get_a_log_scale() -> None:
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pagehint[plot])")
    from pagehint.cli.plot import y_scale

    assert y_scale([1_000_000, 120, 80, 0]) == "symlog"
    assert y_scale([5_000, 900, 60, 0]) == "linear"
    assert y_scale([0, 0]) == "linear"
