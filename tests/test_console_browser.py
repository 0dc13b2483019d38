"""The operator console in a real browser (issue 11): Debian's Chromium driven by
Playwright (the system browser, no download), against a real gateway with Mosquitto, the
Twilio double and the sample district's map, with every request to anything but the
gateway blocked and recorded.

Set ``UPDATE_SCREENSHOTS=1`` to refresh docs/console-board.png and
docs/console-timeline.png from the run (they are always taken, into tmp_path)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.daemon import Gateway
from gateway.journal import MessageKind
from gateway.lifecycle import AlarmState
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, Mosquitto, eventually, gateway_config, running, z2m_devices
from tests.test_console_api import PASSWORD, add_operator
from tests.test_control_security import with_token

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
DOCS = Path(__file__).resolve().parent.parent / "docs"
VIEWPORT = {"width": 1366, "height": 768}


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.fail("Debian's chromium is needed (apt-get install -y chromium; scripts/test "
                    "installs it)")
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """A browser context (its own cookies) with the network to all but the gateway cut."""

    def __init__(self, context: Any, page: Any, origin: str) -> None:
        self.context, self.page, self.origin = context, page, origin
        self.blocked: list[str] = []

    @classmethod
    async def open(cls, browser: Any, url: str) -> Tab:
        origin = url.rstrip("/")
        context = await browser.new_context(viewport=VIEWPORT, locale="zh-CN")
        page = await context.new_page()
        tab = cls(context, page, origin)

        async def only_gateway(route: Any) -> None:
            if route.request.url.startswith(origin + "/"):
                await route.continue_()
            else:
                tab.blocked.append(route.request.url)
                await route.abort()

        await context.route("**/*", only_gateway)
        await page.goto(f"{origin}/console/")
        return tab

    async def sign_in(self, login: str, password: str) -> None:
        """Fill in the form and submit it (the answer is the caller's to check)."""
        page = self.page
        await page.fill("#login", login)
        await page.fill("#password", password)
        await page.click("#signin-button")

    async def signed_in(self, login: str) -> None:
        """Sign in with the test password and wait for the board."""
        await self.sign_in(login, PASSWORD)
        await self.page.wait_for_selector("#app:not([hidden])")


async def publish(broker: Mosquitto, topic: str, payload: dict[str, Any]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topic, json.dumps(payload).encode(), qos=1)


def console_gateway(tmp_path: Path, twilio: TwilioDouble, mosquitto: Mosquitto) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, control={"port": 0},
                         mqtt={"enabled": True, "port": mosquitto.port},
                         registry={"directory": str(SAMPLE),
                                   "district_map": "district.geojson"})
    add_operator(tmp_path / "state", "wang", "王值班")
    add_operator(tmp_path / "state", "li", "李值班")
    return Gateway(cfg, with_token(twilio))


async def test_operator_signs_in_sees_a_press_live_and_acknowledges_it(
        tmp_path: Path, twilio: TwilioDouble, mosquitto: Mosquitto, browser: Any) -> None:
    gw = console_gateway(tmp_path, twilio, mosquitto)
    async with running(gw):
        assert gw.control is not None and gw.mqtt is not None and gw.journal is not None
        await eventually(gw.mqtt.connected.is_set)
        one = await Tab.open(browser, gw.control.url)
        two = await Tab.open(browser, gw.control.url)
        page = one.page

        # A wrong password is refused with the reason; the right one opens the board.
        await one.sign_in("wang", "not the password")
        await page.wait_for_selector("#signin-error:has-text('账号或密码错误')")
        await one.signed_in("wang")
        await page.wait_for_selector("#map path.leaflet-interactive")  # the district drawn
        await two.signed_in("li")
        # Both streams are open before the press (the consoles list both).
        await page.wait_for_selector(".silent-console")

        device = z2m_devices(1)[0]
        elder = gw.registry.elders[device.elder_id]  # type: ignore[union-attr]
        pressed = time.monotonic()
        await publish(mosquitto, device.address, {"action": "emergency", "battery": 90})
        card = page.locator(".card[data-alarm]")
        await card.first.wait_for(timeout=10_000)
        appeared_s = time.monotonic() - pressed
        print(f"press -> card on the board without a reload: {appeared_s:.2f} s")
        assert elder.name in await card.first.inner_text()
        await page.locator("path.alarm-marker").first.wait_for()  # and on the map
        alarm_id = await card.first.get_attribute("data-alarm")
        assert alarm_id

        # The SMS states fill in on the board as the double accepts them.
        await card.first.click()
        await page.wait_for_selector("#recipients .pill.ms-accepted")
        assert await page.locator("#recipients tr").count() >= 3

        # An action without the session's CSRF token is refused, from the page itself.
        forged = ("(id) => fetch(`/console/api/alarms/${id}/ack`, {method: 'POST', headers: "
                  "{'Content-Type': 'application/json'}, body: '{}'}).then(r => r.status)")
        assert await page.evaluate(forged, alarm_id) == 403
        assert (await gw.journal.get_alarm(alarm_id)).state is not AlarmState.ACKNOWLEDGED

        shot = tmp_path / "console-board.png"
        await page.screenshot(path=str(shot))

        # Acknowledge in the browser, with the confirmation.
        told = len(twilio.messages)
        await page.click("#ack-button")
        await page.click("#confirm-ok")
        record = await eventually(lambda: _acknowledged(gw, alarm_id))
        assert record.acknowledged_by == "operator:wang"
        # The others texted get "taken by", through the double.
        await eventually(lambda: len(twilio.messages) > told)
        taken = [n for n in await gw.journal.notifications(alarm_id)
                 if n.kind is MessageKind.TAKEN]
        assert taken and all(n.phone in {m.to for m in twilio.messages} for n in taken)
        # ... and the second console sees the new state without a reload.
        await two.page.wait_for_selector(
            f".card[data-alarm='{alarm_id}'] .badge.st-acknowledged")

        # A notice (a low battery) appears on both consoles and is acknowledged in one.
        await publish(mosquitto, device.address, {"battery": 5, "linkquality": 80})
        notice = page.locator(".card.notice")
        await notice.first.wait_for(timeout=10_000)
        await two.page.locator(".card.notice").first.wait_for(timeout=10_000)
        await notice.first.locator("button").click()
        await two.page.locator(".card.notice").first.wait_for(state="detached",
                                                              timeout=10_000)
        assert await gw.journal.open_notices() == []

        # The timeline of the alarm, from the history page.
        await page.click("button[data-view='history']")
        await page.locator(f"tr[data-alarm='{alarm_id}']").click()
        await page.wait_for_selector("#timeline li")
        timeline = await page.inner_text("#timeline")
        assert "按下按钮" in timeline and "已接警" in timeline
        await page.screenshot(path=str(tmp_path / "console-timeline.png"))

        # English on one click.
        await page.click("#lang-button")
        await page.wait_for_selector("button[data-view='history']:has-text('History')")

        assert one.blocked == [] and two.blocked == [], "the console reached out"
        for png in ("console-board.png", "console-timeline.png"):
            assert (tmp_path / png).stat().st_size > 20_000
            if os.environ.get("UPDATE_SCREENSHOTS"):
                DOCS.mkdir(exist_ok=True)
                shutil.copy(tmp_path / png, DOCS / png)
        await one.context.close()
        await two.context.close()


async def _acknowledged(gw: Gateway, alarm_id: str) -> Any:
    assert gw.journal is not None
    record = await gw.journal.get_alarm(alarm_id)
    return record if record.state is AlarmState.ACKNOWLEDGED else None


class Link:
    """A TCP path from the browser to the gateway that the test can cut (a dropped
    network: open connections reset, new ones refused) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Link:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        self.up = False
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._conns.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_console_away_for_30_s_during_20_presses_shows_all_20(
        tmp_path: Path, twilio: TwilioDouble, mosquitto: Mosquitto, browser: Any) -> None:
    gw = console_gateway(tmp_path, twilio, mosquitto)
    async with running(gw):
        assert gw.control is not None and gw.mqtt is not None and gw.journal is not None
        await eventually(gw.mqtt.connected.is_set)
        port = int(gw.control.url.rsplit(":", 1)[1])
        async with Link(port) as link:
            await _away_and_back(gw, mosquitto, browser, link)


async def _away_and_back(gw: Gateway, mosquitto: Mosquitto, browser: Any, link: Link) -> None:
    assert gw.journal is not None
    tab = await Tab.open(browser, f"http://127.0.0.1:{link.port}")
    await tab.signed_in("wang")
    await tab.page.wait_for_selector("#banner-self-silent")  # the stream said hello

    link.cut()  # the network drops: the stream breaks, reconnects are refused
    await tab.page.wait_for_selector("#banner-conn")
    devices = z2m_devices(20)
    started = time.monotonic()
    for d in devices:
        await publish(mosquitto, d.address, {"action": "emergency"})
    await eventually(lambda: _open_count(gw, 20), timeout=30)
    await asyncio.sleep(max(0.0, 30 - (time.monotonic() - started)))
    assert await tab.page.locator(".card[data-alarm]").count() == 0
    link.up = True

    cards = tab.page.locator(".card[data-alarm]")
    await eventually(lambda: _count_is(cards, 20), timeout=30)
    shown = {await c.get_attribute("data-alarm") for c in await cards.all()}
    assert shown == {a.alarm_id for a in await gw.journal.open_alarms()}
    assert tab.blocked == []
    await tab.context.close()


async def _open_count(gw: Gateway, n: int) -> bool:
    assert gw.journal is not None
    return len(await gw.journal.open_alarms()) >= n


async def _count_is(locator: Any, n: int) -> bool:
    return int(await locator.count()) == n


async def test_the_alert_sounds_in_the_browser_and_silent_consoles_are_flagged(
        tmp_path: Path, twilio: TwilioDouble, mosquitto: Mosquitto, browser: Any) -> None:
    """The start-shift click turns a console's sound on; it then plays the center's alert
    (tone + announcement, rendered by the gateway); a silent or muted console is a warning
    on the others."""
    gw = console_gateway(tmp_path, twilio, mosquitto)
    async with running(gw):
        assert gw.control is not None and gw.mqtt is not None
        await eventually(gw.mqtt.connected.is_set)
        one = await Tab.open(browser, gw.control.url)
        two = await Tab.open(browser, gw.control.url)
        await one.signed_in("wang")
        await two.signed_in("li")
        await one.page.wait_for_selector(".silent-console:has-text('李值班')")

        await two.page.click("#sound-button")  # the gesture: the shift starts
        await two.page.wait_for_selector("#sound-button.on")
        await one.page.locator(".silent-console").wait_for(state="detached")
        await two.page.wait_for_selector(".silent-console:has-text('王值班')")

        device = z2m_devices(1)[0]
        async with two.page.expect_response("**/alert.wav", timeout=20_000) as answer:
            await publish(mosquitto, device.address, {"action": "emergency"})
        response = await answer.value  # the media element asks for ranges (206)
        assert response.status in (200, 206)
        assert response.headers["content-type"] == "audio/wav"
        whole = await two.context.request.get(response.url)  # the same session's cookie
        assert whole.status == 200
        wav = tmp_path / "browser-alert.wav"
        wav.write_bytes(await whole.body())
        seconds, peak = _wav_figures(wav)
        assert seconds > 1.5 and peak > 1000, (seconds, peak)  # tone and speech, not silence

        await two.page.click("#sound-button")  # muted
        await one.page.wait_for_selector(".silent-console:has-text('已静音')")
        assert one.blocked == [] and two.blocked == []
        await one.context.close()
        await two.context.close()


def _wav_figures(path: Path) -> tuple[float, int]:
    import array
    import wave

    with wave.open(str(path)) as w:
        frames = w.readframes(w.getnframes())
        seconds = w.getnframes() / w.getframerate()
    samples = array.array("h", frames)
    return seconds, max(abs(s) for s in samples)


async def test_responders_and_devices_pages(
        tmp_path: Path, twilio: TwilioDouble, mosquitto: Mosquitto, browser: Any) -> None:
    """The responders page changes a duty (confirmed, journaled with the operator, on
    every console); the devices page lists every device with its last report."""
    gw = console_gateway(tmp_path, twilio, mosquitto)
    async with running(gw):
        assert gw.control is not None and gw.mqtt is not None and gw.journal is not None
        assert gw.registry is not None and gw.geo is not None
        await eventually(gw.mqtt.connected.is_set)
        device = z2m_devices(1)[0]
        await publish(mosquitto, device.address, {"battery": 77, "linkquality": 90})
        await eventually(lambda: _seen(gw, device.device_id))
        tab = await Tab.open(browser, gw.control.url)
        await tab.signed_in("wang")
        page = tab.page

        await page.click("button[data-view='devices']")
        row = page.locator("#devices-body tr", has_text=device.device_id)
        await row.wait_for()
        assert "77%" in await row.inner_text()
        assert await page.locator("#devices-body tr").count() == len(gw.registry.devices)

        await page.click("button[data-view='responders']")
        responder = next(r for r in sorted(gw.registry.responders.values(),
                                           key=lambda r: r.responder_id)
                         if gw.geo.is_on_duty(r.responder_id))
        line = page.locator(f"tr[data-responder='{responder.responder_id}']")
        await line.locator("button").click()
        await page.click("#confirm-ok")
        await eventually(lambda: gw.geo.is_on_duty(responder.responder_id) is False)  # type: ignore[union-attr]
        overrides = {o.responder_id: o for o in await gw.journal.duty_overrides()}
        assert overrides[responder.responder_id].by == "operator:wang"
        await line.locator("td:nth-child(4):has-text('否')").wait_for()
        assert tab.blocked == []
        await tab.context.close()


async def _seen(gw: Gateway, device_id: str) -> bool:
    return any(d["device_id"] == device_id and d["battery_pct"] == 77
               for d in gw.device_health())
