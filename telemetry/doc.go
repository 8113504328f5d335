// Package telemetry is the agent's telemetry path: the record model (SenML,
// in package senml), local ingest on a unix socket and its client, the
// built-in Sampler (host health and the agent's own TLS SLIs; the
// [collectors] of the configuration), the pipeline from the durable queue
// (package store) to an uplink, and what the uplinks share: the Uplink
// interface the pipeline drives, the Identity they present, their typed
// connection state. The uplinks themselves are telemetry/mqtt (MQTT over
// TLS) and telemetry/coap (CoAP over DTLS).
//
//	producers ─▶ Ingest (ack after fsync) ─┐
//	Sampler (host, SLIs) ──────────────────┴▶ store ─▶ Pipeline ─▶ Uplink ─▶ broker/collector
//	                                        store.Ack ◀─ PUBACK / CoAP ACK ◀─┘
//
// Delivery is at-least-once: a record leaves the queue only after the
// broker or collector acknowledged the message that carried it. Every
// record carries its sequence number ("seq") so the backend drops
// duplicates.
package telemetry
