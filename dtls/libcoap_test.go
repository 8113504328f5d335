package dtls_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/senml"
)

// freeUDPPort returns a loopback UDP port nobody listens on now.
func freeUDPPort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// Our uplink against libcoap's coap-server-openssl, an independent DTLS
// and CoAP implementation: the DTLS handshake with the TPM key and a
// confirmable exchange complete.
func TestUplinkWithLibcoapServer(t *testing.T) {
	bin, err := exec.LookPath("coap-server-openssl")
	if err != nil {
		t.Fatal("coap-server-openssl not found: install libcoap3-bin (scripts/test.sh does)")
	}
	st := stationtestStart(t)
	d := enrolled(t, st)
	sc, err := st.IssueService("collector", []string{"127.0.0.1"}, true, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o600)
		return p
	}
	certFile, keyFile, caFile := write("server.crt", sc.Chain), write("server.key", sc.Key), write("ca.pem", st.TrustPEM())
	port := freeUDPPort(t)
	out := &syncBuffer{}
	// -d: resources are created on demand, so POST /telemetry has one.
	srv := exec.Command(bin, "-A", "127.0.0.1", "-p", fmt.Sprint(port-1), "-c", certFile, "-j", keyFile, "-C", caFile, "-d", "10", "-v", "7")
	srv.Stdout, srv.Stderr = out, out
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(300 * time.Millisecond)

	// coap-server listens for DTLS on the port after the one given with -p.
	up, err := dtls.NewUplink(dtls.UplinkConfig{URL: fmt.Sprintf("coaps://127.0.0.1:%d", port), RootCAs: d.roots,
		Identity: d.renewer.Identity(), BackoffBase: 100 * time.Millisecond, BackoffCap: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- up.Run(ctx) }()
	if err := up.Ready(ctx); err != nil {
		t.Fatalf("no DTLS session with coap-server-openssl: %v\n%s", err, out.String())
	}
	p := senml.Pack{{Name: "interop", Value: ptr(1.0), Seq: 1}}
	payload, _ := up.Encode(p)
	err = up.Deliver(ctx, payload)
	// libcoap answers a POST on a resource it creates on demand with a
	// success or a 4.xx of its own: either way the confirmable exchange
	// completed (a timeout would not be ErrRejected).
	if err != nil && !errors.Is(err, telemetry.ErrRejected) {
		t.Fatalf("confirmable POST to coap-server-openssl: %v\n%s", err, out.String())
	}
	t.Logf("coap-server-openssl answered: %v\n%s", err, out.String())
	if full, _ := up.Handshakes(); full != 1 {
		t.Errorf("%d handshakes, want 1", full)
	}
	if !strings.Contains(out.String(), "handshake") && !strings.Contains(strings.ToLower(out.String()), "dtls") {
		t.Logf("server log:\n%s", out.String())
	}
	cancel()
	<-done
}

func ptr[T any](v T) *T { return &v }

// syncBuffer is a buffer a child process writes while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
