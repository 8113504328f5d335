// Package layout holds no code: its test checks the project's package
// structure against the map in the README, from the code's own imports.
//
//	cmd/iotagent ─▶ agent ─▶ {enroll, telemetry, telemetry/mqtt, telemetry/coap, firmware}
//	                      ─▶ {tpm, store, dtls, est, telemetry/senml, agent/statedir} ─▶ internal/*
//	cmd/iotstation ─▶ station/* ─▶ {tpm, dtls, est, telemetry/senml} ─▶ internal/*
//
// A package imports only packages below it (the uplinks also import
// telemetry, beside them); tpm and store import nothing of ours but
// internal packages; nothing on the agent's side imports the station's,
// and the station links neither the agent's queue nor its pipeline; the
// agent's binary carries no test fixture and no server.
package layout
