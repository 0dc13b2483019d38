"""The collection rule in conftest.py: a test using an integration fixture must be marked."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.conftest import unmarked_integration_tests


@dataclass
class FakeItem:
    """Just what the rule reads from a collected ``pytest.Item``."""

    nodeid: str
    fixturenames: list[str]
    marks: dict[str, pytest.Mark] = field(default_factory=dict)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self.marks.get(name)


def test_unmarked_tests_using_broker_pty_or_twilio_are_named() -> None:
    integration = {"integration": pytest.mark.integration.mark}
    items = [
        FakeItem("t.py::broker", ["tmp_path", "mosquitto"]),
        FakeItem("t.py::both", ["twilio", "pty"]),
        FakeItem("t.py::marked", ["mosquitto", "twilio"], integration),
        FakeItem("t.py::pure", ["tmp_path", "monkeypatch"]),
    ]
    found = unmarked_integration_tests(items)  # type: ignore[arg-type]
    assert found == ["t.py::broker (uses mosquitto)", "t.py::both (uses pty, twilio)"]


def test_this_suite_has_no_unmarked_integration_test(request: pytest.FixtureRequest) -> None:
    # The hook already refused collection otherwise; this states the rule for the
    # items of this very run, whatever -m or -k selected.
    assert unmarked_integration_tests(list(request.session.items)) == []
