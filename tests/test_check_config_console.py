"""`gateway check-config` and the console (issue 11): the district map is checked as the
gateway checks it at start, and a console nobody can sign in to is a warning."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from gateway.cli import cmd_check_config
from gateway.config import ConfigError
from gateway.console.accounts import OperatorAccounts, accounts_path
from tests.helpers import SAMPLE

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ENV = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "x",
       "CONTROL_TOKEN": "t" * 32}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def write_config(tmp_path: Path, extra: str = "", *, port: bool = True,
                 district_map: Path | str = "district.geojson") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[registry]\ndirectory = "{SAMPLE}"\ndistrict_map = "{district_map}"\n'
        '[mqtt]\nenabled = false\n[sms]\nfrom_number = "+15005550006"\n'
        + ("[control]\nport = 8765\n" if port else "") + extra, encoding="utf-8")
    return path


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, object], str]:
    assert cmd_check_config(argparse.Namespace(config=str(config))) == 0
    out, err = capsys.readouterr()
    # In this process structlog's default config logs to stdout too: the JSON is last.
    start = 0 if out.startswith("{\n") else out.index("\n{\n") + 1
    return json.loads(out[start:]), err


def add_operator(tmp_path: Path, login: str) -> None:
    (tmp_path / "state").mkdir(exist_ok=True)
    with OperatorAccounts(accounts_path(tmp_path / "state"), hasher=FAST) as accounts:
        accounts.add(login, "王值班", "correct horse battery")


def test_a_console_without_operators_is_a_warning_and_no_file_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary, err = check(write_config(tmp_path), capsys)
    path = accounts_path(tmp_path / "state")
    assert summary["console"] == {"accounts": str(path), "operators": 0, "disabled": 0}
    assert f"warning: {path}: no operator can sign in: gateway operator add LOGIN" in err
    assert not path.exists() and not (tmp_path / "state").exists()


def test_operators_are_counted_and_a_disabled_one_cannot_sign_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    add_operator(tmp_path, "wang")
    summary, err = check(config, capsys)
    assert summary["console"] == {"accounts": str(accounts_path(tmp_path / "state")),
                                  "operators": 1, "disabled": 0}
    assert "no operator can sign in" not in err
    with OperatorAccounts(accounts_path(tmp_path / "state"), hasher=FAST) as accounts:
        accounts.disable("wang")
    summary, err = check(config, capsys)
    assert summary["console"] == {"accounts": str(accounts_path(tmp_path / "state")),
                                  "operators": 1, "disabled": 1}
    assert "no operator can sign in" in err and "all 1 disabled" in err


@pytest.mark.parametrize(("extra", "port", "shown"), [
    ("", False, "off (no control.port)"),
    ("[console]\nenabled = false\n", True, "disabled"),
])
def test_no_console_no_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               extra: str, port: bool, shown: str) -> None:
    summary, err = check(write_config(tmp_path, extra, port=port), capsys)
    assert summary["console"] == shown
    assert "operator" not in err


def test_the_district_map_is_loaded_and_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary, _ = check(write_config(tmp_path, port=False), capsys)
    assert summary["district_map"] == {
        "file": str(SAMPLE / "district.geojson"),
        "features": {"district": 1, "community": 10, "grid": 40}}


def broken_map(tmp_path: Path) -> Path:
    data = json.loads((SAMPLE / "district.geojson").read_text(encoding="utf-8"))
    data["features"][3]["properties"]["kind"] = "village"
    path = tmp_path / "broken.geojson"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_broken_district_map_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = broken_map(tmp_path)
    config = write_config(tmp_path, port=False, district_map=path)
    with pytest.raises(ConfigError) as caught:
        cmd_check_config(argparse.Namespace(config=str(config)))
    assert caught.value.key == "registry.district_map"
    assert caught.value.reason.startswith(f"{path}: features[3].properties.kind: 'village'")


def test_a_missing_district_map_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=False, district_map="nowhere.geojson")
    with pytest.raises(ConfigError, match=r"registry\.district_map: .*nowhere\.geojson: "
                                          "cannot read"):
        cmd_check_config(argparse.Namespace(config=str(config)))


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_the_command_exits_2_on_a_broken_map(tmp_path: Path) -> None:
    path = broken_map(tmp_path)
    config = write_config(tmp_path, port=False, district_map=path)
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config",
                          str(config)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 2, res.stderr
    assert f"config error: {config}: registry.district_map: {path}: " in res.stderr
