"""Polling Twilio for replies and delivery reports, for a center behind NAT.

Twilio cannot reach a gateway that has no public URL, so no webhook
(:mod:`gateway.webhooks`) arrives there. Instead :class:`InboundPoller` reads
the Messages list every few seconds for inbound messages to our numbers
(de-duplicated by SID, oldest first, backing off on errors), and
:class:`StatusPoller` fetches the messages whose final status is still
unknown. Both make their API calls through :class:`gateway.sms.TwilioSender`
(its one listing, :meth:`~gateway.sms.TwilioSender.list_messages`, and its one
status fetch, :meth:`~gateway.sms.TwilioSender.fetch_status`), so they share
its request timeout, its bound on requests in flight and its error
classification: every failure is an :class:`~gateway.sms.SmsSendError`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import structlog

from devices.backoff import Backoff
from gateway.journal import Journal, JournalError
from gateway.redact import mask_phone
from gateway.replies import (
    MAX_REPLY_CHARS,
    InboundReply,
    ReplyHandler,
    StatusHandler,
    StatusUpdate,
    is_e164,
)
from gateway.sms import ListedMessage, SmsSendError, TwilioSender

__all__ = ["InboundPoller", "StatusPoller"]

log = structlog.get_logger(__name__)

# Pages of 100 read per number and poll; more would mean a backlog of over
# 5,000 replies within the overlap window, which is not a staff's answers.
_MAX_PAGES: Final = 50


class InboundPoller:
    """Reads inbound messages to ``our_numbers`` from Twilio's REST API, for a
    center that cannot receive webhooks.

    Each poll lists, through ``sender``, the messages sent to each of our
    numbers since the watermark :attr:`since` (less ``overlap_s``, for Twilio's
    indexing delay), skips the SIDs in :attr:`seen`, and calls ``on_reply`` for
    each new one, oldest first. The text ``on_reply`` returns is texted back to
    the sender from the number it wrote to (as TwiML does for webhooks) unless
    ``send_replies`` is false. Nothing is persisted here: the daemon may save
    :attr:`since` and :attr:`seen` and pass them back after a restart. Without
    them, polling starts at ``clock()`` less ``overlap_s``: older messages are
    not replayed, and a local clock ahead of Twilio's by more than ``overlap_s``
    would skip the replies of that first moment, so a restarted daemon should
    pass ``since`` (e.g. when it texted the oldest open alarm). The watermark
    then only moves with Twilio's own timestamps, never with the local clock.

    A failing ``on_reply`` is retried on the next polls, up to
    ``max_handler_attempts`` calls, then the message is given up (logged).
    """

    def __init__(
        self,
        sender: TwilioSender,
        *,
        our_numbers: Sequence[str],
        on_reply: ReplyHandler,
        interval_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        since: datetime | None = None,
        seen: Iterable[str] = (),
        overlap_s: float = 120.0,
        max_backoff_s: float = 60.0,
        send_replies: bool = True,
        max_handler_attempts: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        if not our_numbers:
            raise ValueError("our_numbers is empty")
        if interval_s <= 0 or overlap_s < 0:
            raise ValueError("need interval_s > 0 and overlap_s >= 0")
        if max_handler_attempts < 1:
            raise ValueError("max_handler_attempts must be >= 1")
        if since is not None and since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        self._sender = sender
        self._numbers = tuple(dict.fromkeys(our_numbers))
        self._on_reply = on_reply
        self._interval = interval_s
        self._sleep = sleep
        self._overlap = timedelta(seconds=overlap_s)
        self._send_replies = send_replies
        self._max_attempts = max_handler_attempts
        self._backoff = Backoff(interval_s, max(max_backoff_s, interval_s), rng)
        self._since = (
            since.astimezone(UTC) if since is not None else datetime.fromtimestamp(clock(), UTC)
        )
        # SID -> Twilio's date of the message; None for SIDs restored by the
        # caller, until a listing shows them (or shows they are too old).
        self._seen: dict[str, datetime | None] = dict.fromkeys(seen)
        self._failures: dict[str, int] = {}

    @property
    def since(self) -> datetime:
        """The watermark (UTC): the newest Twilio date of a message listed so far."""
        return self._since

    @property
    def seen(self) -> frozenset[str]:
        """SIDs already handled that a coming poll could still list."""
        return frozenset(self._seen)

    async def run(self) -> None:
        """Poll until cancelled. API errors are logged and backed off (capped,
        jittered); nothing but cancellation ends the loop."""
        log.info("inbound_poll.started", numbers=len(self._numbers), interval_s=self._interval)
        while True:
            try:
                await self.poll_once()
            except SmsSendError as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "inbound_poll.failed",
                    error=str(exc),
                    failures=self._backoff.failures,
                    retry_in_s=round(delay, 3),
                )
            else:
                self._backoff.reset()
                delay = self._interval
            await self._sleep(delay)

    async def poll_once(self) -> list[InboundReply]:
        """One poll of every number; the replies handed to ``on_reply``.

        Raises :class:`~gateway.sms.SmsSendError` when a listing fails (its
        ``timed_out`` set when Twilio did not answer in time); the watermark
        then stays.
        """
        floor = self._since - self._overlap
        records: list[ListedMessage] = []
        for number in self._numbers:
            listing = await self._sender.list_messages(since=floor, to=number, max_pages=_MAX_PAGES)
            if listing.truncated:
                log.warning("inbound_poll.truncated", to=mask_phone(number), pages=listing.pages)
            # Twilio lists newest first; reversed, messages of the same second
            # stay in the order they arrived.
            records.extend(reversed(listing.messages))
        newest = self._since
        fresh: list[tuple[datetime, ListedMessage]] = []
        for record in records:
            when = record.when
            if not record.sid or when is None or record.direction != "inbound" or when < floor:
                continue
            newest = max(newest, when)
            if record.sid in self._seen:
                self._seen[record.sid] = when
            else:
                fresh.append((when, record))
        handled: list[InboundReply] = []
        # Stable: equal dates keep the arrival order established above.
        for when, record in sorted(fresh, key=lambda item: item[0]):
            reply = await self._handle(when, record)
            if reply is not None:
                handled.append(reply)
        self._since = newest
        self._prune()
        return handled

    def _prune(self) -> None:
        floor = self._since - self._overlap
        # Listings never return anything older than the floor again, and a
        # restored SID absent from a complete listing is outside its window.
        self._seen = {sid: when for sid, when in self._seen.items() if when and when >= floor}
        self._failures = {sid: n for sid, n in self._failures.items() if sid not in self._seen}

    async def _handle(self, when: datetime, record: ListedMessage) -> InboundReply | None:
        sid = record.sid
        if not is_e164(record.from_) or not record.to:
            log.warning("inbound_poll.sender_not_e164", sid=sid, sender=mask_phone(record.from_))
            self._seen[sid] = when
            return None
        reply = InboundReply.read(sid, record.from_, record.to, record.body, when.timestamp())
        log.info("inbound_poll.reply", sid=sid, sender=mask_phone(reply.from_phone),
                 alarm_ref=reply.alarm_ref, intent=reply.intent, chars=len(reply.body))
        try:
            answer = await self._on_reply(reply)
        # The callback is the daemon's code: whatever it raises must not stop
        # the intake of the replies behind this one.
        except Exception:
            attempts = self._failures.get(sid, 0) + 1
            self._failures[sid] = attempts
            if attempts < self._max_attempts:
                log.exception("inbound_poll.handler_failed", sid=sid, attempt=attempts)
                return None
            log.exception("inbound_poll.handler_gave_up", sid=sid, attempts=attempts)
            self._seen[sid] = when
            return None
        self._seen[sid] = when
        self._failures.pop(sid, None)
        if answer and self._send_replies:
            await self._send_answer(reply, answer)
        return reply

    async def _send_answer(self, reply: InboundReply, answer: str) -> None:
        try:
            answer_sid = await self._sender.send_reply(
                reply.from_phone, answer[:MAX_REPLY_CHARS], from_number=reply.to_phone
            )
        except SmsSendError as exc:
            log.warning("inbound_poll.answer_failed", sid=reply.message_sid, error=str(exc))
            return
        log.info("inbound_poll.answered", sid=reply.message_sid, answer_sid=answer_sid)


class StatusPoller:
    """Fetches the current status of our messages through ``sender``, for a
    center that no status callback can reach. At most ``concurrency`` fetches
    of one round run at once (the sender bounds all its requests as well)."""

    def __init__(self, sender: TwilioSender, *, concurrency: int = 4) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._sender = sender
        self._concurrency = concurrency

    async def poll_once(self, sids: Iterable[str]) -> list[StatusUpdate]:
        """The current status of each message in ``sids`` (in that order, each
        once). A message that cannot be fetched now (API error, timeout, unknown
        SID) is logged and left out; ask again on the next round."""
        unique = list(dict.fromkeys(sids))
        semaphore = asyncio.Semaphore(self._concurrency)

        async def fetch(sid: str) -> StatusUpdate | None:
            try:
                async with semaphore:
                    status, error_code = await self._sender.fetch_status(sid)
            except SmsSendError as exc:
                log.warning("status_poll.fetch_failed", sid=sid, error=str(exc))
                return None
            return StatusUpdate(sid, status, error_code, None)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(fetch(sid), name=f"status_poll.{sid}") for sid in unique]
        updates = [update for task in tasks if (update := task.result()) is not None]
        log.info("status_poll.done", asked=len(unique), answered=len(updates))
        return updates

    async def run(self, journal: Journal, on_status: StatusHandler, every_s: float, *,
                  clock: Callable[[], float] = time.time) -> None:
        """Every ``every_s``, ask for the messages the journal still waits to hear about
        (accepted or sent, older than one interval) and hand each answer to
        ``on_status``. Until cancelled; a journal that cannot be read skips a round."""
        while True:
            await asyncio.sleep(every_s)
            try:
                pending = await journal.unfinished_deliveries(clock() - every_s)
            except JournalError as exc:
                log.warning("status_poll.journal_unreadable", error=str(exc))
                continue
            for update in await self.poll_once(r.sid for r in pending if r.sid):
                await on_status(update)
