// Package collector is the station's CoAP-over-DTLS telemetry collector:
// the fleet-side end of the agents' CoAP uplink. It is server code and
// belongs to iotstation only; the agent binary must never link it.
//
// A Collector listens on UDP for DTLS 1.2 (pion/dtls v3) with mutual
// certificate authentication: a client must present a certificate that
// chains to Config.ClientCAs, whose CN is a valid device ID (the device
// ID of the session) and that Config.Revoked does not report. The
// handshake requires the extended master secret, offers only
// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 and
// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, and negotiates a Connection ID (RFC
// 9146) with clients that ask for one, so that a gateway whose NAT
// rebinds keeps its session without a new handshake.
//
// Over each session it serves CoAP (go-coap v3) with one resource:
//
//	POST /telemetry                  the session's device
//	POST /devices/{id}/telemetry     the same; 4.03 if {id} is another device
//
// The body is a SenML pack (RFC 8428), Content-Format 112
// (application/senml+cbor) or 110 (application/senml+json). The answers:
//
//	2.04 Changed                   the new records are in the sink (duplicates dropped)
//	4.00 Bad Request               undecodable or invalid SenML, or a pack that would resolve to
//	                               more than 16 × MaxPayload; the diagnostic payload says why
//	4.01 Unauthorized              the certificate was revoked or has expired since the handshake;
//	                               the session is closed
//	4.03 Forbidden                 the path names another device
//	4.04 Not Found                 another resource
//	4.05 Method Not Allowed        another method
//	4.13 Request Entity Too Large  the body, in one datagram or in blocks (RFC 7959), is over
//	                               Config.MaxPayload; Size1 says the limit
//	4.15 Unsupported Content-Format
//	5.03 Service Unavailable       the sink failed: the device sends the records again
//
// Records are resolved (senml.Pack.Resolve at the time of receipt), keeping
// their sequence numbers, de-duplicated, and written to the Sink; only then
// is the request answered 2.04, so delivery is at-least-once from the
// agent's queue to the sink.
//
// # Joining pion/dtls v3 and go-coap v3
//
// The collector owns its UDP socket (listen.go): it routes each datagram
// to its DTLS connection by Connection ID, else by source address, and
// makes a pion server connection only for a first ClientHello from a new
// address, within bounds (MaxPendingHandshakes waiting for their cookie,
// the unverified ones evicted first; MaxHandshakesPerSource past it, per
// IPv4 address or IPv6 /64). A handshake takes one of MaxHandshakes slots,
// and counts against its source, only once the client returned the cookie
// of pion's HelloVerifyRequest, so spoofed ClientHellos cannot keep
// devices out, not even ones forged with a device's own address. Each
// accepted connection is handed to go-coap's DTLS server inside a small
// net.Conn wrapper whose HandshakeContext (which go-coap calls before
// serving a connection) times and classifies the handshake and learns the
// device ID from the verified certificate. Handlers find the device
// through the connection go-coap gives them. Nothing of go-coap or pion
// is forked.
//
// Four go-coap defaults are replaced: its periodic runner (a goroutine
// nobody waits for) by one Run stops; its 16-second inactivity timeout by
// Config.IdleTimeout (a session that outlives a NAT binding is what the
// Connection ID is for); its 1472-byte read buffer by pion's 8 KiB, so
// that an oversized datagram is answered 4.13 rather than ending the
// session; and its unbounded assembly of blocks by a request monitor that
// answers 4.13 as soon as a transfer passes MaxPayload.
//
// # De-duplication
//
// Agents deliver at least once, so the same record can arrive twice: after
// a lost acknowledgement, a 5.03, or a restart of the agent. Each record
// carries the device's sequence number (Record.Seq), and the collector
// keeps, per device, a watermark below which every sequence number was
// written, plus a bitmap of the numbers written in the Config.DedupeWindow
// numbers above it: records of one device can arrive out of order when
// several requests are in flight. A record whose number is at or below the
// watermark, or set in the bitmap, is a duplicate: it is counted and not
// written. Records without a sequence number are written and counted as
// unsequenced; they cannot be de-duplicated.
//
// The bounds, and what happens past them:
//
//   - Per device, about 190 bytes (with a 20-byte device ID), plus
//     DedupeWindow/8 bytes of bitmap (512 B by default) while numbers arrive
//     out of order.
//   - A number more than DedupeWindow above the watermark moves the window
//     up: the numbers it skips over are taken as written. Usually they are
//     gaps that will never be filled (the agent's queue dropped those
//     records when it was full); one that does arrive later is dropped as a
//     duplicate. With an agent that has fewer than DedupeWindow records in
//     flight, that cannot happen to a record it is still retrying.
//   - A number more than DedupeWindow below the watermark cannot be a
//     retry, for the same reason: the device has restarted its numbering
//     (its queue file was replaced), and its window starts afresh (counted
//     as a reset). Records of a restarted device that fall within
//     DedupeWindow below the old watermark are dropped as duplicates.
//   - At most Config.DedupeDevices devices are remembered (100 000 by
//     default: about 19 MB, about 70 MB if every window holds a bitmap).
//     Past that, the least recently active device's window is forgotten
//     (counted as an eviction): a duplicate of that device that arrives very
//     late may then be written once more.
//   - With Config.DedupeFile the windows outlive the collector: they are
//     read when Run starts, written every Config.DedupeCheckpoint (10 s)
//     while they change, and written when Run returns, atomically (temporary
//     file, fsync, rename). After a clean stop nothing passes twice; after a
//     crash, a duplicate of a record written since the last checkpoint may
//     be written once more (the file never claims a record the sink did not
//     take: marks follow the sink's write). The file holds 11 bytes plus
//     the device ID per device, plus DedupeWindow/8 bytes for a device whose
//     numbers arrive out of order (100 000 devices with 20-byte IDs: 3.1 MB
//     in order, up to 54 MB with every bitmap); each checkpoint writes it
//     whole. A damaged file is moved aside (".damaged-" and the time) and
//     logged, and the collector starts with empty windows; an unreadable
//     one is an error. Without DedupeFile the windows live in memory only. A sink
//     that must be exact even across crashes can drop (device, seq) pairs
//     it holds.
//
// Requests of one device are processed one at a time from de-duplication
// to acknowledgement, so that two copies of a batch in flight at once
// cannot both pass.
//
// # Caveats
//
// The device ID is the certificate's CN, and the certificate must be a
// device's (station.DeviceCertificateID: its device URI SAN, and a device
// role in its certificate policy): a station service's certificate is
// refused even when its name would pass as a device ID.
//
// Datagrams that are not DTLS handshakes of a known or new peer are
// dropped and counted in Stats.Dropped by reason.
//
// Established sessions outlive the handshake checks: Revoked and the
// certificate's expiry are checked again at every request, and a session
// whose certificate fails them is answered 4.01 and closed at once (the
// device may see the close before the answer; either way its next
// handshake decides).
//
// The handshake failure reasons of Stats come from pion's errors. pion
// exports few of them, so some are recognized by their text; a pion upgrade
// that changes one makes such failures count as "other". An alert from a
// pion client that negotiated a Connection ID does not reach the server as
// an alert (pion reports "invalid content type"): it counts as "other" too.
package collector
