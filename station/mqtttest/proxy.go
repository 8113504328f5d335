package mqtttest

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy forwards TCP connections from a loopback port to a target (a
// Broker's Addr) and injects faults at the byte level. Clients speak TLS
// end to end through it, so it cannot see MQTT packets: its faults are
// what a network does to a connection.
//
// NewProxy starts it and closes it at cleanup; Close may be called
// earlier. Its methods are safe for concurrent use. Faults apply at once
// to the connections already proxied and to later ones.
type Proxy struct {
	// Addr is 127.0.0.1:PORT, where clients connect.
	Addr string
	// URL is mqtts://Addr, for paho. The broker's certificate covers
	// 127.0.0.1, so TLS verification succeeds through the proxy.
	URL string

	target string
	l      net.Listener

	dropDown atomic.Bool // broker→client bytes are discarded
	dropUp   atomic.Bool // client→broker bytes are discarded
	refuse   atomic.Bool // new connections are closed at once

	accepted, refused      atomic.Int64
	up, down               atomic.Int64
	droppedUp, droppedDown atomic.Int64

	mu     sync.Mutex
	links  map[*link]struct{}
	closed bool
	wg     sync.WaitGroup // the accept loop and every link's goroutines
}

// Stats are a Proxy's counters since it started.
type Stats struct {
	// Accepted counts connections accepted, Refused those of them closed at
	// once because of Refuse, Active those open now.
	Accepted, Refused, Active int
	// Up and Down count bytes forwarded client→broker and broker→client.
	Up, Down int64
	// DroppedUp and DroppedDown count bytes a blackhole discarded.
	DroppedUp, DroppedDown int64
}

// dialTimeout bounds the proxy's connection to its target.
const dialTimeout = 5 * time.Second

// NewProxy listens on a free loopback port and forwards every connection
// to target. It is closed at cleanup.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("mqtttest: proxy: %v", err)
	}
	p := &Proxy{Addr: l.Addr().String(), target: target, l: l, links: map[*link]struct{}{}}
	p.URL = "mqtts://" + p.Addr
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// link is one proxied connection: the client's and, once dialed, the
// target's.
type link struct {
	client net.Conn
	cancel context.CancelFunc // ends the dial to the target
	mu     sync.Mutex
	server net.Conn // nil until dialed
	closed bool
}

func (k *link) close() {
	k.cancel()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	k.client.Close()
	if k.server != nil {
		k.server.Close()
	}
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return // closed
		}
		p.accepted.Add(1)
		if p.refuse.Load() {
			p.refused.Add(1)
			c.Close()
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
		k := &link{client: c, cancel: cancel}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			k.close()
			return
		}
		p.links[k] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(ctx, k)
	}
}

// serve dials the target for k and forwards both ways until either side
// closes or the link is cut; then it closes both.
func (p *Proxy) serve(ctx context.Context, k *link) {
	defer p.wg.Done()
	defer func() {
		k.close()
		p.mu.Lock()
		delete(p.links, k)
		p.mu.Unlock()
	}()
	var d net.Dialer
	s, err := d.DialContext(ctx, "tcp", p.target)
	if err != nil {
		return // the client sees its connection closed, as when the broker is down
	}
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		s.Close()
		return
	}
	k.server = s
	k.mu.Unlock()

	done := make(chan struct{}, 2)
	go func() {
		p.pump(s, k.client, &p.dropUp, &p.up, &p.droppedUp)
		done <- struct{}{}
	}()
	p.pump(k.client, s, &p.dropDown, &p.down, &p.droppedDown)
	k.close() // unblocks the other pump
	<-done
}

// pump copies src to dst, discarding bytes while drop is set, until a read
// or write fails.
func (p *Proxy) pump(dst, src net.Conn, drop *atomic.Bool, fwd, dropped *atomic.Int64) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if drop.Load() {
				dropped.Add(int64(n))
			} else {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
				fwd.Add(int64(n))
			}
		}
		if err != nil {
			return
		}
	}
}

// BlackholeDownstream discards every byte from the broker to clients while
// still forwarding clients' bytes: publishes reach the broker, PUBACKs (and
// PINGRESPs, CONNACKs) never arrive, and TCP raises no error. Heal stops
// it; bytes discarded are lost, so a TLS session that lost some cannot
// continue (its next record fails) and the client has to reconnect.
func (p *Proxy) BlackholeDownstream() { p.dropDown.Store(true) }

// Blackhole discards bytes both ways: a silent partition, which only the
// client's keepalive (or a write timeout) detects.
func (p *Proxy) Blackhole() {
	p.dropDown.Store(true)
	p.dropUp.Store(true)
}

// Cut closes every proxied connection at once, as a link drop does; it
// returns how many it closed. New connections are accepted afterwards
// unless Refuse(true).
func (p *Proxy) Cut() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k := range p.links {
		k.close()
	}
	return len(p.links)
}

// Refuse makes the proxy close new connections as soon as it accepts them
// (clients see EOF or a reset during the TLS handshake), or accept them
// again. Open connections are unaffected: Cut them.
func (p *Proxy) Refuse(on bool) { p.refuse.Store(on) }

// Heal clears every fault: bytes flow both ways and connections are
// accepted.
func (p *Proxy) Heal() {
	p.dropDown.Store(false)
	p.dropUp.Store(false)
	p.refuse.Store(false)
}

// Stats returns the proxy's counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	active := len(p.links)
	p.mu.Unlock()
	return Stats{
		Accepted:    int(p.accepted.Load()),
		Refused:     int(p.refused.Load()),
		Active:      active,
		Up:          p.up.Load(),
		Down:        p.down.Load(),
		DroppedUp:   p.droppedUp.Load(),
		DroppedDown: p.droppedDown.Load(),
	}
}

// Close stops listening, closes every proxied connection and waits for
// the proxy's goroutines to return. It may be called more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	for k := range p.links {
		k.close()
	}
	p.mu.Unlock()
	p.l.Close()
	p.wg.Wait()
}
