"""virtio-balloon protocol constants: feature bits, config space, cmd ids and queue limits.

Sources: virtio 1.2 §5.5 and §6, Linux ``include/uapi/linux/virtio_balloon.h``, QEMU
``hw/virtio/virtio-balloon.c``. Every other module takes these names from here.
"""

from __future__ import annotations

# Device feature bits (virtio 1.2 §5.5.3).
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_REPORTING = 5
# Transport feature bits (virtio 1.2 §6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_PACKED = 34

CMD_ID_STOP = 0
"""Stop hinting, keep the hinted pages (VIRTIO_BALLOON_CMD_ID_STOP)."""
CMD_ID_DONE = 1
"""Stop hinting and free every hinted page (VIRTIO_BALLOON_CMD_ID_DONE)."""
CMD_ID_MIN = 0x8000_0000
"""QEMU's VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN: the counter starts here and each round
increments it first, so the first id issued is ``CMD_ID_MIN + 1`` (as the pc-2G ring dump
shows); after 0xFFFFFFFF it wraps back to ``CMD_ID_MIN``."""

BALLOON_PFN_SHIFT = 12
"""Balloon page numbers and sizes are in 4 KiB units whatever the guest's page size."""

# Config space offsets (struct virtio_balloon_config, little endian even for legacy devices).
CONFIG_NUM_PAGES = 0
CONFIG_ACTUAL = 4
CONFIG_FREE_PAGE_HINT_CMD_ID = 8
CONFIG_POISON_VAL = 12

# Queue sizes QEMU gives the device (the driver may choose smaller split rings).
FREE_PAGE_QUEUE_MAX = 1024  # VIRTQUEUE_MAX_SIZE
REPORTING_QUEUE_MAX = 32
OTHER_QUEUE_MAX = 128


# Device status bits (virtio 1.2 §2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

VIRTIO_ID_BALLOON = 5
"""The traditional memory balloon's device ID (virtio 1.2 §5)."""


def bit(n: int) -> int:
    """The feature mask of bit ``n``."""
    return 1 << n
