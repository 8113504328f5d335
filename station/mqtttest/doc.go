// Package mqtttest runs the fleet's MQTT side for tests: a real mosquitto
// broker configured like production, a fleet-side Subscriber that observes
// what the broker delivers, and a TCP Proxy that injects network faults
// between an agent and the broker.
//
// This package is for tests only; the agent binary must not link it.
//
//	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
//	b := mqtttest.Start(t, st, mqtttest.Options{})
//	sub := b.Subscribe(t, "devices/#")
//	p := mqtttest.NewProxy(t, b.Addr) // the agent connects to p.URL
//
// The broker (mosquitto 2.0, from Debian's mosquitto package) listens on a
// loopback port chosen at run time and authenticates clients by
// certificate only: the station's CA, identity and client ID from the
// certificate's CN (a device's CN is its device ID), the ACL in DefaultACL
// and the station's CRL. A package using it needs the tpmtest fixture in
// its TestMain (stationtest reads the TPM manufacturer CA):
//
//	func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }
//
// # Caveats
//
// Measured on mosquitto 2.0.11 with OpenSSL 3.0, and checked by this
// package's tests (the ticket lifetime was read with openssl s_client
// -sess_out):
//
//   - A publish the ACL forbids is acknowledged (PUBACK) and dropped; a
//     subscription it forbids is granted and delivers nothing. Check ACLs
//     by what a Subscriber receives: publish a marker the ACL allows after
//     the message that should be dropped; mosquitto keeps one client's
//     messages in order, so once the marker arrives the other one is not
//     coming.
//   - mosquitto reads crlfile at start and on SIGHUP, never by itself: after
//     st.Revoke a test calls Broker.ReloadCRL (keeps connections) or
//     Broker.Restart (drops them). A station whose end_sessions names a
//     broker started with Options.DynSec ends the revoked device's
//     connections itself, through the dynamic-security plugin.
//   - With use_identity_as_username mosquitto never asks the
//     dynamic-security plugin to authenticate a client, and the plugin
//     defers every ACL check on a user name it does not know to the ACL
//     file: loading it changes nothing for devices until the station
//     makes one of them a (revoked) dynsec client. Its disableClient
//     closes every connection with that user name at once.
//   - mosquitto issues session tickets (TLS 1.3 and 1.2, lifetime 7200 s)
//     to clients that authenticated with a certificate. A Go client with a
//     tls.Config.ClientSessionCache resumes without sending its certificate
//     (no signature: with a TPM key, no TPM operation), and keeps its
//     identity. Sessions do not survive a SIGHUP or a restart.
//   - With TLS 1.3 a client's handshake completes before the broker has
//     checked its certificate: a refusal (unknown CA, expired, revoked,
//     none) arrives as an alert at the client's first read, or its first
//     write fails with ECONNRESET while the alert waits in the receive
//     buffer.
//   - A certificate's CN is the MQTT client ID: a client's new connection
//     evicts its previous one (a Subscriber is "fleet-reader", so a broker
//     has one open at a time), and no client can take over another's
//     session by asking for its client ID.
package mqtttest
