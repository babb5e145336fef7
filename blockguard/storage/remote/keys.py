"""The remote master key of a protected host: its file, its sub-keys, its export as text.

One 32-byte random key per protected host seals everything it stores on backup targets
(docs/design/remote.md, "Key material, encryption, compression"). It is never sent; a
target holds only ciphertext. The sub-keys are HKDF-SHA256 of it, one per purpose, so no
key seals two kinds of thing: a pack key per volume and generation, one key for sealed
manifests and records ("blobs"), and the name key that turns a volume name into the id a
target sees. Losing the key loses every remote backup, so it exports as text a person can
keep on paper and type back: a prefix, the key in bech32's alphabet (BIP 173: no 1, b, i,
o) and bech32's checksum, which catches any error in up to four characters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blockguard.errors import AlreadyExists, InvalidInput, KeyFileRefused, KeyTextInvalid, NotFound
from blockguard.storage.ioedge import io_edge
from blockguard.storage.manifest import fsync_dir

KEY_BYTES = 32
#: Where the daemon keeps it, under its state directory.
KEY_FILE = Path("keys") / "remote.key"
KEY_TEXT_PREFIX = "blockguard-key-v1:"
KEY_WARNING = (
    "without this key the backups on every target are unreadable: keep a copy off this host"
)
#: Hex digits of a volume id: 128 bits of HMAC-SHA256, short enough for the target's
#: generation keys (``VOLUME_ID@GENERATION_ID``, at most 128 characters).
VOLUME_ID_HEX = 32
_HKDF_SALT = b"blockguard remote keys v1"
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_DATA_CHARS = (KEY_BYTES * 8 + 4) // 5  # 52: 256 bits and 4 zero bits
_CHECK_CHARS = 6
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def encode_fields(*parts: str | int) -> bytes:
    """An unambiguous byte string of strings and integers (type, length, value each): the
    HKDF info and the AAD of sealed data, where ``("ab", "c")`` must differ from
    ``("a", "bc")``."""
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            raw = part.encode()
            out += b"s" + len(raw).to_bytes(4, "big") + raw
        elif type(part) is int and 0 <= part < 1 << 64:
            out += b"i" + part.to_bytes(8, "big")
        else:
            raise InvalidInput(detail=f"{part!r} is neither a string nor a 64-bit count")
    return bytes(out)


class MasterKey:
    """The master key; derives the sub-keys. Its repr never shows the key."""

    __slots__ = ("_key", "_name_key")

    def __init__(self, key: bytes) -> None:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise InvalidInput(detail=f"a master key is {KEY_BYTES} bytes")
        self._key = key
        #: The name key, derived on first use: every backup, scan and open asks for
        #: volume ids, and an HKDF per call is wasted work for the same bytes.
        self._name_key: bytes | None = None

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(KEY_BYTES))

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._key, other._key)

    def _derive(self, *info: str) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=encode_fields(*info)
        )
        return hkdf.derive(self._key)

    def pack_key(self, volume_id: str, generation_id: str) -> bytes:
        """The key that seals the packs of one generation of one volume."""
        return self._derive("pack", volume_id, generation_id)

    def blob_key(self) -> bytes:
        """The key that seals manifests and volume records."""
        return self._derive("blob")

    def chunk_id_key(self) -> bytes:
        """The key of an object store's chunk ids (a keyed hash of a chunk's plaintext):
        equal chunks of every host of the key get one id, the store learns nothing."""
        return self._derive("chunk")

    def store_pack_key(self) -> bytes:
        """The key that seals an object store's packs (shared by every volume and host of
        the key: a pack's chunks are deduplicated across them)."""
        return self._derive("store pack")

    def name_key(self) -> bytes:
        """The key of :meth:`volume_id` (names are never sealed, only hashed)."""
        return self._derive("name")

    def volume_id(self, volume: str) -> str:
        """The id a target knows a volume by: HMAC of its name under the name key, in hex.
        Stable for this key (a new host with the imported key finds its volumes), and
        says nothing of the name to whoever lacks the key."""
        if self._name_key is None:
            self._name_key = self.name_key()
        digest = hmac.new(self._name_key, volume.encode(), hashlib.sha256).hexdigest()
        return digest[:VOLUME_ID_HEX]

    def host_id(self, client: str) -> str:
        """The id an object store knows a host (its client id) by: HMAC of the client id
        under the name key, apart from every volume id (no volume name holds a NUL)."""
        return self.volume_id(f"\0client\0{client}")

    def raw(self) -> bytes:
        """The key's bytes (for its file and its export only)."""
        return self._key


# --- the key file ---------------------------------------------------------------------


def create_key_file(path: Path, key: MasterKey | None = None) -> MasterKey:
    """Make the key file: a new random key, or ``key`` (imported on a new host), mode
    0600 in a directory of this user's with mode 0700 (made if missing).

    It appears whole or not at all: written to a temporary file (``O_EXCL``), fsynced,
    then linked to its name, and the directory fsynced. A link, not a rename: rename
    replaces a file another process made meanwhile, a link fails. An existing key is
    never replaced.

    :raises AlreadyExists: there is a key file already (it is left as it is).
    :raises KeyFileRefused: the directory is not this user's, or open to others.
    """
    key = key or MasterKey.generate()
    directory = path.parent
    with io_edge(directory, "making the key directory"):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileRefused(path=path, reason=f"{directory} is not a directory")
    _check_owner_and_mode(path, st, what=f"its directory {directory}", want="0700")
    if os.path.lexists(path):
        raise AlreadyExists(what="key file", name=str(path))
    tmp = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
    try:
        with io_edge(tmp, "writing the key file"):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(key.raw())
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExists(what="key file", name=str(path)) from None
        except OSError as exc:
            raise KeyFileRefused(path=path, reason=exc.strerror or str(exc)) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with io_edge(directory, "flushing the key directory"):
        fsync_dir(directory)
    return key


def load_key_file(path: Path) -> MasterKey:
    """Read the key file, refusing one that others could read or that is not a key.

    :raises NotFound: there is no key file.
    :raises KeyFileRefused: not a regular file of this user's with mode 0600 (or
        stricter) and exactly 32 bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(
            what="key file", name=str(path), hint="import an exported key with target add --key"
        ) from None
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise KeyFileRefused(path=path, reason=reason or str(exc)) from exc
    try:
        with io_edge(path, "reading the key file"):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileRefused(path=path, reason="it is not a regular file")
            _check_owner_and_mode(path, st, what="it", want="0600")
            data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        size = f"{len(data)}" if len(data) <= KEY_BYTES else "more than 32"
        raise KeyFileRefused(path=path, reason=f"it holds {size} bytes, a key is {KEY_BYTES}")
    return MasterKey(data)


def _check_owner_and_mode(path: Path, st: os.stat_result, *, what: str, want: str) -> None:
    if st.st_uid != os.geteuid():
        raise KeyFileRefused(
            path=path, reason=f"{what} belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
        )
    if st.st_mode & 0o077:
        raise KeyFileRefused(
            path=path,
            reason=f"{what} has mode {stat.S_IMODE(st.st_mode):04o}: group or others have "
            f"access; it must be {want}",
        )


# --- the key as text ------------------------------------------------------------------


def export_key_text(key: MasterKey) -> str:
    """The key as text: the prefix, 13 groups of 4 characters, a checksum of 6."""
    values = _to_5bit(key.raw())
    chars = "".join(_CHARSET[v] for v in values + _checksum(values))
    groups = [chars[i : i + 4] for i in range(0, _DATA_CHARS, 4)] + [chars[_DATA_CHARS:]]
    return KEY_TEXT_PREFIX + "-".join(groups)


def parse_key_text(text: str) -> MasterKey:
    """The key of an exported text. Spaces, line breaks, dashes and case do not matter.

    :raises KeyTextInvalid: naming what is wrong: the prefix, a character a key never
        has (and where), the count of characters, or the checksum (a mistyped one).
    """
    compact = "".join(text.split()).lower()
    prefix, sep, body = compact.partition(":")
    if not sep or f"{prefix}:" != KEY_TEXT_PREFIX:
        newer = sep and prefix.startswith(KEY_TEXT_PREFIX[:-2])
        reason = f"{prefix}: is a key format this blockguard does not read" if newer else ""
        raise KeyTextInvalid(reason=reason or f"it does not start with {KEY_TEXT_PREFIX!r}")
    body = body.replace("-", "")
    for i, char in enumerate(body):
        if char not in _CHARSET:
            hint = " (a key never has 1, b, i or o)" if char in "1bio" else ""
            group, place = min(i // 4, 13) + 1, i - 4 * min(i // 4, 13) + 1
            raise KeyTextInvalid(
                reason=f"{char!r} (group {group}, character {place}) is not a character "
                f"a key has{hint}"
            )
    want = _DATA_CHARS + _CHECK_CHARS
    if len(body) != want:
        raise KeyTextInvalid(
            reason=f"it has {len(body)} characters after the prefix, a key has {want} "
            f"(13 groups of 4 and a checksum of 6)"
        )
    values = [_CHARSET.index(c) for c in body]
    if _polymod(_prefix_values() + values) != 1:
        raise KeyTextInvalid(
            reason="its checksum does not match: a character is mistyped "
            "(compare it with the exported text group by group)"
        )
    raw = _from_5bit(values[:_DATA_CHARS])
    if raw is None:
        raise KeyTextInvalid(reason="its last key character is not one an export writes")
    return MasterKey(raw)


def _to_5bit(data: bytes) -> list[int]:
    bits = int.from_bytes(data, "big") << (_DATA_CHARS * 5 - len(data) * 8)
    return [(bits >> (5 * i)) & 31 for i in reversed(range(_DATA_CHARS))]


def _from_5bit(values: list[int]) -> bytes | None:
    bits = 0
    for v in values:
        bits = bits << 5 | v
    pad = _DATA_CHARS * 5 - KEY_BYTES * 8
    if bits & ((1 << pad) - 1):
        return None
    return (bits >> pad).to_bytes(KEY_BYTES, "big")


def _polymod(values: list[int]) -> int:
    """bech32's checksum function (BIP 173)."""
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, gen in enumerate(_GENERATOR):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _prefix_values(hrp: str = KEY_TEXT_PREFIX[:-1]) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _checksum(values: list[int], hrp: str = KEY_TEXT_PREFIX[:-1]) -> list[int]:
    mod = _polymod(_prefix_values(hrp) + values + [0] * _CHECK_CHARS) ^ 1
    return [(mod >> 5 * (5 - i)) & 31 for i in range(_CHECK_CHARS)]
