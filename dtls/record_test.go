package dtls_test

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/crypto/elliptic"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/extension"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"

	"iotagent.dev/iotagent/dtls"
)

// record marshals a record of content with pion's encoder.
func record(t *testing.T, h recordlayer.Header, content protocol.Content) []byte {
	t.Helper()
	r := &recordlayer.RecordLayer{Header: h, Content: content}
	b, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func handshakeRecord(t *testing.T, epoch, seq uint16, m handshake.Message) []byte {
	t.Helper()
	return record(t, recordlayer.Header{Version: protocol.Version1_2, Epoch: epoch, SequenceNumber: 7},
		&handshake.Handshake{Header: handshake.Header{MessageSequence: seq}, Message: m})
}

func clientHello(cookie []byte) *handshake.MessageClientHello {
	return &handshake.MessageClientHello{
		Version:            protocol.Version1_2,
		Random:             handshake.Random{GMTUnixTime: time.Unix(1.7e9, 0)},
		SessionID:          []byte{1, 2, 3},
		Cookie:             cookie,
		CipherSuiteIDs:     []uint16{0xc02b},
		CompressionMethods: []*protocol.CompressionMethod{{}},
		Extensions: []extension.Extension{
			&extension.SupportedEllipticCurves{EllipticCurves: []elliptic.Curve{elliptic.P256}},
			&extension.ConnectionID{CID: []byte{}},
		},
	}
}

// Each reader recognizes what pion writes, and nothing else: not another
// message, epoch or content type, and no prefix of a datagram it reads.
func TestRecordReaders(t *testing.T) {
	cookie := bytes.Repeat([]byte{0xc0}, 20)
	first := handshakeRecord(t, 0, 0, clientHello(nil))
	second := handshakeRecord(t, 0, 1, clientHello(cookie))
	hvr := handshakeRecord(t, 0, 0, &handshake.MessageHelloVerifyRequest{Version: protocol.Version1_2, Cookie: cookie})
	cid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	sh := &handshake.MessageServerHello{
		Version: protocol.Version1_2, Random: handshake.Random{GMTUnixTime: time.Unix(1.7e9, 0)},
		CipherSuiteID: new(uint16(0xc02b)), CompressionMethod: &protocol.CompressionMethod{},
		Extensions: []extension.Extension{&extension.ConnectionID{CID: cid}},
	}
	shNoCID := *sh
	shNoCID.Extensions = nil
	done := &handshake.MessageServerHelloDone{}
	flight4 := append(handshakeRecord(t, 0, 1, sh), handshakeRecord(t, 0, 2, done)...)
	noCID := append(handshakeRecord(t, 0, 1, &shNoCID), handshakeRecord(t, 0, 2, done)...)
	app := record(t, recordlayer.Header{Version: protocol.Version1_2, Epoch: 1, SequenceNumber: 3}, &protocol.ApplicationData{Data: []byte("x")})
	cidRecord := record(t, recordlayer.Header{Version: protocol.Version1_2, Epoch: 1, SequenceNumber: 3, ConnectionID: cid}, &protocol.ApplicationData{Data: []byte("encrypted")})
	cidRecord[0] = byte(protocol.ContentTypeConnectionID) // pion's encoder writes the inner type
	encrypted := handshakeRecord(t, 1, 5, clientHello(nil))
	// The second of two fragments (only its headers are read): pion's
	// encoder writes whole messages.
	fragment := append([]byte{}, second...)
	copy(fragment[13+6:], []byte{0, 0, 40}) // fragment_offset 40
	fragment[13+9], fragment[13+10], fragment[13+11] = 0, 0, byte(len(second)-13-12-40)
	fragment = fragment[:len(second)-40]
	binary.BigEndian.PutUint16(fragment[11:], uint16(len(fragment)-13))

	for _, tc := range []struct {
		name      string
		datagram  []byte
		hello     *dtls.Hello // nil: ParseHello refuses it
		fragment  bool        // HelloFragment
		hvrCookie []byte
		recordCID []byte
		helloCID  []byte
	}{
		{name: "first ClientHello", datagram: first, hello: &dtls.Hello{MessageSeq: 0, Cookie: []byte{}, RecordSeq: 7}, fragment: true},
		{name: "ClientHello with cookie", datagram: second, hello: &dtls.Hello{MessageSeq: 1, Cookie: cookie, RecordSeq: 7}, fragment: true},
		{name: "ClientHello fragment", datagram: fragment, fragment: true},
		{name: "HelloVerifyRequest", datagram: hvr, hvrCookie: cookie},
		{name: "ServerHello with CID", datagram: flight4, helloCID: cid},
		{name: "ServerHello without CID", datagram: noCID},
		{name: "application data", datagram: app},
		{name: "CID record", datagram: cidRecord, recordCID: cid},
		{name: "after another record", datagram: append(append([]byte{}, app...), cidRecord...), recordCID: cid},
		{name: "ClientHello at epoch 1", datagram: encrypted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check := func(t *testing.T, datagram []byte, whole bool) {
				h, ok := dtls.ParseHello(datagram)
				if want := tc.hello != nil && whole; ok != want || ok && (h.MessageSeq != tc.hello.MessageSeq || !bytes.Equal(h.Cookie, tc.hello.Cookie) || h.RecordSeq != tc.hello.RecordSeq) {
					t.Errorf("ParseHello = %+v, %v; want %+v, %v", h, ok, tc.hello, want)
				}
				if ok := dtls.HelloFragment(datagram); ok != (tc.fragment && whole) {
					t.Errorf("HelloFragment = %v, want %v", ok, tc.fragment && whole)
				}
				if c, ok := dtls.HelloVerifyCookie(datagram); ok != (tc.hvrCookie != nil && whole) || !bytes.Equal(c, tc.hvrCookie) && whole {
					t.Errorf("HelloVerifyCookie = %x, %v; want %x", c, ok, tc.hvrCookie)
				}
				if c, ok := dtls.RecordConnectionID(datagram, len(cid)); whole && (ok != (tc.recordCID != nil) || !bytes.Equal(c, tc.recordCID)) {
					t.Errorf("RecordConnectionID = %x, %v; want %x", c, ok, tc.recordCID)
				}
				if c, ok := dtls.ServerHelloConnectionID(datagram); ok != (tc.helloCID != nil && whole) || whole && !bytes.Equal(c, tc.helloCID) {
					t.Errorf("ServerHelloConnectionID = %x, %v; want %x", c, ok, tc.helloCID)
				}
			}
			check(t, tc.datagram, true)
			// A prefix that cuts the first record is refused; one that
			// holds it (a record follows) may be read, not past its end.
			end := 13 + int(binary.BigEndian.Uint16(tc.datagram[11:]))
			if tc.datagram[0] == byte(protocol.ContentTypeConnectionID) {
				end = len(tc.datagram)
			}
			for n := range min(end, len(tc.datagram)) {
				check(t, tc.datagram[:n], false)
			}
		})
	}
}

// The alert answering a stale ClientHello is one pion reads as fatal
// handshake_failure, in the ClientHello's record number.
func TestHandshakeFailureAlert(t *testing.T) {
	var r recordlayer.RecordLayer
	if err := r.Unmarshal(dtls.HandshakeFailureAlert(0x0102_0304_0506)); err != nil {
		t.Fatal(err)
	}
	a, ok := r.Content.(*alert.Alert)
	if !ok || a.Level != alert.Fatal || a.Description != alert.HandshakeFailure || r.Header.Epoch != 0 || r.Header.SequenceNumber != 0x0102_0304_0506 {
		t.Errorf("HandshakeFailureAlert = %+v %+v, want a fatal handshake_failure at epoch 0, record 0x010203040506", r.Header, r.Content)
	}
}
