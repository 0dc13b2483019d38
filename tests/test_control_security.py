"""Only operators can act (issue 10, fault 5): the control API's transports, token, Host,
Origin and body checks, the Twilio webhooks' own listener, and the CLI over the socket.

Each attack of the issue is replayed against a real gateway (in this process, with the
Twilio double and a pty as the Sur-Gard receiver) and must be refused, with the alarm,
the responder's shift and the registry left as they were."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.config import (
    ConfigError,
    Secrets,
    check_control_token,
    parse_config,
)
from gateway.daemon import Gateway, StartupError
from gateway.lifecycle import AlarmState
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    SAMPLE,
    Pty,
    control,
    eventually,
    gateway_config,
    running,
    secrets_for,
)
from tests.support.ports import free_port

TOKEN = "t0ken-" + "9f" * 16  # a test credential, long enough to be accepted
SMS = {"from_number": "+15005550006"}


def with_token(twilio: TwilioDouble, token: str | None = TOKEN) -> Secrets:
    return dataclasses.replace(secrets_for(twilio), control_token=token)


async def start_alarm(gw: Gateway, pty: Pty) -> str:
    """A Sur-Gard press: journaled, ACKed, first wave sent; its alarm id."""
    assert gw.registry is not None and gw.journal is not None and gw.dispatcher is not None
    await eventually(gw.serial[0].connected.is_set)
    device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                    key=lambda d: d.device_id)[0]
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read() == ACK
    alarm = (await eventually(gw.journal.open_alarms))[0]
    await gw.dispatcher.wait_idle(timeout=15)
    return str(alarm.alarm_id)


async def raw(url: str, method: str = "GET", *, unix: Path | None = None,
              headers: dict[str, str] | None = None, data: str | bytes | None = None,
              json_body: dict[str, Any] | None = None) -> tuple[int, str, dict[str, str]]:
    """A request exactly as given (the attacker's browser or script): status, text, headers."""
    connector = aiohttp.UnixConnector(path=str(unix)) if unix is not None else None
    async with aiohttp.ClientSession(connector=connector) as http, http.request(
            method, url, headers=headers, data=data, json=json_body) as r:
        return r.status, await r.text(), dict(r.headers)


def tcp_gateway(tmp_path: Path, twilio: TwilioDouble, pty: Pty, **control: Any) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, control={"port": 0, **control},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    return Gateway(cfg, with_token(twilio))


# -- fault 5 replayed: cross-site POSTs, DNS rebinding, no token ---------------------------


@pytest.mark.integration
async def test_cross_site_text_plain_posts_act_on_nothing(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.control is not None and gw.journal is not None and gw.geo is not None
        alarm_id = await start_alarm(gw, pty)
        rid = next(r for r in gw.registry.responders if gw.geo.is_on_duty(r))  # type: ignore[union-attr]
        base = gw.control.url
        # What a page on another site can send without a preflight: a text/plain "form".
        page = {"Origin": "https://evil.example", "Content-Type": "text/plain",
                "Sec-Fetch-Site": "cross-site"}
        attacks = [(f"/alarms/{alarm_id}/ack", '{"by": "x"}'),
                   (f"/responders/{rid}/duty", '{"on_duty": false, "by": "x"}'),
                   ("/reload", '{"by": "x"}')]
        with capture_logs() as logs:
            for path, body in attacks:
                # The browser has no token; even with one the page is refused.
                for extra in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                    status, _, _ = await raw(base + path, "POST", headers={**page, **extra},
                                             data=body)
                    assert status in (401, 403), (path, extra, status)
                # A same-origin text/plain body with the token: the body type alone refuses.
                status, _, _ = await raw(base + path, "POST", data=body, headers={
                    "Content-Type": "text/plain", "Authorization": f"Bearer {TOKEN}"})
                assert status == 415, path
                # And over the unix socket, where no token is needed, just as well.
                status, _, _ = await raw(f"http://localhost{path}", "POST", data=body,
                                         unix=gw.control.socket_path,
                                         headers={"Content-Type": "text/plain"})
                assert status == 415, path
        # Every answer came back (each request was handled): nothing happened.
        assert (await gw.journal.get_alarm(alarm_id)).state is AlarmState.NOTIFIED
        assert gw.geo.is_on_duty(rid) is True
        assert not [e for e in logs if e["event"] in ("registry.reloaded", "control.reload")]
        # The operator's own request, the same acts done properly, works.
        status, answer = await control(gw, "POST", f"/alarms/{alarm_id}/ack",
                                       json={"by": "li"})
        assert status == 200, answer
        rec = await gw.journal.get_alarm(alarm_id)
        assert rec.state is AlarmState.ACKNOWLEDGED and rec.acknowledged_by == "operator:li"


@pytest.mark.integration
async def test_a_rebinding_host_cannot_read_and_only_the_same_origin_may_ask(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.control is not None
        alarm_id = await start_alarm(gw, pty)
        port = gw.control.url.rsplit(":", 1)[1]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        url = gw.control.url + "/alarms"
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                     "localhost.", "", "[::1"):
            status, text, _ = await raw(url, headers={**auth, "Host": host})
            if host == "localhost.":  # the same name, fully qualified
                assert status == 200
                continue
            assert status == 403, host
            assert alarm_id not in text
        status, _, _ = await raw("http://localhost/alarms", unix=gw.control.socket_path,
                                 headers={"Host": "evil.example"})
        assert status == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            status, text, _ = await raw(url, headers={**auth, "Host": host})
            assert status == 200 and alarm_id in text, host
        # Origin: only the listener's own; a sibling port on localhost is another site.
        host = f"127.0.0.1:{port}"
        for origin, expected in ((f"http://{host}", 200), ("https://evil.example", 403),
                                 ("null", 403), (f"http://127.0.0.1:{free_port()}", 403),
                                 (f"https://{host}", 403)):
            status, _, _ = await raw(url, headers={**auth, "Host": host, "Origin": origin})
            assert status == expected, origin
        status, _, _ = await raw(url, headers={**auth, "Sec-Fetch-Site": "same-site"})
        assert status == 403


@pytest.mark.integration
async def test_tcp_needs_the_bearer_token_for_reads_too_and_refusals_log_once(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.control is not None
        base = gw.control.url
        with capture_logs() as logs:
            for path in ("/alarms", "/metrics", "/health", "/devices", "/notices"):
                for headers in ({}, {"Authorization": "Bearer wrong"},
                                {"Authorization": f"Bearer {TOKEN}x"},
                                {"Authorization": f"Basic {TOKEN}"},
                                {"Authorization": TOKEN}):
                    status, _, answer_headers = await raw(base + path, headers=headers)
                    assert status == 401, (path, headers)
                    assert answer_headers["WWW-Authenticate"].startswith("Bearer")
        refused = [e for e in logs if e["event"] == "control.refused"]
        assert len(refused) == 1 and refused[0]["status"] == 401  # 25 refusals, one line
        assert TOKEN not in json.dumps(logs)
        status, metrics = await control(gw, "GET", "/metrics", tcp=True)
        assert status == 200 and "gateway_" in metrics
        status, alarms = await control(gw, "GET", "/alarms", tcp=True)
        assert status == 200 and alarms == {"alarms": []}


@pytest.mark.integration
async def test_an_act_names_a_person_in_a_json_body(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    cfg = gateway_config(tmp_path, twilio,
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.control is not None
        alarm_id = await start_alarm(gw, pty)
        path = f"/alarms/{alarm_id}/ack"
        for body in ({}, {"by": ""}, {"by": "   "}, {"by": 7}, {"by": "x" * 65}):
            status, answer = await control(gw, "POST", path, json=body)
            assert status == 400 and "by" in answer["error"], body
        status, _ = await control(gw, "POST", path)  # no body at all
        assert status == 415
        status, _, _ = await raw("http://localhost" + path, "POST", unix=gw.control.socket_path,
                                 data=b"[1]", headers={"Content-Type": "application/json"})
        assert status == 400
        assert (await gw.journal.get_alarm(alarm_id)).state is AlarmState.NOTIFIED
        status, _ = await control(gw, "POST", path, json={"by": " 王 "})
        assert status == 200
        assert (await gw.journal.get_alarm(alarm_id)).acknowledged_by == "operator:王"
        status, answer = await control(gw, "POST", f"/alarms/{alarm_id}/resolve",
                                       json={"by": "wang", "note": "家属已到"})
        assert status == 200, answer
        history = [ev for _, ev, _ in await gw.journal.alarm_log(alarm_id)]
        assert history  # the acts are in the alarm's own log, with who
        rec = await gw.journal.get_alarm(alarm_id)
        assert rec.state is AlarmState.RESOLVED
        # The socket: the configured mode, gone once the gateway stops.
        sock = gw.control.socket_path
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert not sock.exists()


# -- the webhooks' own listener ----------------------------------------------------------


@pytest.mark.integration
async def test_the_webhook_listener_serves_only_twilio_and_the_control_api_no_webhooks(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    hook_port = free_port()
    public = f"http://127.0.0.1:{hook_port}"  # what the reverse proxy forwards to
    cfg = gateway_config(tmp_path, twilio, control={"port": 0}, webhooks={"port": hook_port},
                         sms={"public_url": public},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    twilio.inbound_webhook_url = public + "/twilio/inbound"
    gw = Gateway(cfg, with_token(twilio))
    async with running(gw):
        assert gw.control is not None and gw.journal is not None and gw.webhooks is not None
        assert gw.webhooks.url == public
        alarm_id = await start_alarm(gw, pty)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        # The outside caller of the issue, through the proxy: every control route is absent,
        # with or without the token.
        for method, path, body in (("GET", "/alarms", None), ("GET", f"/alarms/{alarm_id}", None),
                                   ("GET", "/health", None), ("GET", "/metrics", None),
                                   ("GET", "/devices", None),
                                   ("POST", f"/alarms/{alarm_id}/ack", {"by": "x"}),
                                   ("POST", "/reload", {"by": "x"})):
            status, text, _ = await raw(public + path, method, headers=auth, json_body=body)
            assert status == 404, (method, path, status)
            assert alarm_id not in text or method == "POST"
        # The control API has no webhook routes, on either transport.
        for path in ("/twilio/inbound", "/twilio/status"):
            status, _, _ = await raw(gw.control.url + path, "POST", headers=auth,
                                     json_body={"by": "x"})
            assert status == 404
            status, _ = await control(gw, "POST", path, json={"by": "x"})
            assert status == 404
        # The webhooks themselves work there: a staff reply, signed like Twilio, acknowledges.
        staff = next(n for n in await gw.journal.notifications(alarm_id)
                     if n.role == "responder")
        await twilio.inject_inbound(staff.phone, f"{alarm_id} 1", to="+15005550006")
        rec = await gw.journal.get_alarm(alarm_id)
        assert rec.state is AlarmState.ACKNOWLEDGED
        assert (rec.acknowledged_by or "").startswith("sms:")


@pytest.mark.integration
async def test_a_sharedkey_header_without_a_key_is_403_and_logged_once(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    hook_port = free_port()
    public = f"http://127.0.0.1:{hook_port}"
    cfg = gateway_config(tmp_path, twilio, webhooks={"port": hook_port},
                         sms={"public_url": public})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        form = {"MessageSid": "SM" + "a" * 32, "From": "+8613800138000",
                "To": "+15005550006", "Body": "1"}
        headers = {"X-Twilio-Webhooks-Signature-Settings": "key=k1,algorithm=HMAC_SHA256",
                   "X-Twilio-Signature": "c2lnbmF0dXJl"}
        with capture_logs() as logs:
            statuses = []
            async with aiohttp.ClientSession() as http:
                for _ in range(40):
                    async with http.post(public + "/twilio/inbound", data=form,
                                         headers=headers) as r:
                        statuses.append(r.status)
        assert statuses == [403] * 40  # every request answered, none a 500
        missing = [e for e in logs if e["event"] == "webhook.shared_key_missing"]
        assert len(missing) == 1
        assert not [e for e in logs if e.get("log_level") == "error"
                    and e["event"] != "webhook.shared_key_missing"]
        assert "+8613800138000" not in json.dumps(logs, ensure_ascii=False)


# -- configuration ---------------------------------------------------------------------


def _cfg(tmp_path: Path, **control: Any) -> dict[str, Any]:
    return {"gateway": {"state_dir": str(tmp_path / "state")}, "sms": SMS, "control": control}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "gw.example.org"])
def test_a_non_loopback_control_host_is_refused_without_a_tls_proxy(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(tmp_path, host=host, port=8765), tmp_path / "gw.toml")
    assert err.value.key == "control.host" and "behind_tls_proxy" in err.value.reason
    with pytest.raises(ConfigError):  # a proxy but no names it serves
        parse_config(_cfg(tmp_path, host=host, port=8765, behind_tls_proxy=True),
                     tmp_path / "gw.toml")
    cfg = parse_config(_cfg(tmp_path, host=host, port=8765, behind_tls_proxy=True,
                            public_names=["ops.example.org"]), tmp_path / "gw.toml")
    with pytest.raises(ConfigError) as err:  # ...and still no token: refused
        check_control_token(cfg, Secrets(None, None, None))
    assert err.value.key == "control.port"
    with pytest.raises(ConfigError) as err:
        check_control_token(cfg, Secrets(None, None, None, control_token="short"))
    assert err.value.key == "control.token_secret"
    check_control_token(cfg, Secrets(None, None, None, control_token=TOKEN))


def test_loopback_hosts_and_the_socket_alone_need_no_proxy(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        parse_config(_cfg(tmp_path, host=host, port=8765), tmp_path / "gw.toml")
    cfg = parse_config(_cfg(tmp_path), tmp_path / "gw.toml")
    assert cfg.model.control.port is None  # no TCP unless asked for
    check_control_token(cfg, Secrets(None, None, None))  # the socket needs no token
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(tmp_path, socket_mode=0o666), tmp_path / "gw.toml")
    assert err.value.key == "control.socket_mode"
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(tmp_path, socket="/run/" + "x" * 120), tmp_path / "gw.toml")
    assert "control.socket" in str(err.value)


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_refuses_0_0_0_0_naming_file_and_key(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    base = (f'[gateway]\nstate_dir = "{tmp_path}/state"\n[registry]\ndirectory = "{SAMPLE}"\n'
            '[sms]\nfrom_number = "+15005550006"\n')
    env = {k: v for k, v in os.environ.items() if k != "CONTROL_TOKEN"}
    env |= {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "x" * 32}

    def check(control: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        toml.write_text(base + "[control]\n" + control, encoding="utf-8")
        return subprocess.run([sys.executable, "-m", "gateway.cli", "check-config",
                               "--config", str(toml)], capture_output=True, text=True,
                              timeout=60, env={**env, **extra_env}, check=False)

    res = check('host = "0.0.0.0"\nport = 8765\n')
    assert res.returncode == 2
    assert f"{toml}: control.host:" in res.stderr and "0.0.0.0" in res.stderr
    proxied = ('host = "0.0.0.0"\nport = 8765\nbehind_tls_proxy = true\n'
               'public_names = ["ops.example.org"]\n')
    res = check(proxied)
    assert res.returncode == 2 and f"{toml}: control.port:" in res.stderr
    assert "CONTROL_TOKEN" in res.stderr
    res = check(proxied, CONTROL_TOKEN=TOKEN)
    assert res.returncode == 0, res.stderr
    assert TOKEN not in res.stdout + res.stderr


@pytest.mark.integration
async def test_a_tcp_listener_without_a_token_does_not_start(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, control={"port": 0})
    gw = Gateway(cfg, secrets_for(twilio))
    with pytest.raises(StartupError, match="bearer token"):
        await gw.run()
    assert not (tmp_path / "state" / "control.sock").exists()


# -- the CLI over the unix socket, as the README says ------------------------------------


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.integration
async def test_cli_ack_resolve_duty_status_over_the_unix_socket(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    cfg = gateway_config(tmp_path, twilio,
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    toml = tmp_path / "gateway.toml"
    toml.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[registry]\ndirectory = "{SAMPLE}"\n'
                    '[sms]\nfrom_number = "+15005550006"\n', encoding="utf-8")
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.geo is not None and gw.control is not None
        assert gw.control.url == ""  # no TCP listener at all
        alarm_id = await start_alarm(gw, pty)
        code, out, err = await cli("status", "--config", str(toml))
        assert code == 0, err
        assert [a["alarm_id"] for a in json.loads(out)["open_alarms"]] == [alarm_id]
        code, out, err = await cli("ack", alarm_id, "--by", "zhang", "--config", str(toml))
        assert code == 0, err
        assert json.loads(out)["state"] == "acknowledged"
        assert (await gw.journal.get_alarm(alarm_id)).acknowledged_by == "operator:zhang"
        rid = next(r for r in gw.registry.responders if gw.geo.is_on_duty(r))  # type: ignore[union-attr]
        code, out, err = await cli("duty", rid, "off", "--by", "zhang", "--config", str(toml))
        assert code == 0, err
        assert gw.geo.is_on_duty(rid) is False
        code, out, err = await cli("resolve", alarm_id, "--by", "zhang", "--note", "ok",
                                   "--config", str(toml))
        assert code == 0, err
        assert (await gw.journal.get_alarm(alarm_id)).state is AlarmState.RESOLVED
        code, _, err = await cli("ack", "NOPE-NOPE", "--config", str(toml))
        assert code == 1 and "404" in err
    # Stopped: the socket is gone and the CLI says where it looked.
    code, _, err = await cli("status", "--config", str(toml))
    assert code == 1 and str(gw.control.socket_path) in err
