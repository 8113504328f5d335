package dtls

import (
	"encoding/binary"
	"net"

	piondtls "github.com/pion/dtls/v3"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/extension"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
)

// Server starts the server end of a DTLS connection with the peer at raddr
// over pc, which carries that peer's datagrams only; the handshake
// happens at HandshakeContext. The caller demultiplexes its socket into
// such pcs (RFC 6347 §4.2.1 on what to admit), reading datagrams with the
// functions below.
func Server(pc net.PacketConn, raddr net.Addr, opts []ServerOption) (*Conn, error) {
	return piondtls.ServerWithOptions(pc, raddr, opts...)
}

// Record and handshake header sizes and fields (RFC 6347 §4.1, §4.2.2).
const (
	recordHeaderLen    = 13
	handshakeHeaderLen = 12
	contentHandshake   = byte(protocol.ContentTypeHandshake)
	contentCID         = byte(protocol.ContentTypeConnectionID) // RFC 9146 tls12_cid
)

// Hello is what a datagram that starts with a ClientHello says of it.
type Hello struct {
	// MessageSeq is the ClientHello's message_seq: 0 in a client's first
	// ClientHello, 1 in the one that answers a HelloVerifyRequest.
	MessageSeq uint16
	// Cookie is the cookie the client returns: empty in a first
	// ClientHello. It aliases the datagram.
	Cookie []byte
	// RecordSeq is the sequence number of the record that holds it.
	RecordSeq uint64
}

// ParseHello reports whether datagram starts with a plaintext (epoch 0)
// handshake record holding the first fragment of a ClientHello, and reads
// it. It allocates nothing: a server calls it for every datagram of an
// unknown peer, a flood included.
func ParseHello(datagram []byte) (Hello, bool) {
	body, seq, ok := firstHandshake(datagram, handshake.TypeClientHello)
	if !ok {
		return Hello{}, false
	}
	// client_version, random, session_id<0..32>, cookie<0..2^8-1>
	const sidAt = 2 + handshake.RandomLength
	if len(body) < sidAt+1 {
		return Hello{}, false
	}
	cookieAt := sidAt + 1 + int(body[sidAt])
	if len(body) < cookieAt+1 || len(body) < cookieAt+1+int(body[cookieAt]) {
		return Hello{}, false
	}
	return Hello{
		MessageSeq: seq,
		Cookie:     body[cookieAt+1 : cookieAt+1+int(body[cookieAt])],
		RecordSeq:  uint64(binary.BigEndian.Uint16(datagram[5:]))<<32 | uint64(binary.BigEndian.Uint32(datagram[7:])),
	}, true
}

// HelloFragment reports whether datagram starts with a plaintext handshake
// record holding a fragment of a ClientHello, at any offset: the rest of
// one too large for a datagram.
func HelloFragment(datagram []byte) bool {
	_, _, _, ok := handshakeFragment(datagram, handshake.TypeClientHello)
	return ok
}

// HandshakeFailureAlert is a plaintext fatal handshake_failure alert to a
// ClientHello in a record numbered recordSeq: it tells a client that the
// server has no handshake to continue, so that it starts over at once
// rather than retransmitting until it gives up.
func HandshakeFailureAlert(recordSeq uint64) []byte {
	b := make([]byte, recordHeaderLen+2)
	b[0] = byte(protocol.ContentTypeAlert)
	b[1], b[2] = protocol.Version1_2.Major, protocol.Version1_2.Minor
	binary.BigEndian.PutUint16(b[5:], uint16(recordSeq>>32)) // epoch 0 in b[3:5]
	binary.BigEndian.PutUint32(b[7:], uint32(recordSeq))
	binary.BigEndian.PutUint16(b[11:], 2)
	b[13], b[14] = byte(alert.Fatal), byte(alert.HandshakeFailure)
	return b
}

// HelloVerifyCookie returns the cookie of the HelloVerifyRequest datagram
// starts with, if it does. The cookie aliases the datagram.
func HelloVerifyCookie(datagram []byte) ([]byte, bool) {
	body, _, ok := firstHandshake(datagram, handshake.TypeHelloVerifyRequest)
	// server_version, cookie<0..2^8-1>
	if !ok || len(body) < 3 || len(body) < 3+int(body[2]) {
		return nil, false
	}
	return body[3 : 3+int(body[2])], true
}

// RecordConnectionID returns the Connection ID of the first record of
// datagram that carries one (RFC 9146 §4), given the length of the IDs
// the receiver issues. It aliases the datagram.
func RecordConnectionID(datagram []byte, length int) ([]byte, bool) {
	for off := 0; off < len(datagram); {
		hdr, lenAt := recordHeaderLen, 11
		if datagram[off] == contentCID {
			hdr, lenAt = hdr+length, lenAt+length
		}
		if len(datagram)-off < hdr {
			return nil, false
		}
		if datagram[off] == contentCID {
			return datagram[off+11 : off+11+length], true
		}
		off += hdr + int(binary.BigEndian.Uint16(datagram[off+lenAt:]))
	}
	return nil, false
}

// ServerHelloConnectionID returns the Connection ID that a ServerHello in
// datagram asks the client to send (RFC 9146 §3), if datagram holds one
// that does.
func ServerHelloConnectionID(datagram []byte) ([]byte, bool) {
	for off := 0; len(datagram)-off >= recordHeaderLen; {
		end := off + recordHeaderLen + int(binary.BigEndian.Uint16(datagram[off+11:]))
		if end > len(datagram) || datagram[off] != contentHandshake {
			return nil, false
		}
		if body, _, ok := firstHandshake(datagram[off:end], handshake.TypeServerHello); ok {
			var sh handshake.MessageServerHello
			if sh.Unmarshal(body) != nil {
				return nil, false
			}
			for _, e := range sh.Extensions {
				if cid, ok := e.(*extension.ConnectionID); ok {
					return cid.CID, true
				}
			}
			return nil, false
		}
		off = end
	}
	return nil, false
}

// firstHandshake returns the body of the first fragment of a handshake
// message of type typ at the start of datagram's first record, if that is
// a plaintext handshake record, and the message's message_seq.
func firstHandshake(datagram []byte, typ handshake.Type) (body []byte, seq uint16, ok bool) {
	body, seq, offset, ok := handshakeFragment(datagram, typ)
	if !ok || offset != 0 {
		return nil, 0, false
	}
	return body, seq, true
}

// handshakeFragment is firstHandshake for a fragment at any offset, which
// it returns.
func handshakeFragment(datagram []byte, typ handshake.Type) (body []byte, seq uint16, offset uint32, ok bool) {
	if len(datagram) < recordHeaderLen+handshakeHeaderLen || datagram[0] != contentHandshake ||
		binary.BigEndian.Uint16(datagram[3:]) != 0 { // epoch
		return nil, 0, 0, false
	}
	rec := datagram[recordHeaderLen:]
	n := int(binary.BigEndian.Uint16(datagram[11:]))
	if n > len(rec) {
		return nil, 0, 0, false
	}
	rec = rec[:n]
	if len(rec) < handshakeHeaderLen || handshake.Type(rec[0]) != typ {
		return nil, 0, 0, false
	}
	var h handshake.Header
	if h.Unmarshal(rec) != nil || int(h.FragmentLength) > len(rec)-handshakeHeaderLen {
		return nil, 0, 0, false
	}
	return rec[handshakeHeaderLen : handshakeHeaderLen+int(h.FragmentLength)], h.MessageSequence, h.FragmentOffset, true
}
