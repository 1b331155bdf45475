"""``SimulatedLink``'s clock: a batch takes the longer of its wire time and its read time,
the guest runs that long, and the sender may wait for a destination still starting up
(``LinkModel.startup_wait``, once ``startup_buffer`` is full) with the guest running."""

from __future__ import annotations

import pytest

from pagehint.sim import LinkModel, SimulatedLink


class Guest:
    def __init__(self) -> None:
        self.ran: list[float] = []

    def run(self, seconds: float) -> None:
        self.ran.append(seconds)


def test_the_first_batch_waits_for_the_destination_the_guest_running() -> None:
    # No buffer: the first batch waits.
    guest = Guest()
    link = SimulatedLink(guest, LinkModel(bandwidth=1000.0, scan_rate=1e9, startup_wait=0.5))
    link.start()
    link.transmit(100, 100, running=True)
    assert link.now() == pytest.approx(0.6) and guest.ran[-1] == pytest.approx(0.6)
    link.transmit(100, 100, running=True)  # only the first
    assert link.now() == pytest.approx(0.7)
    link.start()  # a new migration waits again
    link.transmit(100, 100, running=False)
    assert link.now() == pytest.approx(0.6) and guest.ran[-1] == 0.0  # (start's set-up)


def test_the_wait_comes_when_the_buffer_is_full() -> None:
    guest = Guest()
    model = LinkModel(bandwidth=1000.0, scan_rate=1e9, startup_wait=0.5, startup_buffer=250)
    link = SimulatedLink(guest, model)
    link.start()
    for _ in range(2):  # 200 bytes: they fit
        link.transmit(100, 100, running=True)
    assert link.now() == pytest.approx(0.2)
    link.transmit(100, 100, running=True)  # 300 > 250: this one waits
    assert link.now() == pytest.approx(0.8) and guest.ran[-1] == pytest.approx(0.6)
    link.transmit(100, 100, running=True)
    assert link.now() == pytest.approx(0.9)


def test_without_a_delay_nothing_changes() -> None:
    a, b = SimulatedLink(Guest()), SimulatedLink(Guest(), LinkModel(startup_wait=0.0))
    for link in (a, b):
        link.start()
        link.transmit(10_000, 8_192, running=True)
    assert a.now() == b.now() == pytest.approx(10_000 / (10e9 / 8))


@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_a_negative_wait_or_buffer_is_refused(value: float) -> None:
    with pytest.raises(ValueError):
        LinkModel(startup_wait=value)
    with pytest.raises(ValueError):
        LinkModel(startup_buffer=-1)
