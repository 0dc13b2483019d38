"""The escalation planner, pure: elder, responder search result, waves and the phones
already told in; the messages of one wave (or a follow-up) out. No I/O, no clock."""

from __future__ import annotations

import pytest

from gateway.config import EscalationSection, GeoSection, WaveSection
from gateway.escalation import Planner, Situation
from gateway.geo import GeoResult, Nearby
from gateway.journal import MessageKind, NotificationPlan, NotificationRecord
from gateway.lifecycle import NotificationState
from gateway.model import Contact, Elder, FacilityKind, LonLat
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
    plans = planner().plan(1, SITUATION, set())
    assert [(p.role, p.name) for p in plans] == [
        ("family", "张丽"), ("family", "Tom Zhang"), ("responder", "员1"), ("responder", "员2")]
    assert plans[0].body == COMPOSER.family(FACTS, "zh")
    assert plans[1].body == COMPOSER.family(FACTS, "en") != plans[0].body
    assert plans[2].body == COMPOSER.staff(FACTS, 100.0, map_url=SITUATION.map_url)
    assert all(FACTS.ref in p.body for p in plans)


def test_wave_two_takes_the_next_staff_and_the_supervisor() -> None:
    plans = planner().plan(2, SITUATION, set())
    assert [(p.role, p.name) for p in plans] == [
        ("responder", "员3"), ("responder", "员4"), ("responder", "员5"), ("supervisor", "主管")]
    # 员3 has no live position: the text says the distance is from the registered base.
    assert plans[0].body == COMPOSER.staff(FACTS, 300.0, map_url=SITUATION.map_url,
                                           from_base=True)
    assert plans[0].body != COMPOSER.staff(FACTS, 300.0, map_url=SITUATION.map_url)
    assert plans[3].body == COMPOSER.staff(FACTS, 2500.0, map_url=SITUATION.map_url,
                                           from_base=True)


def test_wave_three_is_the_hospital() -> None:
    plans = planner().plan(3, SITUATION, set())
    assert plans == [NotificationPlan("facility", "市人民医院", HOSPITAL.phone,
                                      COMPOSER.facility(FACTS))]


def test_nobody_is_told_twice() -> None:
    told = {"+8613800000001", staff(2).phone}
    assert phones(planner().plan(1, SITUATION, told)) == ["+8613800000002", staff(1).phone]
    # Within one wave, a phone reached by an earlier role is skipped (the first role wins).
    twice = Situation(ELDER, FACTS, FOUND,
                      (SUPERVISOR._replace(phone=staff(4).phone),), SITUATION.map_url)
    plans = planner().plan(2, twice, set())
    assert [(p.role, p.phone) for p in plans] == [
        ("responder", staff(3).phone), ("responder", staff(4).phone),
        ("responder", staff(5).phone)]


def test_nobody_on_duty_escalates_to_the_supervisors_at_once() -> None:
    empty = Situation(ELDER, FACTS, GeoResult((), FOUND.facilities), (SUPERVISOR,), None)
    plans = planner().plan(1, empty, set())
    assert [p.role for p in plans] == ["family", "family", "supervisor"]
    assert plans[2].body == COMPOSER.staff(FACTS, 2500.0, from_base=True)  # no map link


def test_configured_waves_offset_the_staff_and_add_the_clinic() -> None:
    escalation = EscalationSection(waves=(WaveSection(after_s=0, staff=1),
                                          WaveSection(after_s=60, staff=2, clinic=True)))
    p = planner(escalation)
    assert p.staff_needed == 3 and p.first_wave_staff == 1
    assert phones(p.plan(1, SITUATION, set())) == [staff(1).phone]
    assert phones(p.plan(2, SITUATION, set())) == [staff(2).phone, staff(3).phone,
                                                   CLINIC.phone]


def test_a_missing_facility_is_left_out() -> None:
    no_hospital = Situation(ELDER, FACTS, GeoResult(FOUND.responders,
                                                    {FacilityKind.CLINIC: CLINIC}))
    assert planner().plan(3, no_hospital, set()) == []


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
