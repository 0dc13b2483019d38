"""The escalation planner, pure: elder, responder search result, waves and the phones
already told in; the messages of one wave (or a follow-up) out. No I/O, no clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.config import EscalationSection, GeoSection, WaveSection
from gateway.escalation import Planner, Situation, WavePlan, silent_waves
from gateway.geo import GeoResult, Nearby
from gateway.journal import MessageKind, NotificationPlan, NotificationRecord
from gateway.lifecycle import NotificationState
from gateway.model import (
    Contact,
    Elder,
    Facility,
    FacilityKind,
    LineType,
    LonLat,
    Registry,
    Responder,
    ResponderRole,
)
from gateway.wording import AlarmFacts, Composer

HOME = LonLat(118.78, 32.04)
MAP = "https://uri.amap.com/marker?position={lon},{lat}"
ELDER = Elder(
    elder_id="E1", name="张桂英", address="鼓楼区中山路1号", community="中山社区", location=HOME,
    contacts=(Contact("张丽", "+8613800000001", "女儿"),
              Contact("Tom Zhang", "+8613800000002", "son", language="en")),
)
FACTS = AlarmFacts("A7K3-9QXM", ELDER.name, ELDER.community, ELDER.address, 1_765_000_000.0,
                   responder="员1")


def staff(i: int, *, stale: bool = False) -> Nearby:
    return Nearby(f"R{i}", f"员{i}", f"+86139000000{i:02d}", LonLat(118.78 + i / 1000, 32.04),
                  distance_m=100.0 * i, bearing_deg=90.0, stale=stale, kind="grid_leader")


SUPERVISOR = Nearby("S1", "主管", "+8613700000001", LonLat(118.8, 32.05), 2500.0, 45.0,
                    stale=True, kind="supervisor")
HOSPITAL = Nearby("H1", "市人民医院", "+862583000001", LonLat(118.79, 32.05), 1800.0, 30.0,
                  kind="hospital")
CLINIC = Nearby("C1", "中山社区卫生站", "+862583000002", LonLat(118.781, 32.041), 300.0, 10.0,
                kind="clinic")
FOUND = GeoResult(responders=tuple(staff(i, stale=i == 3) for i in range(1, 7)),
                  facilities={FacilityKind.HOSPITAL: HOSPITAL, FacilityKind.CLINIC: CLINIC})
SITUATION = Situation(ELDER, FACTS, FOUND, (SUPERVISOR,), map_url="https://m/118.78,32.04")
COMPOSER = Composer()


def planner(escalation: EscalationSection | None = None) -> Planner:
    return Planner(escalation or EscalationSection(), GeoSection(), COMPOSER, MAP)


def phones(plans: list[NotificationPlan]) -> list[str]:
    return [p.phone for p in plans]


def test_the_waves_are_the_configs_defaults() -> None:
    p = planner()
    assert p.waves == EscalationSection().waves
    assert [w.after_s for w in p.waves] == [0, 120, 300]
    assert p.staff_needed == 5  # 2 + 3 staff over the waves, more than responders_k = 3
    assert p.first_wave_staff == 2


def test_wave_one_reaches_the_family_in_their_language_and_the_two_nearest_staff() -> None:
    plans = planner().plan(1, SITUATION, set()).messages
    assert [(p.role, p.name) for p in plans] == [
        ("family", "张丽"), ("family", "Tom Zhang"), ("responder", "员1"), ("responder", "员2")]
    assert plans[0].body == COMPOSER.family(FACTS, "zh")
    assert plans[1].body == COMPOSER.family(FACTS, "en") != plans[0].body
    assert plans[2].body == COMPOSER.staff(FACTS, 100.0, map_url=SITUATION.map_url)
    assert all(FACTS.ref in p.body for p in plans)


def test_wave_two_takes_the_next_staff_and_the_supervisor() -> None:
    plans = planner().plan(2, SITUATION, set()).messages
    assert [(p.role, p.name) for p in plans] == [
        ("responder", "员3"), ("responder", "员4"), ("responder", "员5"), ("supervisor", "主管")]
    # 员3 has no live position: the text says the distance is from the registered base.
    assert plans[0].body == COMPOSER.staff(FACTS, 300.0, map_url=SITUATION.map_url,
                                           from_base=True)
    assert plans[0].body != COMPOSER.staff(FACTS, 300.0, map_url=SITUATION.map_url)
    assert plans[3].body == COMPOSER.staff(FACTS, 2500.0, map_url=SITUATION.map_url,
                                           from_base=True)


def test_wave_three_is_the_hospital() -> None:
    plans = planner().plan(3, SITUATION, set()).messages
    assert plans == [NotificationPlan("facility", "市人民医院", HOSPITAL.phone,
                                      COMPOSER.facility(FACTS))]


def test_nobody_is_told_twice() -> None:
    told = {"+8613800000001", staff(2).phone}
    assert phones(planner().plan(1, SITUATION, told).messages) == [
        "+8613800000002", staff(1).phone]
    # Within one wave, a phone reached by an earlier role is skipped (the first role wins).
    twice = Situation(ELDER, FACTS, FOUND,
                      (SUPERVISOR._replace(phone=staff(4).phone),), SITUATION.map_url)
    plans = planner().plan(2, twice, set()).messages
    assert [(p.role, p.phone) for p in plans] == [
        ("responder", staff(3).phone), ("responder", staff(4).phone),
        ("responder", staff(5).phone)]


def test_nobody_on_duty_escalates_to_the_supervisors_at_once() -> None:
    empty = Situation(ELDER, FACTS, GeoResult((), FOUND.facilities), (SUPERVISOR,), None)
    plans = planner().plan(1, empty, set()).messages
    assert [p.role for p in plans] == ["family", "family", "supervisor"]
    assert plans[2].body == COMPOSER.staff(FACTS, 2500.0, from_base=True)  # no map link


def test_configured_waves_offset_the_staff_and_add_the_clinic() -> None:
    escalation = EscalationSection(waves=(WaveSection(after_s=0, staff=1),
                                          WaveSection(after_s=60, staff=2, clinic=True)))
    p = planner(escalation)
    assert p.staff_needed == 3 and p.first_wave_staff == 1
    assert phones(p.plan(1, SITUATION, set()).messages) == [staff(1).phone]
    assert phones(p.plan(2, SITUATION, set()).messages) == [staff(2).phone, staff(3).phone,
                                                   CLINIC.phone]


def test_a_missing_facility_is_left_out() -> None:
    no_hospital = Situation(ELDER, FACTS, GeoResult(FOUND.responders,
                                                    {FacilityKind.CLINIC: CLINIC}))
    assert planner().plan(3, no_hospital, set()).messages == []


def record(rid: int, phone: str, kind: MessageKind = MessageKind.ESCALATION,
           wave: int | None = 1, role: str = "responder") -> NotificationRecord:
    return NotificationRecord(
        id=rid, alarm_id=FACTS.ref, kind=kind, wave=wave, role=role, name=f"n{rid}",
        phone=phone, body="b", state=NotificationState.ACCEPTED, sid=f"SM{rid}", attempts=1,
        error_code=None, error=None, latency_ms=1.0, created_at=0.0)


def test_follow_ups_reach_everyone_an_escalation_wave_reached_once() -> None:
    told = [record(1, "+8613800000001", role="family"), record(2, staff(1).phone),
            record(3, staff(2).phone), record(4, staff(3).phone, wave=2),
            record(5, staff(1).phone, kind=MessageKind.FALLBACK, wave=None),
            record(6, "+8613999999999", kind=MessageKind.TAKEN, wave=None)]
    taken = planner().follow_up(MessageKind.TAKEN, FACTS, told, by="员2", skip=staff(2).phone)
    assert [(p.role, p.phone) for p in taken] == [
        ("family", "+8613800000001"), ("responder", staff(1).phone),
        ("responder", staff(3).phone)]
    assert {p.body for p in taken} == {COMPOSER.taken(FACTS, "员2")}
    cancelled = planner().follow_up(MessageKind.CANCELLED, FACTS, told)
    assert len(cancelled) == 4 and {p.body for p in cancelled} == {COMPOSER.cancelled(FACTS)}
    with pytest.raises(ValueError, match="not a follow-up"):
        planner().follow_up(MessageKind.ESCALATION, FACTS, told)


def test_the_map_link_is_the_elders_home() -> None:
    assert planner().map_url(ELDER) == "https://uri.amap.com/marker?position=118.780000,32.040000"
    assert Planner(EscalationSection(), GeoSection(), COMPOSER).map_url(ELDER) is None


# ---------------------------------------------------------------------------
# Numbers no SMS reaches (issue 10, fault 7): never planned, returned apart


def test_the_default_wave_three_never_texts_a_landline_hospital() -> None:
    landline = Situation(ELDER, FACTS, FOUND, (SUPERVISOR,), SITUATION.map_url,
                         no_sms=frozenset({HOSPITAL.phone}))
    wave = planner().plan(3, landline, set())
    assert wave == WavePlan([], [NotificationPlan("facility", "市人民医院", HOSPITAL.phone,
                                                  COMPOSER.facility(FACTS))])


def test_voice_only_recipients_are_returned_apart_once_and_the_rest_still_texted() -> None:
    no_sms = frozenset({"+8613800000001", staff(2).phone, SUPERVISOR.phone})
    s = Situation(ELDER, FACTS, FOUND, (SUPERVISOR,), SITUATION.map_url, no_sms=no_sms)
    one = planner().plan(1, s, set())
    assert phones(one.messages) == ["+8613800000002", staff(1).phone]
    assert [(p.role, p.phone) for p in one.skipped] == [
        ("family", "+8613800000001"), ("responder", staff(2).phone)]
    # The dispatcher adds the skipped phones to those told: the next wave skips them silently.
    told = {p.phone for p in one.messages + one.skipped}
    two = planner().plan(2, s, told)
    assert phones(two.messages) == [staff(3).phone, staff(4).phone, staff(5).phone]
    assert [p.role for p in two.skipped] == ["supervisor"]


# silent_waves: what check-config warns about, on a registry built in memory

def _registry(*, hospital_sms: bool, family_sms: bool = True,
              staff_sms: bool = True, clinic_sms: bool = True) -> Registry:
    elder = Elder("E1", "张桂英", "地址", "社区", HOME, contacts=(
        Contact("张丽", "+8613800000001", line_type=LineType.MOBILE, sms_capable=family_sms),))
    responders = {"R1": Responder("R1", "员1", "+8613900000001", "社区",
                                  ResponderRole.GRID_LEADER, True, HOME,
                                  sms_capable=staff_sms),
                  "S1": Responder("S1", "主管", "+8613700000001", "社区",
                                  ResponderRole.SUPERVISOR, True, HOME, sms_capable=staff_sms)}
    facilities = {"H1": Facility("H1", "县人民医院", FacilityKind.HOSPITAL, "+865462900009",
                                 HOME, line_type=LineType.FIXED_LINE, sms_capable=hospital_sms),
                  "C1": Facility("C1", "卫生站", FacilityKind.CLINIC, "+865462900010", HOME,
                                 sms_capable=clinic_sms)}
    return Registry.build({"E1": elder}, {}, responders, facilities)


def _no_lookup(where: LonLat) -> dict[FacilityKind, Nearby]:
    raise AssertionError(f"the facilities agree, no lookup was needed ({where})")


def test_silent_waves_finds_the_default_hospital_wave_with_a_landline() -> None:
    waves = EscalationSection().waves
    silent = silent_waves(waves, _registry(hospital_sms=False), _no_lookup)
    assert [(w.number, w.elders, w.total_elders) for w in silent] == [(3, ("E1",), 1)]
    assert silent[0].reasons == ("hospital: no hospital duty phone takes SMS",)
    assert silent_waves(waves, _registry(hospital_sms=True), _no_lookup) == []


def test_silent_waves_judges_staff_by_role_and_family_per_elder() -> None:
    waves = EscalationSection().waves
    nobody = silent_waves(waves, _registry(hospital_sms=False, family_sms=False,
                                           staff_sms=False), _no_lookup)
    assert [w.number for w in nobody] == [1, 2, 3]
    assert nobody[0].reasons == ("staff: no grid leader or community worker takes SMS",
                                 "family: no contact takes SMS")
    # A staff wave with someone who takes SMS is never silent, whatever the family has.
    assert [w.number for w in silent_waves(
        waves, _registry(hospital_sms=False, family_sms=False), _no_lookup)] == [3]


def test_silent_waves_asks_for_the_nearest_facility_when_the_kind_is_mixed() -> None:
    reg = _registry(hospital_sms=False)
    mobile = Facility("H2", "市医院", FacilityKind.HOSPITAL, "+8613600000009", HOME)
    reg = Registry.build(reg.elders, reg.devices, reg.responders,
                         {**reg.facilities, "H2": mobile})
    waves = (WaveSection(after_s=0, hospital=True),)
    asked: list[LonLat] = []

    def nearest(found: Nearby) -> Callable[[LonLat], dict[FacilityKind, Nearby]]:
        def lookup(where: LonLat) -> dict[FacilityKind, Nearby]:
            asked.append(where)
            return {FacilityKind.HOSPITAL: found}
        return lookup

    near_landline = Nearby("H1", "县人民医院", "+865462900009", HOME, 10.0, 0.0)
    near_mobile = Nearby("H2", "市医院", "+8613600000009", HOME, 10.0, 0.0)
    silent = silent_waves(waves, reg, nearest(near_landline))
    assert [w.reasons for w in silent] == [
        ("hospital: the nearest, 县人民医院 (H1), has a landline",)]
    assert silent_waves(waves, reg, nearest(near_mobile)) == []
    assert asked == [HOME, HOME]


# -- channels (issue 12) ------------------------------------------------------------------


def test_the_default_waves_call_the_first_family_contact_a_staff_tree_and_the_hospital() -> None:
    p = planner()
    p.voice = True
    first = p.calls(1, SITUATION, [], set())
    assert [c.phone for c in first.single] == ["+8613800000001"] and first.tree == []
    assert all(c.text == COMPOSER.spoken(FACTS) for c in first.single)
    second = p.calls(2, SITUATION, [], set())
    assert [c.name for c in second.tree] == ["员3", "员4", "员5"]  # nearest first
    assert second.single == []
    third = p.calls(3, SITUATION, [], set())
    assert [c.phone for c in third.single] == [HOSPITAL.phone]
    # Voice only: the hospital is called, not texted, while calls are placed ...
    assert p.plan(3, SITUATION, set()).messages == []
    # ... and texted when they are not ([voice] off: a wave never goes silent).
    p.voice = False
    assert phones(p.plan(3, SITUATION, set()).messages) == [HOSPITAL.phone]


def test_channels_per_kind_and_phones_called_before_are_not_called_again() -> None:
    waves = EscalationSection(waves=(WaveSection(
        after_s=0, family=True, staff=1, supervisor=True, clinic=True, call_family=2,
        channels={"family": "voice", "supervisor": "both", "clinic": "sms"}),))
    p = planner(waves)
    p.voice = True
    texted = p.plan(1, SITUATION, set()).messages
    assert [x.role for x in texted] == ["responder", "supervisor", "facility"]
    calls = p.calls(1, SITUATION, [], set())
    assert [c.phone for c in calls.single] == ["+8613800000001", "+8613800000002",
                                               SUPERVISOR.phone]
    assert calls.tree == []  # staff by sms only
    again = p.calls(1, SITUATION, [], {"+8613800000001", SUPERVISOR.phone})
    assert [c.phone for c in again.single] == ["+8613800000002"]
    with pytest.raises(ValueError, match="channels"):
        WaveSection(after_s=0, channels={"family": "fax"})  # type: ignore[dict-item]
