"""The alarm lifecycle as a transition table.

    received -> journaled -> notifying -> notified -> acknowledged -> resolved
                                  |            |            ^
                                  +------------+------------+
                       (acknowledged, cancelled or resolved from any open state)

``notified -> notifying`` is an escalation wave. ``cancelled`` is the elder (or the
unit) cancelling; it stays open until an operator resolves it, because a cancel
after a real fall is common and someone should still call back.
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
