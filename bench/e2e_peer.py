"""The peer of bench/e2e.py: a bare MQTT -> HTTP forward, as a few lines of Node-RED would be.

Subscribes (QoS 1) to the buttons' topics and POSTs one SMS per message to Twilio's
``Messages.json`` (here: the double) with Basic auth; prints ``ready`` once subscribed and
each answer's status, which bench/e2e.py counts. Its own file so that its process holds
only aiomqtt and aiohttp (its RSS is one of the figures)::

    python bench/e2e_peer.py PORT BASE_URL ACCOUNT_SID AUTH_TOKEN
"""

from __future__ import annotations

import asyncio
import base64
import sys

import aiohttp
import aiomqtt

TO = "+8613700000000"
FROM = "+15005550006"


async def forward(port: int, base_url: str, sid: str, token: str) -> None:
    url = f"{base_url}/2010-04-01/Accounts/{sid}/Messages.json"
    auth = "Basic " + base64.b64encode(f"{sid}:{token}".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as http, \
            aiomqtt.Client("127.0.0.1", port) as mqtt:

        async def post(topic: str) -> None:
            async with http.post(url, data={"To": TO, "From": FROM,
                                            "Body": f"SOS {topic}"}) as answer:
                await answer.read()
            sys.stdout.write(f"{answer.status}\n")
            sys.stdout.flush()

        await mqtt.subscribe([("zigbee2mqtt/#", 1), ("alarm/buttons/+/event", 1)])
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        async with asyncio.TaskGroup() as tg:
            async for message in mqtt.messages:
                tg.create_task(post(str(message.topic)))


if __name__ == "__main__":
    asyncio.run(forward(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
