// Package mqtttest runs the fleet's MQTT side for tests: a real mosquitto
// broker configured like production (mutual TLS with certificates from a
// stationtest station, identity and client ID from the certificate, the
// fleet ACL, the station's CRL), a fleet-side Subscriber to observe what
// the broker delivers, and a TCP Proxy that injects network faults between
// an agent and the broker.
//
// This package is for tests only; the agent binary must not link it.
package mqtttest
