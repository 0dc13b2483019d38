"""Configuration: validated once, errors name the file, the key and the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    check_twilio_secrets,
    load_config,
    load_secrets,
    read_secret,
)

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


# ---------------------------------------------------------------------------
# Settings that passed check-config and failed later (issue 10, fault 6)

@pytest.mark.parametrize("url", [
    "https://alarm.kenli.example.cn", "https://alarm.kenli.example.cn/gateway",
    "http://10.0.0.7:8443", "https://[2001:db8::1]/gw", "https://xn--fiq228c.example.cn",
])
def test_public_url_accepts_a_base_url(tmp_path: Path, url: str) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + f'public_url = "{url}"\n'))
    assert cfg.model.sms.public_url == url


@pytest.mark.parametrize(("url", "reason"), [
    # Startup died on these with an uncaught ValueError (the webhooks refuse them).
    ("https://alarm.example.cn/?token=1", "has a query or fragment"),
    ("https://alarm.example.cn?x", "has a query or fragment"),
    ("https://alarm.example.cn/#top", "has a query or fragment"),
    # Twilio refuses callback URLs whose host has an underscore.
    ("https://alarm_gw.example.cn", "has an underscore, which Twilio refuses"),
    ("https://alarm.example.cn/", "ends with '/'"),
    ("ftp://alarm.example.cn", "not an absolute http(s) URL"),
    ("https:///twilio", "not an absolute http(s) URL"),
    ("https://ops:pw@alarm.example.cn", "carries credentials"),
    ("https://alarm.example.cn:99999", "Port out of range"),
    ("https://-alarm.example.cn", "not a valid host name"),
    ("https://alarm.example.cn/a b", "whitespace"),
])
def test_public_url_refuses_what_twilio_or_startup_would(tmp_path: Path, url: str,
                                                         reason: str) -> None:
    path = write(tmp_path, MINIMAL + f'public_url = "{url}"\n')
    err = error_of(path)
    assert (err.file, err.key) == (str(path.resolve()), "sms.public_url")
    assert reason in err.reason


GOOD_SID = "AC" + "0123456789abcdef" * 2


def test_twilio_secrets_missing_or_malformed_name_the_credential(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))

    def problem(env: dict[str, str]) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            check_twilio_secrets(cfg, load_secrets(cfg, env), env)
        return info.value

    err = problem({"TWILIO_AUTH_TOKEN": "t"})
    assert (err.key, err.file) == ("sms.account_sid_secret", str(cfg.source))
    assert "not set (systemd credential 'twilio_account_sid' or env TWILIO_ACCOUNT_SID)" \
        in err.reason
    # One hex digit short: Twilio would answer every send with a 4xx.
    err = problem({"TWILIO_ACCOUNT_SID": GOOD_SID[:-1], "TWILIO_AUTH_TOKEN": "t"})
    assert err.key == "sms.account_sid_secret"
    assert "in env TWILIO_ACCOUNT_SID is not 'AC' followed by 32 hex digits" in err.reason
    assert GOOD_SID[:-1] not in str(err)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "twilio_account_sid").write_text("SK" + GOOD_SID[2:] + "\n")
    err = problem({"CREDENTIALS_DIRECTORY": str(creds), "TWILIO_AUTH_TOKEN": "t"})
    assert f"in credential file {creds / 'twilio_account_sid'} is not 'AC'" in err.reason
    err = problem({"TWILIO_ACCOUNT_SID": GOOD_SID})
    assert err.key == "sms.auth_token_secret" and "TWILIO_AUTH_TOKEN" in err.reason
    env = {"TWILIO_ACCOUNT_SID": GOOD_SID, "TWILIO_AUTH_TOKEN": "t"}
    check_twilio_secrets(cfg, load_secrets(cfg, env), env)  # well-formed: no error


def _check_config(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("TWILIO_") and k != "CREDENTIALS_DIRECTORY"}
    # The example's control listener (the console) takes the token the unit hands over.
    given = {"CONTROL_TOKEN": "c0ntrol-" + "5a" * 16, **env}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=120,
                          env={**clean, **given}, check=False)


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_refuses_a_bad_account_sid_and_a_missing_token() -> None:
    example = REPO / "config" / "gateway.example.toml"
    res = _check_config(example, {"TWILIO_ACCOUNT_SID": "AC1234", "TWILIO_AUTH_TOKEN": "t"})
    assert res.returncode == 2, res.stderr
    assert f"config error: {example}: sms.account_sid_secret: the Twilio Account SID in " \
           "env TWILIO_ACCOUNT_SID is not 'AC' followed by 32 hex digits" in res.stderr
    res = _check_config(example, {"TWILIO_ACCOUNT_SID": GOOD_SID})
    assert res.returncode == 2
    assert f"{example}: sms.auth_token_secret: the Twilio auth token is not set" in res.stderr


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_warns_once_per_wave_that_reaches_nobody_by_sms(tmp_path: Path) -> None:
    example = REPO / "config" / "gateway.example.toml"
    secrets = {"TWILIO_ACCOUNT_SID": GOOD_SID, "TWILIO_AUTH_TOKEN": "t"}
    res = _check_config(example, secrets)
    assert res.returncode == 0, res.stderr
    waves = [line for line in res.stderr.splitlines() if "escalation.waves" in line]
    # The default wave 3 is the hospital alone, and the sample's county hospital is a landline.
    assert waves == [
        f"warning: {example}: escalation.waves[2]: wave 3 (after 300 s: hospital) reaches "
        "nobody who can read an SMS for 88 of 88 elders (hospital: no hospital duty phone "
        "takes SMS); they are not texted: add a role, turn [voice] on to call landlines, or "
        "set voice_only = false in the registry for a number that does take SMS"]
    # With calls on, the landline is called: the wave reaches someone.
    called = write(tmp_path, MINIMAL + f'[registry]\ndirectory = "{REPO / "config" / "sample"}"\n'
                   f'[gateway]\nstate_dir = "{tmp_path}/state"\n[mqtt]\nenabled = false\n'
                   '[voice]\nenabled = true\n')
    res = _check_config(called, secrets)
    assert res.returncode == 0, res.stderr
    assert "escalation.waves" not in res.stderr
    # With the hospital's desk marked as taking SMS, no wave is silent.
    registry = tmp_path / "sample"
    registry.mkdir()
    for f in (REPO / "config" / "sample").glob("*.csv"):
        (registry / f.name).write_bytes(f.read_bytes())
    facilities = (registry / "facilities.csv").read_text(encoding="utf-8").splitlines()
    rows = [facilities[0] + ",voice_only"] + [
        row + (",false" if ",hospital," in row else ",") for row in facilities[1:]]
    (registry / "facilities.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = write(tmp_path, MINIMAL + f'[registry]\ndirectory = "{registry}"\n'
                f'[gateway]\nstate_dir = "{tmp_path}/state"\n[mqtt]\nenabled = false\n')
    res = _check_config(cfg, secrets)
    assert res.returncode == 0, res.stderr
    assert "escalation.waves" not in res.stderr
