"""The alarm lifecycle, and each notification's, as transition tables.

    received -> journaled -> notifying -> notified -> acknowledged -> resolved
                                  |            |            ^
                                  +------------+------------+
                       (acknowledged, cancelled or resolved from any open state)

``notified -> notifying`` is an escalation wave. ``cancelled`` is the elder (or the
unit) cancelling; it stays open until an operator resolves it, because a cancel
after a real fall is common and someone should still call back.

The notification table (one SMS to one person) is further down, with its own typed
error, :class:`IllegalNotificationTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class AlarmState(StrEnum):
    RECEIVED = "received"
    JOURNALED = "journaled"
    NOTIFYING = "notifying"
    NOTIFIED = "notified"
    ACKNOWLEDGED = "acknowledged"
    CANCELLED = "cancelled"
    RESOLVED = "resolved"


_S = AlarmState
TRANSITIONS: dict[AlarmState, frozenset[AlarmState]] = {
    _S.RECEIVED: frozenset({_S.JOURNALED}),
    _S.JOURNALED: frozenset({_S.NOTIFYING, _S.ACKNOWLEDGED, _S.CANCELLED, _S.RESOLVED}),
    _S.NOTIFYING: frozenset({_S.NOTIFIED, _S.ACKNOWLEDGED, _S.CANCELLED, _S.RESOLVED}),
    _S.NOTIFIED: frozenset({_S.NOTIFYING, _S.ACKNOWLEDGED, _S.CANCELLED, _S.RESOLVED}),
    _S.ACKNOWLEDGED: frozenset({_S.RESOLVED, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.ACKNOWLEDGED, _S.RESOLVED}),
    _S.RESOLVED: frozenset(),
}

OPEN_STATES = frozenset(s for s in AlarmState if s is not AlarmState.RESOLVED)
#: States in which the command center's alert keeps sounding.
ALERTING_STATES = frozenset({_S.JOURNALED, _S.NOTIFYING, _S.NOTIFIED})


class IllegalTransition(Exception):
    """A state change the lifecycle does not allow (e.g. acknowledging a resolved alarm)."""

    def __init__(self, alarm_id: str, current: AlarmState, wanted: AlarmState) -> None:
        super().__init__(f"alarm {alarm_id}: cannot go from {current} to {wanted}")
        self.alarm_id = alarm_id
        self.current = current
        self.wanted = wanted


def check_transition(alarm_id: str, current: AlarmState, wanted: AlarmState) -> None:
    if wanted not in TRANSITIONS[current]:
        raise IllegalTransition(alarm_id, current, wanted)


# -- notifications ------------------------------------------------------------------------
#
# One SMS (or fallback text) to one person, as the journal's ``notifications`` row sees it:
#
#     pending -> sending -> accepted -> sent -> delivered
#                   |          |          +--> undelivered | failed (carrier)
#                   |          +--> delivered | undelivered | failed
#                   +--> failed (refused, or given up)
#     any state but acknowledged -> acknowledged (the recipient took the alarm)
#
# ``sending`` -> ``sending`` is one more attempt. A carrier status only moves a message
# forwards: a late "sent" after "delivered" is not in the table, so it is ignored. A
# message the carrier could not deliver stays ``undelivered``; a resend through the GSM
# fallback is a row of its own (kind ``fallback``), so the record of what happened is kept.


class NotificationState(StrEnum):
    PENDING = "pending"  # planned, not yet sent
    SENDING = "sending"  # the request may have left: outcome unknown after a crash
    ACCEPTED = "accepted"  # Twilio (or the GSM modem) took it
    SENT = "sent"  # the carrier has it
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"  # refused, given up, or failed at the carrier
    ACKNOWLEDGED = "acknowledged"  # this recipient took the alarm
    # A supervisor's message in a storm (gateway/digest.py): journaled, not sent alone,
    # waiting for the supervisor's next digest SMS...
    HELD = "held"
    DIGESTED = "digested"  # ...which named this alarm (the digest itself is another row)
    WITHDRAWN = "withdrawn"  # the alarm closed before the digest: never sent


_N = NotificationState
_REACHED = frozenset({_N.ACCEPTED, _N.SENT, _N.DELIVERED, _N.UNDELIVERED, _N.FAILED})
NOTIFICATION_TRANSITIONS: dict[NotificationState, frozenset[NotificationState]] = {
    _N.PENDING: frozenset({_N.SENDING, _N.FAILED, _N.ACKNOWLEDGED}) | _REACHED,
    # A carrier status may be the first news of an accepted request (reconciliation).
    _N.SENDING: frozenset({_N.SENDING, _N.ACKNOWLEDGED}) | _REACHED,
    _N.ACCEPTED: frozenset({_N.SENT, _N.DELIVERED, _N.UNDELIVERED, _N.FAILED,
                            _N.ACKNOWLEDGED}),
    _N.SENT: frozenset({_N.DELIVERED, _N.UNDELIVERED, _N.FAILED, _N.ACKNOWLEDGED}),
    _N.DELIVERED: frozenset({_N.ACKNOWLEDGED}),
    _N.UNDELIVERED: frozenset({_N.ACKNOWLEDGED}),
    # They answered, so something reached them (an SMS the carrier called failed, or
    # another channel): who took the alarm is the truth that matters.
    _N.FAILED: frozenset({_N.ACKNOWLEDGED}),
    _N.ACKNOWLEDGED: frozenset(),
    # A held row becomes the digest's own SMS (sending), or one the digest names.
    _N.HELD: frozenset({_N.SENDING, _N.DIGESTED, _N.WITHDRAWN, _N.ACKNOWLEDGED}),
    _N.DIGESTED: frozenset({_N.ACKNOWLEDGED}),
    _N.WITHDRAWN: frozenset(),
}

#: Rows a restart must reconcile with Twilio before anything is resent.
UNFINISHED_NOTIFICATION_STATES = frozenset({_N.PENDING, _N.SENDING})
#: Rows that never told their recipient of their alarm by an SMS of its own: no
#: follow-up ("taken by", "cancelled") goes to them.
UNTOLD_NOTIFICATION_STATES = frozenset({_N.HELD, _N.DIGESTED, _N.WITHDRAWN})


class IllegalNotificationTransition(Exception):
    """A notification state change the table does not allow (e.g. acknowledged -> accepted)."""

    def __init__(self, notification_id: int, current: NotificationState,
                 wanted: NotificationState) -> None:
        super().__init__(f"notification {notification_id}: cannot go from {current} to {wanted}")
        self.notification_id = notification_id
        self.current = current
        self.wanted = wanted


def notification_may(current: NotificationState, wanted: NotificationState) -> bool:
    """True when ``current -> wanted`` is in the table (the same state always is)."""
    return wanted is current or wanted in NOTIFICATION_TRANSITIONS[current]


def check_notification_transition(notification_id: int, current: NotificationState,
                                  wanted: NotificationState) -> None:
    if not notification_may(current, wanted):
        raise IllegalNotificationTransition(notification_id, current, wanted)
