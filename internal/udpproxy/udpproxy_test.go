package udpproxy

import (
	"net"
	"testing"
	"time"
)

func echoServer(t *testing.T) *net.UDPAddr {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			c.WriteToUDP(buf[:n], from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr)
}

func TestLoss(t *testing.T) {
	srv := echoServer(t)
	for _, tc := range []struct {
		loss     float64
		n        int
		min, max int // echoes back out of n
	}{{0, 200, 200, 200}, {1, 20, 0, 0}, {0.1, 200, 140, 180}} {
		p := New(t, srv, tc.loss, 42)
		c, err := net.DialUDP("udp4", nil, p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		buf := make([]byte, 64)
		for i := 0; i < tc.n; i++ {
			c.Write([]byte("ping"))
			c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if _, err := c.Read(buf); err == nil {
				got++
			}
		}
		c.Close()
		if got < tc.min || got > tc.max {
			t.Errorf("loss %v: %d of %d echoes came back, want %d..%d", tc.loss, got, tc.n, tc.min, tc.max)
		}
		p.Close()
	}
}
