// Package telemetry is the agent's telemetry path: the record model (SenML,
// in package senml), local ingest on a unix socket, built-in collectors
// (host health and the agent's own TLS SLIs), the pipeline from the durable
// queue (package store) to an uplink, and the MQTT-over-TLS uplink.
//
//	producers ─▶ Ingest (ack after fsync) ─┐
//	Collector (host, SLIs) ────────────────┴▶ store ─▶ Pipeline ─▶ Uplink ─▶ broker
//	                                        store.Ack ◀─ PUBACK / CoAP ACK ◀─┘
//
// Delivery is at-least-once: a record leaves the queue only after the
// broker or collector acknowledged the message that carried it. Every
// record carries its sequence number ("seq") so the backend drops
// duplicates.
//
// # Why our own reconnect loop
//
// paho.mqtt.golang with auto-reconnect on re-sends stored messages after a
// reconnect and completes the original publish token with no error before
// any PUBACK: a record deleted then is lost if that PUBACK never comes. The
// MQTT uplink therefore turns auto-reconnect off, treats paho's in-memory
// store as a cache, and reconnects itself with exponential backoff and
// full jitter; the bbolt queue is the source of truth.
package telemetry
