"""The CLI parses D-Bus addresses itself (dbus-fast's parser imports urllib.parse and
ipaddress, issue 16): it must read every address as dbus-fast does, and refuse the same."""

from __future__ import annotations

import pytest
from dbus_fast._private.address import get_bus_address, parse_address
from dbus_fast.constants import BusType
from dbus_fast.errors import InvalidAddressError

from blockguard.cli import bus

ADDRESSES = [
    "unix:path=/run/dbus/system_bus_socket",
    "unix:path=/tmp/bg-x/bus,guid=decaf7234629e195987d59946b107965",
    "unix:abstract=/tmp/dbus-XYZ,guid=1;unix:path=/run/bus",
    "unix:path=/tmp/with%20space%2c%3d%3b",
    "unix:path=/tmp/%C3%A9t%C3%A9",  # UTF-8 escapes
    "unix:path=/tmp/%ff%fe",  # not UTF-8
    "unix:path=/tmp/100%,x=%4",  # % without two hex digits stays
    "unix:path=/tmp/%zz%4g%",
    "unix:abstract=a%00b",
    "tcp:host=127.0.0.1,port=12345",
    "tcp:host=localhost,port=x",
    ";;unix:path=/a;;",
    "unix:",
    "unix:,,path=/a,,",
    "",
    ";",
    "nocolon",
    "unix:path",
    "unix:path=/a b",
    "unix:path=/a'b",
    "unix:path=/a%00b",
    "unix:path=é",
]


def outcome(parse, address: str) -> object:
    try:
        return parse(address)
    except (InvalidAddressError, bus.InvalidAddressError) as exc:
        return ("refused", str(exc))


@pytest.mark.parametrize("address", ADDRESSES)
def test_addresses_read_as_dbus_fast_reads_them(address: str) -> None:
    assert outcome(bus.parse_address, address) == outcome(parse_address, address)


@pytest.mark.parametrize("name", ["system", "session"])
@pytest.mark.parametrize("value", [None, "", "unix:path=/tmp/some-bus"])
def test_the_named_buses_are_found_as_dbus_fast_finds_them(
    name: str, value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"DBUS_{name.upper()}_BUS_ADDRESS"
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("DISPLAY", raising=False)
    kind = BusType.SYSTEM if name == "system" else BusType.SESSION
    assert outcome(bus.bus_address, name) == outcome(get_bus_address, kind)
    assert bus.bus_address("unix:path=/x") == "unix:path=/x"
