package coap

import (
	"net"
	"testing"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
)

// A client made with startMID numbers its messages from that ID on,
// across the 16-bit wrap: what lets a resumed session continue the
// message IDs of the process that sealed it.
func TestStartMID(t *testing.T) {
	for _, start := range []uint16{0, 1, 500, 0x7fff, 0xffff} {
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := piondtls.ClientWithOptions(pc, pc.LocalAddr(), piondtls.WithInsecureSkipVerify(true))
		if err != nil {
			t.Fatal(err)
		}
		cc := coapdtls.Client(conn, startMID(start))
		first, second := uint16(cc.GetMessageID()), uint16(cc.GetMessageID())
		cc.Close()
		conn.Close()
		pc.Close()
		if first != start || second != start+1 {
			t.Errorf("startMID(%d): message IDs %d, %d; want %d, %d", start, first, second, start, start+1)
		}
	}
}
