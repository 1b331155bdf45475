"""The pre-copy loop's accounting and control flow on simulated guests: QMP figures, zero
pages, convergence, the round limit, the hint window around every sync, cancel, and the
published scenarios' reductions."""

from __future__ import annotations

import threading

import pytest

from helpers import MIB, attached_guest, migrate_simulated
from pagehint import MemoryMap
from pagehint.device import FreePageHintDevice, HintState
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, Progress
from pagehint.sim import (
    LinkModel,
    SimulatedDestination,
    SimulatedGuest,
    SimulatedLink,
    SimulatedSource,
    SteadyWriter,
    load_scenario,
    reduction,
    run_scenario,
)


def simple(
    config: PrecopyConfig,
    *,
    writer: SteadyWriter | None = None,
    used: float = 0.25,
    link: LinkModel | None = None,
) -> tuple[MigrationResult, SimulatedGuest, FreePageHintDevice]:
    """A 256 MiB guest with a hole, fresh (free memory is zero pages), attached and migrated."""
    memmap = MemoryMap([(0, 128 * MIB), (192 * MIB, 128 * MIB)])
    guest, device = attached_guest(memmap, seed=2, used=used, init_on_alloc=False)
    guest.log.get()
    if writer is not None:
        guest.workloads.append(writer)
    result, _ = migrate_simulated(SimulatedSource(guest, device), config, link)
    return result, guest, device


def test_qmp_figures_add_up() -> None:
    cfg = PrecopyConfig(hints=False)
    r, guest, _ = simple(cfg)
    d = r.to_dict()
    assert d["status"] == "completed" and d["lost-pages"] == 0
    ram = d["ram"]
    assert ram["total"] == guest.npages * 4096
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["transferred"] == ram["normal"] * (8 + 4096) + ram["duplicate"] * (8 + 1)
    assert ram["remaining"] == 0
    # Without hints every page goes once in round 0: the kernel's 25 % as data, the rest as
    # zero pages (the guest never wrote them).
    kernel = round(0.25 * guest.nblocks) * guest.pages_per_block
    assert r.rounds[0].normal >= kernel and ram["normal"] + ram["duplicate"] >= guest.npages
    assert d["total-time"] == pytest.approx(r.total_time * 1000, abs=1e-3)  # ms, 3 decimals
    assert [x["round"] for x in d["rounds"]] == list(range(len(r.rounds)))
    assert {"dirty-at-start", "pages-skipped", "new-dirty"} <= set(d["rounds"][0])


def test_hints_skip_free_pages_and_open_a_window_per_sync() -> None:
    r, _guest, device = simple(PrecopyConfig())
    assert r.hinting and r.pages_skipped > 0 and r.lost_pages == 0
    # One start per sync while running (config interrupt each), stop before each, DONE last.
    assert device.cmd_id - 0x8000_0000 == r.dirty_sync_count - 1
    assert device.state is HintState.DONE
    off, _, _ = simple(PrecopyConfig(hints=False))
    assert r.duplicate + r.normal < off.duplicate + off.normal


def test_a_converged_migration_fits_the_downtime() -> None:
    cfg = PrecopyConfig(max_downtime=0.05)
    r, _, _ = simple(cfg, writer=SteadyWriter(16 * MIB, pages_per_s=2000))
    assert r.status == "completed" and r.dirty_sync_count < cfg.max_rounds
    assert 0 < r.downtime <= cfg.max_downtime
    assert r.lost_pages == 0


def test_the_round_limit_forces_completion() -> None:
    # 40k pages/s over a 128 Mbit/s link never converges within 5 ms of downtime.
    cfg = PrecopyConfig(max_downtime=0.005, max_rounds=4)
    r, _, _ = simple(
        cfg, writer=SteadyWriter(32 * MIB, pages_per_s=40_000), link=LinkModel(bandwidth=16 * MIB)
    )
    assert r.status == "completed"
    assert r.dirty_sync_count == cfg.max_rounds + 2  # set-up, the rounds, the final one
    assert r.downtime > cfg.max_downtime and r.lost_pages == 0


def test_cancel_from_the_progress_callback_sends_done() -> None:
    guest, device = attached_guest(MemoryMap.x86(512 * MIB), seed=3)
    source = SimulatedSource(guest, device)
    calls = 0

    def progress(_: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            migration.cancel()

    migration = Precopy(
        source,
        SimulatedDestination(guest),
        SimulatedLink(source),
        PrecopyConfig(batch_pages=1024),
        progress=progress,
    )
    r = migration.run()
    assert r.status == "cancelled" and calls == 2
    assert device.state is HintState.DONE and not source.paused
    guest.driver.run()
    assert guest.hinted_block_count == 0  # the guest took DONE and freed its hinted blocks


@pytest.mark.parametrize(
    "kw",
    [{"max_downtime": -1}, {"max_rounds": 0}, {"clear_chunk_pages": 100}, {"strategy": "fast"}],
)
def test_bad_configs_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PrecopyConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"bandwidth": 0}, {"scan_rate": -1.0}, {"setup_time": -1.0}])
def test_bad_link_models_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LinkModel(**kw)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wang-v37-idle-8g", "wang-v37-bzimage-8g", "wang-v37-idle-128g"])
def test_published_reductions_are_reproduced_within_10_points(name: str) -> None:
    s = load_scenario(name)
    off, on = run_scenario(s, hints=False), run_scenario(s, hints=True)
    assert off.lost_pages == 0 and on.lost_pages == 0
    published = reduction(s.published["total_time_off_ms"], s.published["total_time_on_ms"])
    simulated = reduction(off.total_time, on.total_time)
    assert abs(simulated - published) <= 0.10, (simulated, published)


@pytest.mark.parametrize("hints", [False, True])
def test_the_dirty_count_kept_as_pages_go_is_the_bitmaps(hints: bool) -> None:
    # What the loop decides on (and reports) is counted as merges, sends and hints change
    # the bitmap, not by a pass over it: at every step it must be what a pass finds.
    memmap = MemoryMap([(0, 128 * MIB), (192 * MIB, 128 * MIB)])
    guest, device = attached_guest(memmap, seed=4, used=0.25, init_on_alloc=True)
    guest.log.get()
    guest.workloads.append(SteadyWriter(16 * MIB, pages_per_s=20000))
    migration: list[Precopy] = []
    seen: list[tuple[int, int]] = []

    def check(p: Progress) -> None:
        seen.append((p.remaining, migration[0].bitmap.count()))

    r, _ = migrate_simulated(
        SimulatedSource(guest, device),
        PrecopyConfig(hints=hints, batch_pages=4096),
        progress=check,
        on_start=migration.append,
    )
    assert r.status == "completed" and r.lost_pages == 0 and (r.pages_skipped > 0) == hints
    assert len(seen) > 10 and all(kept == counted for kept, counted in seen)


def test_a_kept_count_above_an_empty_bitmap_does_not_keep_the_loop_going() -> None:
    # A count read while a device thread is between its clear and its total, or any drift,
    # may say pages remain when the bitmap is empty: the loop must still move on (it would
    # iterate over nothing forever); run in a thread, so that a regression fails, not hangs.
    memmap = MemoryMap([(0, 64 * MIB)])
    guest, device = attached_guest(memmap, seed=5, used=0.25)
    migration: list[Precopy] = []
    inflated: list[int] = []
    results: list[MigrationResult] = []

    def inflate(p: Progress) -> None:
        if not inflated:
            inflated.append(p.remaining)
            migration[0]._dirty_pages += 1_000_000  # more than there are pages

    def run() -> None:
        r, _ = migrate_simulated(
            SimulatedSource(guest, device),
            PrecopyConfig(batch_pages=4096),
            progress=inflate,
            on_start=migration.append,
        )
        results.append(r)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the loop kept iterating over an empty bitmap"
    assert inflated and results[0].status == "completed" and results[0].lost_pages == 0
