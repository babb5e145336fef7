"""``blockguardctl status`` asks for the status and the health in one call (issue 16),
and still works with a daemon older than that call."""

from __future__ import annotations

from typing import Any

import pytest

from blockguard.cli.client import RemoteError
from blockguard.cli.health import _fetch

STATUS = {"volumes": 1, "pools": 1, "running_jobs": 0, "summary": "1 volumes", "drills": {}}
HEALTH = {"level": "ok", "code": 0, "summary": "1 volumes", "volumes": [], "pools": []}


class FakeClient:
    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.calls: list[str] = []

    def call(self, member: str) -> Any:
        self.calls.append(member)
        if member == "GetStatusAndHealth":
            if self.refuse:
                raise RemoteError(self.refuse, "no such method")
            return {"status": dict(STATUS), "health": dict(HEALTH)}
        return dict({"GetStatus": STATUS, "GetHealth": HEALTH}[member])


def test_one_call() -> None:
    client = FakeClient()
    assert _fetch(client) == (STATUS, HEALTH)  # type: ignore[arg-type]
    assert client.calls == ["GetStatusAndHealth"]


@pytest.mark.parametrize(
    "refusal",
    ["org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.AccessDenied"],
)
def test_an_older_daemon_or_policy_gets_two_calls(refusal: str) -> None:
    client = FakeClient(refusal)
    assert _fetch(client) == (STATUS, HEALTH)  # type: ignore[arg-type]
    # The health first: the status's summary then tells the level just assessed.
    assert client.calls == ["GetStatusAndHealth", "GetHealth", "GetStatus"]


def test_other_errors_are_not_hidden() -> None:
    client = FakeClient("org.blockguard1.Error.EnvironmentProblem")
    with pytest.raises(RemoteError):
        _fetch(client)  # type: ignore[arg-type]
    assert client.calls == ["GetStatusAndHealth"]
