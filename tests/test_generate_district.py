"""The district generator: deterministic, plausible, and always loadable by the registry."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from devices.events import AddressScheme
from gateway import district
from gateway.model import FacilityKind, ResponderRole
from gateway.registry import REGISTRY_FILES, load_registry, registry_summary

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "sample"


def _load_script() -> ModuleType:
    return district


gen = _load_script()


def generate(out: Path, *, elders: int = 88, responders: int = 143, seed: int = 2026,
             city: bool = False) -> dict[str, int]:
    preset = gen.CITY if city else gen.DISTRICT
    counts: dict[str, int] = gen.generate(
        out, elders=elders, responders=responders, seed=seed, width_km=preset.width_km,
        height_km=preset.height_km, area_name=preset.area_name,
    )
    return counts


def read_rows(directory: Path, name: str) -> list[dict[str, str]]:
    with (directory / name).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in REGISTRY_FILES}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=7)
    generate(tmp_path / "b", seed=7)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_another_seed_gives_another_district(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=7)
    generate(tmp_path / "b", seed=8)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert all(a[name] != b[name] for name in REGISTRY_FILES)


def test_committed_sample_is_the_default_output(tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert file_bytes(tmp_path) == file_bytes(SAMPLE)


def test_generated_district_loads_and_matches_its_counts(tmp_path: Path) -> None:
    counts = generate(tmp_path)
    reg = load_registry(tmp_path, bbox=gen.Area(5.0, 4.5).bbox)
    assert registry_summary(reg) == counts
    assert counts["elders"] == 88
    assert counts["responders"] == 143
    assert counts["communities"] == 10


def test_district_shape(tmp_path: Path) -> None:
    generate(tmp_path)
    reg = load_registry(tmp_path)
    elders = list(reg.elders.values())
    devices = list(reg.devices.values())

    # Schemes in the advertised proportions, one device per elder.
    schemes = Counter(d.scheme for d in devices)
    assert schemes == {AddressScheme.MQTT: 61, AddressScheme.CONTACT_ID: 18,
                       AddressScheme.PHONE: 9}
    assert sorted(d.elder_id for d in devices) == sorted(reg.elders)
    mqtt = [d.address for d in devices if d.scheme is AddressScheme.MQTT]
    own = [t for t in mqtt if t.startswith("alarm/buttons/D")]
    assert 1 <= len(own) < len(mqtt) // 4
    assert all(t.startswith(("zigbee2mqtt/sos-E", "alarm/buttons/D")) for t in mqtt)
    for d in devices:
        if d.scheme is AddressScheme.MQTT and d.address.startswith("zigbee2mqtt/"):
            assert d.address == f"zigbee2mqtt/sos-{d.elder_id}"
        expected_interval = None if d.scheme is AddressScheme.PHONE else 24.0
        assert d.test_interval_h == expected_interval
        if d.scheme is AddressScheme.PHONE:
            # The caller ID is the elder's own 0546 landline.
            assert d.address == reg.elder_of(d).phone
            assert d.address.startswith("+86546")
        if d.scheme is AddressScheme.CONTACT_ID:
            assert "A" not in d.address

    # Clustered into ten communities, each with a clinic and an on-duty grid leader.
    communities = {e.community for e in elders}
    assert len(communities) == 10
    assert all(c.endswith("社区") for c in communities)
    clinics = {f.name for f in reg.facilities.values() if f.kind is FacilityKind.CLINIC}
    assert clinics == {f"{c}卫生服务站" for c in communities}
    hospitals = [f.name for f in reg.facilities.values() if f.kind is FacilityKind.HOSPITAL]
    assert hospitals == ["垦利区人民医院"]
    assert all(f.duty_phone.startswith("+86546") for f in reg.facilities.values())
    on_duty_leaders = {r.community for r in reg.responders.values()
                       if r.role is ResponderRole.GRID_LEADER and r.on_duty}
    assert on_duty_leaders == communities
    roles = Counter(r.role for r in reg.responders.values())
    assert 2 <= roles[ResponderRole.SUPERVISOR] <= 3
    on_duty = sum(r.on_duty for r in reg.responders.values())
    assert 0.65 < on_duty / len(reg.responders) < 0.85

    # People: Chinese names, addresses in the district, 1-3 contacts with mobiles.
    for e in elders:
        assert 2 <= len(e.name) <= 3
        assert e.address.startswith(f"垦利区{e.community}")
        assert "单元" in e.address
        assert 1 <= len(e.contacts) <= 3
        assert all(c.phone[3:6] in {"138", "139", "150", "186"} for c in e.contacts)
    phones = [c.phone for e in elders for c in e.contacts]
    phones += [r.phone for r in reg.responders.values()]
    assert len(set(phones)) == len(phones)


def test_elders_cluster_around_their_community(tmp_path: Path) -> None:
    generate(tmp_path)
    reg = load_registry(tmp_path)
    clinic_of = {f.name.removesuffix("卫生服务站"): f.location
                 for f in reg.facilities.values() if f.kind is FacilityKind.CLINIC}
    for elder in reg.elders.values():
        # Within about 1.5 km of the community's clinic (its centre), in a 5 km district.
        own = clinic_of[elder.community]
        assert abs(own.lon - elder.location.lon) < 0.017
        assert abs(own.lat - elder.location.lat) < 0.0135


def test_city_sized_set_loads(tmp_path: Path) -> None:
    # The --city preset's area with fewer elders, to stay fast.
    counts = generate(tmp_path, elders=5000, responders=250, city=True)
    reg = load_registry(tmp_path, bbox=gen.Area(gen.CITY.width_km, gen.CITY.height_km).bbox)
    assert registry_summary(reg) == counts
    assert counts["communities"] == 10
    accounts = [d.address for d in reg.devices.values() if d.scheme is AddressScheme.CONTACT_ID]
    assert len(accounts) == 1000
    assert len(set(accounts)) == len(accounts)
    lons = [e.location.lon for e in reg.elders.values()]
    # Spread over the city's tens of kilometres, not the district's five.
    assert max(lons) - min(lons) > 0.2
    assert all(e.address.startswith("东营市") for e in reg.elders.values())


def test_communities_scale_with_elders() -> None:
    names = gen.community_names(200)
    assert len(set(names)) == 200
    assert names[:3] == ["胜利", "建设", "黄河"]
    assert len(set(gen.community_names(400))) == 400


def test_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--out", str(tmp_path), "--elders", "12", "--responders", "9",
                     "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "elders=12" in out
    assert "service area bbox: [118.5216, 37.5697, 118.5784, 37.6103]" in out
    assert len(read_rows(tmp_path, "elders.csv")) == 12
    assert len(read_rows(tmp_path, "responders.csv")) == 9
    load_registry(tmp_path)


def test_cli_city_preset_overridable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--out", str(tmp_path), "--city", "--elders", "50",
                     "--responders", "20"]) == 0
    assert "service area bbox: [118.3232, 37.4552, 118.7768, 37.7248]" in capsys.readouterr().out
    assert all(r["address"].startswith("东营市") for r in read_rows(tmp_path, "elders.csv"))


def test_impossible_request_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--out", str(tmp_path), "--responders", "2"]) == 2
    assert "responders" in capsys.readouterr().err
    assert not (tmp_path / "elders.csv").exists()
