"""The object store's credentials (blockguard/storage/remote/objstore.py): a root-only
file or the AWS environment, the secret never shown; and the space codes of stores other
than SeaweedFS (which cannot be made to say them here) named PoolSpaceLow."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockguard.errors import CredentialsFileRefused, NotFound, PoolSpaceLow
from blockguard.storage.remote.objstore import (
    Credentials,
    ObjectStore,
    credentials_from_env,
    load_credentials,
)

SECRET = "s3cr3t-never-shown-0001"
GOOD = f"[default]\naws_access_key_id = AKID0001\naws_secret_access_key = {SECRET}\n"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_root_only_file_is_read(tmp_path: Path) -> None:
    creds = load_credentials(write(tmp_path / "c", GOOD))
    assert creds == Credentials("AKID0001", SECRET)
    assert SECRET not in repr(creds)
    token = GOOD.replace("[default]", "[backup]") + "aws_session_token = tok\n"
    assert load_credentials(write(tmp_path / "t", token), "backup").session_token == "tok"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "c", GOOD, mode)
    with pytest.raises(CredentialsFileRefused, match=rf"{oct(mode)[2:]}: group or others") as e:
        load_credentials(path)
    assert str(path) in str(e.value)


def test_bad_files_are_refused_without_showing_the_secret(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="credentials file"):
        load_credentials(tmp_path / "none")
    link = tmp_path / "link"
    link.symlink_to(write(tmp_path / "c", GOOD))
    with pytest.raises(CredentialsFileRefused, match="symbolic link"):
        load_credentials(link)
    cases = {
        "no section": (GOOD.replace("[default]", "[other]"), "no \\[default\\] section"),
        "no secret": ("[default]\naws_access_key_id = AKID0001\n", "no aws_secret_access_key"),
        "not ini": (f"aws_secret_access_key = {SECRET}\n", "not an AWS credentials file"),
    }
    for name, (text, reason) in cases.items():
        with pytest.raises(CredentialsFileRefused, match=reason) as refused:
            load_credentials(write(tmp_path / name.replace(" ", "_"), text))
        assert SECRET not in str(refused.value), name


def test_the_aws_environment() -> None:
    assert credentials_from_env({}) is None
    assert credentials_from_env({"AWS_ACCESS_KEY_ID": "A"}) is None
    env = {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "t"}
    assert credentials_from_env(env) == Credentials("A", SECRET, "t")


@pytest.mark.parametrize(
    "message",
    [
        "Server returned non-2xx status code: 403 Forbidden: <Error><Code>QuotaExceeded</Code>",
        "Server returned non-2xx status code: 507 Insufficient Storage: ",
        "Server returned non-2xx status code: 400 Bad: <Code>XMinioStorageFull</Code>",
    ],
)
def test_space_codes_of_other_stores_are_pool_space_low(message: str) -> None:
    store = ObjectStore(
        target="s3t",
        endpoint="http://192.0.2.9:1",
        bucket="b",
        credentials=Credentials("AKID0001", SECRET),
    )
    named = store._named(Exception(message), "putting", "packs/1")
    assert isinstance(named, PoolSpaceLow)
    assert "target s3t" in str(named) and "b/packs/1" in str(named)
