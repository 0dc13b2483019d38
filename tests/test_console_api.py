"""The operator console's API and event stream (issue 11), against a real gateway in this
process: sign-in, sessions, CSRF, the board, actions named after the operator, and a
stream that loses nothing across a disconnect. The browser tests (test_console_browser.py)
drive the same routes through the page."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from argon2 import PasswordHasher

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.console import views
from gateway.console.accounts import OperatorAccounts, accounts_path
from gateway.daemon import Gateway
from gateway.lifecycle import AlarmState
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, eventually, gateway_config, running
from tests.test_control_security import tcp_gateway, with_token

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def add_operator(state_dir: Path, login: str = "wang", name: str = "王值班") -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with OperatorAccounts(accounts_path(state_dir), hasher=FAST) as accounts:
        accounts.add(login, name, PASSWORD)


class Console:
    """One browser-like session: its cookie jar and CSRF token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def sign_in(self, login: str = "wang", password: str = PASSWORD) -> tuple[int, Any]:
        status, body = await self.post("sign-in", {"login": login, "password": password},
                                       csrf=False)
        if status == 200:
            self.csrf = body["csrf"]
        return status, body

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(f"{self.url}/console/api/{path}") as r:
            return r.status, await r.json() if r.content_type == "application/json" \
                else await r.text()

    async def post(self, path: str, body: dict[str, Any] | None = None, *,
                   csrf: bool = True) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        async with self.http.post(f"{self.url}/console/api/{path}", json=body or {},
                                  headers=headers) as r:
            return r.status, await r.json()

    async def events(self, after: str = "", last_id: str | None = None,
                     ) -> AsyncIterator[tuple[str, str | None, dict[str, Any]]]:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with self.http.get(f"{self.url}/console/api/events?after={after}",
                                 headers=headers) as r:
            assert r.status == 200
            event, event_id, data = "", None, ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and event:
                    yield event, event_id, json.loads(data)
                    event, event_id, data = "", None, ""

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> Console:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def press(gw: Gateway, pty: Pty, index: int = 0) -> str:
    assert gw.registry is not None
    devices = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                     key=lambda d: d.device_id)
    device = devices[index]
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    return device.device_id


async def test_sign_in_board_ack_and_csrf(tmp_path: Path, twilio: TwilioDouble,
                                          pty: Pty) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None and gw.control.url
        async with Console(gw.control.url) as console:
            # No session: every API route but sign-in says 401.
            assert (await console.get("board"))[0] == 401
            assert (await console.sign_in(password="wrong password!"))[0] == 401
            status, me = await console.sign_in()
            assert status == 200 and me["name"] == "王值班"
            status, board = await console.get("board")
            assert status == 200 and board["alarms"] == []

            device_id = press(gw, pty)
            assert await pty.read() == ACK
            await eventually(lambda: gw.dispatcher is not None and gw.dispatcher.active)
            assert gw.dispatcher is not None
            await gw.dispatcher.wait_idle(timeout=15)
            status, board = await console.get("board")
            (alarm,) = board["alarms"]
            assert alarm["device_id"] == device_id and alarm["elder"]["name"]
            assert alarm["notifications"] and alarm["nearby"]["facilities"]
            alarm_id = alarm["alarm_id"]

            # An action without the CSRF token is refused and changes nothing.
            status, _ = await console.post(f"alarms/{alarm_id}/ack", csrf=False)
            assert status == 403
            assert (await gw.journal.get_alarm(alarm_id)).state is not \
                AlarmState.ACKNOWLEDGED  # type: ignore[union-attr]
            status, body = await console.post(f"alarms/{alarm_id}/ack")
            assert status == 200, body
            record = await gw.journal.get_alarm(alarm_id)  # type: ignore[union-attr]
            assert record.state is AlarmState.ACKNOWLEDGED
            assert record.acknowledged_by == "operator:wang"

            status, view = await console.get(f"alarms/{alarm_id}")
            assert status == 200
            assert any(e["event"] == "alarm.acknowledged" for e in view["timeline"])

            status, body = await console.post(f"alarms/{alarm_id}/false-alarm",
                                              {"note": "按错了"})
            assert status == 200 and body["false_alarm"]
            record = await gw.journal.get_alarm(alarm_id)  # type: ignore[union-attr]
            assert record.state is AlarmState.RESOLVED and "按错了" in (record.note or "")
            status, rows = await console.get("history")
            assert [r["alarm_id"] for r in rows["alarms"]] == [alarm_id]
            async with console.http.get(f"{gw.control.url}/console/api/history.csv") as r:
                text = await r.text()
            assert r.status == 200 and alarm_id in text

            assert (await console.post("sign-out"))[0] == 200
            assert (await console.get("board"))[0] == 401


async def test_stream_catches_up_after_a_disconnect(tmp_path: Path, twilio: TwilioDouble,
                                                    pty: Pty) -> None:
    """A console away during presses gets every change when it comes back (Last-Event-ID);
    a cursor of another run gets a resync."""
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None
        async with Console(gw.control.url) as console:
            await console.sign_in()
            _, board = await console.get("board")
            last_id = board["cursor"]
            stream = console.events(after=board["cursor"])
            event, _, hello = await anext(stream)
            assert event == "hello" and hello["stream_id"]
            await stream.aclose()  # the tab goes to sleep

            for i in range(5):
                press(gw, pty, i)
                assert await pty.read() == ACK
            assert gw.journal is not None
            await eventually(lambda: len(gw.dispatcher.active) == 5)  # type: ignore[union-attr]

            seen: set[str] = set()
            stream = console.events(last_id=last_id)
            async for event, _event_id, data in stream:
                if event == "change":
                    seen.update(data["alarms"])
                if len(seen) >= 5:
                    break
            await stream.aclose()
            open_ids = {a.alarm_id for a in await gw.journal.open_alarms()}
            assert seen == open_ids

            stream = console.events(last_id="feedbeef-3")
            assert (await anext(stream))[0] == "hello"
            assert (await anext(stream))[0] == "resync"
            await stream.aclose()


async def test_lockout_after_repeated_failures(tmp_path: Path, twilio: TwilioDouble,
                                               pty: Pty) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None
        async with Console(gw.control.url) as console:
            for _ in range(4):
                assert (await console.sign_in(password="not the password"))[0] == 401
            status, body = await console.sign_in(password="not the password")
            assert status == 423 and body["error"] == "locked"
            status, body = await console.sign_in()
            assert status == 423, "the right password is refused while locked"


async def test_cross_site_and_form_posts_are_refused(tmp_path: Path, twilio: TwilioDouble,
                                                     pty: Pty) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None
        url = gw.control.url
        async with Console(url) as console:
            await console.sign_in()
            async with console.http.post(f"{url}/console/api/sign-in",
                                         data={"login": "wang", "password": PASSWORD}) as r:
                assert r.status == 415  # an HTML form cannot sign anyone in
            async with console.http.post(
                    f"{url}/console/api/notices/1/ack", json={},
                    headers={"X-CSRF-Token": console.csrf,
                             "Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with console.http.get(f"{url}/console/") as r:
                assert r.status == 200
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            async with console.http.get(f"{url}/", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/console/"


async def test_sessions_survive_a_restart(tmp_path: Path, twilio: TwilioDouble,
                                          pty: Pty) -> None:
    add_operator(tmp_path / "state")
    gw = tcp_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.control is not None
        console = Console(gw.control.url)
        await console.sign_in()
        url = gw.control.url
    try:
        port = int(url.rsplit(":", 1)[1])
        gw2 = tcp_gateway(tmp_path, twilio, pty, port=port)
        async with running(gw2):
            status, _ = await console.get("board")
            assert status == 200
            assert (await console.post("notices/999/ack"))[0] == 404  # CSRF still valid
    finally:
        await console.close()



async def test_history_filters_report_and_csv(tmp_path: Path, twilio: TwilioDouble,
                                              pty: Pty) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None and gw.registry is not None and gw.journal is not None
        async with Console(gw.control.url) as console:
            await console.sign_in()
            first = press(gw, pty, 0)
            assert await pty.read() == ACK
            second = press(gw, pty, 1)
            assert await pty.read() == ACK
            alarms = await eventually(lambda: _two(gw))
            by_device = {a.device_id: a for a in alarms}
            elder = gw.registry.elders[by_device[first].elder_id]

            status, rows = await console.get(f"history?device={second}")
            assert status == 200
            assert [r["alarm_id"] for r in rows["alarms"]] == [by_device[second].alarm_id]
            status, rows = await console.get(f"history?elder={elder.name}")
            assert by_device[first].alarm_id in {r["alarm_id"] for r in rows["alarms"]}
            assert all(elder.name in r["elder"] for r in rows["alarms"])
            day = rows["alarms"][0]["received_at_local"][:10]
            status, rows = await console.get(f"history?day={day}")
            assert {r["alarm_id"] for r in rows["alarms"]} == {a.alarm_id for a in alarms}
            status, rows = await console.get("history?day=2001-01-01")
            assert rows["alarms"] == []
            assert (await console.get("history?day=yesterday"))[0] == 400

            status, report = await console.get(f"report?day={day}")
            assert status == 200 and report["alarms"] == 2
            async with console.http.get(
                    f"{gw.control.url}/console/api/report.csv?day={day}") as r:
                assert r.status == 200 and r.content_type == "text/csv"
                assert "attachment" in r.headers["Content-Disposition"]
                text = await r.text()
            assert "alarms,2" in text


async def _two(gw: Gateway) -> list[Any] | None:
    assert gw.journal is not None
    alarms = await gw.journal.open_alarms()
    return alarms if len(alarms) == 2 else None


@pytest.mark.parametrize("tls", [False, True])
async def test_session_cookie_and_page_policy(tmp_path: Path, twilio: TwilioDouble,
                                              pty: Pty, tls: bool) -> None:
    """HttpOnly, SameSite=Strict; Secure (and the __Host- prefix) when browsers come over
    TLS; the page's policy allows only the gateway, and a tile server when one is set."""
    tiles = {"tile_url": "https://tiles.center.local/{z}/{x}/{y}.png"} if tls else {}
    cfg = gateway_config(tmp_path, twilio, control={"port": 0, "behind_tls_proxy": tls},
                         console=tiles,
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, with_token(twilio))
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None
        async with Console(gw.control.url) as console:
            async with console.http.post(
                    f"{gw.control.url}/console/api/sign-in",
                    json={"login": "wang", "password": PASSWORD},
                    headers={"Origin": gw.control.url.replace("http:", "https:")
                             if tls else gw.control.url}) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert ("Secure" in cookie) is tls
            assert cookie.startswith("__Host-gw_console=" if tls else "gw_console=")
            async with console.http.get(f"{gw.control.url}/console/api/board") as r:
                assert r.headers["Cache-Control"] == "no-store"  # operators' data
            async with console.http.get(f"{gw.control.url}/console/") as r:
                policy = r.headers["Content-Security-Policy"]
            assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert ("https://tiles.center.local" in policy) is tls


async def test_map_data_offline_and_bounded(tmp_path: Path, twilio: TwilioDouble, pty: Pty,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The map's data comes from the gateway: the district's GeoJSON, facilities and homes;
    a city's homes are left out (only alarms' homes are drawn then)."""
    cfg = gateway_config(tmp_path, twilio, control={"port": 0},
                         registry={"district_map": "district.geojson"},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, with_token(twilio))
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None
        async with Console(gw.control.url) as console:
            await console.sign_in()
            status, data = await console.get("map")
            assert status == 200
            kinds = {f["properties"]["kind"] for f in data["district"]["features"]}
            assert kinds == {"district", "community", "grid"}
            assert len(data["elders"]) == data["elders_total"] == 88
            assert len(data["facilities"]) == 11
            monkeypatch.setattr(views, "MAP_ELDERS_MAX", 10)
            status, data = await console.get("map")
            assert data["elders"] == [] and data["elders_total"] == 88


async def test_the_maps_responder_poll_sends_the_shift_only(tmp_path: Path, twilio: TwilioDouble,
                                                            pty: Pty) -> None:
    gw = tcp_gateway(tmp_path, twilio, pty)
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None and gw.registry is not None and gw.geo is not None
        async with Console(gw.control.url) as console:
            await console.sign_in()
            _, everyone = await console.get("responders")
            _, shift = await console.get("responders?on_duty=1")
            assert len(everyone["responders"]) == len(gw.registry.responders)
            on_duty = {r.responder_id for r in gw.registry.responders.values()
                       if gw.geo.is_on_duty(r.responder_id)}
            assert {r["id"] for r in shift["responders"]} == on_duty
            assert len(on_duty) < len(everyone["responders"])


async def test_the_console_over_the_gateways_own_tls_certificate(
        tmp_path: Path, twilio: TwilioDouble, pty: Pty) -> None:
    """control.tls_cert_file / tls_key_file: the listener speaks TLS itself (what lets it
    leave loopback), the session cookie is Secure, and a plain-HTTP request gets nowhere."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (scripts/test installs it)")
    cert, key = tmp_path / "console.crt", tmp_path / "console.key"
    await asyncio.to_thread(
        subprocess.run, [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                         "-keyout", str(key), "-out", str(cert)], check=True,
        capture_output=True)
    cfg = gateway_config(tmp_path, twilio,
                         control={"port": 0, "tls_cert_file": str(cert),
                                  "tls_key_file": str(key)},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, with_token(twilio))
    add_operator(tmp_path / "state")
    async with running(gw):
        assert gw.control is not None and gw.control.url.startswith("https://")
        port = gw.control.url.rsplit(":", 1)[1]
        trust = ssl.create_default_context(cafile=str(cert))
        url = f"https://localhost:{port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(f"{url}/console/api/sign-in", ssl=trust,
                                 json={"login": "wang", "password": PASSWORD},
                                 headers={"Origin": url}) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
            assert cookie.startswith("__Host-gw_console=") and "Secure" in cookie
            async with http.get(f"{url}/console/api/board", ssl=trust) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://localhost:{port}/console/api/board") as r:
                    await r.read()
