package collector

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"iotagent.dev/iotagent/dtls"
)

// peerListener owns the collector's UDP socket. It hands each datagram to
// the DTLS connection it belongs to, by Connection ID (RFC 9146) and else
// by source address, and makes a connection only for a client's first
// ClientHello from a new address, within bounds. It replaces pion's
// listener, which made a connection for any handshake record from any new
// address (the collector then took a handshake slot for it, until the 10 s
// handshake timeout), and queued up to 128 of them for Accept, dropping
// the rest, a device's ClientHello among them.
//
// A handshake goes through these states. Only a client that returned the
// cookie of pion's HelloVerifyRequest, so receives at its address, takes
// one of Config.MaxHandshakes slots; what the others hold is bounded:
//
//	first ClientHello from a new address (message_seq 0, no cookie);
//	dropped if no slot is free ("busy": the client's retransmission
//	tries again), if its source has MaxHandshakesPerSource verified
//	handshakes, or if the accept queue is full
//	        │
//	        ▼
//	   unverified ──────────────┐ evicted to stay within
//	        │ the ClientHello    │ MaxPendingHandshakes, unverified
//	        │ with pion's cookie │ ones first, the oldest first; or
//	        │ and room in its    │ past HandshakeTimeout: "no_cookie"
//	        │ source             │ ("busy" if its cookie came back)
//	        ▼                    │
//	     waiting ◀─┐ no slot ────┤
//	        │      │ free: the   │
//	        │   ───┘ retrans-    │
//	        │        mission     │
//	        │ a slot tries again │
//	        ▼                    │
//	   handshaking ──▶ finished ◀┘ slot and source count given back
//
// Unverified and waiting handshakes are pending: they hold no slot, only
// a pion connection whose handshake waits for the client (about 31 KB and
// 4 goroutines with go-coap's), which receives nothing but ClientHellos.
// A client can wait only from the rare race of its first ClientHello in
// with a slot free and its cookie back with none. A ClientHello with a
// cookie from an address with no handshake (evicted, timed out, or from
// before a restart) is answered with a fatal alert: pion cannot take the
// handshake up again, and the client would retransmit it until it gives
// up; the alert makes it start over at once.
//
// Waiting and handshaking handshakes are verified: their client receives
// at its address. Only they count against their source's
// MaxHandshakesPerSource; a cookie that comes back while its source has
// that many is dropped, and the client's retransmission tries again. An
// unverified handshake's source may be forged, and counting it would let
// MaxHandshakesPerSource spoofed ClientHellos a HandshakeTimeout keep a
// device, a whole NAT'd site or an IPv6 /64 out; unverified handshakes
// are bounded by MaxPendingHandshakes alone, and evicted before any
// verified one, so that a flood of them cannot push out a client that
// returned its cookie.
//
// Why not answer the first ClientHello statelessly, with an HMAC cookie
// as RFC 6347 §4.2.1 suggests and OpenSSL's DTLSv1_listen does: pion/dtls
// v3.1.15's server cannot take over a handshake whose cookie exchange it
// did not make. Its HelloVerifyRequest takes message_seq 0, so it must
// send one itself for its ServerHello to carry the message_seq 1 the
// client expects; the cookie-bearing ClientHello it then checks against
// its own cookie (20 bytes of crypto/rand, no hook) is part of the
// Finished transcript with its message_seq and cookie, so it can be
// neither rewritten nor replayed with another cookie. A stateless front
// end needs a pion server that starts after an external cookie exchange
// (message_seq 1), or takes a cookie generator and verifier.
type peerListener struct {
	sock       *net.UDPConn
	opts       []dtls.ServerOption
	cidLen     int
	maxPending int
	perSource  int
	slots      chan struct{} // a token per handshake holding a slot
	m          *metrics
	queue      chan *peerConn // made, not accepted yet
	done       chan struct{}  // closed by close
	readDone   chan struct{}

	mu     sync.Mutex
	closed bool
	conns  int // open peerConns; the socket closes with the last one once closed
	byAddr map[netip.AddrPort]*peerConn
	byCID  map[string]*peerConn
	// The pending handshakes, oldest first: unverified, evicted first,
	// and waiting.
	unverified list.List            // of *peerConn
	waiting    list.List            // of *peerConn
	sources    map[netip.Prefix]int // verified, unfinished handshakes by source
	readErr    error                // why reading the socket failed, if not closing
}

// acceptBacklog bounds the connections made and not accepted yet, as
// pion's listener did (and Linux's listen backlog); go-coap accepts at
// once, so it fills only when the accept loop cannot keep up.
const acceptBacklog = 128

// peerQueue bounds the datagrams a connection has received and not read
// yet; more are dropped, as a full socket buffer drops them.
const peerQueue = 32

func newPeerListener(sock *net.UDPConn, opts []dtls.ServerOption, maxPending, perSource int, slots chan struct{}, m *metrics) *peerListener {
	l := &peerListener{
		sock:       sock,
		opts:       opts,
		cidLen:     dtls.ServerCIDLength,
		maxPending: maxPending,
		perSource:  perSource,
		slots:      slots,
		m:          m,
		queue:      make(chan *peerConn, acceptBacklog),
		done:       make(chan struct{}),
		readDone:   make(chan struct{}),
		byAddr:     map[netip.AddrPort]*peerConn{},
		byCID:      map[string]*peerConn{},
		sources:    map[netip.Prefix]int{},
	}
	go l.read()
	return l
}

// coapListener is what go-coap's DTLS server serves: a peerListener's
// connections as sessions.
type coapListener struct {
	peers *peerListener
	c     *Collector
	// err is why accepting failed for good, other than shutdown. Only
	// Serve's goroutine sets it.
	err error
}

func (l *coapListener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	p, dc, err := l.peers.accept(ctx)
	switch {
	case errors.Is(err, errListenerClosed):
		// The socket failed (and go-coap would retry at once, for
		// ever), or the listener was closed: stop serving.
		l.err = l.peers.err()
		return nil, coapnet.ErrListenerIsClosed
	case err != nil:
		return nil, err // go-coap stops if ctx ended, else goes on
	}
	return &session{Conn: dc, peer: p, c: l.c}, nil
}

func (l *coapListener) Close() error {
	l.peers.close()
	return nil
}

// errListenerClosed is accept's error once the listener is closed.
var errListenerClosed = errors.New("listener closed")

// accept returns the next connection made, with a pion server over it.
func (l *peerListener) accept(ctx context.Context) (*peerConn, *dtls.Conn, error) {
	for {
		var p *peerConn
		select {
		case p = <-l.queue:
		case <-l.done:
			return nil, nil, errListenerClosed
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
		l.mu.Lock()
		evicted := p.isClosed
		l.mu.Unlock()
		if evicted {
			continue
		}
		dc, err := dtls.Server(p, net.UDPAddrFromAddrPort(p.addr), l.opts)
		if err != nil {
			p.Close()
			return nil, nil, err
		}
		return p, dc, nil
	}
}

// close stops making connections and closes those not accepted; the
// socket stays open for the others until the last one closes.
func (l *peerListener) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closeLocked()
}

func (l *peerListener) closeLocked() {
	if l.closed {
		return
	}
	l.closed = true
	close(l.done)
	for {
		select {
		case p := <-l.queue:
			p.closeLocked()
		default:
			if l.conns == 0 {
				l.sock.Close()
			}
			return
		}
	}
}

// shutdown closes the listener, every connection and the socket, and
// waits for the reading goroutine.
func (l *peerListener) shutdown() {
	l.mu.Lock()
	l.closeLocked()
	for _, p := range l.byAddr {
		p.closeLocked()
	}
	for _, p := range l.byCID {
		p.closeLocked()
	}
	l.sock.Close()
	l.mu.Unlock()
	<-l.readDone
}

// err is why reading the socket failed, once accept reported the listener
// closed; nil if it was closed.
func (l *peerListener) err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.readErr
}

// read routes datagrams until the socket closes or fails.
func (l *peerListener) read() {
	defer close(l.readDone)
	buf := make([]byte, maxDatagram)
	for {
		n, from, err := l.sock.ReadFromUDPAddrPort(buf)
		if err != nil {
			l.mu.Lock()
			if !l.closed {
				l.readErr = err
				l.closeLocked()
			}
			l.mu.Unlock()
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		p, reply := l.route(buf[:n], from)
		if p != nil {
			p.push(buf[:n], from)
		}
		if reply != nil {
			l.sock.WriteToUDPAddrPort(reply, from)
		}
	}
}

// route returns the connection datagram goes to, making one if it is a
// first ClientHello that may have one, or nil (then the datagram is
// dropped) and what to answer, if anything.
func (l *peerListener) route(datagram []byte, from netip.AddrPort) (*peerConn, []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cidLen > 0 {
		if cid, ok := dtls.RecordConnectionID(datagram, l.cidLen); ok {
			if p := l.byCID[string(cid)]; p != nil {
				return p, nil
			}
		}
	}
	if p := l.byAddr[from]; p != nil {
		if p.admits(datagram) {
			return p, nil
		}
		return nil, nil
	}
	return l.admitLocked(datagram, from)
}

// admitLocked makes a connection for a first ClientHello from a new
// address, within the bounds.
func (l *peerListener) admitLocked(datagram []byte, from netip.AddrPort) (*peerConn, []byte) {
	if l.closed {
		return nil, nil
	}
	h, ok := dtls.ParseHello(datagram)
	if !ok {
		l.m.drop(dropNotHello)
		return nil, nil
	}
	if h.MessageSeq != 0 || len(h.Cookie) != 0 {
		// A client past the HelloVerifyRequest of a handshake that is
		// gone (evicted, timed out, or the collector restarted): it
		// would retransmit this until it gives up, as pion cannot take
		// the handshake up again. An alert, smaller than what it
		// answers, makes it start over.
		l.m.drop(dropStale)
		return nil, dtls.HandshakeFailureAlert(h.RecordSeq)
	}
	if len(l.slots) == cap(l.slots) {
		// Refused before pion's HelloVerifyRequest, the client's
		// retransmission tries again; refused after, it could not.
		l.m.handshakeFailed(reasonBusy)
		return nil, nil
	}
	src := sourceOf(from.Addr())
	if l.sources[src] >= l.perSource {
		// Full of verified handshakes, which a forged source cannot
		// make: a host stalling its own. Its retransmission tries
		// again.
		l.m.drop(dropSourceLimit)
		return nil, nil
	}
	if len(l.queue) == cap(l.queue) { // only admitLocked sends, under l.mu
		l.m.drop(dropQueueFull)
		return nil, nil
	}
	if l.unverified.Len()+l.waiting.Len() >= l.maxPending {
		oldest := l.unverified.Front()
		if oldest == nil {
			oldest = l.waiting.Front()
		}
		oldest.Value.(*peerConn).closeLocked()
		l.m.evicted.Add(1)
	}
	p := &peerConn{
		l:       l,
		addr:    from,
		source:  src,
		in:      make(chan inbound, peerQueue),
		closed:  make(chan struct{}),
		dchange: make(chan struct{}),
		byAddr:  true,
	}
	l.conns++
	l.byAddr[from] = p
	p.elem = l.unverified.PushBack(p)
	l.m.pending.Add(1)
	l.queue <- p
	return p, nil
}

// sourceOf is what MaxHandshakesPerSource counts verified handshakes by:
// an IPv4 address, or an IPv6 /64 (one subscriber's network, commonly).
func sourceOf(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

// Phases of a connection's handshake, in order: how far it got.
type phase uint8

const (
	phaseUnverified  phase = iota // pion's HelloVerifyRequest sent (or about to be); no cookie back, or its source had no room
	phaseWaiting                  // the cookie came back and counts in its source; no slot free yet
	phaseHandshaking              // holding a slot
	phaseFinished                 // the handshake ended; nothing counted any more
)

// peerConn is the datagrams of one peer, as pion's server reads and writes
// them. Its methods are safe for concurrent use.
type peerConn struct {
	l      *peerListener
	addr   netip.AddrPort // of the first ClientHello
	source netip.Prefix
	in     chan inbound
	closed chan struct{}

	// Guarded by l.mu.
	phase    phase
	elem     *list.Element // in l.unverified or l.waiting, as phase says
	counted  bool          // in l.sources
	refused  bool          // its cookie came back while its source had MaxHandshakesPerSource
	slot     bool          // holds a token of l.slots
	cookie   []byte        // of pion's HelloVerifyRequest
	cid      string        // in l.byCID
	byAddr   bool          // l.byAddr[addr] is p
	isClosed bool

	moved atomic.Bool // routed by CID only, its first address given up

	dmu      sync.Mutex
	deadline time.Time
	dchange  chan struct{} // closed when the deadline changes
}

// recordHandshake is the content type of a DTLS handshake record.
const recordHandshake = 22

type inbound struct {
	b    []byte
	from net.Addr
}

// admits reports whether a datagram for p goes to pion: before its cookie
// came back only ClientHellos do, and the one with the cookie only with
// room in its source's MaxHandshakesPerSource and a slot. l.mu held.
func (p *peerConn) admits(datagram []byte) bool {
	if p.phase >= phaseHandshaking {
		return true
	}
	h, ok := dtls.ParseHello(datagram)
	if !ok {
		if dtls.HelloFragment(datagram) {
			return true // the rest of a ClientHello that did not fit a datagram
		}
		p.l.m.drop(dropNotHello)
		return false
	}
	if len(h.Cookie) == 0 {
		return true // a retransmitted first ClientHello: pion answers it again
	}
	if p.cookie == nil || !bytes.Equal(h.Cookie, p.cookie) {
		p.l.m.drop(dropBadCookie)
		return false
	}
	l := p.l
	if p.phase == phaseUnverified {
		if l.sources[p.source] >= l.perSource {
			// It stays unverified, as its cookie had not come back:
			// its retransmission tries again.
			p.refused = true
			l.m.drop(dropSourceLimit)
			return false
		}
		l.sources[p.source]++
		p.counted = true
		l.unverified.Remove(p.elem)
		p.elem = l.waiting.PushBack(p)
		p.phase = phaseWaiting
	}
	select {
	case l.slots <- struct{}{}:
	default:
		return false
	}
	p.slot = true
	l.waiting.Remove(p.elem)
	p.elem = nil
	l.m.pending.Add(-1)
	p.phase = phaseHandshaking
	return true
}

// push queues a datagram for pion to read.
func (p *peerConn) push(b []byte, from netip.AddrPort) {
	select {
	case p.in <- inbound{b: bytes.Clone(b), from: net.UDPAddrFromAddrPort(from)}:
	default: // pion is not keeping up: drop, as a full socket would
	}
}

// finish ends p's handshake, giving back its slot and source count, and
// returns how far it got: phaseWaiting for one whose cookie came back
// while its source had MaxHandshakesPerSource, which waited as one
// waiting for a slot does.
func (p *peerConn) finish() phase {
	p.l.mu.Lock()
	defer p.l.mu.Unlock()
	got := p.phase
	if got == phaseUnverified && p.refused {
		got = phaseWaiting
	}
	p.releaseLocked()
	p.phase = phaseFinished
	return got
}

// releaseLocked gives back what p's handshake holds. l.mu held.
func (p *peerConn) releaseLocked() {
	l := p.l
	if p.elem != nil {
		if p.phase == phaseUnverified {
			l.unverified.Remove(p.elem)
		} else {
			l.waiting.Remove(p.elem)
		}
		p.elem = nil
		l.m.pending.Add(-1)
	}
	if p.counted {
		p.counted = false
		if l.sources[p.source]--; l.sources[p.source] <= 0 {
			delete(l.sources, p.source)
		}
	}
	if p.slot {
		p.slot = false
		<-l.slots
	}
}

func (p *peerConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		p.dmu.Lock()
		deadline, changed := p.deadline, p.dchange
		p.dmu.Unlock()
		var timer *time.Timer
		var expired <-chan time.Time
		if !deadline.IsZero() {
			wait := time.Until(deadline)
			if wait <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			timer = time.NewTimer(wait)
			expired = timer.C
		}
		n, from, err, again := 0, net.Addr(nil), error(nil), false
		select {
		case d := <-p.in:
			n, from = copy(b, d.b), d.from
		case <-p.closed:
			err = net.ErrClosed
		case <-expired:
			err = os.ErrDeadlineExceeded
		case <-changed:
			again = true
		}
		if timer != nil {
			timer.Stop()
		}
		if !again {
			return n, from, err
		}
	}
}

func (p *peerConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	select {
	case <-p.closed:
		return 0, net.ErrClosed
	default:
	}
	if len(b) > 0 && b[0] == recordHandshake { // the HelloVerifyRequest, the ServerHello
		p.learn(b)
	}
	if !p.moved.Load() {
		if ua, ok := addr.(*net.UDPAddr); ok {
			if to := ua.AddrPort(); netip.AddrPortFrom(to.Addr().Unmap(), to.Port()) != p.addr {
				p.leaveAddr()
			}
		}
	}
	return p.l.sock.WriteTo(b, addr)
}

// learn takes the cookie from pion's HelloVerifyRequest and the
// Connection ID from its ServerHello, routing datagrams that carry it to
// p.
func (p *peerConn) learn(b []byte) {
	l := p.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if p.cookie == nil {
		if c, ok := dtls.HelloVerifyCookie(b); ok {
			p.cookie = bytes.Clone(c)
			return
		}
	}
	if p.cid == "" && l.cidLen > 0 && !p.isClosed {
		if cid, ok := dtls.ServerHelloConnectionID(b); ok && len(cid) == l.cidLen && l.byCID[string(cid)] == nil {
			p.cid = string(cid)
			l.byCID[p.cid] = p
		}
	}
}

// leaveAddr gives up p's first address once pion answers the peer at
// another: the peer moved (a NAT rebinding) and is found by its
// Connection ID, and the address may be another peer's now. As pion's
// listener, it keeps the address until then: a spoofed datagram claiming
// p's Connection ID from elsewhere must not take the address from p.
func (p *peerConn) leaveAddr() {
	l := p.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if p.cid == "" || !p.byAddr {
		return
	}
	delete(l.byAddr, p.addr)
	p.byAddr = false
	p.moved.Store(true)
}

func (p *peerConn) Close() error {
	p.l.mu.Lock()
	defer p.l.mu.Unlock()
	p.closeLocked()
	return nil
}

// closeLocked closes p and forgets it. l.mu held.
func (p *peerConn) closeLocked() {
	if p.isClosed {
		return
	}
	l := p.l
	p.isClosed = true
	close(p.closed)
	p.releaseLocked()
	if p.byAddr {
		delete(l.byAddr, p.addr)
		p.byAddr = false
	}
	if p.cid != "" {
		delete(l.byCID, p.cid)
	}
	if l.conns--; l.conns == 0 && l.closed {
		l.sock.Close()
	}
}

func (p *peerConn) LocalAddr() net.Addr { return p.l.sock.LocalAddr() }

func (p *peerConn) SetDeadline(t time.Time) error { return p.SetReadDeadline(t) }

// SetReadDeadline sets when ReadFrom gives up: pion cancels a read with a
// deadline in the past.
func (p *peerConn) SetReadDeadline(t time.Time) error {
	p.dmu.Lock()
	defer p.dmu.Unlock()
	p.deadline = t
	close(p.dchange)
	p.dchange = make(chan struct{})
	return nil
}

// SetWriteDeadline does nothing: writes go straight to the socket, which a
// connection must not put a deadline on for the others.
func (p *peerConn) SetWriteDeadline(time.Time) error { return nil }
