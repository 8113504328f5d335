package dtls_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// echoServer is a pion DTLS server with the settings of ServerOptions
// (the collector's) that echoes what it reads, counting handshakes.
type echoServer struct {
	addr       *net.UDPAddr
	handshakes atomic.Int64
	l          net.Listener
	wg         sync.WaitGroup
	mu         sync.Mutex
	conns      []net.Conn
	closed     bool
}

func startEcho(t testing.TB, st *stationtest.Station) *echoServer {
	t.Helper()
	l, err := piondtls.ListenWithOptions("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)},
		dtls.ServerOptions(dtls.ServerConfig{Certificate: st.ServiceCert(t, "collector", []string{"127.0.0.1"}, true), ClientCAs: st.TrustPool()})...)
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{addr: l.Addr().(*net.UDPAddr), l: l}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				c.Close()
				continue
			}
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				dc := c.(*piondtls.Conn)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := dc.HandshakeContext(ctx)
				cancel()
				if err != nil {
					return
				}
				s.handshakes.Add(1)
				buf := make([]byte, 2048)
				for {
					n, err := dc.Read(buf)
					if err != nil {
						return
					}
					dc.Write(buf[:n])
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		// A client that stopped without close_notify (a failed test)
		// would leave its server connection reading forever.
		s.mu.Lock()
		s.closed = true
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// echo sends msg and waits for it to come back, sending it again every
// 500 ms as a CoAP client retransmits: pion updates a server connection's
// peer address just after handing the record that moved it to the reader,
// so an answer written at once to the first record from a new address can
// still go to the old one (the collector's clients cover this with CoAP
// retransmission; so does this echo).
func echo(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 2048)
	for sent := 0; time.Now().Before(deadline); {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("write: %v", err)
		}
		sent++
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := c.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Logf("no echo of %q after %d sends; sending again", msg, sent)
					break
				}
				t.Fatalf("echo of %q: %v", msg, err)
			}
			if string(buf[:n]) == msg {
				return
			}
			// the echo of an earlier copy of an earlier message
		}
	}
	t.Fatalf("no echo of %q in 5 s", msg)
}

// The TPM key signs the DTLS handshake (one signature); then the
// connection survives a new local port (Connection ID); then its state,
// exported and sealed, resumes on a new socket with no handshake and no
// signature.
func TestTPMHandshakeRebindAndResume(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	srv := startEcho(t, st)
	opts := dtls.ClientOptions(dtls.ClientCertificate(d.Identity().GetClientCertificate), d.RootCAs(), "127.0.0.1")

	pc, err := dtls.ListenRebindable("udp4")
	if err != nil {
		t.Fatal(err)
	}
	sigs := d.TPM.Signatures()
	conn, err := dtls.Client(pc, srv.addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.HandshakeContext(ctx); err != nil {
		t.Fatalf("handshake with the TPM key: %v", err)
	}
	if got := d.TPM.Signatures() - sigs; got != 1 {
		t.Errorf("handshake made %d TPM signatures, want 1", got)
	}
	echo(t, conn, "before rebinding")

	before := pc.LocalAddr().String()
	if err := pc.Rebind(); err != nil {
		t.Fatal(err)
	}
	if pc.LocalAddr().String() == before {
		t.Fatal("Rebind kept the same local port")
	}
	echo(t, conn, "after rebinding")
	if n := srv.handshakes.Load(); n != 1 {
		t.Errorf("%d handshakes after rebinding, want 1 (the session followed the CID)", n)
	}

	// Export: close the socket first so the old connection sends nothing
	// more, then seal the state as the uplink stores it.
	pc.Close()
	state, err := dtls.ExportState(conn)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	key := make([]byte, 32)
	rand.Read(key)
	sealer, _ := dtls.NewSealer(key, rand.Reader)
	sealed, err := sealer.Seal(state)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, state[len(state)/2:len(state)/2+16]) {
		t.Error("sealed state contains the plain state")
	}
	opened, err := sealer.Open(sealed)
	if err != nil {
		t.Fatal(err)
	}
	pc2, _ := dtls.ListenRebindable("udp4")
	defer pc2.Close()
	sigs = d.TPM.Signatures()
	resumed, err := dtls.ResumeState(opened, pc2, srv.addr, opts)
	if err != nil {
		t.Fatalf("ResumeState: %v", err)
	}
	defer resumed.Close()
	echo(t, resumed, "after resuming")
	if got := d.TPM.Signatures() - sigs; got != 0 {
		t.Errorf("resuming made %d TPM signatures, want 0", got)
	}
	if n := srv.handshakes.Load(); n != 1 {
		t.Errorf("%d handshakes after resuming, want still 1", n)
	}
}

func TestSealer(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	s, err := dtls.NewSealer(key, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sealed, _ := s.Seal([]byte("session state"))
	other := make([]byte, 32)
	rand.Read(other)
	s2, _ := dtls.NewSealer(other, rand.Reader)
	for _, tc := range []struct {
		name string
		s    *dtls.Sealer
		in   []byte
	}{
		{"another key", s2, sealed},
		{"altered", s, append(append([]byte{}, sealed[:len(sealed)-1]...), sealed[len(sealed)-1]^1)},
		{"truncated", s, sealed[:10]},
	} {
		if _, err := tc.s.Open(tc.in); err == nil {
			t.Errorf("Open(%s) succeeded", tc.name)
		}
	}
	if _, err := dtls.NewSealer(key[:16], rand.Reader); err == nil {
		t.Error("NewSealer accepted a 16-byte key")
	}
}
