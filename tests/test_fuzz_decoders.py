"""Property-based fuzzing of every decoder: only the typed error ever escapes (issue 9).

Plain ``st.text()``/``st.binary()`` did not find fault 1 (a ``ts`` of
``0001-01-01T00:00:00+08:00`` raised OverflowError): the inputs here are biased to
calendar and numeric edges -- times near ``datetime.min``/``max`` with offsets, Feb 29
and leap seconds, epoch numbers of every magnitude (seconds, ms, us, ns), floats at
inf/nan/-0.0/1e308, integers beyond 64 bits, unicode edges (lone surrogates, invalid
UTF-8, look-alike digits) -- and built as JSON *text*, so that literals no encoder
writes (``NaN``, ``1e400``, ``"\\ud800"``) reach the decoders too.

The rule checked is stricter than the boundary's: a decoder must raise its typed error
*by itself*. An error that the boundary made out of another exception (it chains the
original as ``__cause__``) is a decoder bug and fails here, though in production it
would only be journaled as malformed.

CI runs ``FUZZ_EXAMPLES`` (default 200) inputs per decoder; ``scripts/fuzz`` runs the
long campaign (atheris, coverage-guided, or these strategies in a loop).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from devices.callerid import CallerIdDecoder
from devices.contact_id import parse_contact_id
from devices.events import DeviceProtocolError, Frame
from devices.mqtt_payloads import OWN_EVENT_KINDS, MqttDecoder
from devices.responder_app import ResponderAppDecoder
from devices.surgard import DC4, SurGardDecoder

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])

# -- building blocks: JSON text with calendar, numeric and unicode edges ---------------------

NUMBER_LITERALS = [
    "0", "-0", "-0.0", "0.0", "1", "-1", "1e308", "-1e308", "1.7976931348623157e308",
    "5e-324", "1e-400", "1e400", "-1e400", "NaN", "-NaN", "Infinity", "-Infinity", "inf",
    "9007199254740993", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "18446744073709551615", "18446744073709551616", "1" + "0" * 400, "01", "1.", ".5",
    "1E+2", "0x10", "253402300799", "253402300800", "-62135596800", "4294967296",
]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
UNICODE_EDGES = ["", "\x00", "\x1f", "\u200f", "\ufeff", "\uffff", "\U0010ffff", "\ufb00",
                 "１２３", "٣٤", "𝟘𝟙", "İ", "ß", "\u0085", "\u2028", "e\u0301", "🆘"]
ESCAPED_SURROGATES = ['"\\ud800"', '"\\udfff"', '"\\ud800\\udc00"', '"\\udc00\\ud800"',
                      '"\\u0000"', '"\\uD83C"']
OFFSETS = ["Z", "z", "+00:00", "-00:00", "+08:00", "-08:00", "+23:59", "-23:59", "+24:00",
           "+14:00", "-12:00", "+0800", "+08", "+08:00:30", "+08:00:00.5", ""]


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any],
           tenths: int = 8) -> st.SearchStrategy[Any]:
    """``usual`` about ``tenths`` in ten times, else ``other``: keeps a message valid
    enough to get past the first checks and reach the fields behind them."""
    return st.integers(0, 9).flatmap(lambda roll: usual if roll < tenths else other)


def _float_text(value: float) -> str:
    return json.dumps(value)  # NaN, Infinity and -Infinity are written as such


# Epoch numbers of every magnitude, in seconds and as ms/us/ns would give them.
epoch_ints = st.integers(0, 21).flatmap(
    lambda k: st.integers(max(10**k - 3, -3), 10**k + 3)).map(str)
now_scaled = st.sampled_from([1, 1000, 10**6, 10**9]).flatmap(
    lambda scale: st.integers(1_700_000_000 * scale, 1_900_000_000 * scale)).map(str)
big_ints = st.integers(-(2**300), 2**300).map(str)
numbers = st.one_of(
    st.sampled_from(NUMBER_LITERALS), epoch_ints, now_scaled, big_ints,
    st.floats().map(_float_text), st.integers(-10**6, 10**6).map(str),
)

fixed_offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                              max_value=timedelta(hours=23, minutes=59)).map(timezone)
near_min = st.datetimes(min_value=datetime.min, max_value=datetime.min + timedelta(days=2),
                        timezones=fixed_offsets)
near_max = st.datetimes(min_value=datetime.max - timedelta(days=2), max_value=datetime.max,
                        timezones=fixed_offsets)
anywhen = st.datetimes(timezones=st.one_of(st.none(), fixed_offsets))


@st.composite
def hand_made_times(draw: st.DrawFn) -> str:
    """ISO-8601-like text around the calendar's edges, valid or not."""
    year = draw(st.one_of(st.sampled_from([0, 1, 2, 1970, 2000, 2016, 2023, 2024, 2100,
                                           9998, 9999]), st.integers(0, 9999)))
    month = draw(st.sampled_from([0, 1, 2, 12, 13]) | st.integers(1, 12))
    day = draw(st.sampled_from([0, 1, 28, 29, 30, 31, 32]))  # Feb 29 of any year
    hour = draw(st.sampled_from([0, 23, 24]))
    minute = draw(st.sampled_from([0, 59, 60]))
    second = draw(st.sampled_from([0, 59, 60, 61]))  # 60: a leap second
    fraction = draw(st.sampled_from(["", ".5", ".999999", ".9999999", ",5", "."]))
    sep = draw(st.sampled_from(["T", " ", "t", ""]))
    offset = draw(st.sampled_from(OFFSETS))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}" \
        f"{fraction}{offset}"


edge_times = st.one_of(near_min, near_max).map(datetime.isoformat)
iso_times = mostly(edge_times, st.one_of(anywhen.map(datetime.isoformat), hand_made_times()),
                   tenths=5)
strings = st.one_of(
    st.text(max_size=20).map(json.dumps),
    st.text(max_size=20).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.sampled_from(UNICODE_EDGES).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.sampled_from(ESCAPED_SURROGATES),
    iso_times.map(json.dumps),
)
timestamps = mostly(iso_times.map(json.dumps), st.one_of(numbers, strings), tenths=6)
scalars = st.one_of(numbers, strings, st.sampled_from(["true", "false", "null"]))


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs.items()) + "}"


json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(_array),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4).map(_object)),
    max_leaves=12,
)
deep = st.integers(1, 3000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))


def objects(fields: dict[str, st.SearchStrategy[str]],
            required: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """JSON object text with some of ``fields`` (always the required ones), extra keys."""
    @st.composite
    def build(draw: st.DrawFn) -> str:
        names = [n for n in fields if n in required or draw(st.booleans())]
        pairs = {n: draw(fields[n]) for n in names}
        if draw(st.integers(0, 9)) == 0:
            pairs[draw(st.text(max_size=6))] = draw(json_values)
        return _object(pairs)
    return build()


@st.composite
def corrupted(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as UTF-8, sometimes with invalid UTF-8 or a raw surrogate spliced in."""
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
    return data


def payloads(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return mostly(text.flatmap(corrupted), st.one_of(
        json_values.flatmap(corrupted), deep.map(str.encode), st.binary(max_size=48)))


ids = st.one_of(st.sampled_from(["kl-0042", "sos-0001", "R17", "", "+", "#", "a/b", "x" * 65,
                                 "\x00", "🆘", "\ufb00", "A7K3-9QXM"]),
                st.text(min_size=1, max_size=12))

# -- the decoders' messages -------------------------------------------------------------------

own_events = mostly(st.sampled_from(sorted(OWN_EVENT_KINDS)).map(json.dumps), strings)
own_messages = objects({"v": mostly(st.just("1"), scalars), "event": own_events,
                        "seq": numbers, "ts": timestamps, "battery": numbers, "rssi": numbers},
                       required=("v", "event"))
z2m_states = objects({"action": st.one_of(st.sampled_from(
    ["emergency", "sos", "single", "cancel", "disarm", "other"]).map(json.dumps), scalars),
    "battery": numbers, "voltage": numbers, "linkquality": numbers,
    "battery_low": scalars, "tamper": scalars})
availability = st.one_of(
    st.sampled_from(["online", "offline", " online\n", "ONLINE"]),
    objects({"state": st.one_of(st.sampled_from(['"online"', '"offline"']), scalars)}))

mqtt_messages = st.one_of(
    st.tuples(ids.map(lambda d: f"alarm/buttons/{d}/event"), payloads(own_messages)),
    st.tuples(ids.map(lambda d: f"zigbee2mqtt/{d}"), payloads(z2m_states)),
    st.tuples(ids.map(lambda d: f"zigbee2mqtt/{d}/availability"), payloads(availability)),
    st.tuples(st.sampled_from(["zigbee2mqtt/bridge/state", "alarm/buttons/x/status",
                               "zigbee2mqtt/a/b/c", "elsewhere", ""]), payloads(json_values)),
)

positions = objects({"lon": numbers, "lat": numbers, "accuracy": numbers,
                     "timestamp": timestamps}, required=("lon", "lat"))
app_messages = st.one_of(
    st.tuples(ids.map(lambda r: f"responders/{r}/location"), payloads(positions)),
    st.tuples(ids.map(lambda r: f"responders/{r}/duty"),
              payloads(objects({"on_duty": scalars}))),
    st.tuples(ids.map(lambda r: f"responders/{r}/ack"),
              payloads(objects({"alarm_id": st.one_of(ids.map(json.dumps), scalars)}))),
    st.tuples(ids.map(lambda a: f"alarm/alarms/{a}/ack"),
              payloads(objects({"by": st.one_of(ids.map(json.dumps), scalars)}))),
)

HEX_LOOKALIKES = "0123456789ABCDEFabcdef０１Ａ٣𝟘ﬀ \x00"
hexish = st.text(alphabet=HEX_LOOKALIKES, min_size=0, max_size=18)


@st.composite
def surgard_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # shaped like a Contact ID frame, with edge fields
        line = draw(st.sampled_from(["1", "123", "", "12"]))
        text = f"5{draw(hexish)[:2]}{line} {draw(st.sampled_from(['18', '98', '17']))}" \
            f"{draw(hexish)[:4]}{draw(st.sampled_from('ERPX1'))}{draw(hexish)[:8]}"
        return text.encode("utf-8", "surrogatepass") + DC4
    if kind == 1:
        return b"1" + draw(st.binary(max_size=3)) + b" " * draw(st.integers(0, 12)) + b"@" + DC4
    if kind == 2:
        return draw(st.sampled_from([DC4, b"\r\n", b"\x00", b"\x06", b"\x15"]))
    return draw(st.binary(max_size=200))


callerid_lines = st.one_of(
    st.sampled_from(["RING", "OK", "DATE = 0229", "TIME = 2460", "NMBR = P", "NMBR = O",
                     "NMBR =", "NMBR = OUT OF AREA", "NAME = U.S.ROBOTICS"]),
    numbers.map(lambda n: f"NMBR = {n}"),
    st.text(alphabet="0123456789+-() #*１٣𝟘", max_size=40).map(lambda n: f"NMBR = {n}"),
    st.sampled_from(UNICODE_EDGES).map(lambda s: f"NAME = {s}"),
    st.text(max_size=30),
)


@st.composite
def callerid_streams(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.one_of(
        callerid_lines.map(lambda line: line.encode("utf-8", "surrogatepass")),
        st.sampled_from(INVALID_UTF8), st.binary(max_size=40), st.just(b"x" * 300)),
        max_size=8))
    ends = draw(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b""]), min_size=len(parts),
                         max_size=len(parts)))
    return b"".join(p + e for p, e in zip(parts, ends, strict=True))


def chunked(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut at arbitrary points, as a serial port might deliver it."""
    @st.composite
    def cut(draw: st.DrawFn) -> list[bytes]:
        whole = draw(data)
        points = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=4)))
        edges = [0, *points, len(whole)]
        return [whole[a:b] for a, b in itertools.pairwise(edges)]
    return cut()


# -- the rule: only the typed error, and raised by the decoder itself -------------------------


def only_typed_error(call: Callable[[], object], raw: bytes) -> None:
    """Run one decode; anything but a DeviceProtocolError it raised itself fails."""
    error: DeviceProtocolError | None = None
    try:
        call()
    except DeviceProtocolError as exc:
        error = exc
    if error is not None:
        assert error.raw == raw
        # The boundary chains what it converted: that is a decoder bug to fix.
        assert error.__cause__ is None, f"decoder bug caught only at the boundary: {error!r}"


def check_frames(frames: list[Frame]) -> None:
    for frame in frames:
        if frame.error is not None:
            assert isinstance(frame.error, DeviceProtocolError)
            assert frame.error.__cause__ is None, \
                f"decoder bug caught only at the boundary: {frame.error!r}"
        for event in frame.events:
            assert isinstance(event.raw, bytes)


BUTTONS = MqttDecoder()
APP = ResponderAppDecoder()


def check_mqtt(message: tuple[str, bytes]) -> None:
    topic, payload = message
    only_typed_error(lambda: BUTTONS.decode(topic, payload), payload)
    try:
        events = BUTTONS.decode(topic, payload)
    except DeviceProtocolError:
        return
    for event in events:
        BUTTONS.confirmation(event)  # never raises either


def check_app(message: tuple[str, bytes]) -> None:
    topic, payload = message
    only_typed_error(lambda: APP.decode(topic, payload), payload)


def check_surgard(chunks: list[bytes]) -> None:
    decoder = SurGardDecoder()
    for chunk in chunks:
        check_frames(decoder.feed(chunk))


def check_callerid(chunks: list[bytes]) -> None:
    decoder = CallerIdDecoder()
    for chunk in chunks:
        check_frames(decoder.feed(chunk))


def check_contact_id(message: str | bytes) -> None:
    raw = message if isinstance(message, bytes) else message.encode("utf-8", "backslashreplace")
    only_typed_error(lambda: parse_contact_id(message), raw)


contact_id_messages = st.one_of(hexish, st.text(max_size=20), st.binary(max_size=20),
                                hexish.map(lambda s: s.encode("utf-8", "surrogatepass")))

CAMPAIGNS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "mqtt-buttons": (mqtt_messages, check_mqtt),
    "responder-app": (app_messages, check_app),
    "surgard": (chunked(st.lists(surgard_frames(), max_size=6).map(b"".join)), check_surgard),
    "callerid": (chunked(callerid_streams()), check_callerid),
    "contact-id": (contact_id_messages, check_contact_id),
}
"""Every decoder's inputs and check, by name (``scripts/fuzz`` runs these too)."""


@FUZZ
@given(message=mqtt_messages)
def test_mqtt_button_decoder(message: tuple[str, bytes]) -> None:
    check_mqtt(message)


@FUZZ
@given(message=app_messages)
def test_responder_app_decoder(message: tuple[str, bytes]) -> None:
    check_app(message)


@FUZZ
@given(chunks=CAMPAIGNS["surgard"][0])
def test_surgard_decoder(chunks: list[bytes]) -> None:
    check_surgard(chunks)


@FUZZ
@given(chunks=CAMPAIGNS["callerid"][0])
def test_callerid_decoder(chunks: list[bytes]) -> None:
    check_callerid(chunks)


@FUZZ
@given(message=contact_id_messages)
def test_contact_id_decoder(message: str | bytes) -> None:
    check_contact_id(message)


def test_the_strategies_find_fault_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the root cause of fault 1 put back, these strategies find it (plain ones did
    not): the boundary still turns it into the typed error, and the check notices."""
    import devices.mqtt_payloads as module

    def moment_before_the_fix(value: object) -> datetime | None:
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                return None
            return None if moment.tzinfo is None else moment.astimezone(UTC)
        return None

    monkeypatch.setattr(module, "_moment", moment_before_the_fix)
    hunt = settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
        given(message=st.tuples(st.just("alarm/buttons/kl-0042/event"),
                                payloads(own_messages)))(check_mqtt))
    with pytest.raises(AssertionError, match=r"caught only at the boundary.*OverflowError"):
        hunt()
