"""Settings: defaults, then /etc/blockguard/blockguard.toml, then BLOCKGUARD_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockguard.engine.settings import Settings
from blockguard.errors import InvalidConfig, InvalidInput


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "blockguard.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = Settings.from_env(tmp_path, env={}, config=None)
    assert s.mount_root == tmp_path / "pools"
    assert (s.probe_seconds, s.drill_auto, s.drill_bytes) == (1.0, True, 64 * 1024 * 1024)


def test_file_sets_every_kind_of_field_and_env_overrides(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'probe_seconds = 0\ndrill_auto = false\ndrill_bytes = 4194304\nmount_root = "/srv/bg"\n'
        "scheduler_interval = 2.5\n",
    )
    s = Settings.from_env(tmp_path, env={}, config=config)
    assert s.probe_seconds == 0.0 and s.drill_auto is False and s.drill_bytes == 4194304
    assert s.mount_root == Path("/srv/bg") and s.scheduler_interval == 2.5
    env = {"BLOCKGUARD_PROBE_SECONDS": "3", "BLOCKGUARD_DRILL_AUTO": "1"}
    s = Settings.from_env(tmp_path, env=env, config=config)
    assert s.probe_seconds == 3.0 and s.drill_auto is True and s.drill_bytes == 4194304


def test_config_named_by_environment(tmp_path: Path) -> None:
    config = write(tmp_path, "cow_size = 8388608\n")
    s = Settings.from_env(tmp_path, env={"BLOCKGUARD_CONFIG": str(config)})
    assert s.cow_size == 8388608


def test_test_hook_keeps_its_environment_name(tmp_path: Path) -> None:
    s = Settings.from_env(tmp_path, env={"BLOCKGUARD_TEST_BACKUP_DELAY": "0.5"})
    assert s.backup_delay == 0.5
    assert Settings.keys()["backup_delay"] == "BLOCKGUARD_TEST_BACKUP_DELAY"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    config = write(tmp_path, "probe_seconds = 0\nprobe_secnds = 1\n")
    with pytest.raises(InvalidConfig) as err:
        Settings.from_env(tmp_path, env={}, config=config)
    assert "unknown key 'probe_secnds'" in str(err.value) and str(config) in str(err.value)
    assert isinstance(err.value, InvalidInput) and err.value.dbus_name.endswith(".InvalidConfig")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('probe_seconds = "fast"\n', "probe_seconds: 'fast' is not a number"),
        ("drill_auto = 1\n", "drill_auto: 1 is not true or false"),
        ("drill_bytes = 1.5\n", "drill_bytes: 1.5 is not a whole number"),
        ("cow_size = -1\n", "cow_size: -1 is negative"),
        ("default_speed = 0\n", "default_speed: must be positive"),
        ("s3_lease_timeout = 0\n", "s3_lease_timeout: must be positive"),
        ("s3_gc_interval = -1.0\n", "s3_gc_interval: -1.0 is negative"),
        ("probe_seconds = \n", "not valid TOML"),
        ("state_dir = '/x'\n", "unknown key 'state_dir'"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        Settings.from_env(tmp_path, env={}, config=write(tmp_path, text))
    assert words in str(err.value)


def test_bad_environment_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig) as err:
        Settings.from_env(tmp_path, env={"BLOCKGUARD_DRILL_AUTO": "maybe"})
    assert "BLOCKGUARD_DRILL_AUTO='maybe'" in str(err.value)


def test_a_named_file_must_exist_the_default_may_not(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig) as err:
        Settings.from_env(tmp_path, env={}, config=tmp_path / "nope.toml")
    assert "nope.toml: no such file" in str(err.value)
    env = {"BLOCKGUARD_CONFIG": str(tmp_path / "gone.toml")}
    with pytest.raises(InvalidConfig):
        Settings.from_env(tmp_path, env=env)


def test_daemon_refuses_to_start_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = write(tmp_path, "drill_atuo = false\n")
    argv = [sys.executable, "-m", "blockguard.daemon.main", "--config", str(config)]
    argv += ["--state-dir", str(tmp_path / "state"), "--bus", "unix:path=/x"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown key 'drill_atuo'" in result.stderr


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for key, env_name in Settings.keys().items():
        assert f"| `{key}` |" in doc and f"`{env_name}`" in doc, key


def test_the_sample_file_is_valid_and_says_the_defaults(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "data" / "blockguard.toml").read_text()
    uncommented = "\n".join(line.removeprefix("#") for line in text.splitlines() if "= " in line)
    config = write(tmp_path, uncommented.replace("/var/lib/blockguard", str(tmp_path)))
    assert Settings.from_env(tmp_path, env={}, config=config) == Settings.from_env(tmp_path, env={})
