// Package udpproxy is a UDP relay for tests that drops datagrams at
// random, with a seeded generator so a failure can be replayed: the lossy
// radio link a CoAP uplink must ride. For tests only.
package udpproxy

import (
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy relays datagrams between clients and one target, dropping each
// with probability Loss in both directions. Each client address gets its
// own upstream socket, as a NAT would.
type Proxy struct {
	// Addr is where clients send.
	Addr   *net.UDPAddr
	target *net.UDPAddr
	ln     *net.UDPConn

	mu    sync.Mutex
	rng   *rand.Rand
	loss  float64
	peers map[string]*net.UDPConn

	// Forwarded and Dropped count datagrams; BytesUp and BytesDown count
	// the UDP payload bytes forwarded to and from the target.
	Forwarded, Dropped atomic.Int64
	BytesUp, BytesDown atomic.Int64
	wg                 sync.WaitGroup
}

// New starts a proxy to target dropping a share loss of datagrams, seeded
// by seed; it stops at cleanup.
func New(t testing.TB, target *net.UDPAddr, loss float64, seed uint64) *Proxy {
	t.Helper()
	ln, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Addr: ln.LocalAddr().(*net.UDPAddr), target: target, ln: ln,
		rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), loss: loss, peers: map[string]*net.UDPConn{}}
	p.wg.Add(1)
	go p.fromClients()
	t.Cleanup(p.Close)
	return p
}

// SetLoss changes the drop probability.
func (p *Proxy) SetLoss(loss float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.loss = loss
}

func (p *Proxy) drop() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rng.Float64() < p.loss {
		p.Dropped.Add(1)
		return true
	}
	p.Forwarded.Add(1)
	return false
}

func (p *Proxy) fromClients() {
	defer p.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := p.ln.ReadFromUDP(buf)
		if err != nil {
			return
		}
		up := p.upstream(from)
		if up == nil || p.drop() {
			continue
		}
		p.BytesUp.Add(int64(n))
		up.Write(buf[:n])
	}
}

// upstream returns the socket that relays for client from, making one and
// its return path on first sight.
func (p *Proxy) upstream(from *net.UDPAddr) *net.UDPConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.peers[from.String()]; ok {
		return c
	}
	c, err := net.DialUDP("udp4", nil, p.target)
	if err != nil {
		return nil
	}
	p.peers[from.String()] = c
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65535)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if p.drop() {
				continue
			}
			p.BytesDown.Add(int64(n))
			p.ln.WriteToUDP(buf[:n], from)
		}
	}()
	return c
}

// Close stops relaying and waits for the relay goroutines.
func (p *Proxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.peers {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
