"""config/gateway.example.toml documents every key that exists, and parses as shipped.

The key list comes from the pydantic models of gateway/config.py, walked recursively,
so a section or key added there without its line in the example fails here (issue 10:
``[supervision]``, ``mqtt.client_id``, ``alert.output_dir``, ... were missing). A key
may be documented set or commented out (``# key = value`` under its table)."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway.config import GatewayConfigModel, load_config
from gateway.registry import registry_summary
from gateway.world import load_world

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "gateway.example.toml"

_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The config models an annotation holds: ``X``, ``X | None``, ``tuple[X, ...]``.

    A mapping's values are free-form keys (templates, event codes), not fields."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is dict:
        return
    if origin in (typing.Union, types.UnionType, tuple, typing.Annotated):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def config_fields(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every field's dotted path (array-of-tables elements share their table's path),
    True for a field whose value is a free-form mapping (its sub-keys are not fields)."""
    found: dict[str, bool] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        found[path] = typing.get_origin(info.annotation) is dict
        for sub in _models_in(info.annotation):
            found.update(config_fields(sub, path + "."))
    return found


def documented_keys(text: str) -> set[str]:
    """The dotted keys the example sets or shows commented out, with the tables holding them.

    A comment that reads as TOML (``# [gsm]``, ``# port = "..."``) counts as that line;
    the table a commented header opens lasts until the next header, like a real one."""
    keys: set[str] = set()
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        if commented:
            line = line.lstrip("#").strip()
        header = _HEADER.match(line)
        if header:
            table = header.group(1)
            parts = table.split(".")
            keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            continue
        key = _KEY.match(line)
        if key:
            keys.add(f"{table}.{key.group(1)}" if table else key.group(1))
    return keys


def test_the_walk_sees_nested_optional_and_repeated_sections() -> None:
    # Guards the walk itself: if it stopped descending, the next test would pass on nothing.
    fields = config_fields(GatewayConfigModel)
    for path in ("gateway.name", "mqtt.tls.insecure", "serial.heartbeat_missed",
                 "escalation.waves.hospital", "gsm.send_timeout_s", "sms.templates"):
        assert path in fields, path
    assert fields["sms.templates"] is True and fields["gateway.name"] is False
    assert "sms.templates.zh" not in fields


def test_every_config_key_is_in_the_example() -> None:
    fields = config_fields(GatewayConfigModel)
    keys = documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    missing = sorted(set(fields) - keys)
    assert not missing, f"{EXAMPLE.name} does not document: {', '.join(missing)}"


def test_the_example_documents_no_key_that_does_not_exist() -> None:
    # A stale or misspelt commented-out key teaches operators a line that is then refused.
    fields = config_fields(GatewayConfigModel)
    free = [path for path, is_mapping in fields.items() if is_mapping]
    keys = documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    unknown = sorted(k for k in keys - set(fields)
                     if not any(k.startswith(f"{path}.") for path in free))
    assert not unknown, f"{EXAMPLE.name} documents keys that do not exist: {', '.join(unknown)}"


def test_the_example_parses_as_shipped_with_its_registry() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.registry_dir == REPO / "config" / "sample"
    world = load_world(cfg)
    assert registry_summary(world.registry)["elders"] == 88
    # The shipped sample's duty desks are landlines: marked as such, never texted.
    assert world.registry.no_sms == {f.duty_phone for f in world.registry.facilities.values()}
