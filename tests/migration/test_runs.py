"""Runs of pages: what a batch is, from the pages the sender took to the pages sent."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagehint.migration import PageRuns, expand_runs


def i64(values: list[int]) -> npt.NDArray[np.int64]:
    return np.array(values, dtype=np.int64)


def test_runs_of_a_batch_that_wrapped_around() -> None:
    runs = PageRuns.of_pfns(i64([7, 8, 9, 12, 13, 0, 1, 5]))
    assert runs.starts.tolist() == [7, 12, 0, 5] and runs.counts.tolist() == [3, 2, 2, 1]
    assert runs.pages == 8 and runs.last() == 5
    assert runs.pfns().tolist() == [7, 8, 9, 12, 13, 0, 1, 5]


def test_no_pages_no_runs() -> None:
    runs = PageRuns.of_pfns(i64([]))
    assert runs.pages == 0 and runs.last() == -1 and len(runs.starts) == 0
    assert runs.pfns().tolist() == [] and expand_runs(i64([]), i64([])).tolist() == []


def test_starts_and_counts_must_match() -> None:
    with pytest.raises(ValueError):
        PageRuns(i64([1, 2]), i64([1]))


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 70)), max_size=20))
def test_expand_runs_is_every_page_of_every_run_in_order(runs: list[tuple[int, int]]) -> None:
    starts, counts = i64([s for s, _ in runs]), i64([c for _, c in runs])
    expect = [s + k for s, c in runs for k in range(c)]
    assert expand_runs(starts, counts).tolist() == expect


@given(st.lists(st.integers(0, 300), unique=True))
def test_runs_of_distinct_pages_give_them_back(pages: list[int]) -> None:
    runs = PageRuns.of_pfns(i64(pages))
    assert runs.pfns().tolist() == pages and runs.pages == len(pages)
    assert np.all(runs.counts >= 1)
    # Maximal: a run never goes on where the next one starts.
    assert not np.any(runs.starts[:-1] + runs.counts[:-1] == runs.starts[1:])
