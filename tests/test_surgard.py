"""Sur-Gard MLR2 / System III automation output: framing, parsing, resynchronisation."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    EventKind,
    Frame,
    Qualifier,
)
from devices.surgard import ACK, DC4, NAK, SurGardDecoder, encode_heartbeat, encode_mlr2

FUZZ = settings(max_examples=100, deadline=None)
MANUAL_EXAMPLE = b"5011 181234E12101001\x14"
HEARTBEAT = b"1011           @    \x14"


def feed_chunks(chunks: list[bytes], decoder: SurGardDecoder | None = None) -> list[Frame]:
    decoder = decoder or SurGardDecoder()
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


def only_event(frame: Frame) -> DeviceEvent:
    assert frame.ok, frame.error
    assert len(frame.events) == 1
    return frame.events[0]


def test_control_bytes() -> None:
    assert (ACK, NAK, DC4) == (b"\x06", b"\x15", b"\x14")


def test_manual_example() -> None:
    [frame] = SurGardDecoder().feed(MANUAL_EXAMPLE)
    assert frame.raw == MANUAL_EXAMPLE
    assert only_event(frame) == DeviceEvent(
        kind=EventKind.EMERGENCY,  # 121 duress
        address=DeviceAddress(AddressScheme.CONTACT_ID, "1234"),
        raw=MANUAL_EXAMPLE,
        code="121",
        qualifier=Qualifier.NEW,
        group="01",
        zone="001",
        extra=(("receiver", "01"), ("line", "1")),
    )


@pytest.mark.parametrize(
    ("frame", "account", "kind", "qualifier", "code", "group", "zone", "receiver", "line"),
    [
        (b"5011 181234E10101001\x14", "1234", EventKind.EMERGENCY, Qualifier.NEW,
         "101", "01", "001", "01", "1"),
        (b"5011 181234R10101001\x14", "1234", EventKind.EMERGENCY, Qualifier.RESTORE,
         "101", "01", "001", "01", "1"),
        (b"5022 180572P64101003\x14", "0572", EventKind.INACTIVITY, Qualifier.PREVIOUS,
         "641", "01", "003", "02", "2"),
        (b"5013 180001E40601007\x14", "0001", EventKind.CANCEL, Qualifier.NEW,
         "406", "01", "007", "01", "3"),
        (b"5011 981234E60200000\x14", "1234", EventKind.TEST, Qualifier.NEW,
         "602", "00", "000", "01", "1"),
        (b"5011 18BEEFE38401002\x14", "BEEF", EventKind.LOW_BATTERY, Qualifier.NEW,
         "384", "01", "002", "01", "1"),
        (b"5011 18beefE38401002\x14", "BEEF", EventKind.LOW_BATTERY, Qualifier.NEW,
         "384", "01", "002", "01", "1"),
        # System III: three-digit line number.
        (b"503004 181234E12001001\x14", "1234", EventKind.EMERGENCY, Qualifier.NEW,
         "120", "01", "001", "03", "004"),
        (b"5011 181234E57001001\x14", "1234", EventKind.TROUBLE, Qualifier.NEW,
         "570", "01", "001", "01", "1"),
    ],
)  # fmt: skip
def test_captured_contact_id_frames(
    frame: bytes,
    account: str,
    kind: EventKind,
    qualifier: Qualifier,
    code: str,
    group: str,
    zone: str,
    receiver: str,
    line: str,
) -> None:
    event = only_event(SurGardDecoder().feed(frame)[0])
    assert event.address == DeviceAddress(AddressScheme.CONTACT_ID, account)
    assert (event.kind, event.qualifier) == (kind, qualifier)
    assert (event.code, event.group, event.zone) == (code, group, zone)
    assert event.extra == (("receiver", receiver), ("line", line))
    assert event.raw == frame


@pytest.mark.parametrize(
    ("frame", "receiver", "line"),
    [
        (HEARTBEAT, "01", "1"),
        (b"1021           @    \x14", "02", "1"),
        (b"103001         @    \x14", "03", "001"),
        (b"101@\x14", "01", None),
    ],
)
def test_heartbeats(frame: bytes, receiver: str, line: str | None) -> None:
    event = only_event(SurGardDecoder().feed(frame)[0])
    assert event.kind is EventKind.HEARTBEAT
    assert event.address == DeviceAddress(AddressScheme.RECEIVER, f"surgard:{receiver}")
    assert dict(event.extra).get("line") == line
    assert event.raw == frame


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"5011 181234X12101001\x14", "qualifier must be E, R or P"),
        (b"5011 181234e12101001\x14", "qualifier must be E, R or P"),
        (b"5011 171234E12101001\x14", "message type must be 18 or 98"),
        (b"5011 181234E1210100\x14", "15 characters after the space, got 14"),
        (b"5011 181234E121010011\x14", "15 characters after the space, got 16"),
        (b"50111181234E12101001\x14", "must be 5RRL 18"),
        (b"5A11 181234E12101001\x14", "receiver number is malformed"),
        (b"501A 181234E12101001\x14", "line number is malformed"),
        (b"5011 1812G4E12101001\x14", "account is malformed"),
        (b"5011 181234E1Z101001\x14", "event code is malformed"),
        (b"5011 181234E121Q1001\x14", "group is malformed"),
        (b"5011 181234E121010Z1\x14", "zone is malformed"),
        ("5011 181234E121010０1\x14".encode(), "not ASCII"),
        (b"1011       X   @    \x14", "malformed sur-gard heartbeat"),
        (b"2011 18123412101001\x14", "unsupported sur-gard message type '2'"),
        (b"\xff\xfe\x14", "not ASCII"),
    ],
)
def test_malformed_frames_become_error_frames(frame: bytes, reason: str) -> None:
    [result] = SurGardDecoder().feed(frame)
    assert not result.ok
    assert result.events == ()
    assert result.raw == frame
    assert result.error is not None
    assert reason in result.error.reason
    assert result.error.raw == frame


def test_noise_between_frames_is_ignored() -> None:
    stream = b"\r\n\x00" + MANUAL_EXAMPLE + b"\r\n" + HEARTBEAT + b"\x00\x00\r" + MANUAL_EXAMPLE
    frames = SurGardDecoder().feed(stream)
    assert [f.raw for f in frames] == [MANUAL_EXAMPLE, HEARTBEAT, MANUAL_EXAMPLE]
    assert all(f.ok for f in frames)


def test_trailing_cr_before_dc4_is_tolerated() -> None:
    [frame] = SurGardDecoder().feed(b"5011 181234E12101001\r\n\x14")
    assert only_event(frame).code == "121"


def test_bare_terminators_produce_nothing() -> None:
    assert SurGardDecoder().feed(b"\x14\r\n\x14\x00\x14") == []


def test_garbage_between_frames_is_nak_and_stream_continues() -> None:
    stream = MANUAL_EXAMPLE + b"@#%garbage\x14" + HEARTBEAT
    first, bad, beat = SurGardDecoder().feed(stream)
    assert first.ok
    assert not bad.ok
    assert bad.raw == b"@#%garbage\x14"
    assert only_event(beat).kind is EventKind.HEARTBEAT


def test_garbage_glued_to_a_frame_rejects_it_and_the_resend_succeeds() -> None:
    # Half-parsing "xx5011 ..." could shift fields onto another account: NAK it and
    # let the receiver resend, as it does up to three times.
    decoder = SurGardDecoder()
    [rejected] = decoder.feed(b"xx" + MANUAL_EXAMPLE)
    assert not rejected.ok
    [resent] = decoder.feed(MANUAL_EXAMPLE)
    assert only_event(resent).code == "121"


def test_oversized_run_is_one_error_then_resynchronises() -> None:
    decoder = SurGardDecoder(max_frame=32)
    junk = b"9" * 100
    frames = decoder.feed(junk)
    assert len(frames) == 1
    assert not frames[0].ok
    assert frames[0].raw == b"9" * 33
    assert decoder.feed(b"more junk without terminator") == []
    assert decoder.pending == 0
    # The rest of the oversized frame ends at this DC4; the next frame is clean.
    [frame] = decoder.feed(b"tail\x14" + MANUAL_EXAMPLE)
    assert only_event(frame).code == "121"


def test_oversized_frame_within_one_chunk() -> None:
    frames = SurGardDecoder(max_frame=32).feed(b"5" * 40 + b"\x14" + HEARTBEAT)
    assert [f.ok for f in frames] == [False, True]
    assert frames[0].raw == b"5" * 33


def test_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    body = MANUAL_EXAMPLE[:-1]
    [frame] = SurGardDecoder(max_frame=len(body)).feed(MANUAL_EXAMPLE)
    assert frame.ok
    [frame] = SurGardDecoder(max_frame=len(body) - 1).feed(MANUAL_EXAMPLE)
    assert not frame.ok


def test_partial_frame_is_held_until_dc4() -> None:
    decoder = SurGardDecoder()
    assert decoder.feed(MANUAL_EXAMPLE[:7]) == []
    assert decoder.pending == 7
    [frame] = decoder.feed(MANUAL_EXAMPLE[7:])
    assert frame.raw == MANUAL_EXAMPLE
    assert decoder.pending == 0


def test_configured_kinds() -> None:
    decoder = SurGardDecoder(kinds={"570": EventKind.EMERGENCY})
    [frame] = decoder.feed(b"5011 181234E57001001\x14")
    assert only_event(frame).kind is EventKind.EMERGENCY


def test_rejects_non_positive_max_frame() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        SurGardDecoder(max_frame=0)


def test_encoders_match_the_manual() -> None:
    assert encode_mlr2("01", "1", "1234", Qualifier.NEW, "121", "01", "001") == MANUAL_EXAMPLE
    assert encode_mlr2("03", "004", "1234", Qualifier.NEW, "120") == b"503004 181234E12001001\x14"
    assert encode_mlr2("01", "1", "1234", Qualifier.NEW, "602", mt="98").startswith(b"5011 98")
    assert encode_heartbeat() == HEARTBEAT
    assert encode_heartbeat("07") == b"1071           @    \x14"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"receiver": "1"}, "receiver"),
        ({"line": "12"}, "line"),
        ({"account": "12345"}, "account"),
        ({"code": "12"}, "event code"),
        ({"group": "G1"}, "group"),
        ({"zone": "1"}, "zone"),
    ],
)
def test_encode_rejects_bad_fields(kwargs: dict[str, str], reason: str) -> None:
    args = {"receiver": "01", "line": "1", "account": "1234", "code": "101"}
    args |= {"group": "01", "zone": "001"} | kwargs
    with pytest.raises(ValueError, match=reason):
        encode_mlr2(
            args["receiver"],
            args["line"],
            args["account"],
            Qualifier.NEW,
            args["code"],
            args["group"],
            args["zone"],
        )
    with pytest.raises(ValueError, match="message type"):
        encode_mlr2("01", "1", "1234", Qualifier.NEW, "101", mt="17")
    with pytest.raises(ValueError, match="receiver"):
        encode_heartbeat("1")


HEX = "0123456789ABCDEF"
DIGITS = "0123456789"
frames_strategy = st.one_of(
    st.builds(
        encode_mlr2,
        receiver=st.text(DIGITS, min_size=2, max_size=2),
        line=st.text(DIGITS, min_size=1, max_size=1) | st.text(DIGITS, min_size=3, max_size=3),
        account=st.text(HEX, min_size=4, max_size=4),
        qualifier=st.sampled_from(Qualifier),
        code=st.text(HEX, min_size=3, max_size=3),
        group=st.text(HEX, min_size=2, max_size=2),
        zone=st.text(HEX, min_size=3, max_size=3),
        mt=st.sampled_from(["18", "98"]),
    ),
    st.builds(encode_heartbeat, st.text(DIGITS, min_size=2, max_size=2)),
)  # fmt: skip
noise = st.sampled_from([b"", b"\r\n", b"\x00", b"\r", b"\n\n"])


@FUZZ
@given(
    items=st.lists(st.tuples(noise, frames_strategy), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_valid_stream_decodes_the_same_in_any_chunking(
    items: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(n + f for n, f in items)
    whole = SurGardDecoder().feed(stream)
    assert [f.raw for f in whole] == [f for _, f in items]
    assert all(f.ok and len(f.events) == 1 for f in whole)
    assert feed_chunks(split_at(stream, cuts)) == whole
    assert feed_chunks([bytes([b]) for b in stream]) == whole


@FUZZ
@given(
    receiver=st.text(DIGITS, min_size=2, max_size=2),
    line=st.text(DIGITS, min_size=1, max_size=1),
    account=st.text(HEX + "abcdef", min_size=4, max_size=4),
    qualifier=st.sampled_from(Qualifier),
    code=st.text(HEX, min_size=3, max_size=3),
    zone=st.text(HEX, min_size=3, max_size=3),
)
def test_encode_decode_round_trip(
    receiver: str, line: str, account: str, qualifier: Qualifier, code: str, zone: str
) -> None:
    raw = encode_mlr2(receiver, line, account, qualifier, code, "01", zone)
    event = only_event(SurGardDecoder().feed(raw)[0])
    assert event.address.value == account.upper()
    assert (event.qualifier, event.code, event.zone) == (qualifier, code, zone)
    assert event.extra == (("receiver", receiver), ("line", line))


arbitrary_stream = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([DC4, b"\r\n", b"\x00", MANUAL_EXAMPLE, HEARTBEAT, b"5", b"1", b" "]),
    ),
    max_size=20,
).map(b"".join)


@FUZZ
@given(stream=arbitrary_stream, cuts=st.lists(st.integers(0, 800), max_size=10))
def test_arbitrary_bytes_never_raise_and_chunking_never_matters(
    stream: bytes, cuts: list[int]
) -> None:
    whole = SurGardDecoder(max_frame=48).feed(stream)
    chunked = feed_chunks(split_at(stream, cuts), SurGardDecoder(max_frame=48))
    assert summary(chunked) == summary(whole)
    for frame in whole:
        assert frame.ok != (frame.error is not None)
        assert frame.ok == (len(frame.events) == 1)
        assert len(frame.raw) <= 48 + len(DC4)


def test_any_other_exception_becomes_an_error_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: the decoder's boundary holds even for a bug nobody has found yet."""
    import devices.surgard as module

    real = module._parse_contact_id

    def broken(text: str, raw: bytes, kinds: object) -> object:
        if "0002" in text:
            raise OverflowError("date value out of range")
        return real(text, raw, kinds)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_parse_contact_id", broken)
    decoder = SurGardDecoder()
    good = encode_mlr2("01", "1", "0001", Qualifier.NEW, "101")
    bad = encode_mlr2("01", "1", "0002", Qualifier.NEW, "101")
    data = good + bad + b"5011 18"
    frames = decoder.feed(data)
    assert [f.ok for f in frames] == [True, False]
    assert frames[1].raw == data and frames[1].error is not None
    assert "OverflowError" in frames[1].error.reason
    assert decoder.pending == 0  # the partial frame went with the failure
    assert [f.ok for f in decoder.feed(good)] == [True]
