"""A target area's own speeds: measured once with the project's probe on a scratch file
in the area, kept in the area, measured again only when the figures are missing, old or
from another device; an ``areas`` answer is checked before it is believed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockguard.core.perftable import DeviceSpeed
from blockguard.storage.remote import areaprobe
from blockguard.storage.remote.areaprobe import AreaReport, area_report, keep_area_speed


def test_an_area_is_probed_once_and_its_figures_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[Path] = []
    real = areaprobe.probe_area

    def counted(root: Path, **kw: object) -> DeviceSpeed | None:
        probes.append(root)
        return real(root, **kw)  # type: ignore[arg-type]  # the caller's own keywords

    monkeypatch.setattr(areaprobe, "probe_area", counted)
    clock = [1_000_000.0]
    first = area_report(tmp_path, "main", duration=0.02, size=8 << 20, clock=lambda: clock[0])
    assert probes == [tmp_path]
    speed = first.speed
    assert speed is not None and min(speed.seq_read, speed.seq_write) > 0
    assert first.total > 0 and 0 < first.free <= first.total
    assert first.measured_at == clock[0] and first.disk in ("ssd", "hdd", "unknown")
    # The scratch file is gone; the figures are kept.
    assert not (tmp_path / areaprobe.SCRATCH).exists()
    assert json.loads((tmp_path / areaprobe.CACHE).read_text())["seq_read"] == speed.seq_read

    clock[0] += 3600
    again = area_report(tmp_path, "main", duration=0.02, size=8 << 20, clock=lambda: clock[0])
    assert probes == [tmp_path] and again.speed == speed and again.measured_at == 1_000_000.0

    clock[0] += areaprobe.DEFAULT_MAX_AGE
    area_report(tmp_path, "main", duration=0.02, size=8 << 20, clock=lambda: clock[0])
    assert probes == [tmp_path, tmp_path]


def test_figures_of_another_device_are_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_area_speed(tmp_path, DeviceSpeed(1.0, 2.0, 3.0, 4.0), 50.0)
    cache = tmp_path / areaprobe.CACHE
    moved = json.loads(cache.read_text()) | {"st_dev": os.stat(tmp_path).st_dev + 1}
    cache.write_text(json.dumps(moved))
    monkeypatch.setattr(areaprobe, "probe_area", lambda root, **kw: DeviceSpeed(9, 9, 9, 9))
    found = area_report(tmp_path, "main", clock=lambda: 60.0)
    assert found.speed == DeviceSpeed(9, 9, 9, 9) and found.measured_at == 60.0


def test_an_area_too_full_to_probe_is_reported_unmeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = area_report(tmp_path, "main", size=1 << 20)
    assert found.speed is None and found.total > 0
    assert not (tmp_path / areaprobe.CACHE).exists()

    def failing(root: Path, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(areaprobe, "probe_area", failing)
    assert area_report(tmp_path, "main").speed is None


def test_an_area_the_serve_cannot_write_is_reported_unmeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe lock cannot be made (an area root the serve user may read, not write).
    def refused(root: Path) -> None:
        raise PermissionError(13, "Permission denied", str(root / areaprobe.LOCK))

    monkeypatch.setattr(areaprobe, "_probe_lock", refused)
    found = area_report(tmp_path, "main")
    assert found.speed is None and found.total > 0 and found.free > 0


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"name": "../x", "total": 1, "free": 1, "chunk_size": 65536},
        {"name": "a", "total": -1, "free": 1, "chunk_size": 65536},
        {"name": "a", "total": 1, "free": 1, "chunk_size": 65536, "seq_read": "fast"},
        {"name": "a", "total": 1, "free": 1, "chunk_size": 65536, "disk": "\x1b[2J"},
    ],
)
def test_an_area_answer_that_does_not_fit_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        AreaReport.from_dict(bad)


def test_an_area_round_trips_as_the_answer_carries_it() -> None:
    area = AreaReport("main", 100, 50, "dir", "ssd", 1.0, 2.0, 3.0, 4.0, 65536, 7.0)
    assert AreaReport.from_dict(area.as_dict()) == area
    assert area.speed == DeviceSpeed(1.0, 2.0, 3.0, 4.0)
    assert AreaReport("main", 100, 50).speed is None
