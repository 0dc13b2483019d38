"""The validated registry snapshot: a hit equals a full load; anything doubtful is revalidated."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

import gateway.registry as registry_module
import gateway.world as world_module
from gateway.config import Config, parse_config
from gateway.model import Registry
from gateway.registry import RegistryError, load_registry
from gateway.registry_snapshot import PHONES_FILE, SNAPSHOT_FILE, SNAPSHOT_VERSION, snapshot_key
from gateway.world import REGISTRY_CACHE, load_world
from tests.test_registry import SAMPLE, SAMPLE_BBOX, VALID, edit, voice_only, write_registry


def same(a: Registry, b: Registry) -> None:
    """Equal records, in the same order, with the same derived indexes."""
    assert list(a.elders.items()) == list(b.elders.items())
    assert list(a.devices.items()) == list(b.devices.items())
    assert list(a.responders.items()) == list(b.responders.items())
    assert list(a.facilities.items()) == list(b.facilities.items())
    assert a.no_sms == b.no_sms
    for device in a.devices.values():
        assert b.device_by_address(device.device_address) == device


class Counting:
    """Counts full validations (the snapshot exists to avoid them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = registry_module._validate

        def counted(*args: Any, **kwargs: Any) -> Registry:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(registry_module, "_validate", counted)


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> Counting:
    return Counting(monkeypatch)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_hit_rebuilds_an_equal_registry_without_validating(
    tmp_path: Path, validations: Counting
) -> None:
    cache = tmp_path / "state" / "registry-cache"
    uncached = load_registry(SAMPLE, bbox=SAMPLE_BBOX)
    first = load_registry(SAMPLE, bbox=SAMPLE_BBOX, cache_dir=cache)
    assert (cache / SNAPSHOT_FILE).is_file()
    assert validations.calls == 2
    with capture_logs() as logs:
        second = load_registry(SAMPLE, bbox=SAMPLE_BBOX, cache_dir=cache)
    assert validations.calls == 2  # no row was validated again
    same(uncached, first)
    same(first, second)
    assert second == first
    loaded = events(logs, "registry.loaded")
    assert len(loaded) == 1 and loaded[0]["snapshot"] is True


def test_hit_keeps_overrides_line_types_and_optional_values(
    tmp_path: Path, validations: Counting
) -> None:
    # voice_only overrides, a landline contact, an elder without phone, no test interval.
    directory = write_registry(tmp_path, voice_only("contacts.csv", "true", "", "false"))
    cache = tmp_path / "cache"
    full = load_registry(directory, cache_dir=cache)
    warm = load_registry(directory, cache_dir=cache)
    assert validations.calls == 1
    same(full, warm)
    assert warm.devices["D3"].test_interval_h is None
    assert warm.elders["E2"].phone is None
    assert not warm.elders["E1"].contacts[0].sms_capable


def test_shared_strings_after_a_hit(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_registry(SAMPLE, cache_dir=cache)
    reg = load_registry(SAMPLE, cache_dir=cache)
    device = next(iter(reg.devices.values()))
    assert device.elder_id is reg.elders[device.elder_id].elder_id


@pytest.mark.parametrize("name", sorted(VALID))
def test_changed_file_is_validated_again(
    tmp_path: Path, validations: Counting, name: str
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    # Same size and a restored mtime: only the bytes tell.
    path = directory / name
    data = path.read_bytes()
    st = path.stat()
    i = data.index(b"\n") + 1
    changed = data[:i] + data[i:].replace(b"1", b"2", 1)
    assert changed != data and len(changed) == len(data)
    path.write_bytes(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    # The change may break the registry: validated all the same, not served.
    with capture_logs() as logs, contextlib.suppress(RegistryError):
        load_registry(directory, cache_dir=cache)
    assert validations.calls == 2
    ignored = events(logs, "registry.snapshot_ignored")
    assert [e["reason"] for e in ignored] == ["stale"]


@pytest.mark.parametrize("kwargs", [{"default_region": "US"},
                                    {"bbox": (118.0, 37.0, 119.0, 38.0)}])
def test_other_parameters_are_validated_again(
    tmp_path: Path, validations: Counting, kwargs: dict[str, Any]
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    with pytest.raises(RegistryError) if "default_region" in kwargs else _nothing():
        load_registry(directory, cache_dir=cache, **kwargs)
    assert validations.calls == 2


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _snapshot(cache: Path) -> tuple[dict[str, Any], bytes]:
    data = (cache / SNAPSHOT_FILE).read_bytes()
    header, _, body = data.partition(b"\n")
    return orjson.loads(header), body


def _corruptions(cache: Path) -> dict[str, bytes]:
    header, body = _snapshot(cache)
    foreign = orjson.dumps({**header, "version": SNAPSHOT_VERSION + 1}) + b"\n" + body
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    return {
        "truncated": (cache / SNAPSHOT_FILE).read_bytes()[:-10],
        "flipped": orjson.dumps(header) + b"\n" + bytes(flipped),
        "garbage": b"\x00\xffnot a snapshot",
        "empty": b"",
        "foreign version": foreign,
        "header not an object": b"[1, 2]\n" + body,
    }


@pytest.mark.parametrize("kind", ["truncated", "flipped", "garbage", "empty",
                                  "foreign version", "header not an object"])
def test_damaged_or_foreign_snapshot_is_ignored_with_a_warning(
    tmp_path: Path, validations: Counting, kind: str
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    good = load_registry(directory, cache_dir=cache)
    (cache / SNAPSHOT_FILE).write_bytes(_corruptions(cache)[kind])
    with capture_logs() as logs:
        again = load_registry(directory, cache_dir=cache)
    assert validations.calls == 2
    same(good, again)
    ignored = events(logs, "registry.snapshot_ignored")
    assert len(ignored) == 1 and ignored[0]["log_level"] == "warning"
    assert ignored[0]["reason"] != "stale"
    # ... and was replaced by a good one.
    load_registry(directory, cache_dir=cache)
    assert validations.calls == 2


def test_well_formed_but_inconsistent_body_is_rejected(
    tmp_path: Path, validations: Counting
) -> None:
    # A body that passes its checksum (written by someone else) but names an unknown elder.
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    header, body = _snapshot(cache)
    lines = [orjson.loads(line) for line in body.split(b"\n")]
    for line in lines:
        if line[0] == "devices":
            line[1][0][1] = "E404"
    new_body = b"\n".join(orjson.dumps(line) for line in lines)
    header["sha256"] = hashlib.sha256(new_body).hexdigest()
    (cache / SNAPSHOT_FILE).write_bytes(orjson.dumps(header) + b"\n" + new_body)
    with capture_logs() as logs:
        reg = load_registry(directory, cache_dir=cache)
    assert validations.calls == 2
    assert reg.devices["D1"].elder_id == "E1"
    assert "damaged" in events(logs, "registry.snapshot_ignored")[0]["reason"]


def test_a_miss_still_reports_problems_with_file_row_and_column(tmp_path: Path) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    before = (cache / SNAPSHOT_FILE).read_bytes()
    write_registry(directory, edit("contacts.csv", "13805460001", "1380546000"))
    with pytest.raises(RegistryError) as info:
        load_registry(directory, cache_dir=cache)
    (problem,) = info.value.problems
    assert (problem.file.name, problem.line, problem.field) == ("contacts.csv", 2, "phone")
    # An invalid registry never replaces the last good snapshot.
    assert (cache / SNAPSHOT_FILE).read_bytes() == before


def test_missing_file_is_reported_not_served_from_the_snapshot(tmp_path: Path) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    (directory / "devices.csv").unlink()
    with pytest.raises(RegistryError) as info:
        load_registry(directory, cache_dir=cache)
    first = info.value.problems[0]
    assert (first.file.name, first.line) == ("devices.csv", None)


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    directory = write_registry(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with capture_logs() as logs:
        reg = load_registry(directory, cache_dir=blocker / "cache")
    assert reg.elders
    assert events(logs, "registry.snapshot_not_written")[0]["log_level"] == "warning"


def test_key_covers_bytes_and_parameters() -> None:
    files = {"elders.csv": b"a", "devices.csv": b"b"}
    key = snapshot_key(files, "CN", None)
    assert snapshot_key(dict(files), "CN", None) == key
    assert snapshot_key({**files, "elders.csv": b"c"}, "CN", None) != key
    assert snapshot_key(files, "US", None) != key
    assert snapshot_key(files, "CN", (1.0, 2.0, 3.0, 4.0)) != key
    # Names and contents cannot be shifted into one another.
    assert snapshot_key({"elders.csv": b"ab"}, "CN", None) != snapshot_key(
        {"elders.csv": b"a", "b": b""}, "CN", None)


# ---------------------------------------------------------------------------
# load_world: check-config writes the snapshot in the gateway's state folder, run reads it


def _config(tmp_path: Path) -> Config:
    return parse_config({"gateway": {"state_dir": str(tmp_path / "state")},
                         "registry": {"directory": str(SAMPLE)},
                         "mqtt": {"enabled": False},
                         "sms": {"from_number": "+15005550006"}}, tmp_path / "gateway.toml")


def test_world_writes_the_snapshot_in_its_own_state_folder_and_reuses_it(
    tmp_path: Path, validations: Counting
) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "state").mkdir()
    first = load_world(cfg)
    assert (tmp_path / "state" / REGISTRY_CACHE / SNAPSHOT_FILE).is_file()
    second = load_world(cfg)
    assert validations.calls == 1
    same(first.registry, second.registry)
    home = next(iter(second.registry.elders.values())).location
    assert second.geo.lookup(home) == first.geo.lookup(home)


def test_world_creates_no_state_folder(tmp_path: Path, validations: Counting) -> None:
    # check-config may run before the gateway ever started: it creates none of its files.
    cfg = _config(tmp_path)
    load_world(cfg)
    load_world(cfg)
    assert validations.calls == 2
    assert not (tmp_path / "state").exists()


def test_a_loaded_registry_is_frozen_out_of_the_collectors_passes(tmp_path: Path) -> None:
    # Left in the young generation, a city's million objects would all be walked by the
    # next collection: about 100 ms holding the GIL, beside the event loop on a reload.
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # full, write, then hit
        registry = load_registry(SAMPLE, cache_dir=cache)
        elder = next(iter(registry.elders.values()))
        tracked = {id(o) for o in gc.get_objects()}  # generations 0-2, not the frozen
        assert id(elder) not in tracked and id(registry) not in tracked
        assert gc.isenabled()


def test_a_replaced_world_is_freed_a_step_at_a_time_with_the_loop_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world_module, "RELEASE_STEP", 10)
    world = load_world(_config(tmp_path))
    elder = next(iter(world.registry.elders.values()))
    device = next(iter(world.registry.devices.values()))
    held_by_world = sys.getrefcount(elder)
    box, ticks = [world], []
    del world

    async def main() -> None:
        release = asyncio.ensure_future(world_module.release_world(box))
        while not release.done():
            ticks.append(sys.getrefcount(elder))
            await asyncio.sleep(0)
        await release

    asyncio.run(main())
    assert box == []
    # Nothing of the world holds its records any more: only this test does.
    assert sys.getrefcount(elder) == held_by_world - 1  # the elders mapping's
    assert sys.getrefcount(device) == sys.getrefcount(elder)
    # The loop ran between the steps (88 elders, their devices, 143 staff: many steps of
    # 10): the elder was taken into a batch while its mapping still held it, and was
    # held by one or the other until its own step, among the last (the elders' batches,
    # taken first, go last).
    assert len(ticks) > 50
    assert held_by_world + 1 in ticks
    freed_at = ticks.index(held_by_world - 1)
    assert min(ticks[:freed_at]) == held_by_world and freed_at > len(ticks) - 20


def test_a_rebuild_from_the_snapshot_paces_itself_line_by_line(tmp_path: Path) -> None:
    load_registry(SAMPLE, cache_dir=tmp_path)  # validates, writes the snapshot
    steps: list[int] = []
    registry = load_registry(SAMPLE, cache_dir=tmp_path, pace=lambda: steps.append(1))
    same(registry, load_registry(SAMPLE))
    assert len(steps) == 4  # one line per section: 88 elders, 88 devices, 143 staff, 11


async def test_a_reloads_step_waits_until_the_loop_ran_what_was_ready() -> None:
    loop = asyncio.get_running_loop()
    pace = world_module._loop_first(loop)
    order: list[str] = []

    def step() -> None:  # in the worker thread, as load_world's steps are
        loop.call_soon_threadsafe(order.append, "alarm work")  # ready before the turn
        pace()
        order.append("next step")

    await asyncio.to_thread(step)
    assert order == ["alarm work", "next step"]
    loop_closed = asyncio.new_event_loop()
    loop_closed.close()
    world_module._loop_first(loop_closed)()  # a closed loop: returns at once


# ---------------------------------------------------------------------------
# What phonenumbers said is kept across changes of the files


class CountingParses:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.numbers: list[str] = []
        real = registry_module._parse_phone

        def counted(raw: str, region: str) -> Any:
            self.numbers.append(raw)
            return real(raw, region)

        monkeypatch.setattr(registry_module, "_parse_phone", counted)


def test_a_changed_registry_parses_only_new_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    full = load_registry(directory, cache_dir=cache)
    parses = CountingParses(monkeypatch)
    # A new contact whose number is the elder's home phone (known, but without a line
    # type: parsed again for it), and one new number.
    write_registry(directory, {"contacts.csv": VALID["contacts.csv"]
                               + "E1,王芳,女儿,0546-2900001,zh\nE1,王丽,女儿,13905460099,zh\n"})
    changed = load_registry(directory, cache_dir=cache)
    assert sorted(parses.numbers) == ["0546-2900001", "13905460099"]
    contacts = changed.elders["E1"].contacts
    assert [c.phone for c in contacts] == ["+8613805460001", "+865462900001", "+8613905460099"]
    assert contacts[1].line_type == full.facilities["F1"].line_type  # a landline
    assert not contacts[1].sms_capable
    # Nothing new: no number parsed at all (the snapshot is not even needed for that).
    (cache / SNAPSHOT_FILE).unlink()
    parses.numbers.clear()
    again = load_registry(directory, cache_dir=cache)
    assert parses.numbers == []
    same(changed, again)


def test_numbers_of_a_refused_registry_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_registry(tmp_path, edit("contacts.csv", "13805460001", "1380546000"))
    cache = tmp_path / "cache"
    with pytest.raises(RegistryError):
        load_registry(directory, cache_dir=cache)
    assert not (cache / SNAPSHOT_FILE).exists()
    parses = CountingParses(monkeypatch)
    write_registry(directory)  # the typo fixed
    load_registry(directory, cache_dir=cache)
    assert parses.numbers == ["13805460001"]


@pytest.mark.parametrize("damage", [b"", b"\x00garbage", "flip", "wrong rows"])
def test_damaged_phone_file_is_ignored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: bytes | str
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    full = load_registry(directory, cache_dir=cache)
    path = cache / PHONES_FILE
    header, _, body = path.read_bytes().partition(b"\n")
    if damage == "flip":
        data = header + b"\n" + body[:-2] + b"?]"
    elif damage == "wrong rows":
        body = orjson.dumps([[1, 2, 3]])
        meta = {**orjson.loads(header), "sha256": hashlib.sha256(body).hexdigest()}
        data = orjson.dumps(meta) + b"\n" + body
    else:
        assert isinstance(damage, bytes)
        data = damage
    path.write_bytes(data)
    (cache / SNAPSHOT_FILE).unlink()
    parses = CountingParses(monkeypatch)
    with capture_logs() as logs:
        again = load_registry(directory, cache_dir=cache)
    same(full, again)
    assert len(parses.numbers) == 9  # every distinct number, as without a cache
    ignored = events(logs, "registry.snapshot_ignored")
    assert [e["log_level"] for e in ignored] == ["warning"]


def test_phone_file_of_another_region_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_registry(tmp_path)
    cache = tmp_path / "cache"
    load_registry(directory, cache_dir=cache)
    parses = CountingParses(monkeypatch)
    with pytest.raises(RegistryError):
        load_registry(directory, cache_dir=cache, default_region="US")
    assert parses.numbers
