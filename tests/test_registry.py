"""Registry loader: the sample district, located errors for broken inputs, normalisation."""

from __future__ import annotations

import codecs
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phonenumbers
import pytest
from structlog.testing import capture_logs

from devices.events import AddressScheme, DeviceAddress
from gateway.model import FacilityKind, LineType, LonLat, ResponderRole
from gateway.registry import (
    MAX_SHOWN_PROBLEMS,
    REGISTRY_FILES,
    FieldValueError,
    RegistryError,
    RegistryProblem,
    load_registry,
    normalise_device_address,
    normalise_phone,
    registry_summary,
)

SAMPLE = Path(__file__).resolve().parent.parent / "config" / "sample"
SAMPLE_BBOX = (118.5216, 37.5697, 118.5784, 37.6103)

# A small valid registry; each broken-input case changes one thing in it.
VALID: dict[str, str] = {
    "elders.csv": (
        "elder_id,name,address,community,lon,lat,phone,notes\n"
        "E1,王桂兰,垦利区胜利社区胜利路1号,胜利社区,118.55,37.59,0546-2900001,高血压\n"
        "E2,李建国,垦利区建设社区建设路2号,建设社区,118.56,37.60,,\n"
    ),
    "devices.csv": (
        "device_id,elder_id,scheme,address,model,test_interval_h\n"
        "D1,E1,mqtt,zigbee2mqtt/sos-E1,TS0215A_sos,24\n"
        "D2,E2,contact_id,1b2c,CID dialer,24\n"
        "D3,E2,phone,0546-2900002,SOS phone,\n"
    ),
    "contacts.csv": (
        "elder_id,name,relation,phone,language\n"
        "E1,王伟,儿子,13805460001,zh\n"
        "E2,李芳,女儿,+86 139 0546 0002,en\n"
        "E2,李强,儿子,15005460005,\n"
    ),
    "responders.csv": (
        "responder_id,name,phone,community,role,on_duty,lon,lat\n"
        "R1,张强,15005460003,胜利社区,grid_leader,yes,118.551,37.591\n"
        "R2,赵敏,18605460004,建设社区,supervisor,0,118.561,37.601\n"
    ),
    "facilities.csv": (
        "facility_id,name,kind,duty_phone,lon,lat,address\n"
        "F1,垦利区人民医院,hospital,0546-2900009,118.545,37.58,垦利区胜利路12号\n"
        "F2,胜利社区卫生服务站,clinic,0546-2900010,118.549,37.589,\n"
    ),
}


def write_registry(
    directory: Path, changes: Mapping[str, str | bytes | None] | None = None
) -> Path:
    """Write VALID with ``changes`` applied (None deletes a file) and return the directory."""
    files: dict[str, str | bytes | None] = {**VALID, **(changes or {})}
    for name, content in files.items():
        if content is None:
            continue
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (directory / name).write_bytes(data)
    return directory


def problems_of(directory: Path, **kwargs: object) -> tuple[RegistryProblem, ...]:
    with pytest.raises(RegistryError) as info:
        load_registry(directory, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def located(problems: tuple[RegistryProblem, ...]) -> list[tuple[str, int | None, str | None]]:
    return [(p.file.name, p.line, p.field) for p in problems]


def edit(name: str, old: str, new: str) -> dict[str, str | bytes | None]:
    text = VALID[name]
    assert old in text, f"test bug: {old!r} not in {name}"
    return {name: text.replace(old, new, 1)}


def append(name: str, row: str) -> dict[str, str | bytes | None]:
    return {name: VALID[name] + row + "\n"}


def voice_only(name: str, *values: str, text: str | None = None) -> dict[str, str | bytes | None]:
    """VALID[name] (or ``text``) with a voice_only column: ``values`` for its rows, in order."""
    header, *rows = (VALID[name] if text is None else text).splitlines()
    assert len(rows) == len(values), f"test bug: {name} has {len(rows)} rows"
    lines = [f"{header},voice_only"] + [f"{r},{v}" for r, v in zip(rows, values, strict=True)]
    return {name: "\n".join(lines) + "\n"}


# ---------------------------------------------------------------------------
# The sample district


def test_sample_loads_within_its_service_area() -> None:
    reg = load_registry(SAMPLE, bbox=SAMPLE_BBOX)
    assert len(reg.elders) == 88
    assert len(reg.responders) == 143
    for device in reg.devices.values():
        assert reg.device_by_address(device.device_address) is device
        assert reg.elder_of(device).elder_id == device.elder_id


def test_sample_matches_the_counts_its_readme_advertises() -> None:
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    advertised = {
        key: int(count)
        for key, count in re.findall(r"^\| ([a-z_]+) \| (\d+) \|$", readme, re.MULTILINE)
    }
    summary = registry_summary(load_registry(SAMPLE))
    assert advertised == summary


def test_sample_every_elder_can_alarm_and_be_reported() -> None:
    reg = load_registry(SAMPLE)
    with_device = {d.elder_id for d in reg.devices.values()}
    assert with_device == set(reg.elders)
    assert all(1 <= len(e.contacts) <= 3 for e in reg.elders.values())
    assert all(c.phone.startswith("+861") for e in reg.elders.values() for c in e.contacts)


# ---------------------------------------------------------------------------
# A valid registry, normalised


def test_valid_registry_is_normalised(tmp_path: Path) -> None:
    reg = load_registry(write_registry(tmp_path))

    e1, e2 = reg.elders["E1"], reg.elders["E2"]
    assert e1.phone == "+865462900001"
    assert e1.location == LonLat(118.55, 37.59)
    assert e1.notes == "高血压"
    assert e2.phone is None
    assert [(c.name, c.phone, c.relation, c.language) for c in e2.contacts] == [
        ("李芳", "+8613905460002", "女儿", "en"),
        ("李强", "+8615005460005", "儿子", "zh"),  # empty language defaults to zh
    ]

    assert reg.devices["D2"].address == "1B2C"
    assert reg.devices["D3"].address == "+865462900002"
    assert reg.devices["D3"].test_interval_h is None
    assert reg.devices["D1"].test_interval_h == 24.0
    cid = reg.device_by_address(DeviceAddress(AddressScheme.CONTACT_ID, "1B2C"))
    assert cid is not None
    assert cid.device_id == "D2"
    phone = reg.device_by_address(DeviceAddress(AddressScheme.PHONE, "+865462900002"))
    assert phone is not None
    assert phone.device_id == "D3"

    assert reg.responders["R1"].on_duty is True
    assert reg.responders["R2"].on_duty is False
    assert reg.responders["R2"].role is ResponderRole.SUPERVISOR
    assert reg.responders["R1"].phone == "+8615005460003"
    assert reg.facilities["F1"].kind is FacilityKind.HOSPITAL
    assert reg.facilities["F1"].duty_phone == "+865462900009"
    assert reg.facilities["F2"].address == ""


def test_registry_mappings_are_read_only(tmp_path: Path) -> None:
    reg = load_registry(write_registry(tmp_path))
    with pytest.raises(TypeError):
        reg.elders["E9"] = reg.elders["E1"]  # type: ignore[index]


def test_summary_counts(tmp_path: Path) -> None:
    assert registry_summary(load_registry(write_registry(tmp_path))) == {
        "elders": 2,
        "communities": 2,
        "contacts": 3,
        "devices": 3,
        "devices_mqtt": 1,
        "devices_contact_id": 1,
        "devices_phone": 1,
        "responders": 2,
        "responders_on_duty": 1,
        "responders_grid_leader": 1,
        "responders_community_worker": 0,
        "responders_supervisor": 1,
        "facilities": 2,
        "facilities_hospital": 1,
        "facilities_clinic": 1,
    }


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    changes: dict[str, str | bytes | None] = {
        name: codecs.BOM_UTF8 + text.encode("utf-8") for name, text in VALID.items()
    }
    reg = load_registry(write_registry(tmp_path, changes))
    assert set(reg.elders) == {"E1", "E2"}  # "elder_id" header recognised despite the BOM


def test_crlf_blank_lines_column_order_and_absent_optional_columns(tmp_path: Path) -> None:
    changes: dict[str, str | bytes | None] = {
        "elders.csv": (
            "lat,lon,elder_id,name,address,community\r\n"
            "37.59,118.55,E1,王桂兰,地址1,胜利社区\r\n"
            "\r\n"
            " 37.60 , 118.56 , E2 ,李建国,地址2,建设社区\r\n"
            ",,,,,\r\n"
        ),
        "contacts.csv": "elder_id,name,phone\nE1,王伟,13805460001\nE2,李芳,13905460002\n",
    }
    reg = load_registry(write_registry(tmp_path, changes))
    assert reg.elders["E2"].location == LonLat(118.56, 37.60)
    assert reg.elders["E2"].phone is None
    assert reg.elders["E1"].contacts[0].language == "zh"
    assert reg.elders["E1"].contacts[0].relation == ""


def test_bbox_accepts_points_inside(tmp_path: Path) -> None:
    reg = load_registry(write_registry(tmp_path), bbox=(118.5, 37.5, 118.6, 37.7))
    assert len(reg.elders) == 2


def test_landline_contact_loads_with_a_masked_warning(tmp_path: Path) -> None:
    changes = edit("contacts.csv", "13805460001", "0546-2900077")
    with capture_logs() as logs:
        reg = load_registry(write_registry(tmp_path, changes))
    assert reg.elders["E1"].contacts[0].phone == "+865462900077"
    warnings = [e for e in logs if e["event"] == "registry.phone_not_mobile"]
    assert warnings == [
        {
            "event": "registry.phone_not_mobile",
            "log_level": "warning",
            "file": "contacts.csv",
            "line": 2,
            "field": "phone",
            "phone": "+86546****0077",
            "line_type": "fixed_line",
        }
    ]
    contact = reg.elders["E1"].contacts[0]
    assert (contact.line_type, contact.sms_capable) == (LineType.FIXED_LINE, False)
    assert contact.phone in reg.no_sms


# ---------------------------------------------------------------------------
# Line types (issue 10, fault 7): every texted number is marked; voice_only overrides


def test_every_texted_number_is_marked_by_its_line_type(tmp_path: Path) -> None:
    reg = load_registry(write_registry(tmp_path))
    assert {(c.line_type, c.sms_capable) for e in reg.elders.values() for c in e.contacts} \
        == {(LineType.MOBILE, True)}
    assert {(r.line_type, r.sms_capable) for r in reg.responders.values()} \
        == {(LineType.MOBILE, True)}
    # Duty desks on 0546- landlines: marked, never texted, and no warning per facility.
    assert {(f.line_type, f.sms_capable) for f in reg.facilities.values()} \
        == {(LineType.FIXED_LINE, False)}
    assert reg.no_sms == {"+865462900009", "+865462900010"}


def test_the_sample_facilities_are_landlines_and_its_people_take_sms() -> None:
    reg = load_registry(SAMPLE)
    assert reg.no_sms == {f.duty_phone for f in reg.facilities.values()}
    assert all(f.line_type is LineType.FIXED_LINE for f in reg.facilities.values())


def test_voice_only_overrides_the_line_type_either_way(tmp_path: Path) -> None:
    # The hospital's duty line takes SMS (a desk phone that does, on a landline prefix);
    # a responder on a mobile number cannot read texts any more.
    changes = {**voice_only("facilities.csv", "false", ""),
               **voice_only("responders.csv", "TRUE", "")}
    with capture_logs() as logs:
        reg = load_registry(write_registry(tmp_path, changes))
    assert (reg.facilities["F1"].line_type, reg.facilities["F1"].sms_capable) == (
        LineType.FIXED_LINE, True)
    assert reg.facilities["F2"].sms_capable is False  # empty: by line type
    assert (reg.responders["R1"].line_type, reg.responders["R1"].sms_capable) == (
        LineType.MOBILE, False)
    assert reg.responders["R2"].sms_capable is True
    assert reg.no_sms == {"+865462900010", "+8615005460003"}
    assert not [e for e in logs if e["event"] == "registry.phone_not_mobile"]


def test_voice_only_describes_the_line_wherever_the_number_appears(tmp_path: Path) -> None:
    # The clinic's landline takes SMS; the same number as a family contact is texted too.
    changes = {**voice_only("facilities.csv", "", "no"),
               **edit("contacts.csv", "13805460001", "0546-2900010")}
    reg = load_registry(write_registry(tmp_path, changes))
    assert reg.facilities["F2"].sms_capable is True
    assert reg.elders["E1"].contacts[0].sms_capable is True
    assert reg.no_sms == {"+865462900009"}


def test_voice_only_given_both_ways_for_one_number_is_a_problem(tmp_path: Path) -> None:
    contacts = voice_only("contacts.csv", "true", "", "")
    responders = voice_only("responders.csv", "false", "", text=VALID["responders.csv"]
                            .replace("15005460003", "13805460001"))
    problems = problems_of(write_registry(tmp_path, {**contacts, **responders}))
    assert located(problems) == [("responders.csv", 2, "voice_only")]
    assert str(problems[0]) == (
        "responders.csv:2: field 'voice_only': 'false' contradicts contacts.csv:2, which "
        "says true for +86138****0001: a line either takes an SMS or not")


def test_voice_only_must_be_a_boolean(tmp_path: Path) -> None:
    problems = problems_of(write_registry(tmp_path, voice_only("facilities.csv", "maybe", "")))
    assert [str(p) for p in problems] == [
        "facilities.csv:2: field 'voice_only': 'maybe' is not one of true|false|1|0|yes|no"]


def test_each_distinct_number_is_parsed_and_typed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Registry load time is phone parsing: the line type reuses the one parse per number.
    calls: Counter[str] = Counter()
    parse, number_type = phonenumbers.parse, phonenumbers.number_type

    def counted_parse(*args: Any, **kwargs: Any) -> phonenumbers.PhoneNumber:
        calls["parse"] += 1
        return parse(*args, **kwargs)

    def counted_type(number: phonenumbers.PhoneNumber) -> int:
        calls["number_type"] += 1
        return number_type(number)

    monkeypatch.setattr(phonenumbers, "parse", counted_parse)
    monkeypatch.setattr(phonenumbers, "number_type", counted_type)
    # E1's son is also E2's contact and a responder: written the same way three times.
    changes = {**append("contacts.csv", "E2,王伟,邻居,13805460001,zh"),
               **edit("responders.csv", "15005460003", "13805460001")}
    load_registry(write_registry(tmp_path, changes))
    # elders 1 + devices 1 (caller id) + contacts 3 + responders 1 + facilities 2 distinct texts
    assert calls == {"parse": 8, "number_type": 6}


# ---------------------------------------------------------------------------
# Broken inputs: each names the right file, line and field


@dataclass(frozen=True)
class Broken:
    id: str
    changes: dict[str, str | bytes | None]
    file: str
    line: int | None
    field: str | None
    reason: str  # a regular expression the reason must match
    bbox: tuple[float, float, float, float] | None = None


ELDERS_GBK = VALID["elders.csv"].encode("gb18030")
ELDERS_BAD_UTF8 = VALID["elders.csv"].encode("utf-8").replace("李建国".encode(), b"\xff\xfe")
BAD_UTF8_OFFSET = ELDERS_BAD_UTF8.index(b"\xff")

BROKEN = [
    Broken(
        "missing file", {"responders.csv": None}, "responders.csv", None, None, "file not found"
    ),
    Broken("empty file", {"contacts.csv": ""}, "contacts.csv", None, None, "file is empty"),
    Broken(
        "only blank lines", {"contacts.csv": "\n\n"}, "contacts.csv", None, None, "file is empty"
    ),
    Broken(
        "missing column",
        edit("elders.csv", ",lat,", ",latitude,"),
        "elders.csv",
        1,
        "lat",
        "required column missing",
    ),
    Broken(
        "unknown column",
        edit("elders.csv", ",phone,", ",phon,"),
        "elders.csv",
        1,
        "phon",
        r"unknown column; expected elder_id,name,",
    ),
    Broken(
        "duplicate column",
        edit("devices.csv", ",model,", ",scheme,"),
        "devices.csv",
        1,
        "scheme",
        "appears twice",
    ),
    Broken(
        "invalid UTF-8",
        {"elders.csv": ELDERS_BAD_UTF8},
        "elders.csv",
        3,
        None,
        rf"invalid UTF-8 at byte offset {BAD_UTF8_OFFSET} ",
    ),
    Broken(
        "GBK file",
        {"elders.csv": ELDERS_GBK},
        "elders.csv",
        2,
        None,
        r"invalid UTF-8 .*looks GBK/GB18030-encoded",
    ),
    Broken(
        "malformed CSV",
        append("contacts.csv", 'E1,"王伟,儿子,138'),
        "contacts.csv",
        5,
        None,
        "malformed CSV",
    ),
    Broken(
        "too many fields",
        edit("devices.csv", "TS0215A_sos,24", "TS0215A_sos,24,x"),
        "devices.csv",
        2,
        None,
        "row has 7 fields but the header has 6",
    ),
    Broken(
        "empty required value",
        edit("elders.csv", "李建国", ""),
        "elders.csv",
        3,
        "name",
        "required value is empty",
    ),
    Broken(
        "bad phone",
        edit("contacts.csv", "13805460001", "1380546"),
        "contacts.csv",
        2,
        "phone",
        r"^\*\*\*\*46 is not a valid phone number: .*; "
        r"Chinese mobile numbers have 11 digits, this has 7$",
    ),
    Broken(
        "landline without area code",
        edit("elders.csv", "0546-2900001", "2900001"),
        "elders.csv",
        2,
        "phone",
        r"landline missing its area code \(e\.g\. 0546-\)\?$",
    ),
    Broken(
        "phone with letters",
        edit("responders.csv", "15005460003", "n/a"),
        "responders.csv",
        2,
        "phone",
        "not a phone number",
    ),
    Broken(
        "phone with extension",
        edit("facilities.csv", "0546-2900009", "0546-2900009 ext 12"),
        "facilities.csv",
        2,
        "duty_phone",
        r"^\+86546\*\*\*\*0009 has an extension",
    ),
    Broken(
        "lon/lat swapped",
        edit("elders.csv", "118.55,37.59", "37.59,118.55"),
        "elders.csv",
        2,
        "lat",
        r"^118\.55 is not a latitude \(-90\.\.90\); lon/lat swapped\?$",
    ),
    Broken(
        "longitude out of range",
        edit("responders.csv", "118.551", "218.551"),
        "responders.csv",
        2,
        "lon",
        r"^218\.551 is not a longitude \(-180\.\.180\)$",
    ),
    Broken(
        "decimal comma",
        edit("facilities.csv", "118.545", "118,545"),
        "facilities.csv",
        2,
        None,
        "row has 8 fields",
    ),
    Broken(
        "text for a number",
        edit("facilities.csv", "118.545", "东经118.545"),
        "facilities.csv",
        2,
        "lon",
        "is not a number",
    ),
    Broken(
        "NaN", edit("elders.csv", "37.60", "nan"), "elders.csv", 3, "lat", "not a finite number"
    ),
    Broken(
        "infinity",
        edit("elders.csv", "118.56", "-inf"),
        "elders.csv",
        3,
        "lon",
        "not a finite number",
    ),
    Broken(
        "null island",
        edit("elders.csv", "118.56,37.60", "0,0"),
        "elders.csv",
        3,
        "lon",
        "placeholder",
    ),
    Broken(
        "out of bbox",
        edit("elders.csv", "118.56,37.60", "119.56,37.60"),
        "elders.csv",
        3,
        "lon",
        r"outside the service area lon 118\.5\.\.118\.6, lat 37\.5\.\.37\.7$",
        bbox=(118.5, 37.5, 118.6, 37.7),
    ),
    Broken(
        "out of bbox in latitude",
        edit("facilities.csv", "118.549,37.589", "118.549,37.789"),
        "facilities.csv",
        3,
        "lat",
        "outside the service area",
        bbox=(118.5, 37.5, 118.6, 37.7),
    ),
    Broken(
        "swapped inside a bbox",
        edit("responders.csv", "118.561,37.601", "45.5,15.5"),
        "responders.csv",
        3,
        "lon",
        r"outside the service area .*; lon/lat swapped\?$",
        bbox=(10.0, 40.0, 20.0, 50.0),
    ),
    Broken(
        "duplicate id",
        edit("elders.csv", "E2,李建国", "E1,李建国"),
        "elders.csv",
        3,
        "elder_id",
        r"duplicate id 'E1' \(first on line 2\)",
    ),
    Broken(
        "id with whitespace",
        edit("devices.csv", "D3,", "D 3,"),
        "devices.csv",
        4,
        "device_id",
        "contains whitespace",
    ),
    Broken(
        "duplicate device address",
        edit("devices.csv", "mqtt,zigbee2mqtt/sos-E1", "contact_id,1B2C"),  # D2 has 1b2c
        "devices.csv",
        3,
        "address",
        r"contact_id address '1B2C' is already device 'D1' \(line 2\)",
    ),
    Broken(
        "duplicate phone device",
        append("devices.csv", "D4,E1,phone,+86 546 290 0002,,"),
        "devices.csv",
        5,
        "address",
        r"phone address '\+86546\*\*\*\*0002' is already device 'D3' \(line 4\)",
    ),
    Broken(
        "unknown elder in devices",
        edit("devices.csv", "D3,E2", "D3,E9"),
        "devices.csv",
        4,
        "elder_id",
        r"unknown elder 'E9' \(not in elders.csv\)",
    ),
    Broken(
        "unknown elder in contacts",
        edit("contacts.csv", "E1,王伟", "E7,王伟"),
        "contacts.csv",
        2,
        "elder_id",
        "unknown elder 'E7'",
    ),
    Broken(
        "elder without device",
        edit("devices.csv", "D1,E1,mqtt,zigbee2mqtt/sos-E1,TS0215A_sos,24\n", ""),
        "elders.csv",
        2,
        "elder_id",
        "has no device in devices.csv: they cannot raise an alarm",
    ),
    Broken(
        "elder without contact",
        edit("contacts.csv", "E1,王伟,儿子,13805460001,zh\n", ""),
        "elders.csv",
        2,
        "elder_id",
        "has no contact in contacts.csv",
    ),
    Broken(
        "receiver scheme",
        edit("devices.csv", "D1,E1,mqtt", "D1,E1,receiver"),
        "devices.csv",
        2,
        "scheme",
        "identifies an alarm receiver",
    ),
    Broken(
        "unknown scheme",
        edit("devices.csv", "D1,E1,mqtt", "D1,E1,zigbee"),
        "devices.csv",
        2,
        "scheme",
        r"'zigbee' is not one of mqtt\|contact_id\|phone",
    ),
    Broken(
        "bad account",
        edit("devices.csv", "1b2c", "1G2C"),
        "devices.csv",
        3,
        "address",
        r"'1G2C' is not a Contact ID account \(4 hex digits\)",
    ),
    Broken(
        "five-digit account",
        edit("devices.csv", "1b2c", "12345"),
        "devices.csv",
        3,
        "address",
        "not a Contact ID account",
    ),
    Broken(
        "wildcard topic",
        edit("devices.csv", "zigbee2mqtt/sos-E1", "zigbee2mqtt/+"),
        "devices.csv",
        2,
        "address",
        "wildcard",
    ),
    Broken(
        "multi-level wildcard",
        edit("devices.csv", "zigbee2mqtt/sos-E1", "zigbee2mqtt/#"),
        "devices.csv",
        2,
        "address",
        "wildcard",
    ),
    Broken(
        "trailing slash",
        edit("devices.csv", "zigbee2mqtt/sos-E1", "zigbee2mqtt/sos-E1/"),
        "devices.csv",
        2,
        "address",
        "ends with '/'",
    ),
    Broken(
        "broker topic",
        edit("devices.csv", "zigbee2mqtt/sos-E1", "$SYS/x"),
        "devices.csv",
        2,
        "address",
        "reserved for broker",
    ),
    Broken(
        "nested topic",
        append("devices.csv", "D4,E1,mqtt,zigbee2mqtt/sos-E1/b,,"),
        "devices.csv",
        5,
        "address",
        r"lies under the topic of device 'D1' \(line 2\)",
    ),
    Broken(
        "zero test interval",
        edit("devices.csv", "TS0215A_sos,24", "TS0215A_sos,0"),
        "devices.csv",
        2,
        "test_interval_h",
        "is not positive",
    ),
    Broken(
        "text test interval",
        edit("devices.csv", "TS0215A_sos,24", "TS0215A_sos,daily"),
        "devices.csv",
        2,
        "test_interval_h",
        "is not a number",
    ),
    Broken(
        "bad role",
        edit("responders.csv", "grid_leader", "网格员"),
        "responders.csv",
        2,
        "role",
        "grid_leader|community_worker|supervisor",
    ),
    Broken(
        "bad on_duty",
        edit("responders.csv", ",yes,", ",maybe,"),
        "responders.csv",
        2,
        "on_duty",
        "'maybe' is not one of true|false",
    ),
    Broken(
        "bad kind",
        edit("facilities.csv", "hospital", "pharmacy"),
        "facilities.csv",
        2,
        "kind",
        "hospital|clinic",
    ),
    Broken(
        "bad language",
        edit("contacts.csv", "13805460001,zh", "13805460001,fr"),
        "contacts.csv",
        2,
        "language",
        "zh|en",
    ),
    Broken(
        "contact twice",
        append("contacts.csv", "E1,王伟伟,儿子,+8613805460001,zh"),
        "contacts.csv",
        5,
        "phone",
        r"\+86138\*\*\*\*0001 is already a contact of 'E1' \(line 2\)",
    ),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_broken_input_is_located(tmp_path: Path, case: Broken) -> None:
    problems = problems_of(write_registry(tmp_path, case.changes), bbox=case.bbox)
    matching = [
        p for p in problems if (p.file.name, p.line, p.field) == (case.file, case.line, case.field)
    ]
    assert matching, f"no problem at {case.file}:{case.line}:{case.field} in {located(problems)}"
    assert any(re.search(case.reason, p.reason) for p in matching), [p.reason for p in matching]


def test_problem_str_names_file_line_and_field(tmp_path: Path) -> None:
    changes = edit("elders.csv", "118.55,37.59", "37.59,137.2")
    (problem,) = problems_of(write_registry(tmp_path, changes))
    assert problem.file == tmp_path / "elders.csv"
    assert str(problem) == (
        "elders.csv:2: field 'lat': 137.2 is not a latitude (-90..90); lon/lat swapped?"
    )
    assert str(RegistryProblem(tmp_path / "x.csv", None, None, "file not found")) == (
        "x.csv: file not found"
    )


def test_all_problems_are_reported_in_file_order(tmp_path: Path) -> None:
    changes = {
        **edit("facilities.csv", "hospital", "pharmacy"),
        **edit("contacts.csv", "13805460001", "1"),
        **edit("elders.csv", "李建国", ""),
        **edit("devices.csv", "1b2c", "XYZ"),
    }
    problems = problems_of(write_registry(tmp_path, changes))
    assert located(problems) == [
        ("elders.csv", 3, "name"),
        ("devices.csv", 3, "address"),
        ("contacts.csv", 2, "phone"),
        ("facilities.csv", 2, "kind"),
    ]


def test_unusable_file_does_not_bury_the_cause_under_consequences(tmp_path: Path) -> None:
    # With elders.csv unreadable, devices and contacts are not also reported as
    # pointing at unknown elders.
    problems = problems_of(write_registry(tmp_path, {"elders.csv": None}))
    assert located(problems) == [("elders.csv", None, None)]


def test_an_elder_with_a_broken_row_is_still_known_to_references(tmp_path: Path) -> None:
    problems = problems_of(write_registry(tmp_path, edit("elders.csv", "37.60", "x")))
    assert located(problems) == [("elders.csv", 3, "lat")]


def test_multiline_cell_keeps_line_numbers_right(tmp_path: Path) -> None:
    changes = {
        "elders.csv": (
            "elder_id,name,address,community,lon,lat,phone,notes\n"
            'E1,王桂兰,地址1,胜利社区,118.55,37.59,,"高血压\n糖尿病"\n'
            "E2,李建国,地址2,建设社区,118.56,97.60,,\n"
        )
    }
    problems = problems_of(write_registry(tmp_path, changes))
    assert located(problems) == [("elders.csv", 4, "lat")]


def test_error_message_is_capped_with_a_count_of_the_rest(tmp_path: Path) -> None:
    rows = "".join(f"E{i},name{i},addr,c,118.55,137.0,,\n" for i in range(1, 61))
    changes: dict[str, str | bytes | None] = {
        "elders.csv": "elder_id,name,address,community,lon,lat,phone,notes\n" + rows,
        "devices.csv": "device_id,elder_id,scheme,address\n"
        + "".join(f"D{i},E{i},mqtt,t/{i}\n" for i in range(1, 61)),
        "contacts.csv": "elder_id,name,phone\n"
        + "".join(f"E{i},n,13805460{i:03d}\n" for i in range(1, 61)),
    }
    with pytest.raises(RegistryError) as info:
        load_registry(write_registry(tmp_path, changes))
    assert len(info.value.problems) == 60
    text = str(info.value)
    lines = text.splitlines()
    assert lines[0] == "registry has 60 problems:"
    assert len(lines) == 1 + MAX_SHOWN_PROBLEMS + 1
    assert lines[1] == "  elders.csv:2: field 'lat': 137.0 is not a latitude (-90..90)"
    assert lines[-1] == "  ... and 10 more problems"


def test_error_messages_never_carry_a_full_phone_number(tmp_path: Path) -> None:
    changes = {
        "contacts.csv": VALID["contacts.csv"] + "E1,王伟伟,儿子,13805460001,zh\n",
        **edit("elders.csv", "0546-2900001", "0546-29000011"),
    }
    text = str(problems_of(write_registry(tmp_path, changes)))
    assert "13805460001" not in text
    assert "05462900001" not in text.replace("-", "")
    assert "****" in text


def test_missing_directory(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "nowhere")
    assert [str(p) for p in problems] == ["nowhere: registry directory not found"]


def test_each_registry_file_missing_is_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path)
    assert [(p.file.name, p.reason) for p in problems] == [
        (name, "file not found") for name in REGISTRY_FILES
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default_region": "XX"}, "unknown phone region"),
        ({"bbox": (118.6, 37.5, 118.5, 37.7)}, "is not"),
        ({"bbox": (118.5, 37.5, float("nan"), 37.7)}, "is not"),
    ],
)
def test_bad_arguments_are_value_errors(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_registry(write_registry(tmp_path), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Normalisation helpers


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("13812345678", "+8613812345678"),
        ("138 1234 5678", "+8613812345678"),
        ("+86 138-1234-5678", "+8613812345678"),
        ("008613812345678", "+8613812345678"),
        ("0546-1234567", "+865461234567"),
        ("(0546) 123 4567", "+865461234567"),
        ("05461234567", "+865461234567"),
        ("+1 415 555 2671", "+14155552671"),
        ("  13812345678 ", "+8613812345678"),
    ],
)
def test_normalise_phone(raw: str, e164: str) -> None:
    assert normalise_phone(raw) == e164


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("1234", "not a valid phone number"),
        ("138123456789", "not a valid phone number"),
        ("0546-123456", "not a valid phone number"),
        ("hello", "not a phone number"),
        ("+999 1234", "not a phone number"),
        ("13812345678 ext. 12", "extension"),
    ],
)
def test_normalise_phone_rejects(raw: str, reason: str) -> None:
    with pytest.raises(FieldValueError, match=reason) as info:
        normalise_phone(raw)
    assert info.value.value == raw


def test_normalise_phone_uses_the_default_region() -> None:
    assert normalise_phone("020 7946 0018", "GB") == "+442079460018"


@pytest.mark.parametrize(
    ("scheme", "raw", "normal"),
    [
        (AddressScheme.CONTACT_ID, "1b2c", "1B2C"),
        (AddressScheme.CONTACT_ID, " 0123 ", "0123"),
        (AddressScheme.PHONE, "0546-2900002", "+865462900002"),
        (AddressScheme.MQTT, " zigbee2mqtt/sos-E0001 ", "zigbee2mqtt/sos-E0001"),
        (AddressScheme.MQTT, "alarm/buttons/D0007", "alarm/buttons/D0007"),
    ],
)
def test_normalise_device_address(scheme: AddressScheme, raw: str, normal: str) -> None:
    assert normalise_device_address(scheme, raw) == normal


@pytest.mark.parametrize(
    ("scheme", "raw"),
    [
        (AddressScheme.CONTACT_ID, "123"),
        (AddressScheme.CONTACT_ID, "0x12"),
        (AddressScheme.PHONE, "12"),
        (AddressScheme.MQTT, ""),
        (AddressScheme.MQTT, "a/+/b"),
        (AddressScheme.MQTT, "a\x00b"),
        (AddressScheme.RECEIVER, "surgard:01"),
    ],
)
def test_normalise_device_address_rejects(scheme: AddressScheme, raw: str) -> None:
    with pytest.raises(FieldValueError):
        normalise_device_address(scheme, raw)


def test_broken_table_covers_every_file() -> None:
    files = {c.file for c in BROKEN}
    assert files == set(REGISTRY_FILES)
