"""Message texts: every SMS quotes the alarm reference and fits two UCS-2 segments."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.registry import load_registry
from gateway.sms import segments
from gateway.wording import DEFAULT_TEMPLATES, AlarmFacts, Composer, format_distance
from tests.helpers import SAMPLE

REF = "K7QM-3XRD"


def facts(name: str = "张秀英", address: str = "垦利区胜利社区胜利路12号3单元201",
          community: str = "胜利社区", responder: str | None = "王强") -> AlarmFacts:
    return AlarmFacts(REF, name, community, address, 1_790_000_000.0, responder)


def test_every_sample_elder_gets_texts_within_two_segments() -> None:
    c = Composer()
    reg = load_registry(SAMPLE)
    for elder in reg.elders.values():
        f = AlarmFacts(REF, elder.name, elder.community, elder.address, 1_790_000_000.0, "王强")
        for text in (c.family(f), c.staff(f, 1234.0), c.staff(f, 1234.0, from_base=True),
                     c.facility(f), c.taken(f, "李娜"), c.cancelled(f)):
            assert REF in text
            assert segments(text) <= 2
            assert len(text) <= 134  # Chinese: UCS-2, 2 x 67 characters


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=1, max_size=12), address=st.text(min_size=0, max_size=200),
       community=st.text(max_size=10))
def test_long_addresses_are_shortened_never_the_reference(name: str, address: str,
                                                          community: str) -> None:
    c = Composer()
    f = facts(name, address, community)
    for text in (c.family(f), c.staff(f, 80.0), c.staff(f, 80.0, from_base=True),
                 c.facility(f)):
        assert REF in text
        if len(name) + len(community) < 20:
            assert segments(text) <= 2


def test_chinese_family_text_reads_right() -> None:
    text = Composer().family(facts())
    assert text.startswith("【一键通】您的家人张秀英")
    assert "胜利路12号" in text and "王强正在赶往" in text and text.endswith(REF)
    assert Composer().family(facts(responder=None)).count("指挥中心正在联系") == 1


def test_english_template_and_distances() -> None:
    text = Composer().staff(facts(), 2480.0, language="en")
    assert "about 2.5 km from you" in text and f'"{REF} 1"' in text
    assert format_distance(346.0) == "350米"
    assert format_distance(1234.0, "en") == "1.2 km"


def test_a_distance_from_the_registered_base_says_so() -> None:
    live = Composer().staff(facts(), 480.0)
    base = Composer().staff(facts(), 480.0, from_base=True)
    assert "距您约480米。" in live and "登记地址" not in live
    assert "距您约480米（按您的登记地址估算）。" in base
    english = Composer().staff(facts(), 480.0, language="en", from_base=True)
    assert "about 480 m from you (from your registered base)." in english


def test_map_link_is_optional_and_may_use_more_segments() -> None:
    url = "https://uri.amap.com/marker?position=118.543950,37.572859"
    with_map = Composer().staff(facts(), 300.0, map_url=url)
    assert with_map.endswith(url)
    assert url not in Composer().staff(facts(), 300.0)


def test_configured_templates_are_validated_and_used() -> None:
    base = {"sms": {"from_number": "+15005550006"}}
    cfg = parse_config({"sms": {**base["sms"], "templates": {"zh": {
        "family": "紧急：{name}按下一键通，编号{ref}"}}}}, Path("x.toml"))
    composer = Composer(cfg.model.sms.merged_templates())
    assert composer.family(facts()) == f"紧急：张秀英按下一键通，编号{REF}"
    assert composer.staff(facts(), 10.0) == Composer().staff(facts(), 10.0)  # untouched kinds
    with pytest.raises(ConfigError) as err:
        parse_config({"sms": {**base["sms"], "templates": {"zh": {"family": "no reference"}}}},
                     Path("x.toml"))
    assert "must contain {ref}" in err.value.reason
    with pytest.raises(ConfigError) as err:
        parse_config({"sms": {**base["sms"], "templates": {"zh": {"family": "{nme} {ref}"}}}},
                     Path("x.toml"))
    assert "bad placeholder" in err.value.reason
    assert set(DEFAULT_TEMPLATES["en"]) == set(DEFAULT_TEMPLATES["zh"])
