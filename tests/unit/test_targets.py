"""Target registration without a network: ssh-keyscan and ssh are stand-ins (a canned
keyscan answer; an "ssh" that runs the standalone serve command locally, or that fails
as ssh does when a key is refused). What is checked: every refusal names the bad input
and records nothing; a registration records the target, its link and its host key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockguard.core.catalog import Catalog, PerfEntry, area_perf_key, link_perf_key
from blockguard.core.perftable import DeviceSpeed
from blockguard.engine.remoteplan import link_speed
from blockguard.engine.targets import TargetRegistry, area_entry
from blockguard.errors import (
    AlreadyExists,
    HostKeyMismatch,
    HostKeyUnconfirmed,
    InvalidInput,
    KeyTextInvalid,
    NotAuthorized,
)
from blockguard.storage.remote import keys
from blockguard.storage.remote.areaprobe import AreaReport, keep_area_speed
from blockguard.storage.remote.linkprobe import LinkSpeed, measure_link
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.runner import Runner

REPO = Path(__file__).resolve().parents[2]
URL = "ssh://bg@192.0.2.2:2222"


def host_key(tmp_path: Path, name: str) -> tuple[str, str, str]:
    """A real host key: (type, base64 blob, fingerprint as ssh-keygen prints it)."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    key_type, blob = Path(f"{path}.pub").read_text().split()[:2]
    listed = subprocess.run(
        ["ssh-keygen", "-lf", f"{path}.pub"], check=True, capture_output=True, text=True
    )
    return key_type, blob, listed.stdout.split()[1]


def script(path: Path, text: str) -> str:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


class Lab:
    """A state directory, a catalog, a target host key and stand-in ssh tools."""

    def __init__(self, tmp_path: Path, ssh: str = "serve") -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.catalog = Catalog(tmp_path / "catalog.db")
        self.key_type, self.blob, self.fingerprint = host_key(tmp_path, "hostkey")
        _, _, self.other = host_key(tmp_path, "impostor")
        scanned = tmp_path / "keyscan.out"
        scanned.write_text(f"# banner\n[192.0.2.2]:2222 {self.key_type} {self.blob}\n")
        self.area = tmp_path / "area"
        PackStore.create(self.area, "host1").close()
        serve = (
            f"PYTHONPATH={REPO} exec {sys.executable} -m blockguard.engine.servecmd "
            f"--client host1 --root {self.area} --probe-seconds 0.02\n"
        )
        refused = "echo 'bg@192.0.2.2: Permission denied (publickey).' >&2\nexit 255\n"
        binaries = {
            "ssh-keyscan": script(tmp_path / "fake-keyscan", f"cat {scanned}\n"),
            "ssh": script(tmp_path / "fake-ssh", serve if ssh == "serve" else refused),
        }
        self.registry = TargetRegistry(
            self.catalog,
            self.state,
            Runner(binaries=binaries),
            measure=lambda s: measure_link(s, payload=64 << 10, rounds=1, pings=1),
        )

    def nothing_recorded(self) -> None:
        assert self.catalog.list_targets() == []
        assert self.catalog.list_perf() == []
        known_hosts = self.state / "known_hosts"
        assert not known_hosts.exists() or known_hosts.read_text() == ""
        assert not list(self.state.glob("keys/known_hosts.adding.*"))


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


@pytest.mark.parametrize(
    ("target", "url", "pool", "names"),
    [
        ("off/site", URL, "main", "off/site"),
        ("offsite", "http://bg@192.0.2.2", "main", "http://bg@192.0.2.2"),
        ("offsite", "ssh://192.0.2.2", "main", "needs a user name"),
        ("offsite", "ssh://bg@-oProxyCommand=x", "main", "-oProxyCommand=x"),
        ("offsite", URL, "", "pool"),
    ],
)
def test_bad_input_is_named_and_nothing_written(
    lab: Lab, target: str, url: str, pool: str, names: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        lab.registry.prepare(target, url, pool, lab.fingerprint)
    assert names in str(info.value)
    lab.nothing_recorded()
    assert not lab.state.exists()


def test_without_a_fingerprint_the_offered_one_is_shown_and_nothing_recorded(lab: Lab) -> None:
    with pytest.raises(HostKeyUnconfirmed) as info:
        lab.registry.prepare("offsite", URL, "main")
    message = str(info.value)
    assert f"--host-key {lab.fingerprint}" in message
    assert "offsite" in message and "192.0.2.2:2222" in message and "ssh-keygen -lf" in message
    lab.nothing_recorded()
    assert not lab.registry.key_path.exists()


def test_a_wrong_fingerprint_is_a_mismatch_and_nothing_recorded(lab: Lab) -> None:
    with pytest.raises(HostKeyMismatch) as info:
        lab.registry.prepare("offsite", URL, "main", lab.other)
    assert lab.fingerprint in str(info.value) and lab.other in str(info.value)
    lab.nothing_recorded()


def test_a_mistyped_imported_key_is_named_and_no_key_written(lab: Lab) -> None:
    text = keys.export_key_text(keys.MasterKey.generate())
    typo = text[:-3] + ("q" if text[-3] != "q" else "p") + text[-2:]
    with pytest.raises(KeyTextInvalid, match="checksum"):
        lab.registry.prepare("offsite", URL, "main", lab.fingerprint, key_text=typo)
    assert not lab.registry.key_path.exists()
    lab.nothing_recorded()


def test_a_registration_records_target_link_and_host_key(lab: Lab) -> None:
    request = lab.registry.prepare("offsite", URL, "main", lab.fingerprint, client_id="host1")
    target = lab.registry.register(request)
    assert (target.url, target.pool, target.client_id, target.host_key) == (
        URL,
        "main",
        "host1",
        lab.fingerprint,
    )
    shown = lab.registry.describe(lab.catalog.get_target("offsite"))
    assert shown["link_down"] > 0 and shown["link_up"] > 0 and shown["link_round_trip"] > 0
    assert shown["space_total"] > 0
    link = lab.catalog.get_perf(link_perf_key("offsite"), "pool")
    assert link is not None and link.seq_read == shown["link_down"]
    assert (lab.state / "known_hosts").read_text() == (
        f"[192.0.2.2]:2222 {lab.key_type} {lab.blob}\n"
    )
    assert not list(lab.state.glob("keys/known_hosts.adding.*"))
    # The master key and the client key were made once; a second id is refused whole.
    key = lab.registry.master_key()
    assert lab.registry.export_key()["key"] == keys.export_key_text(key)
    with pytest.raises(AlreadyExists, match="offsite"):
        lab.registry.prepare("offsite", URL, "main", lab.fingerprint)
    lab.registry.remove("offsite")
    lab.nothing_recorded()


def test_a_refused_key_shows_the_authorized_keys_line_and_records_nothing(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path, ssh="refused")
    request = lab.registry.prepare("offsite", URL, "main", lab.fingerprint, client_id="host1")
    with pytest.raises(NotAuthorized) as info:
        lab.registry.register(request)
    public = lab.registry.client_public_key()
    line = lab.registry.authorized_keys_line("host1", public)
    assert line in str(info.value)
    assert 'restrict,command="python3 -m blockguard.engine.servecmd --client host1' in line
    lab.nothing_recorded()


def test_an_imported_key_is_the_key_and_another_is_refused(lab: Lab, tmp_path: Path) -> None:
    key = keys.MasterKey.generate()
    text = keys.export_key_text(key)
    assert lab.registry.master_key(keys.parse_key_text(text)) == key
    other = keys.export_key_text(keys.MasterKey.generate())
    with pytest.raises(InvalidInput, match="another master key"):
        lab.registry.prepare("offsite", URL, "main", lab.fingerprint, key_text=other)
    assert keys.load_key_file(lab.registry.key_path) == key


def test_a_target_that_holds_generations_is_not_removed(lab: Lab) -> None:
    from blockguard.core.catalog import RemoteGenerationRow
    from blockguard.errors import Busy

    lab.registry.register(lab.registry.prepare("offsite", URL, "main", lab.fingerprint))
    row = RemoteGenerationRow(
        "offsite", "db", "20261103T120501.123456Z-1a2b3c4d", "full", None, None,
        1.0, 8192, 8192, 1, 2.0, 0.5,
    )  # fmt: skip
    lab.catalog.record_remote_generation(row)
    with pytest.raises(Busy, match="holds generations of db"):
        lab.registry.remove("offsite")
    assert lab.catalog.get_target("offsite").id == "offsite"
    lab.catalog.remove_remote_generation("offsite", "db", row.generation)
    lab.registry.remove("offsite")
    lab.nothing_recorded()


def test_a_manifest_that_does_not_open_is_shown_by_the_catalogs_volume_name(lab: Lab) -> None:
    from blockguard.core.catalog import RemoteGenerationRow

    request = lab.registry.prepare("offsite", URL, "main", lab.fingerprint, client_id="host1")
    lab.registry.register(request)
    vid = lab.registry.master_key().volume_id("db")
    gen = "20261103T120501.123456Z-1a2b3c4d"
    with PackStore.open(lab.area, "host1") as store:
        store.begin(f"{vid}@{gen}", {"format": 1, "volume": vid})
        store.commit(f"{vid}@{gen}", {"packs": []}, b"not a sealed manifest")
    with lab.registry.remote_pool("offsite") as remote:
        [damaged] = remote.scan().damaged
        assert damaged.volume == f"unknown volume (id {vid})"
    # The catalog knows the volume (here by a generation it recorded on the target).
    row = RemoteGenerationRow(
        "offsite", "db", gen, "full", None, None, 1.0, 8192, 8192, 1, 2.0, 0.5
    )  # fmt: skip
    lab.catalog.record_remote_generation(row)
    with lab.registry.remote_pool("offsite") as remote:
        [damaged] = remote.scan().damaged
        assert (damaged.volume, damaged.generation_id) == ("db", gen)
    lab.catalog.remove_remote_generation("offsite", "db", gen)


def test_a_failed_registration_keeps_the_key_another_target_pinned_for_the_address(
    lab: Lab,
) -> None:
    first = lab.registry.prepare("offsite", URL, "main", lab.fingerprint)
    again = lab.registry.prepare("offsite", URL, "main", lab.fingerprint)
    lab.registry.register(first)
    pinned = (lab.state / "known_hosts").read_text()
    assert pinned.startswith("[192.0.2.2]:2222 ")
    with pytest.raises(AlreadyExists, match="offsite"):
        lab.registry.register(again)  # fails at the record, after its pin
    assert (lab.state / "known_hosts").read_text() == pinned
    assert [t.id for t in lab.catalog.list_targets()] == ["offsite"]


def test_registrations_at_the_same_time_keep_every_pinned_host_key(lab: Lab) -> None:
    """Jobs of several registrations run in threads: each pins its address's key in one
    known_hosts without losing another's line."""
    import threading

    urls = {f"site{n}": f"ssh://bg@192.0.2.{n + 10}:2222" for n in range(4)}
    requests = [lab.registry.prepare(t, url, "main", lab.fingerprint) for t, url in urls.items()]
    errors: list[BaseException] = []

    def register(request: object) -> None:
        try:
            lab.registry.register(request)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    lines = (lab.state / "known_hosts").read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(
        f"[192.0.2.{n + 10}]:2222" for n in range(4)
    )
    assert {t.id for t in lab.catalog.list_targets()} == set(urls)


def test_a_registration_records_each_area_as_the_slower_of_area_and_link(lab: Lab) -> None:
    # The target keeps its area's probed figures; the link is slower up, faster down.
    keep_area_speed(lab.area, DeviceSpeed(30e6, 400e6, 5e6, 300e6), time.time())
    lab.registry.measure = lambda _s: LinkSpeed(down=50e6, up=10e6, round_trip=0.002)
    request = lab.registry.prepare("offsite", URL, "area", lab.fingerprint, client_id="host1")
    lab.registry.register(request)
    row = lab.catalog.get_perf(area_perf_key("offsite", "area"), "pool")
    assert row is not None
    assert (row.seq_read, row.seq_write, row.rand_read, row.rand_write) == (30e6, 10e6, 5e6, 10e6)
    assert row.capacity is not None and row.capacity > 0 and row.transport == "ssh"
    [shown] = lab.registry.describe(lab.catalog.get_target("offsite"))["areas"]
    assert (shown["name"], shown["read"], shown["write"]) == ("area", 30e6, 10e6)
    # The planner's remote speeds are the area's row, not the link's.
    speed, measured = link_speed(lab.catalog, "offsite", default=1.0)
    assert measured and speed == DeviceSpeed(30e6, 10e6, 5e6, 10e6)
    lab.registry.remove("offsite")
    lab.nothing_recorded()


def test_an_unmeasured_area_is_planned_with_the_link(lab: Lab) -> None:
    link = LinkSpeed(down=50e6, up=10e6, round_trip=0.002)
    unmeasured = AreaReport("main", total=1 << 30, free=1 << 29)
    entries = [area_entry("offsite", URL, unmeasured, link, 100.0)]
    assert entries[0].seq_read is None and entries[0].capacity == 1 << 30
    lab.catalog.add_target(
        "offsite",
        url=URL,
        client_id="host1",
        pool="main",
        host_key=lab.fingerprint,
        link=PerfEntry(
            link_perf_key("offsite"),
            "pool",
            100.0,
            "probe",
            seq_read=50e6,
            seq_write=10e6,
            rand_read=50e6,
            rand_write=10e6,
            chunk_size=65536,
        ),
        round_trip=0.002,
        areas=entries,
    )
    speed, measured = link_speed(lab.catalog, "offsite", default=1.0)
    assert measured and speed == link.device_speed()
    # A row under another target's key is refused, nothing recorded.
    lab.catalog.remove_target("offsite")
    with pytest.raises(InvalidInput, match="target:offsite:area:NAME"):
        lab.catalog.add_target(
            "offsite",
            url=URL,
            client_id="host1",
            pool="main",
            host_key=lab.fingerprint,
            link=PerfEntry(link_perf_key("offsite"), "pool", 1.0, "probe"),
            round_trip=0.002,
            areas=[area_entry("other", URL, unmeasured, link, 1.0)],
        )
    assert lab.catalog.list_targets() == [] and lab.catalog.list_perf() == []
