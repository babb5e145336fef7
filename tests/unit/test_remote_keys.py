"""The remote master key: its file is made once and never replaced or loosened, its
sub-keys are stable, and its text export comes back exactly or names the typo."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from blockguard.errors import (
    AlreadyExists,
    InvalidInput,
    KeyFileRefused,
    KeyTextInvalid,
    NotFound,
)
from blockguard.storage.remote import keys
from blockguard.storage.remote.keys import (
    KEY_TEXT_PREFIX,
    MasterKey,
    create_key_file,
    encode_fields,
    export_key_text,
    load_key_file,
    parse_key_text,
)

FIXED = MasterKey(bytes(range(32)))


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys" / "remote.key"


# --- the key file ---------------------------------------------------------------------


def test_a_new_key_file_is_private_whole_and_loads_back(key_path: Path) -> None:
    key = create_key_file(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert key_path.read_bytes() == key.raw() and len(key.raw()) == 32
    assert load_key_file(key_path) == key
    assert os.listdir(key_path.parent) == ["remote.key"]  # no temporary file left
    assert create_key_file(key_path.with_name("other.key")) != key  # random, not fixed


def test_an_existing_key_is_never_replaced(key_path: Path) -> None:
    first = create_key_file(key_path)
    with pytest.raises(AlreadyExists, match=str(key_path)):
        create_key_file(key_path)
    with pytest.raises(AlreadyExists):
        create_key_file(key_path, FIXED)
    assert load_key_file(key_path) == first
    assert os.listdir(key_path.parent) == ["remote.key"]


def test_any_file_in_the_keys_place_is_kept(key_path: Path) -> None:
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_bytes(b"not a key, but someone's file")
    with pytest.raises(AlreadyExists):
        create_key_file(key_path)
    assert key_path.read_bytes() == b"not a key, but someone's file"


def test_an_imported_key_is_written_as_given(key_path: Path) -> None:
    text = export_key_text(FIXED)
    assert create_key_file(key_path, parse_key_text(text)) == FIXED
    assert load_key_file(key_path) == FIXED


def test_a_key_directory_open_to_others_is_refused_and_nothing_is_made(key_path: Path) -> None:
    key_path.parent.mkdir(parents=True)
    key_path.parent.chmod(0o755)
    with pytest.raises(KeyFileRefused, match="has mode 0755: group or others have access"):
        create_key_file(key_path)
    assert os.listdir(key_path.parent) == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602])
def test_a_key_file_others_may_read_or_write_is_refused(key_path: Path, mode: int) -> None:
    create_key_file(key_path)
    key_path.chmod(mode)
    with pytest.raises(KeyFileRefused, match=f"has mode {mode:04o}"):
        load_key_file(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == mode  # refused, not "fixed"


@pytest.mark.parametrize(("size", "said"), [(0, "0"), (31, "31"), (33, "more than 32")])
def test_a_key_file_of_the_wrong_size_is_refused(key_path: Path, size: int, said: str) -> None:
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_bytes(os.urandom(size))
    key_path.chmod(0o600)
    with pytest.raises(KeyFileRefused, match=f"holds {said} bytes, a key is 32"):
        load_key_file(key_path)


def test_a_missing_link_or_directory_key_file_is_named(key_path: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"key file .* does not exist"):
        load_key_file(key_path)
    real = tmp_path / "elsewhere.key"
    create_key_file(real)
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.symlink_to(real)
    with pytest.raises(KeyFileRefused, match="symbolic link"):
        load_key_file(key_path)
    key_path.unlink()
    key_path.mkdir(mode=0o700)
    with pytest.raises(KeyFileRefused, match="not a regular file"):
        load_key_file(key_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_key_file_of_another_user_is_refused(key_path: Path) -> None:
    create_key_file(key_path)
    os.chown(key_path, 65534, 65534)
    with pytest.raises(KeyFileRefused, match="belongs to uid 65534"):
        load_key_file(key_path)


# --- sub-keys -------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 written out, one block (32 bytes): the reference the module must equal."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_sub_keys_are_rfc5869_hkdf_of_the_master_key_one_per_purpose() -> None:
    salt = b"blockguard remote keys v1"
    raw = FIXED.raw()
    assert FIXED.pack_key("v1", "g1") == hkdf_sha256(raw, salt, encode_fields("pack", "v1", "g1"))
    assert FIXED.blob_key() == hkdf_sha256(raw, salt, encode_fields("blob"))
    assert FIXED.name_key() == hkdf_sha256(raw, salt, encode_fields("name"))
    derived = {
        FIXED.pack_key("v1", "g1"),
        FIXED.pack_key("v1", "g2"),
        FIXED.pack_key("v2", "g1"),
        FIXED.blob_key(),
        FIXED.name_key(),
        MasterKey(bytes(32)).pack_key("v1", "g1"),
    }
    assert len(derived) == 6


def test_volume_ids_are_the_hmac_of_the_name_and_stable() -> None:
    expected = hmac.new(FIXED.name_key(), b"db", hashlib.sha256).hexdigest()[:32]
    assert FIXED.volume_id("db") == expected
    assert len(expected) == 32 and all(c in "0123456789abcdef" for c in expected)
    assert FIXED.volume_id("web") != expected
    assert MasterKey(bytes(32)).volume_id("db") != expected
    # Pinned: a change here makes every volume on every target unfindable.
    assert FIXED.volume_id("db") == PINNED_VOLUME_ID


PINNED_VOLUME_ID = "d90823497f7537a224742455cd127b4d"


def test_the_name_key_is_derived_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    derived: list[tuple[str, ...]] = []
    derive = MasterKey._derive

    def counting(self: MasterKey, *info: str) -> bytes:
        derived.append(info)
        return derive(self, *info)

    monkeypatch.setattr(MasterKey, "_derive", counting)
    key = MasterKey(bytes(range(32)))
    ids = [key.volume_id(name) for name in ("db", "web", "db", "mail")]
    assert ids[0] == ids[2] == PINNED_VOLUME_ID and len(set(ids)) == 3
    assert derived == [("name",)]


def test_fields_encode_without_ambiguity() -> None:
    assert encode_fields("ab", "c") != encode_fields("a", "bc")
    assert encode_fields("1") != encode_fields(1)
    for bad in (-1, 1 << 64, True, 1.5, b"x"):
        with pytest.raises(InvalidInput):
            encode_fields(bad)  # type: ignore[arg-type]  # the refusal is what is tested


def test_the_key_never_shows_in_its_repr() -> None:
    assert repr(FIXED) == "MasterKey(<secret>)"
    assert FIXED.raw().hex() not in repr(FIXED)
    with pytest.raises(InvalidInput):
        MasterKey(bytes(31))


# --- the key as text --------------------------------------------------------------------


def test_export_is_prefix_thirteen_groups_and_a_checksum_and_parses_back() -> None:
    text = export_key_text(FIXED)
    assert text.startswith(KEY_TEXT_PREFIX)
    groups = text[len(KEY_TEXT_PREFIX) :].split("-")
    assert [len(g) for g in groups] == [4] * 13 + [6]
    assert parse_key_text(text) == FIXED
    assert text == PINNED_EXPORT
    key = MasterKey.generate()
    assert parse_key_text(export_key_text(key)) == key


PINNED_EXPORT = (
    "blockguard-key-v1:qqqs-yqcy-q5rq-wzqf-pg9s-crgw-pugp-zysn-zs23-v9cc-rydp-k8qa-rc0s-g9xyqt"
)


def test_spacing_case_and_line_breaks_do_not_matter() -> None:
    text = export_key_text(FIXED)
    prefix, body = text.split(":")
    retyped = f"  {prefix.upper()}:\n" + body.upper().replace("-", " ")[:30] + "\n" + body[30:]
    assert parse_key_text(retyped) == FIXED


def test_every_one_character_typo_is_caught() -> None:
    text = export_key_text(FIXED)
    start = len(KEY_TEXT_PREFIX)
    caught = 0
    for at in range(start, len(text)):
        if text[at] == "-":
            continue
        for char in keys._CHARSET:
            if char != text[at]:
                with pytest.raises(KeyTextInvalid, match="checksum does not match"):
                    parse_key_text(text[:at] + char + text[at + 1 :])
                caught += 1
    assert caught == 58 * 31


def test_swapped_neighbours_are_caught() -> None:
    body = export_key_text(FIXED)[len(KEY_TEXT_PREFIX) :].replace("-", "")
    for at in range(len(body) - 1):
        if body[at] != body[at + 1]:
            swapped = body[:at] + body[at + 1] + body[at] + body[at + 2 :]
            with pytest.raises(KeyTextInvalid, match="checksum"):
                parse_key_text(KEY_TEXT_PREFIX + swapped)


def test_what_is_wrong_is_named() -> None:
    text = export_key_text(FIXED)
    body = text[len(KEY_TEXT_PREFIX) :]
    with pytest.raises(KeyTextInvalid, match="does not start with 'blockguard-key-v1:'"):
        parse_key_text(body)
    with pytest.raises(KeyTextInvalid, match="blockguard-key-v2: is a key format"):
        parse_key_text("blockguard-key-v2:" + body)
    with pytest.raises(KeyTextInvalid, match=r"'b' \(group 2, character 1\) is not"):
        parse_key_text(KEY_TEXT_PREFIX + body[:5] + "b" + body[6:])
    with pytest.raises(KeyTextInvalid, match="never has 1, b, i or o"):
        parse_key_text(KEY_TEXT_PREFIX + "1" + body[1:])
    with pytest.raises(KeyTextInvalid, match=r"'!' \(group 14, character 5\)"):
        parse_key_text(text[:-2] + "!" + text[-1:])
    with pytest.raises(KeyTextInvalid, match="has 57 characters after the prefix, a key has 58"):
        parse_key_text(text[:-1])
    with pytest.raises(KeyTextInvalid, match="has 59 characters"):
        parse_key_text(text + "q")


def test_the_checksum_is_bech32s() -> None:
    """BIP 173's valid test vectors check the checksum function the export uses."""
    for vector in (
        "A12UEL5L",
        "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
        "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    ):
        hrp, _, data = vector.lower().rpartition("1")
        values = [keys._CHARSET.index(c) for c in data]
        assert keys._polymod(keys._prefix_values(hrp) + values) == 1, vector
