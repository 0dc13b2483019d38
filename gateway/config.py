"""Configuration: one TOML file, validated once at start into immutable typed objects.

Secrets never live in the file. They are read from environment variables or from
systemd credentials (``$CREDENTIALS_DIRECTORY/<name>``); the file only names
which variable or credential to use. Every error names the file, the key and the
reason, so an operator can fix a broken config without reading code.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from devices.events import EventKind
from gateway.wording import DEFAULT_TEMPLATES, validate_templates


class ConfigError(Exception):
    """A configuration problem: which file, which key, why."""

    def __init__(self, file: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class GatewaySection(_Section):
    name: str = Field("alarm-gateway", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    state_dir: Path = Path("/var/lib/alarm-gateway")
    journal_file: str = "journal.sqlite3"
    dedupe_window_s: PositiveFloat = 120.0
    shutdown_timeout_s: PositiveFloat = 20.0
    journal_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Routine device traffic (check-ins, batteries) older than this is pruned daily;
    # alarms, their logs and notifications are kept.
    retain_device_messages_days: float = Field(90.0, gt=0)
    # The center's time zone (IANA name): local days for the daily report, local times.
    timezone: str = "Asia/Shanghai"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as "
                             "'Asia/Shanghai')") from None
        return v

    @property
    def journal_path(self) -> Path:
        return self.state_dir / self.journal_file

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class RegistrySection(_Section):
    directory: Path = Path("sample")
    default_region: str = Field("CN", pattern=r"^[A-Z]{2}$")
    # Service area (min_lon, min_lat, max_lon, max_lat); points outside are registry errors.
    bbox: tuple[float, float, float, float] | None = None
    # How often to look for changed registry files (reloaded once they stop changing);
    # 0 turns the watch off (SIGHUP and POST /reload still reload).
    watch_interval_s: float = Field(5.0, ge=0, allow_inf_nan=False)
    # GeoJSON outline of the district, communities and grid cells for the console's
    # offline map (gateway.mapdata); relative paths are inside `directory`; none: the
    # map draws only the registry's points.
    district_map: Path | None = None

    @field_validator("bbox")
    @classmethod
    def _bbox_ordered(
        cls, v: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if v is None:
            return v
        min_lon, min_lat, max_lon, max_lat = v
        if not all(math.isfinite(x) for x in v):
            raise ValueError("bbox values must be finite")
        if not (-180 <= min_lon < max_lon <= 180 and -90 <= min_lat < max_lat <= 90):
            raise ValueError("bbox must be [min_lon, min_lat, max_lon, max_lat] in degrees")
        return v


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # journald: JSON with a <N> priority prefix (auto and json add it by themselves when
    # stdout is systemd's journal stream; see gateway/logs.py).
    format: Literal["auto", "json", "console", "journald"] = "auto"


class GeoSection(_Section):
    # UTM 50N covers 114-120E: the whole district, without the 118.5E Gauss-Kruger border.
    crs: str = "EPSG:32650"
    source_crs: str = "EPSG:4326"
    responders_k: int = Field(3, ge=1, le=50)
    stale_after_s: PositiveFloat = 600.0
    # Skip staff already sent to another open, unacknowledged alarm (their first wave).
    exclude_busy: bool = True


class TlsSection(_Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


class MqttSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    # Name of the env variable / systemd credential holding the password.
    password_secret: str = "mqtt_password"  # noqa: S105 - a credential name
    tls: TlsSection | None = None
    client_id: str | None = None  # default: "gw-<gateway.name>"
    keepalive_s: int = Field(30, ge=5, le=3600)
    z2m_base: str = "zigbee2mqtt"
    own_base: str = "alarm/buttons"
    status_topic: str = "alarm/gateway/{name}/status"
    alarm_topic: str = "alarm/alarms/{alarm_id}/state"
    emergency_actions: tuple[str, ...] = ("emergency", "sos", "single", "double", "hold", "panic")
    reconnect_initial_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    max_inflight: int = Field(64, ge=1, le=10_000)


class SerialPortSection(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    port: str
    protocol: Literal["surgard", "callerid"]
    baudrate: int = Field(9600, ge=300, le=921600)
    init_commands: tuple[str, ...] | None = None  # modem only; default ATZ, AT+VCID=1
    heartbeat_interval_s: PositiveFloat = 30.0
    heartbeat_missed: int = Field(3, ge=1, le=100)
    reconnect_initial_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0


class AlertSection(_Section):
    """The command center's audible alert, as :class:`gateway.alert.AlertPlayer` reads it.

    ``backend``: "auto" (paplay if ``pactl info`` works, else aplay if ``aplay -l``
    lists a card, else "file"), "aplay", "paplay", "file" (record plays and keep
    the WAVs in ``output_dir``; a temporary directory if None) or "none" (log only).
    ``device`` is the ALSA device for aplay (``-D``) or the sink for paplay.
    ``repeat_interval_s`` is the pause between rounds (0: back to back);
    ``max_render_s`` bounds espeak-ng per announcement (the tone plays alone past it);
    ``playback_margin_s`` is added to a WAV's duration to time out a stuck player;
    ``espeak`` is the espeak-ng binary (name on PATH or absolute path).
    ``summary_over``: when more alarms than this wait for the speaker, one summary
    ("紧急求助：共N起，最新：…") is announced instead of each (0: always a summary);
    ``max_wav_files`` bounds the rendered announcements kept on disk.
    """

    backend: Literal["auto", "aplay", "paplay", "file", "none"] = "auto"
    output_dir: Path | None = None
    repeat_interval_s: float = Field(10.0, ge=0, allow_inf_nan=False)
    voice: str = Field("cmn", min_length=1)
    device: str | None = Field(None, min_length=1)
    max_render_s: PositiveFloat = 10.0
    playback_margin_s: float = Field(3.0, ge=0, allow_inf_nan=False)
    espeak: str = Field("espeak-ng", min_length=1)
    summary_over: int = Field(3, ge=0)
    max_wav_files: int = Field(16, ge=1, le=10_000)


# A DNS host name: dot-separated labels of letters, digits and inner hyphens. No
# underscore: Twilio refuses callback URLs whose host has one (it is not a host name).
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def twilio_callback_url(url: str) -> str:
    """Check a URL that Twilio calls (webhooks, status callbacks); return it unchanged.

    ``http``/``https``, a host name or IP address (an optional port), an optional path;
    no query, fragment, credentials or trailing slash, because the gateway appends its
    own paths and Twilio signs the exact URL. Raises ValueError with the reason."""
    if url != url.strip() or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} contains whitespace")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an absolute http(s) URL")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"{url!r} has a query or fragment; give the base URL only "
                         "(the gateway appends /twilio/...)")
    if "@" in parts.netloc:
        raise ValueError(f"{url!r} carries credentials; Twilio signs its requests instead")
    if url.endswith("/"):
        raise ValueError(f"{url!r} ends with '/'; give it without (the gateway appends "
                         "/twilio/...)")
    try:
        host, _port = parts.hostname or "", parts.port
    except ValueError as exc:  # a port that is not a number, or out of range
        raise ValueError(f"{url!r}: {exc}") from None
    if not host:
        raise ValueError(f"{url!r} has no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if "_" in host:
            raise ValueError(f"host {host!r} has an underscore, which Twilio refuses in "
                             "callback URLs (use a name with hyphens)") from None
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"host {host!r} is not a valid host name") from None
    return url


class SmsSection(_Section):
    provider: Literal["twilio"] = "twilio"
    from_number: str | None = None
    messaging_service_sid: str | None = Field(None, pattern=r"^MG[0-9a-fA-F]{32}$")
    # Twilio API base URL; set for the local test double or a self-hosted proxy.
    base_url: str | None = Field(None, pattern=r"^https?://")
    account_sid_secret: str = "twilio_account_sid"  # noqa: S105 - a credential name
    auth_token_secret: str = "twilio_auth_token"  # noqa: S105 - a credential name
    request_timeout_s: PositiveFloat = 5.0
    max_attempts: int = Field(5, ge=1, le=20)  # per round of retries
    # Capped full-jitter backoff between the attempts of one round.
    backoff_initial_s: float = Field(0.2, ge=0, allow_inf_nan=False)
    backoff_max_s: PositiveFloat = 5.0
    # Twilio down and no fallback: pause between rounds, and give up this long after the press.
    retry_later_s: PositiveFloat = 30.0
    give_up_after_s: PositiveFloat = 1800.0
    concurrency: int = Field(16, ge=1, le=1000)
    # Messages per second the account (or sender) may start; past it Twilio answers 429 /
    # 20429. None: only `concurrency` limits. In a storm the first waves go first.
    rate_per_s: float | None = Field(None, gt=0, le=10000, allow_inf_nan=False)
    budget_ms: PositiveFloat = 2000.0
    # Public HTTPS URL at which Twilio reaches this gateway (reverse proxy to the control
    # port): enables StatusCallback delivery reports and acknowledgement by SMS reply.
    public_url: str | None = None
    # Behind NAT (no webhooks): poll Twilio for replies / delivery reports (0 = off).
    poll_inbound_s: float = Field(0.0, ge=0)
    poll_status_s: float = Field(0.0, ge=0)
    # Map link in staff messages, e.g. "https://uri.amap.com/marker?position={lon},{lat}"
    map_url_template: str | None = None
    # Overrides of the message templates per language, e.g. [sms.templates.zh] family = "..."
    templates: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("public_url")
    @classmethod
    def _callback_url(cls, v: str | None) -> str | None:
        return None if v is None else twilio_callback_url(v)

    @model_validator(mode="after")
    def _one_sender(self) -> SmsSection:
        if bool(self.from_number) == bool(self.messaging_service_sid):
            raise ValueError("set exactly one of from_number or messaging_service_sid")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        if self.map_url_template and ("{lon}" not in self.map_url_template
                                      or "{lat}" not in self.map_url_template):
            raise ValueError("map_url_template needs {lon} and {lat}")
        problems = validate_templates(self.merged_templates())
        if problems:
            raise ValueError("templates: " + "; ".join(problems))
        return self

    def merged_templates(self) -> dict[str, dict[str, str]]:
        merged = {lang: dict(kinds) for lang, kinds in DEFAULT_TEMPLATES.items()}
        for lang, kinds in self.templates.items():
            merged.setdefault(lang, dict(DEFAULT_TEMPLATES["zh"])).update(kinds)
        return merged


class GsmSection(_Section):
    """SMS fallback through a GSM modem when Twilio is unreachable or failing,
    as :class:`gateway.gsm.GsmModemSender` reads it.

    ``port`` is a pyserial URL or device path (in production a stable
    ``/dev/serial/by-id/...`` link). ``command_timeout_s`` bounds each command
    and the wait for the ``> `` prompt; ``send_timeout_s`` the wait for
    ``+CMGS`` after the PDU. ``smsc`` (``+`` and digits) overrides the SIM's
    service centre; ``validity_minutes`` ``None`` leaves the validity to it.
    Failed attempts back off with full jitter between ``backoff_initial_s``
    and ``backoff_max_s``.
    """

    port: str = Field(min_length=1)
    baudrate: int = Field(115200, ge=300, le=921600)
    command_timeout_s: PositiveFloat = 10.0
    send_timeout_s: PositiveFloat = 60.0
    max_attempts: int = Field(3, ge=1, le=10)
    smsc: str | None = Field(None, pattern=r"^\+[0-9]{1,20}$")
    validity_minutes: int | None = Field(1440, ge=1)
    backoff_initial_s: float = Field(0.5, ge=0, allow_inf_nan=False)
    backoff_max_s: float = Field(5.0, ge=0, allow_inf_nan=False)
    # With [voice] on: a call Twilio cannot place rings the number this long from the
    # modem instead (ATD<number>; then ATH): no speech, but the center's number rings.
    # 0: the modem never rings anyone.
    ring_s: float = Field(20.0, ge=0, le=120, allow_inf_nan=False)

    @model_validator(mode="after")
    def _backoff_ordered(self) -> GsmSection:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need backoff_initial_s <= backoff_max_s")
        return self


Channel = Literal["sms", "voice", "both"]
RecipientKind = Literal["family", "staff", "supervisor", "clinic", "hospital"]


class WaveSection(_Section):
    """One escalation wave: who is told, and when (seconds after the press) if nobody
    has acknowledged by then. :class:`gateway.escalation.Planner` plans from these."""

    after_s: float = Field(ge=0, allow_inf_nan=False)
    family: bool = False
    staff: int = Field(0, ge=0, le=50)  # the next N nearest on-duty staff not told yet
    supervisor: bool = False
    clinic: bool = False
    hospital: bool = False
    # How each kind of recipient is told when [voice] is on: "sms" (default), "voice" or
    # "both". Staff by voice are a call tree (one at a time, nearest first, until one
    # presses 1); family by voice are the first ``call_family`` contacts. Whoever no SMS
    # reaches (a landline) is called anyway; with [voice] off everyone is texted.
    channels: dict[RecipientKind, Channel] = Field(default_factory=dict)
    call_family: int = Field(1, ge=1, le=10)

    def channel(self, kind: RecipientKind) -> Channel:
        return self.channels.get(kind, "sms")


def _default_waves() -> tuple[WaveSection, ...]:
    # The one definition of the default waves (the planner has no copy of its own).
    return (
        WaveSection(after_s=0, family=True, staff=2, channels={"family": "both"}),
        WaveSection(after_s=120, staff=3, supervisor=True, channels={"staff": "both"}),
        WaveSection(after_s=300, hospital=True, channels={"hospital": "voice"}),
    )


class VoiceSection(_Section):
    """Calls through Twilio Programmable Voice, as :mod:`gateway.calling` reads it.

    Off by default: it needs a voice-capable number (``from_number``, default
    ``sms.from_number``). ``language``/``voice`` go to ``<Say>``; ``ring_timeout_s`` is
    how long a call rings before it is ``no-answer``; ``machine_detection`` asks Twilio
    to tell a voicemail from a person; ``gather_timeout_s`` is how long the callee has
    to press a digit; ``tree_max_s`` bounds a wave's call tree; ``poll_s`` is how often
    a call's status is fetched when no status callback can reach the gateway."""

    enabled: bool = False
    from_number: str | None = Field(None, pattern=r"^\+[1-9][0-9]{6,14}$")
    language: str = Field("cmn-CN", min_length=2)
    # Twilio's default voice ("man") speaks no Mandarin: an invalid voice/language pair
    # fails the <Say>. Polly.Zhiyu is Twilio's Amazon Polly voice for cmn-CN.
    voice: str | None = Field("Polly.Zhiyu", min_length=1)
    ring_timeout_s: int = Field(30, ge=5, le=600)
    machine_detection: bool = True
    gather_timeout_s: int = Field(8, ge=1, le=60)
    tree_max_s: PositiveFloat = 300.0
    poll_s: PositiveFloat = 5.0


class EscalationSection(_Section):
    waves: tuple[WaveSection, ...] = Field(default_factory=_default_waves)
    # A storm (gateway/digest.py): a supervisor gets at most supervisor_digest_after SMS of
    # their own per supervisor_digest_s; the alarms after those wait for one digest SMS
    # per interval naming them (journaled, so a restart sends it).
    supervisor_digest_after: int = Field(default=3, ge=1)
    supervisor_digest_s: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("waves")
    @classmethod
    def _ordered(cls, v: tuple[WaveSection, ...]) -> tuple[WaveSection, ...]:
        if not v:
            raise ValueError("at least one wave is needed")
        if v[0].after_s != 0:
            raise ValueError("the first wave must start at after_s = 0")
        if any(b.after_s <= a.after_s for a, b in itertools.pairwise(v)):
            raise ValueError("waves must be in increasing after_s order")
        return v


_UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, one for the terminating NUL


def is_loopback(host: str) -> bool:
    """True for names and addresses that never leave this machine."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ControlSection(_Section):
    """The operator's control API, as :class:`gateway.control.ControlServer` reads it.

    It always listens on the unix socket ``socket`` (relative: in
    ``gateway.state_dir``), with mode ``socket_mode``: file permissions decide who
    is an operator, and ``gateway ack|resolve|status|duty`` use it. A TCP listener
    exists only when ``port`` is set (0: any free port); every request on it then
    needs ``Authorization: Bearer <token>``, the token read from the credential
    or env variable named by ``token_secret``. A non-loopback ``host`` is refused
    unless ``behind_tls_proxy`` is true and ``public_names`` lists the names the
    proxy serves (the Host header must be one of them, or a loopback name), or the
    listener speaks TLS itself (``tls_cert_file`` and ``tls_key_file``, PEM; then
    ``public_names`` lists the names the certificate is for).
    The operator console (``[console]``) is served on this TCP listener.
    """

    socket: Path = Path("control.sock")
    socket_mode: int = 0o660
    port: int | None = Field(None, ge=0, le=65535)
    token_secret: str = "control_token"  # noqa: S105 - a credential name
    behind_tls_proxy: bool = False
    public_names: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,253}$")], ...] = ()
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Declared after the proxy and TLS settings: its check reads them.
    host: str = Field("127.0.0.1", min_length=1)

    @property
    def tls(self) -> bool:
        """Browsers reach the listener over TLS (its own certificate or a proxy)."""
        return self.behind_tls_proxy or self.tls_cert_file is not None

    @model_validator(mode="after")
    def _tls_pair(self) -> ControlSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: int) -> int:
        if v not in (0o600, 0o660):
            raise ValueError("must be 0o600 (the gateway's user only) or 0o660 (and its group)")
        return v

    @field_validator("host")
    @classmethod
    def _loopback_unless_proxied(cls, v: str, info: ValidationInfo) -> str:
        if is_loopback(v):
            return v
        tls = info.data.get("behind_tls_proxy") or info.data.get("tls_cert_file")
        if not (tls and info.data.get("public_names")):
            raise ValueError(
                f"{v!r} is not a loopback address: the control API and the console act on "
                "alarms and must not be reachable from the network in clear text; keep "
                "127.0.0.1, or set control.behind_tls_proxy = true (or control.tls_cert_file "
                "and control.tls_key_file) with control.public_names (the names browsers "
                "use) and a control_token credential")
        return v

    def socket_path(self, state_dir: Path) -> Path:
        return self.socket if self.socket.is_absolute() else state_dir / self.socket


class ConsoleSection(_Section):
    """The operator console, a web page on the control API's TCP listener
    (``control.port``) under ``/console/``; off when there is no TCP listener.

    Operators sign in with accounts made by ``gateway operator add``. ``tile_url``:
    a raster tile server of the center's own (``{z}/{x}/{y}``) drawn under the
    offline vector map; empty: the vector map only (no request leaves the gateway).
    """

    enabled: bool = True
    language: Literal["zh", "en"] = "zh"
    tile_url: str = Field("", pattern=r"^(|https?://\S+\{z\}\S*)$")
    tile_attribution: str = Field("", max_length=200)
    session_idle_h: float = Field(8.0, gt=0, le=72, allow_inf_nan=False)
    session_max_h: float = Field(24.0, gt=0, le=168, allow_inf_nan=False)
    max_failures: int = Field(5, ge=1, le=100)
    lockout_min: float = Field(15.0, gt=0, le=1440, allow_inf_nan=False)


class WebhooksSection(_Section):
    """The listener of Twilio's webhooks (``/twilio/inbound``, ``/twilio/status``),
    on only when ``sms.public_url`` is set. It serves nothing else, so the reverse
    proxy behind ``sms.public_url`` forwards here and exposes no control route."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8766, ge=0, le=65535)


class SupervisionSection(_Section):
    grace: float = Field(1.5, ge=1.0, le=10.0)  # a check-in may be this many intervals late
    low_battery_pct: float = Field(20.0, ge=0, le=100)
    check_every_s: PositiveFloat = 60.0


class LifecycleSection(_Section):
    """What closes an acknowledged alarm, as :class:`gateway.closure.Closure` reads it.

    ``auto_resolve_after_min``: resolve it (by "gateway") this many minutes after its
    acknowledgement unless someone asked to keep it open; 0 = never. ``remind_every_min``:
    an operator notice ``alarm.still_open`` every this many minutes while it is
    acknowledged but open; 0 = never. ``check_every_s``: how often the journal is looked
    at (the most an action can be late)."""

    auto_resolve_after_min: float = Field(240.0, ge=0, allow_inf_nan=False)
    remind_every_min: float = Field(30.0, ge=0, allow_inf_nan=False)
    check_every_s: PositiveFloat = 30.0


class ReportSection(_Section):
    """The daily report (:mod:`gateway.report`): made for each local day
    ``after_midnight_min`` minutes after the center's midnight, journaled and logged."""

    enabled: bool = True
    after_midnight_min: float = Field(5.0, ge=0, le=720, allow_inf_nan=False)


class RetentionSection(_Section):
    """Personal data and old alarms, as :mod:`gateway.retention` prunes them daily.

    ``alarms_years``: resolved alarms older than this are deleted with their log,
    notifications and device messages. ``sms_personal_data_days``: SMS records older
    than this lose the phone number (kept masked), the name and the text. Each
    writer job handles at most ``batch_rows`` alarms or SMS records, so that a press
    never waits behind more than one batch."""

    alarms_years: float = Field(5.0, gt=0, allow_inf_nan=False)
    sms_personal_data_days: float = Field(90.0, gt=0, allow_inf_nan=False)
    batch_rows: int = Field(500, ge=1, le=100_000)


class ContactIdSection(_Section):
    # Contact ID event code -> alarm kind overrides, e.g. {"150" = "emergency"}.
    codes: dict[str, EventKind] = Field(default_factory=dict)

    @field_validator("codes")
    @classmethod
    def _three_hex(cls, v: dict[str, EventKind]) -> dict[str, EventKind]:
        for code in v:
            if len(code) != 3 or any(c not in "0123456789ABCDEFabcdef" for c in code):
                raise ValueError(f"event code {code!r} must be 3 hex digits")
        return v


class GatewayConfigModel(_Section):
    gateway: GatewaySection = GatewaySection()
    registry: RegistrySection = RegistrySection()
    logging: LoggingSection = LoggingSection()
    geo: GeoSection = GeoSection()
    mqtt: MqttSection = MqttSection()
    serial: tuple[SerialPortSection, ...] = ()
    alert: AlertSection = AlertSection()
    sms: SmsSection
    control: ControlSection = ControlSection()
    webhooks: WebhooksSection = WebhooksSection()
    console: ConsoleSection = ConsoleSection()
    contact_id: ContactIdSection = ContactIdSection()
    supervision: SupervisionSection = SupervisionSection()
    escalation: EscalationSection = EscalationSection()
    voice: VoiceSection = VoiceSection()
    gsm: GsmSection | None = None
    lifecycle: LifecycleSection = LifecycleSection()
    report: ReportSection = ReportSection()
    retention: RetentionSection = RetentionSection()

    @model_validator(mode="after")
    def _unique_serial_names(self) -> GatewayConfigModel:
        names = [s.name for s in self.serial]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"serial port names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _voice_number(self) -> GatewayConfigModel:
        if self.voice.enabled and not (self.voice.from_number or self.sms.from_number):
            raise ValueError("voice.from_number: calls need a voice-capable number (or "
                             "sms.from_number)")
        return self

    @model_validator(mode="after")
    def _control_listeners(self) -> GatewayConfigModel:
        path = self.control.socket_path(self.gateway.state_dir)
        # The socket is bound in a private folder next to it (see gateway.control):
        # its path is a few bytes longer than the final one.
        if len(os.fsencode(path)) + 12 > _UNIX_PATH_MAX:
            raise ValueError(f"control.socket: {path} is too long for a unix socket "
                             f"(at most {_UNIX_PATH_MAX - 12} bytes); use a shorter path")
        c, w = self.control, self.webhooks
        if self.sms.public_url and c.port and c.port == w.port:
            raise ValueError(f"webhooks.port: {w.port} is also control.port; the webhook "
                             "listener must be a port of its own")
        return self


@dataclass(frozen=True, slots=True)
class Secrets:
    """Secrets resolved from the environment or systemd credentials. Never logged."""

    twilio_account_sid: str | None
    twilio_auth_token: str | None
    mqtt_password: str | None
    control_token: str | None = None

    def __repr__(self) -> str:
        def shown(v: str | None) -> str:
            return "unset" if v is None else "set"

        return (
            f"Secrets(twilio_account_sid={shown(self.twilio_account_sid)}, "
            f"twilio_auth_token={shown(self.twilio_auth_token)}, "
            f"mqtt_password={shown(self.mqtt_password)}, "
            f"control_token={shown(self.control_token)})"
        )


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration plus where it came from."""

    source: Path
    model: GatewayConfigModel

    @property
    def registry_dir(self) -> Path:
        d = self.model.registry.directory
        return d if d.is_absolute() else (self.source.parent / d)

    @property
    def district_map_path(self) -> Path | None:
        """``[registry] district_map``, a relative path taken inside :attr:`registry_dir`."""
        m = self.model.registry.district_map
        return m if m is None or m.is_absolute() else (self.registry_dir / m)


def _loc_to_key(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + p)
    return "".join(parts)


def parse_config(data: Mapping[str, Any], source: Path) -> Config:
    """Validate already-parsed TOML data; raise ConfigError naming the first bad key."""
    if "secrets" in data or _contains_secret_key(data):
        raise ConfigError(
            source,
            _secret_key_path(data),
            "secrets must not be stored in the config file; "
            "use environment variables or systemd credentials (see README)",
        )
    try:
        model = GatewayConfigModel.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _loc_to_key(tuple(first["loc"]))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "required key is missing"
        more = len(exc.errors()) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(source, key, msg) from None
    return Config(source=source, model=model)


_SECRET_KEYS = {"auth_token", "password", "account_sid", "token", "api_key", "secret"}


def _secret_key_path(data: Mapping[str, Any], prefix: str = "") -> str:
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k in _SECRET_KEYS or k == "secrets":
            return path
        if isinstance(v, Mapping):
            found = _secret_key_path(v, path)
            if found:
                return found
    return ""


def _contains_secret_key(data: Mapping[str, Any]) -> bool:
    return bool(_secret_key_path(data))


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not valid UTF-8 at byte {exc.start}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    return parse_config(data, path.resolve())


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """A secret from ``$CREDENTIALS_DIRECTORY/<name>`` (systemd) or env ``<NAME>``."""
    env = os.environ if env is None else env
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        p = Path(cred_dir) / name
        if p.is_file():
            return p.read_text(encoding="utf-8").strip() or None
    value = env.get(name.upper())
    return value.strip() if value and value.strip() else None


def load_secrets(cfg: Config, env: Mapping[str, str] | None = None) -> Secrets:
    m = cfg.model
    return Secrets(
        twilio_account_sid=read_secret(m.sms.account_sid_secret, env),
        twilio_auth_token=read_secret(m.sms.auth_token_secret, env),
        mqtt_password=read_secret(m.mqtt.password_secret, env) if m.mqtt.username else None,
        control_token=read_secret(m.control.token_secret, env),
    )


#: Shortest control token accepted: a bearer token is a password nobody types.
MIN_CONTROL_TOKEN = 24


def check_control_token(cfg: Config, secrets: Secrets) -> None:
    """Refuse a TCP control listener without a usable token (ConfigError naming the key).

    Checked by ``check-config`` and before the gateway starts: the token is a
    secret, so the file alone cannot say whether it is there."""
    c = cfg.model.control
    if c.port is None:
        return
    where = f"credential '{c.token_secret}' or env {c.token_secret.upper()}"
    if secrets.control_token is None:
        raise ConfigError(cfg.source, "control.port",
                          f"a TCP listener needs a bearer token and none is set ({where}); "
                          "remove control.port to use the unix socket only")
    if len(secrets.control_token) < MIN_CONTROL_TOKEN:
        raise ConfigError(cfg.source, "control.token_secret",
                          f"the token in {where} is shorter than {MIN_CONTROL_TOKEN} "
                          "characters (make one with: openssl rand -hex 32)")


#: Twilio Account SIDs: "AC" and 32 hex digits (``gateway.sms.TwilioAccount`` checks the
#: same at start; checked here too so that ``check-config`` cannot pass a SID that
#: every send would then fail with).
ACCOUNT_SID_PATTERN: Final = re.compile(r"AC[0-9a-fA-F]{32}")


def secret_source(name: str, env: Mapping[str, str] | None = None) -> str:
    """Where :func:`read_secret` looks for ``name``, for error messages (never the value)."""
    env = os.environ if env is None else env
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / name).is_file():
        return f"credential file {Path(cred_dir) / name}"
    if env.get(name.upper(), "").strip():
        return f"env {name.upper()}"
    return f"systemd credential '{name}' or env {name.upper()}"


def check_twilio_secrets(cfg: Config, secrets: Secrets,
                         env: Mapping[str, str] | None = None) -> None:
    """Refuse missing Twilio credentials or a malformed Account SID (ConfigError naming
    the credential): what the file cannot show, checked before anything is sent."""
    sms = cfg.model.sms
    sid_name, token_name = sms.account_sid_secret, sms.auth_token_secret
    if secrets.twilio_account_sid is None:
        raise ConfigError(cfg.source, "sms.account_sid_secret",
                          f"the Twilio Account SID is not set "
                          f"({secret_source(sid_name, env)})")
    if not ACCOUNT_SID_PATTERN.fullmatch(secrets.twilio_account_sid):
        raise ConfigError(cfg.source, "sms.account_sid_secret",
                          f"the Twilio Account SID in {secret_source(sid_name, env)} is not "
                          f"'AC' followed by 32 hex digits (it has "
                          f"{len(secrets.twilio_account_sid)} characters); copy it from "
                          "the Twilio console")
    if secrets.twilio_auth_token is None:
        raise ConfigError(cfg.source, "sms.auth_token_secret",
                          f"the Twilio auth token is not set "
                          f"({secret_source(token_name, env)})")
