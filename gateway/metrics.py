"""Prometheus metrics, one registry per gateway instance (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.sms_latency = Histogram(
            "gateway_receipt_to_sms_ms", "Receipt to SMS accepted (ms)",
            buckets=_LATENCY_BUCKETS_MS, registry=r)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
