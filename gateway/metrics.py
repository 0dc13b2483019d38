"""Prometheus metrics, one registry per gateway instance (tests run several).

Most are counted where they happen. What other parts already count (notices by kind
on the notice board, MQTT reconnects on the link, offline and overdue devices in
supervision) is read at scrape time through :meth:`Metrics.watch`, so those parts
need no metrics object and the figures cannot drift from what ``/healthz`` and
``gateway status`` show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import gateway

DISTRIBUTION = "elder-alarm-gateway"

_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 30000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.device_messages = Counter(
            "gateway_device_messages", "Device messages received", ["source", "kind"], registry=r)
        self.protocol_errors = Counter(
            "gateway_protocol_errors", "Malformed device input", ["source"], registry=r)
        self.intake_crashes = Counter(
            "gateway_intake_crashes", "Device messages a handler failed on (a bug)", registry=r)
        self.unknown_devices = Counter(
            "gateway_unknown_devices", "Messages from devices not in the registry", registry=r)
        self.alarms = Counter("gateway_alarms", "Alarms opened", ["source"], registry=r)
        self.drills = Counter("gateway_drills", "Drill alarms opened (not in gateway_alarms)",
                              registry=r)
        self.presses_joined = Counter(
            "gateway_presses_joined", "Presses joined to an open alarm", registry=r)
        self.journal_errors = Counter(
            "gateway_journal_errors", "Journal writes that failed", registry=r)
        self.journal_latency = Histogram(
            "gateway_receipt_to_journal_ms", "Receipt to journal commit (ms)",
            buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.sms_sent = Counter("gateway_sms_accepted", "SMS accepted by Twilio", ["role"],
                                registry=r)
        self.sms_failed = Counter("gateway_sms_failed", "SMS given up", ["role", "reason"],
                                  registry=r)
        self.calls = Counter("gateway_calls", "Calls by how they ended (accepted, declined, "
                             "unanswered, busy, no-answer, machine, failed, rang, skipped)",
                             ["state"], registry=r)
        self.supervisor_held = Counter(
            "gateway_supervisor_held", "Supervisor alarm SMS held for a digest (a storm)",
            registry=r)
        self.supervisor_digests = Counter(
            "gateway_supervisor_digests", "Digest SMS planned to supervisors", registry=r)
        self.sms_latency = Histogram(
            "gateway_receipt_to_sms_ms", "Receipt to first-wave SMS accepted (ms)",
            buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.press_to_sms = Histogram(
            "gateway_press_to_sms_ms", "Press to first-wave SMS accepted (ms): from the "
            "device's own time when it stamps its messages (the SMS budget)",
            buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.press_to_alert = Histogram(
            "gateway_press_to_alert_ms", "Press to the center hearing the alarm (ms): the "
            "player started the first tone, announcement or summary that covers it",
            buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.device_wait = Histogram(
            "gateway_device_to_receipt_ms", "A stamped device message's time to its "
            "receipt (ms): the bridge, the broker, the network", buckets=_LATENCY_BUCKETS_MS,
            registry=r)
        self.device_clock_off = Counter(
            "gateway_device_clock_off", "Stamped device messages whose time is implausible "
            "(ahead of the gateway, or over a day old): latency counted from receipt",
            registry=r)
        self.sms_budget_breaches = Counter(
            "gateway_sms_budget_breaches", "SMS accepted later than the latency budget",
            registry=r)
        self.open_alarms = Gauge("gateway_open_alarms", "Alarms not yet resolved", registry=r)
        self.alerting = Gauge("gateway_alerting_alarms", "Alarms sounding in the center",
                              registry=r)
        self.transport_up = Gauge("gateway_transport_up", "1 when a device channel is connected",
                                  ["channel"], registry=r)
        self.responders_on_duty = Gauge(
            "gateway_responders_on_duty",
            "Responders who may be sent (not supervisors), on duty by roster or override",
            registry=r)
        self.responders_live = Gauge(
            "gateway_responders_live", "Responders with a fresh position from their phone",
            registry=r)

        self.deliveries = Counter(
            "gateway_sms_deliveries", "Carrier delivery reports that changed a message's state",
            ["status"], registry=r)
        self.build = Info("gateway_build", "The running gateway's version", registry=r)
        self.build.info({"version": build_version()})
        self._watched = _Watched()
        r.register(self._watched)

    def watch(self, *, notices_by_kind: Mapping[str, int] | None = None,
              mqtt_reconnects: Callable[[], int] | None = None,
              devices: Callable[[], tuple[int, int]] | None = None) -> None:
        """Read these at each scrape: the notice board's counts by kind, the MQTT link's
        reconnects, supervision's (offline, overdue) device counts."""
        w = self._watched
        w.notices_by_kind = notices_by_kind if notices_by_kind is not None else w.notices_by_kind
        w.mqtt_reconnects = mqtt_reconnects or w.mqtt_reconnects
        w.devices = devices or w.devices

    def render(self) -> bytes:
        return generate_latest(self.registry)


def build_version() -> str:
    """The installed distribution's version (what pip installed), else the source's."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return gateway.__version__


@dataclass(eq=False)  # registered in a dict: hashable by identity
class _Watched(Collector):
    notices_by_kind: Mapping[str, int] | None = None
    mqtt_reconnects: Callable[[], int] | None = None
    devices: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        notices = CounterMetricFamily("gateway_notices", "Operator notices raised, by kind",
                                      labels=["kind"])
        for kind, n in sorted((self.notices_by_kind or {}).items()):
            notices.add_metric([kind], n)
        yield notices
        if self.mqtt_reconnects is not None:
            yield CounterMetricFamily("gateway_mqtt_reconnects",
                                      "MQTT connections made after the first",
                                      value=self.mqtt_reconnects())
        if self.devices is not None:
            offline, overdue = self.devices()
            yield GaugeMetricFamily("gateway_devices_offline",
                                    "Devices with an offline notice outstanding", value=offline)
            yield GaugeMetricFamily("gateway_devices_overdue",
                                    "Devices offline or past their expected check-in",
                                    value=overdue)
