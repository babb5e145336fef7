"""An idle daemon's health work: assessed when time alone changes it, metrics rewritten
when a figure changed (or slowly, for the ages)."""

from __future__ import annotations

from blockguard.core.health import Thresholds, VolumeFacts, next_time_change
from blockguard.engine import metrics


def test_next_time_change_is_the_earliest_rpo_miss_to_come() -> None:
    t = Thresholds(rpo_grace=0.1)
    vols = [
        VolumeFacts("quiet"),  # no RPO: time changes nothing
        VolumeFacts("hourly", rpo_seconds=3600, last_success=1000.0),
        VolumeFacts("daily", rpo_seconds=86400, last_success=1000.0),
        VolumeFacts("missed", rpo_seconds=60, last_success=0.0),  # already missed
        VolumeFacts("gone", rpo_seconds=10, last_success=1000.0, tracker_state="detached"),
    ]
    assert next_time_change(vols, t, now=2000.0) == 1000.0 + 3960.0
    assert next_time_change(vols[:1], t, now=2000.0) is None


def test_metrics_rewritten_when_a_figure_changed_or_slowly_for_ages() -> None:
    a = 'blockguard_health 0\nblockguard_volume_rpo_age_seconds{volume="v"} 10\n'
    older = 'blockguard_health 0\nblockguard_volume_rpo_age_seconds{volume="v"} 70\n'
    changed = 'blockguard_health 1\nblockguard_volume_rpo_age_seconds{volume="v"} 70\n'
    assert metrics.rewrite_due(a, None, 0.0)
    last = (metrics.steady(a), 0.0)
    assert not metrics.rewrite_due(older, last, 60.0)  # only the age moved
    assert metrics.rewrite_due(changed, last, 60.0)
    assert metrics.rewrite_due(older, last, metrics.REWRITE_AFTER)
