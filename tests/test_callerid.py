"""Hayes modem caller ID lines: calls become EMERGENCY events, chatter is ignored."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.callerid import (
    CALL_CODE,
    DEFAULT_INIT_COMMANDS,
    PRIVATE,
    UNAVAILABLE,
    CallerIdDecoder,
    encode_callerid_block,
    normalise_number,
)
from devices.events import AddressScheme, DeviceAddress, DeviceEvent, EventKind, Frame

FUZZ = settings(max_examples=100, deadline=None)
DOCUMENTED_BLOCK = (
    b"RING\r\n\r\nDATE = 1015\r\nTIME = 2038\r\n"
    b"NMBR = 8475550001\r\nNAME = U.S.ROBOTICS\r\n\r\nRING\r\n"
)


def feed_chunks(chunks: list[bytes], decoder: CallerIdDecoder | None = None) -> list[Frame]:
    decoder = decoder or CallerIdDecoder()
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def summary(frames: list[Frame]) -> list[tuple[bytes, tuple[DeviceEvent, ...], str | None]]:
    """Frames as comparable values (exceptions compare by identity)."""
    return [(f.raw, f.events, None if f.error is None else str(f.error)) for f in frames]


def events(frames: list[Frame]) -> list[DeviceEvent]:
    return [event for frame in frames for event in frame.events]


def test_init_commands() -> None:
    assert DEFAULT_INIT_COMMANDS == ("ATZ", "AT+VCID=1")


def test_documented_block_in_the_us() -> None:
    frames = CallerIdDecoder(default_region="US").feed(DOCUMENTED_BLOCK)
    assert [f.raw for f in frames] == [
        b"RING",
        b"DATE = 1015",
        b"TIME = 2038",
        b"NMBR = 8475550001",
        b"NAME = U.S.ROBOTICS",
        b"RING",
    ]
    assert all(f.ok for f in frames)
    assert events(frames) == [
        DeviceEvent(
            kind=EventKind.EMERGENCY,
            address=DeviceAddress(AddressScheme.PHONE, "+18475550001"),
            raw=b"NMBR = 8475550001",
            code=CALL_CODE,
            extra=(("date", "1015"), ("time", "2038"), ("number", "8475550001")),
        )
    ]


def test_number_invalid_in_region_is_kept_as_given() -> None:
    [event] = events(CallerIdDecoder().feed(DOCUMENTED_BLOCK))  # default region CN
    assert event.address == DeviceAddress(AddressScheme.PHONE, "8475550001")
    assert event.kind is EventKind.EMERGENCY
    assert ("number", "8475550001") not in event.extra


@pytest.mark.parametrize(
    ("nmbr", "address"),
    [
        ("13800138000", "+8613800138000"),  # mobile
        ("+8613800138000", "+8613800138000"),
        ("008613800138000", "+8613800138000"),
        ("05466222222", "+865466222222"),  # Dongying landline with area code
        ("12", "12"),  # too short to be a number anywhere: kept as given
        ("P", PRIVATE),
        ("p", PRIVATE),
        ("PRIVATE", PRIVATE),
        ("O", UNAVAILABLE),
        ("OUT OF AREA", UNAVAILABLE),
        ("", UNAVAILABLE),
    ],
)
def test_nmbr_values(nmbr: str, address: str) -> None:
    [frame] = CallerIdDecoder().feed(f"NMBR = {nmbr}\r\n".encode())
    [event] = frame.events
    # Unidentified calls are still alarms: the operator must hear about them.
    assert event.kind is EventKind.EMERGENCY
    assert event.code == CALL_CODE
    assert event.address == DeviceAddress(AddressScheme.PHONE, address)


def test_chinese_name_before_nmbr_is_attached() -> None:
    block = "RING\r\nDATE = 0301\r\nTIME = 0815\r\nNAME = 张秀英\r\nNMBR = 13800138000\r\n"
    [event] = events(CallerIdDecoder().feed(block.encode()))
    assert event.address.value == "+8613800138000"
    assert dict(event.extra) == {
        "date": "0301",
        "time": "0815",
        "name": "张秀英",
        "number": "13800138000",
    }


def test_name_after_nmbr_does_not_leak_into_the_next_call() -> None:
    first = encode_callerid_block("13800138000", "王建国", datetime(2024, 10, 15, 20, 38))
    second = b"DATE = 1015\r\nTIME = 2041\r\nNMBR = 13900139000\r\n"
    call_1, call_2 = events(CallerIdDecoder().feed(first + second))
    assert "name" not in dict(call_1.extra)
    assert dict(call_2.extra) == {"date": "1015", "time": "2041", "number": "13900139000"}


def test_ring_starts_a_new_block() -> None:
    stream = b"DATE = 1015\r\nTIME = 2038\r\nRING\r\nNMBR = 13800138000\r\n"
    [event] = events(CallerIdDecoder().feed(stream))
    assert dict(event.extra) == {"number": "13800138000"}


def test_compact_field_form() -> None:
    stream = b"DATE=1015\r\nTIME=2038\r\nNMBR=13800138000\r\nNAME=LI\r\n"
    [event] = events(CallerIdDecoder().feed(stream))
    assert event.address.value == "+8613800138000"
    assert dict(event.extra)["time"] == "2038"


@pytest.mark.parametrize("terminator", [b"\r\n", b"\r", b"\n", b"\n\r"])
def test_any_line_terminator(terminator: bytes) -> None:
    stream = terminator.join([b"RING", b"NMBR = 13800138000", b"RING", b""])
    frames = CallerIdDecoder().feed(stream)
    assert [f.raw for f in frames] == [b"RING", b"NMBR = 13800138000", b"RING"]
    assert [e.address.value for e in events(frames)] == ["+8613800138000"]


@pytest.mark.parametrize(
    "line", [b"RING", b"OK", b"ERROR", b"ATZ", b"AT+VCID=1", b"NO CARRIER", b"MESG = 0F"]
)
def test_modem_chatter_has_no_events(line: bytes) -> None:
    [frame] = CallerIdDecoder().feed(line + b"\r\n")
    assert frame == Frame(line)


def test_blank_and_noise_lines_produce_nothing() -> None:
    assert CallerIdDecoder().feed(b"\r\n\r\n  \r\n\x00\r\n") == []


def test_overlong_line_is_one_error_then_recovers() -> None:
    decoder = CallerIdDecoder(max_line=20)
    frames = decoder.feed(b"X" * 100)
    assert len(frames) == 1
    assert not frames[0].ok
    assert frames[0].raw == b"X" * 21
    assert decoder.feed(b"Y" * 50) == []
    # The terminator ends the skipped line; the next line decodes normally.
    [call] = decoder.feed(b"\r\nNMBR = 13800138000\r\n")
    assert [e.address.value for e in call.events] == ["+8613800138000"]


def test_invalid_utf8_line_is_an_error_frame() -> None:
    line = b"NAME = \xd5\xc5\xc8\xfd"  # GBK, not UTF-8
    [frame] = CallerIdDecoder().feed(line + b"\r\n")
    assert not frame.ok
    assert frame.raw == line
    assert frame.error is not None
    assert "not UTF-8" in frame.error.reason


def test_garbled_nmbr_line_still_raises_the_alarm() -> None:
    [frame] = CallerIdDecoder().feed(b"NMBR = 138\xff0013800\r\n")
    [event] = frame.events
    assert event.kind is EventKind.EMERGENCY
    assert event.address.value == "138\\xff0013800"


def test_chinese_name_split_inside_a_character() -> None:
    block = "NAME = 张秀英\r\nNMBR = 13800138000\r\n".encode()
    decoder = CallerIdDecoder()
    frames = feed_chunks([block[:8], block[8:9], block[9:]], decoder)
    assert dict(events(frames)[0].extra)["name"] == "张秀英"


def test_encode_block() -> None:
    block = encode_callerid_block("13800138000", "张三", datetime(2024, 3, 1, 8, 5))
    expected = "RING\r\nDATE = 0301\r\nTIME = 0805\r\nNMBR = 13800138000\r\nNAME = 张三\r\nRING\r\n"
    assert block == expected.encode()
    assert b"NAME" not in encode_callerid_block("P", when=datetime(2024, 3, 1))


def test_normalise_number() -> None:
    assert normalise_number(" 138-0013-8000 ") == "+8613800138000"
    assert normalise_number("8475550001", "US") == "+18475550001"
    assert normalise_number("not a number") == "not a number"


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="max_line"):
        CallerIdDecoder(max_line=0)
    with pytest.raises(ValueError, match="unknown phone region 'XX'"):
        CallerIdDecoder(default_region="XX")


mobile = st.from_regex(r"13[0-9]{9}", fullmatch=True)
names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    max_size=12,
).map(str.strip)


@FUZZ
@given(
    calls=st.lists(st.tuples(mobile, names), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=12),
)
def test_valid_stream_decodes_the_same_in_any_chunking(
    calls: list[tuple[str, str]], cuts: list[int]
) -> None:
    when = datetime(2024, 10, 15, 20, 38)
    stream = b"".join(encode_callerid_block(n, name, when) for n, name in calls)
    whole = CallerIdDecoder().feed(stream)
    assert [e.address.value for e in events(whole)] == [f"+86{n}" for n, _ in calls]
    assert all(f.ok for f in whole)
    assert summary(feed_chunks(split_at(stream, cuts))) == summary(whole)


arbitrary_stream = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b"RING", b"NMBR = ", b"NMBR=P", b"NAME = ", b"\xe5\xbc"]
        ),
    ),
    max_size=20,
).map(b"".join)


@FUZZ
@given(stream=arbitrary_stream, cuts=st.lists(st.integers(0, 800), max_size=10))
def test_arbitrary_bytes_never_raise_and_chunking_never_matters(
    stream: bytes, cuts: list[int]
) -> None:
    whole = CallerIdDecoder(max_line=32).feed(stream)
    chunked = feed_chunks(split_at(stream, cuts), CallerIdDecoder(max_line=32))
    assert summary(chunked) == summary(whole)
    for frame in whole:
        assert frame.ok != (frame.error is not None)
        assert len(frame.raw) <= 33
        assert all(e.kind is EventKind.EMERGENCY for e in frame.events)


def test_any_other_exception_becomes_an_error_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: the decoder's boundary holds even for a bug nobody has found yet."""
    import devices.callerid as module

    real = module.normalise_number

    def broken(number: str, region: str = "CN") -> str:
        if number == "13800000000":
            raise RecursionError("maximum recursion depth exceeded")
        return real(number, region)

    monkeypatch.setattr(module, "normalise_number", broken)
    decoder = CallerIdDecoder()
    data = b"RING\r\nNMBR = 8475550001\r\nNMBR = 13800000000\r\nNAME = X"
    frames = decoder.feed(data)
    assert [f.ok for f in frames] == [True, True, False]
    assert frames[2].raw == data and frames[2].error is not None
    assert "RecursionError" in frames[2].error.reason
    [frame] = decoder.feed(b"NMBR = 8475550001\r\n")
    assert frame.ok and frame.events[0].kind is EventKind.EMERGENCY
