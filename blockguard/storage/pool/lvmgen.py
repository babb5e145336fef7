"""One generation in an ``lvm`` pool: its LV and its writer.

A generation is two things (see :mod:`.lvmpool` for the whole layout): a logical volume
``g<GENERATION_ID>`` holding its chunks — a thin LV the size of the volume for a full, a
linear LV with the changed chunks packed in chunk order for a delta — and a directory
``volumes/VOLUME/GENERATION_ID/`` on the pool's metadata file system holding
``checksums.xxh3`` and, committed last, ``manifest.json``. The directory is made (and
flock-ed through its ``.writing`` file) *before* the LV, so a garbage collector that finds
an LV always finds the directory that says whether a writer still owns it. The writer and
reader are the store's (:mod:`.store`), on the LV's block device.
"""

from __future__ import annotations

from blockguard.storage.pool.store import StagedGenerationWriter

LAYOUT_THIN = "thin-image"
LAYOUT_PACKED = "packed-lv"


def lv_name_of(generation_id: str) -> str:
    """The LV that holds a generation's chunks (generation ids are valid LV names)."""
    return f"g{generation_id}"


class LvmGenerationWriter(StagedGenerationWriter):
    """Writes one generation's LV, then its checksums and manifest."""

    @property
    def lv(self) -> str | None:
        """The generation's LV (None: an empty delta, or the writer was aborted)."""
        return self.data.storage.get("lv") if self.data.drop is not None else None
