"""Configuration: validated once, errors name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, load_secrets, read_secret

REPO = Path(__file__).resolve().parent.parent
MINIMAL = '[sms]\nfrom_number = "+15005550006"\n'


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "gateway.toml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "config" / "gateway.example.toml")
    m = cfg.model
    assert m.gateway.name == "kenli-center"
    assert [s.protocol for s in m.serial] == ["surgard", "callerid"]
    assert m.serial[1].init_commands == ("ATZ", "AT+VCID=1")
    assert m.geo.crs == "EPSG:32650"
    assert cfg.registry_dir == (REPO / "config" / "sample").resolve()


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.gateway.dedupe_window_s == 120
    assert cfg.model.sms.budget_ms == 2000
    assert cfg.model.mqtt.enabled


def test_config_is_immutable(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(Exception, match="frozen"):
        cfg.model.gateway.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[gateway]\nname='x'\n", "sms", "required key is missing"),
        (MINIMAL + "[[serial]]\nname='r1'\nprotocol='surgard'\n", "serial[0].port",
         "required key is missing"),
        (MINIMAL + "[gateway]\ndedupe_window_s = 'soon'\n", "gateway.dedupe_window_s",
         "valid number"),
        (MINIMAL + "[gateway]\ndedupe_window_s = -5\n", "gateway.dedupe_window_s",
         "greater than 0"),
        (MINIMAL + "[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal to 65535"),
        (MINIMAL + "[mqtt]\nhostname = 'x'\n", "mqtt.hostname", "unknown key"),
        (MINIMAL + "[[serial]]\nname='r'\nport='/dev/x'\nprotocol='morse'\n",
         "serial[0].protocol", "'surgard' or 'callerid'"),
        ('[sms]\nfrom_number = "+1"\nmessaging_service_sid = "MG' + "0" * 32 + '"\n', "sms",
         "exactly one of from_number or messaging_service_sid"),
        (MINIMAL + "[registry]\nbbox = [118.9, 37.4, 118.3, 37.8]\n", "registry.bbox",
         "min_lon"),
        (MINIMAL + "[registry]\nwatch_interval_s = -1\n", "registry.watch_interval_s",
         "greater than or equal to 0"),
        (MINIMAL + "[contact_id]\ncodes = { '1x' = 'emergency' }\n", "contact_id.codes",
         "3 hex digits"),
        (MINIMAL + "[contact_id]\ncodes = { '150' = 'explode' }\n", "contact_id.codes.150",
         "emergency"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path: Path, text: str, key: str,
                                             reason: str) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert err.file == str(path.resolve())
    assert err.key == key
    assert reason in err.reason
    assert str(path.resolve()) in str(err) and key in str(err)


@pytest.mark.parametrize("secret_line", [
    "[sms]\nfrom_number='+15005550006'\nauth_token='abc'\n",
    MINIMAL + "[mqtt]\npassword='hunter2'\n",
    MINIMAL + "[secrets]\ntwilio='x'\n",
])
def test_secrets_in_the_file_are_refused(tmp_path: Path, secret_line: str) -> None:
    err = error_of(write(tmp_path, secret_line))
    assert "secrets must not be stored in the config file" in err.reason
    assert "hunter2" not in str(err) and "abc" not in str(err)


def test_invalid_toml_utf8_and_missing_file(tmp_path: Path) -> None:
    assert "invalid TOML" in error_of(write(tmp_path, "[sms\n")).reason
    assert "not valid UTF-8 at byte" in error_of(write(tmp_path, b"[sms]\nx='\xff'\n")).reason
    err = error_of(tmp_path / "nope.toml")
    assert "cannot read" in err.reason and err.file.endswith("nope.toml")


def test_secrets_from_env_and_systemd_credentials(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "[mqtt]\nusername = 'gateway'\n"))
    env = {"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": " s3cr3t-xyz ",
           "MQTT_PASSWORD": "pw"}
    s = load_secrets(cfg, env)
    assert (s.twilio_account_sid, s.twilio_auth_token, s.mqtt_password) == (
        "AC123", "s3cr3t-xyz", "pw")
    assert "s3cr3t" not in repr(s) and "AC123" not in repr(s)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "twilio_auth_token").write_text("from-credential\n")
    env2 = {**env, "CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("twilio_auth_token", env2) == "from-credential"
    assert read_secret("twilio_account_sid", env2) == "AC123"  # falls back to env
    assert read_secret("missing", {}) is None
    no_user = load_secrets(load_config(write(tmp_path, MINIMAL)), env)
    assert no_user.mqtt_password is None
