"""What people read and hear about an alarm: SMS bodies and the spoken announcement.

Every SMS quotes the alarm reference (used to acknowledge by reply and to find a
message again at Twilio after a crash) and fits in two UCS-2 segments (134
characters of Chinese): the address is shortened before anything else is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from gateway.smstext import segments

MAX_SEGMENTS = 2
CHINA_TZ = timezone(timedelta(hours=8))

DRILL_SMS_PREFIX = "【演习】"
"""Every SMS of a drill starts with this: whoever gets it knows nobody is in danger."""
DRILL_SPOKEN_PREFIX = "演习，演习。"
"""Said before a drill's announcement in the center."""

DEFAULT_TEMPLATES: Mapping[str, Mapping[str, str]] = {
    "zh": {
        "family": "【一键通】您的家人{name}于{time}按下紧急呼叫（{address}）。"
                  "{staff}请保持电话畅通。编号{ref}",
        "staff": "【一键通紧急】{name}（{community}）按下呼叫，地址：{address}，"
                 "距您约{distance}{whence}。请速前往，回复“{ref} 1”确认。{map}",
        # Appended to the distance when no recent position of the recipient was known.
        "whence_base": "（按您的登记地址估算）",
        "facility": "【一键通】{name}（{address}）紧急呼叫，可能需要医疗援助，"
                    "社区人员已出发。编号{ref}",
        "staff_line": "社区{responder}正在赶往。",
        "no_staff": "指挥中心正在联系社区人员。",
        "taken": "【一键通】编号{ref}：{name}的紧急呼叫已由{who}接单处理，谢谢。",
        "cancelled": "【一键通】编号{ref}：{name}已取消紧急呼叫（老人自行取消），"
                     "社区将回访确认。",
        # A supervisor's digest in a storm (gateway/digest.py): {alarms} lists the
        # newest first as "digest_item"s, {count} counts them all.
        "digest": "【一键通汇总】{minutes}分钟内另有{count}起紧急呼叫未获接单：{alarms}。"
                  "详情见指挥中心，回复“编号 1”接单。",
        "digest_item": "{ref} {name}（{community}）",
        "digest_more": "等",
        "spoken": "紧急呼叫。{community}，{name}，{address}。",
        "spoken_unknown": "紧急呼叫。未登记的设备，{address}。请立即处理。",
        "reply_thanks": "已确认由您接单，谢谢！编号{ref}",
        "reply_already": "编号{ref}已由{who}接单，无需前往。",
        "reply_declined": "已收到，正在通知其他人员。编号{ref}",
        "reply_help": "请回复“{ref} 1”接单，或“{ref} 2”表示无法前往。",
        "reply_not_recipient": "您不是编号{ref}的通知对象，无法确认。",
        "reply_no_alarm": "当前没有需要您确认的紧急呼叫。",
    },
    "en": {
        "family": "[SOS] {name} pressed the alarm button at {time} ({address}). "
                  "{staff}Please keep your phone free. Ref {ref}",
        "staff": "[SOS] {name} ({community}) needs help at {address}, about {distance} "
                 "from you{whence}. Please go now; reply \"{ref} 1\" to take it. {map}",
        "whence_base": " (from your registered base)",
        "facility": "[SOS] {name} ({address}) raised an alarm and may need medical help; "
                    "community staff are on the way. Ref {ref}",
        "staff_line": "Community worker {responder} is on the way. ",
        "no_staff": "The command center is calling community staff. ",
        "taken": "[SOS] Ref {ref}: {name}'s call has been taken by {who}. Thank you.",
        "cancelled": "[SOS] Ref {ref}: {name} cancelled the call; the community will check in.",
        "digest": "[SOS digest] {count} more alarms in {minutes} min not yet taken: "
                  "{alarms}. See the command center; reply \"<ref> 1\" to take one.",
        "digest_item": "{ref} {name} ({community})",
        "digest_more": " and more",
        "spoken": "Emergency call. {community}, {name}, {address}.",
        "spoken_unknown": "Emergency call from an unregistered device, {address}.",
        "reply_thanks": "Confirmed: the alarm is yours. Thank you! Ref {ref}",
        "reply_already": "Ref {ref} has already been taken by {who}.",
        "reply_declined": "Noted; we are telling others. Ref {ref}",
        "reply_help": "Reply \"{ref} 1\" to take the alarm or \"{ref} 2\" if you cannot go.",
        "reply_not_recipient": "You were not notified of {ref} and cannot confirm it.",
        "reply_no_alarm": "There is no alarm waiting for your confirmation.",
    },
}


@dataclass(frozen=True, slots=True)
class AlarmFacts:
    ref: str
    name: str
    community: str
    address: str
    received_at: float  # unix seconds
    responder: str | None = None  # nearest responder's name, if any


def format_distance(metres: float, language: str = "zh") -> str:
    if metres < 1000:
        value = f"{round(metres / 10) * 10:.0f}"
        return f"{value}米" if language == "zh" else f"{value} m"
    km = f"{metres / 1000:.1f}"
    return f"{km}公里" if language == "zh" else f"{km} km"


def _fit(template: str, fields: dict[str, str], shrink: str = "address",
         limit: int = MAX_SEGMENTS) -> str:
    """Render; shorten ``fields[shrink]`` from the middle until the text fits."""
    text = template.format(**fields)
    value = fields.get(shrink, "")
    while segments(text) > limit and len(value) > 4:
        cut = max(1, len(value) // 8)
        keep_head = (len(value) - cut) // 2
        value = value[:keep_head] + "…" + value[keep_head + cut + 1:]
        text = template.format(**{**fields, shrink: value})
    return text


class Composer:
    """Renders the SMS texts and the spoken alert from templates."""

    def __init__(self, templates: Mapping[str, Mapping[str, str]] = DEFAULT_TEMPLATES) -> None:
        self._t = templates

    def _lang(self, language: str) -> Mapping[str, str]:
        return self._t.get(language) or self._t["zh"]

    def _common(self, facts: AlarmFacts, language: str) -> dict[str, str]:
        t = self._lang(language)
        when = datetime.fromtimestamp(facts.received_at, CHINA_TZ).strftime("%H:%M")
        staff = (t["staff_line"].format(responder=facts.responder) if facts.responder
                 else t["no_staff"])
        return {"ref": facts.ref, "name": facts.name, "community": facts.community,
                "address": facts.address, "time": when, "staff": staff}

    def family(self, facts: AlarmFacts, language: str = "zh") -> str:
        return _fit(self._lang(language)["family"], self._common(facts, language))

    def staff(self, facts: AlarmFacts, distance_m: float, language: str = "zh",
              map_url: str | None = None, *, from_base: bool = False) -> str:
        """The SMS to a responder; ``from_base``: the distance is from their registered
        base location, no recent live position being known, and the text says so."""
        fields = self._common(facts, language)
        fields["distance"] = format_distance(distance_m, language)
        fields["whence"] = self._lang(language)["whence_base"] if from_base else ""
        # A map link costs a segment or two; it is off unless configured.
        fields["map"] = map_url or ""
        return _fit(self._lang(language)["staff"], fields,
                    limit=MAX_SEGMENTS + (2 if map_url else 0))

    def taken(self, facts: AlarmFacts, who: str, language: str = "zh") -> str:
        fields = self._common(facts, language)
        fields["who"] = who
        return _fit(self._lang(language)["taken"], fields)

    def cancelled(self, facts: AlarmFacts, language: str = "zh") -> str:
        return _fit(self._lang(language)["cancelled"], self._common(facts, language))

    def reply(self, kind: str, language: str = "zh", **fields: str) -> str:
        """Text sent back to someone who replied to an alarm SMS."""
        return self._lang(language)[f"reply_{kind}"].format(**fields)

    def facility(self, facts: AlarmFacts, language: str = "zh") -> str:
        return _fit(self._lang(language)["facility"], self._common(facts, language))

    def digest(self, alarms: Sequence[AlarmFacts], interval_s: float,
               language: str = "zh") -> str:
        """One SMS naming ``alarms`` (newest first) for a supervisor: as many as fit in
        three segments, then "and more"; the count is of them all."""
        t = self._lang(language)
        fields = {"count": str(len(alarms)), "minutes": f"{interval_s / 60:g}"}
        items = [t["digest_item"].format(**self._common(a, language)) for a in alarms]
        sep = "；" if language == "zh" else "; "
        shown = len(items)
        while True:
            listed = sep.join(items[:shown]) + ("" if shown == len(items) else t["digest_more"])
            text = t["digest"].format(**fields, alarms=listed)
            if shown <= 1 or segments(text) <= MAX_SEGMENTS + 1:
                return text
            shown -= 1

    def spoken(self, facts: AlarmFacts | None, address: str = "", language: str = "zh") -> str:
        t = self._lang(language)
        if facts is None:
            return t["spoken_unknown"].format(address=address)
        return t["spoken"].format(**self._common(facts, language))


def validate_templates(templates: Mapping[str, Mapping[str, str]]) -> Sequence[str]:
    """Problems with configured templates (missing kinds, unknown placeholders)."""
    problems: list[str] = []
    sample = {"ref": "ABCD-EFGH", "name": "x", "community": "x", "address": "x",
              "time": "00:00", "staff": "", "distance": "1", "responder": "x", "map": "",
              "who": "x", "whence": "", "count": "2", "minutes": "2", "alarms": "x"}
    for lang, kinds in templates.items():
        for kind in DEFAULT_TEMPLATES["zh"]:
            if kind not in kinds:
                problems.append(f"{lang}.{kind}: missing")
                continue
            try:
                kinds[kind].format(**sample)
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{lang}.{kind}: bad placeholder {exc}")
        for kind in ("family", "staff", "facility", "taken", "cancelled"):
            if kind in kinds and "{ref}" not in kinds[kind]:
                problems.append(f"{lang}.{kind}: must contain {{ref}} (the alarm reference)")
    return problems
