"""SMS-SUBMIT PDU encoding and decoding: published vectors, boundaries, round trips."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devices.gsm_pdu import (
    GSM7_ALPHABET,
    GSM7_EXTENSION,
    MAX_PARTS,
    Pdu,
    PduError,
    decode_submit,
    encode_submit,
    segments_needed,
)
from gateway.smstext import GSM7_BASIC, GSM7_EXTENDED, segments

TO = "+8613812345678"

# Published vectors. "hellohello" (dreamfabric.com SMS-SUBMIT walkthrough,
# AT+CMGS=23); the others from python-gsmmodem's test_pdu.py.
HELLOHELLO = "0011000B916407281553F80000AA0AE8329BFD4697D9EC37"
HELLO_WORLD = "0001000B917228001011F100000CC8329BFD065DDF72363904"
UCS2_WITH_SMSC = "07914400000000F01100099121436587F90008F40A4E16754C60A8597DFF01"
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipisicing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua.Ut enim ad minim veniam, quinostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.Duis aute irure "
    "dolor in reprehenderit in voluptate velit esse cillum doloe eu fugiat nulla pariatur."
    "Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum"
)
# Encoded with TP-RD (reject duplicates) set: first octet 45; ours is 41.
LOREM_PDUS = [
    "0045000B915121551532F40000A0050003000301986F79B90D4AC3E7F53688FC66BFE5A0799A0E0AB7CB7416"
    "68FC76CFCB637A995E9783C2E4343C3D4F8FD3EE33A8CC4ED359A079990C22BF41E5747DDE7E9341F4721BFE"
    "9683D2EE719A9C26D7DD74509D0E6287C56F791954A683C86FF65B5E06B5C36777181466A7E3F5B0AB4A0795"
    "DDE936284C06B5D3EE741B642FBBD3E1360B14AFA7DD",
    "0045000B915121551532F40000A0050003000302DE73BABC4E0695F165F9384D0FD3D36F37A8CE6687DBE337"
    "881D16BFE5E939C89D9EA741753A28CC4EC7EB6938A88C0795C3A0F1BBDD7E93DFA0F1DB3D2FC7EB61BA8B58"
    "4FCF41E13ABD0C4ACBEBF23288FC66BFE5A0B41B242FC3E56574D94D2ECBD37450DA0DB2BFD975383D4C2F83"
    "EC65769A0E2ACFE765D038CD66D7DB20F29BFD2E83CA",
    "0045000B915121551532F400008C050003000303EA2073FD9C0ED341EE3A9B1D06C1C3F274985E97BB8AF871"
    "194E2FD7E5A079DA4D07BDC7E370791CA683C675789A1CA687E920F7DB0D82CBDF6972D94D6781E675371D94"
    "7683C675363C0C8AD7D3A0B7D99C1EA7C32072795E96D7DD7450FBCD66A7E9A0B03BDD06A5C9A0F29C0E6287"
    "C56F79BD0D",
]


def _only(pdus: list[Pdu]) -> Pdu:
    assert len(pdus) == 1
    return pdus[0]


# ----------------------------------------------------------------------------- vectors


def test_hellohello_seven_bit_packing() -> None:
    pdu = _only(encode_submit("+46708251358", "hellohello", validity_minutes=4 * 1440))
    assert pdu.hex == HELLOHELLO
    assert pdu.tpdu_length == 23
    assert pdu.hex.endswith("0AE8329BFD4697D9EC37")  # UDL 10 septets, packed text
    assert decode_submit(HELLOHELLO) == ("+46708251358", "hellohello", None)


def test_without_validity_period() -> None:
    pdu = _only(encode_submit("+27820001111", "Hello World!", validity_minutes=None))
    assert pdu.hex == HELLO_WORLD
    assert pdu.tpdu_length == len(HELLO_WORLD) // 2 - 1


def test_ucs2_with_smsc_and_validity() -> None:
    pdu = _only(
        encode_submit(
            "+123456789", "世界您好！", validity_minutes=52 * 7 * 1440, smsc="+44000000000"
        )
    )
    assert pdu.hex == UCS2_WITH_SMSC
    # AT+CMGS counts the octets after the SMSC field (07 + 7 octets).
    assert pdu.tpdu_length == len(UCS2_WITH_SMSC) // 2 - 8
    assert decode_submit(UCS2_WITH_SMSC) == ("+123456789", "世界您好！", None)


def test_ucs2_is_utf16_big_endian() -> None:
    pdu = _only(encode_submit(TO, "你好", validity_minutes=None))
    assert pdu.hex.endswith("0008" + "04" + "4F60597D")  # PID, DCS 08, UDL 4, U+4F60 U+597D


def test_concatenated_seven_bit_with_header_fill_bit() -> None:
    pdus = encode_submit("+15125551234", LOREM, validity_minutes=None)
    assert [p.hex for p in pdus] == ["0041" + p[4:] for p in LOREM_PDUS]
    assert [decode_submit(p.hex)[2] for p in pdus] == [(0, 3, 1), (0, 3, 2), (0, 3, 3)]
    assert "".join(decode_submit(p.hex)[1] for p in pdus) == LOREM


@pytest.mark.parametrize(
    ("text", "packed", "septets"),
    [
        ("a[]{}€", "E10D6FE3DBA036A94D19", 11),
        ("[{abc}]~", "1BDE0615168F37A98D6FD303", 13),
    ],
)
def test_extension_characters_are_escaped(text: str, packed: str, septets: int) -> None:
    pdu = _only(encode_submit(TO, text, validity_minutes=None))
    assert pdu.hex.endswith(f"{septets:02X}{packed}")
    assert decode_submit(pdu.hex)[1] == text


@pytest.mark.parametrize(
    "pdu",
    [
        "07911326040000F0310D0B911326880736F40000A90FF7FBDD454E87CDE1B0DB357EB701",
        "07914346466554F601000B914316565811F9000806304253F68449",
    ],
)
def test_decodes_submits_from_other_encoders(pdu: str) -> None:
    to, text, udh = decode_submit(pdu)
    assert (to, text, udh) in {
        ("+31628870634", "www.diafaan.com", None),
        ("+34616585119", "あ叶葉", None),
    }


@pytest.mark.parametrize(
    ("minutes", "vp"),
    [
        (1, 0x00),
        (5, 0x00),
        (6, 0x01),
        (30, 5),
        (720, 143),
        (721, 144),
        (16 * 60, 151),
        (1440, 0xA7),
        (1441, 168),
        (3 * 1440, 169),
        (30 * 1440, 196),
        (30 * 1440 + 1, 197),
        (5 * 7 * 1440, 197),
        (63 * 7 * 1440, 255),
        (10**9, 255),
    ],
)
def test_relative_validity_rounds_up(minutes: int, vp: int) -> None:
    pdu = _only(encode_submit("+46708251358", "x", validity_minutes=minutes))
    assert pdu.hex[26:28] == f"{vp:02X}"


def test_status_report_request_and_reference() -> None:
    first = encode_submit(TO, "x", request_status_report=True)[0].hex[2:4]
    assert int(first, 16) == 0x01 | 0x10 | 0x20
    parts = encode_submit(TO, "x" * 200, reference=0xAB)
    assert [decode_submit(p.hex)[2] for p in parts] == [(0xAB, 2, 1), (0xAB, 2, 2)]


def test_alphabet_matches_the_segment_counter() -> None:
    assert len(GSM7_ALPHABET) == 128
    assert set(GSM7_ALPHABET) == GSM7_BASIC
    assert set(GSM7_EXTENSION) == GSM7_EXTENDED


# ----------------------------------------------------------------------------- boundaries


def _parts(text: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    out = []
    for pdu in encode_submit(TO, text, reference=7):
        to, part, udh = decode_submit(pdu.hex)
        assert to == TO
        out.append((part, udh))
    return out


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("a" * 160, [160]),
        ("a" * 161, [153, 8]),
        ("a" * 306, [153, 153]),
        ("a" * 307, [153, 153, 1]),
        ("€" * 80, [80]),  # 160 septets
        ("€" * 81, [76, 5]),  # 152 septets: the 77th pair would straddle the boundary
        ("a" * 152 + "€" + "b" * 10, [152, 11]),  # the escape pair moves to part 2
        ("中" * 70, [70]),
        ("中" * 71, [67, 4]),
        ("中" * 134, [67, 67]),
        ("中" * 66 + "😀" + "文" * 5, [66, 6]),  # the surrogate pair moves to part 2
        ("中" * 68 + "😀", [69]),  # 70 UTF-16 units: still one message
        ("中" * 69 + "😀", [67, 3]),
        ("", [0]),
    ],
)
def test_parts_at_the_boundaries(text: str, sizes: list[int]) -> None:
    parts = _parts(text)
    assert [len(p) for p, _ in parts] == sizes
    assert "".join(p for p, _ in parts) == text
    total = len(sizes)
    expected = [None] if total == 1 else [(7, total, i) for i in range(1, total + 1)]
    assert [udh for _, udh in parts] == expected
    assert segments_needed(text) == total == segments(text)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("number", ["8613812345678", "+", "+86 138", "+86138a", "+" + "1" * 21])
def test_destination_must_be_international(number: str) -> None:
    with pytest.raises(PduError, match="destination"):
        encode_submit(number, "x")


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(PduError, match="reference"):
        encode_submit(TO, "x", reference=256)
    with pytest.raises(PduError, match="validity"):
        encode_submit(TO, "x", validity_minutes=0)
    with pytest.raises(PduError, match="smsc"):
        encode_submit(TO, "x", smsc="13800000000")
    with pytest.raises(PduError, match="surrogate"):
        encode_submit(TO, "中\ud800")
    with pytest.raises(PduError, match=f"more than {MAX_PARTS}"):
        encode_submit(TO, "中" * (67 * MAX_PARTS + 1))
    assert issubclass(PduError, ValueError)


@pytest.mark.parametrize(
    ("pdu", "reason"),
    [
        ("zz", "hexadecimal"),
        ("", "SMSC length"),
        # An SMS-DELIVER (python-gsmmodem's test vector) is not a submit.
        ("06917228195339040B917228214365F700003130805120618005D4F29C2E03", "SMS-SUBMIT"),
        (HELLOHELLO[:-2], "user data"),
        (HELLOHELLO + "00", "extra octets"),
        # 8-bit data coding: binary, not text.
        ("0591721891F101000B917228214365F700040C48656C6C6F20776F726C6421", "8-bit"),
        # A 12-digit address holding 11 digits and a filler (python-gsmmodem's
        # "invalid" vector).
        ("0041010C910661345542F60008A0050003000301306F3044", "filler"),
        ("0001000B917228001011F1000803004100", "odd number"),
        ("0001000B917228001011F1000804D800D800", "UTF-16"),
        ("0001000B917228001011F10000A1" + "00" * 141, "exceeds"),
        ("0041000B917228001011F100080106", "header longer"),
        ("0041000B917228001011F1000806050003000203", "out of range"),
    ],
)
def test_decode_rejects_malformed(pdu: str, reason: str) -> None:
    with pytest.raises(PduError, match=reason) as info:
        decode_submit(pdu)
    assert info.value.pdu == pdu


# ----------------------------------------------------------------------------- properties

numbers = st.from_regex(r"\+[0-9]{1,20}", fullmatch=True)
gsm7_text = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENDED), max_size=480)
any_text = st.text(max_size=400)  # every category except lone surrogates, astral included


@settings(max_examples=300, deadline=None)
@given(
    to=numbers,
    text=st.one_of(gsm7_text, any_text),
    reference=st.integers(0, 255),
    validity=st.none() | st.integers(1, 10**7),
    status_report=st.booleans(),
    smsc=st.none() | numbers,
)
@example(to=TO, text="€" * 77, reference=0, validity=None, status_report=False, smsc=None)
@example(to=TO, text="中" * 67 + "😀", reference=0, validity=None, status_report=False, smsc=None)
def test_round_trip(
    to: str,
    text: str,
    reference: int,
    validity: int | None,
    status_report: bool,
    smsc: str | None,
) -> None:
    pdus = encode_submit(
        to,
        text,
        reference=reference,
        validity_minutes=validity,
        request_status_report=status_report,
        smsc=smsc,
    )
    assert len(pdus) == segments_needed(text) == segments(text)
    texts = []
    for seq, pdu in enumerate(pdus, start=1):
        raw = bytes.fromhex(pdu.hex)
        assert pdu.hex == pdu.hex.upper()
        assert pdu.tpdu_length == len(raw) - 1 - raw[0]
        got_to, part, udh = decode_submit(pdu.hex)
        assert got_to == to
        assert udh == (None if len(pdus) == 1 else (reference, len(pdus), seq))
        # The user data never exceeds one SMS: 140 octets after the TPDU header
        # (first octet, MR, address, PID, DCS, optional VP, UDL).
        header = 6 + (len(to) - 1 + 1) // 2 + (validity is not None) + 1
        assert pdu.tpdu_length - header <= 140
        texts.append(part)
    assert "".join(texts) == text


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_pdu_error(data: bytes) -> None:
    with contextlib.suppress(PduError):
        to, text, udh = decode_submit(data.hex())
        assert isinstance(to, str)
        assert isinstance(text, str)
        assert udh is None or 1 <= udh[2] <= udh[1]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_decoding_arbitrary_strings_raises_only_pdu_error(text: str) -> None:
    with contextlib.suppress(PduError):
        decode_submit(text)
