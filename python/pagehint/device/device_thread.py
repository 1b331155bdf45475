"""The VMM's device thread for a virtio-mmio transport made with ``process_on_notify=False``:
the guest's QueueNotify only records the notification (the vCPU goes back to the guest at
once) and this thread serves it, as QEMU's free page hint processing runs in a bottom half on
an iothread rather than in the vCPU's exit.

``hold()`` makes notifications wait until ``release()``, and returns once no processing is
under way: stop-and-copy holds it so that the device is quiescent while its state is saved,
and a test holds it to put a guest action between the guest's notify and the device's
processing (the lost write of the ``qemu`` strategy).
"""

from __future__ import annotations

import threading

from pagehint.device.mmio import VirtioMmioTransport


class DeviceThread:
    """Serves ``transport``'s notifications on a thread of its own until ``stop()``."""

    def __init__(self, transport: VirtioMmioTransport, *, name: str = "virtio-device") -> None:
        if transport.process_on_notify:
            raise ValueError("the transport serves notifications on the vCPU thread already")
        self.transport = transport
        self._name = name
        self._stop = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.served = 0
        """Rounds of ``process_pending`` that found work."""
        self.error: str | None = None
        """Why the thread ended, if the device model raised."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the device thread is already started")
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        notified = self.transport.notified
        try:
            while not self._stop.is_set():
                if not notified.wait(0.05) or not self._released.wait(0.05):
                    continue
                self._idle.clear()
                try:
                    # A hold that came in between waits for this round (checked under idle).
                    if self._released.is_set() and self.transport.process_pending():
                        self.served += 1
                finally:
                    self._idle.set()
        except Exception as e:  # noqa: BLE001 - reported, as a vCPU's end is
            self.error = f"{type(e).__name__}: {e}"

    def hold(self, timeout: float = 10.0) -> None:
        """Notifications wait from now on; returns once processing under way has ended
        (``TimeoutError`` if it does not)."""
        self._released.clear()
        if not self._idle.wait(timeout):
            raise TimeoutError(f"the device thread did not finish its work in {timeout} s")

    def release(self) -> None:
        """Serves the notifications that waited, and the next ones as they come."""
        self._released.set()

    @property
    def held(self) -> bool:
        return not self._released.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._released.set()
        if self._thread is not None:
            self._thread.join(timeout)
