"""The Twilio double in its own process, with an HTTP control endpoint for faults.

The chaos suite runs the double as a separate process (as the gateway meets Twilio in
production: another host), so faults cannot be injected by calling methods on it. This
wrapper serves the double on ``--port`` and a small control API on ``--control-port``,
built only on the double's public fault API (``FaultyTwilioDouble.outage``,
``FaultyTwilioDouble.inject`` with ``Fault``, tests/support/twilio_faults.py)::

    POST /outage   {"on": true, "refuse": true}      connection refused until ended
    POST /outage   {"on": true}                      every request answered 503
    POST /outage   {"on": false}                     healthy again
    POST /inject   {"status": 429, "count": 50, "retry_after": 1}
    GET  /state    {"messages": N, "pending_faults": K, "requests": R}

    python -m tests.chaos.twilio_chaos --port 8099 --control-port 8098 --auth-token T

Test-only; both ports bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from aiohttp import web

from gateway.sandbox.twilio_double import DEFAULT_ACCOUNT_SID
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

MAX_INJECT = 100_000


def control_app(double: FaultyTwilioDouble) -> web.Application:
    async def outage(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        await double.outage(bool(body["on"]), refuse=bool(body.get("refuse", False)))
        return web.json_response({"ok": True})

    async def inject(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        count = int(body.get("count", 1))
        if not 1 <= count <= MAX_INJECT:
            raise web.HTTPBadRequest(text=f"count must be 1..{MAX_INJECT}")
        retry_after = body.get("retry_after")
        fault = Fault.status(int(body["status"]), retry_after=retry_after)
        double.inject(*([fault] * count))
        return web.json_response({"ok": True, "pending_faults": double.pending_faults})

    async def state(_request: web.Request) -> web.Response:
        return web.json_response({"messages": len(double.messages),
                                  "pending_faults": double.pending_faults,
                                  "requests": len(double.requests)})

    app = web.Application()
    app.add_routes([web.post("/outage", outage), web.post("/inject", inject),
                    web.get("/state", state)])
    return app


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FaultyTwilioDouble(account_sid=args.account_sid, auth_token=args.auth_token,
                            host="127.0.0.1", port=args.port) as double:
        runner = web.AppRunner(control_app(double), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", args.control_port).start()
            print(f"twilio_chaos: double {double.base_url} control "
                  f"http://127.0.0.1:{args.control_port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.twilio_chaos")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--account-sid", default=DEFAULT_ACCOUNT_SID)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
