package coap_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/telemetry/coap"
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
// and CoAP implementation started with the station's CA: the server
// verifies our TPM-held device certificate in a full handshake, answers
// both confirmable POSTs with success, and holds the exact bytes we sent.
func TestUplinkWithLibcoapServer(t *testing.T) {
	bin, err := exec.LookPath("coap-server-openssl")
	if err != nil {
		t.Fatal("coap-server-openssl not found: install libcoap3-bin (scripts/test.sh does)")
	}
	client, err := exec.LookPath("coap-client-openssl")
	if err != nil {
		t.Fatal("coap-client-openssl not found: install libcoap3-bin (scripts/test.sh does)")
	}
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	sc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "collector", SANs: []string{"127.0.0.1"}, Server: true, Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	certFile, keyFile, caFile := write("server.crt", sc.Chain), write("server.key", sc.Key), write("ca.pem", st.TrustPEM())
	// coap-server listens for plain CoAP on the port given with -p and for
	// DTLS on the next one.
	port := freeUDPPort(t)
	out := &testsync.Buffer{}
	// -C: the client must present a certificate chaining to the station's
	// CA. -d: a POST to a path nobody registered creates the resource
	// (2.01 Created, then 2.04 Changed); without it libcoap 4.3.1 answers
	// 4.04. -v 7: the handshake, the client's certificate and every PDU.
	srv := exec.Command(bin, "-A", "127.0.0.1", "-p", fmt.Sprint(port-1),
		"-c", certFile, "-j", keyFile, "-C", caFile, "-d", "10", "-v", "7")
	srv.Stdout, srv.Stderr = out, out
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- srv.Wait() }()
	stopped := false
	defer func() {
		if !stopped {
			srv.Process.Kill()
			<-exited
		}
	}()
	listening := fmt.Sprintf("created DTLS endpoint 127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), listening); {
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("coap-server-openssl exited: %v\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("coap-server-openssl not listening on DTLS port %d after 10 s\n%s", port, out.String())
		}
	}

	up, err := coap.New(coap.Config{URL: fmt.Sprintf("coaps://127.0.0.1:%d", port), RootCAs: d.RootCAs,
		Identity: d.Identity(), BackoffBase: 100 * time.Millisecond, BackoffCap: time.Second})
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
	var last []byte
	for seq := range uint64(2) {
		payload, err := up.Encode(senml.Pack{{Name: "interop", Value: ptr(float64(seq + 1)), Seq: seq + 1}})
		if err != nil {
			t.Fatal(err)
		}
		// nil is 2.01 or 2.04 only: any other answer, or none, is an error.
		if err := up.Deliver(ctx, payload); err != nil {
			t.Fatalf("POST %d to coap-server-openssl: %v\n%s", seq+1, err, out.String())
		}
		last = payload
	}
	if full, resumed := up.Handshakes(); full != 1 || resumed != 0 {
		t.Errorf("Handshakes() = %d full, %d resumed, want 1, 0", full, resumed)
	}
	// The server holds what the second POST carried, byte for byte.
	got := filepath.Join(dir, "got.cbor")
	get := exec.CommandContext(ctx, client, "-m", "get", "-B", "10", "-o", got, fmt.Sprintf("coap://127.0.0.1:%d/telemetry", port-1))
	if b, err := get.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(get.Args, " "), err, b)
	}
	if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, last) {
		t.Errorf("GET /telemetry = %x (%v), want %x", b, err, last)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil after cancel", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return 10 s after cancel")
	}

	// libcoap prints PDUs through stdio without flushing: read its log
	// after it exits (SIGTERM is its clean stop).
	if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			t.Errorf("coap-server-openssl: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("coap-server-openssl still running 10 s after SIGTERM\n%s", out.String())
	}
	log := out.String()
	cn := d.Identity().DeviceID()
	for _, c := range []struct {
		what string
		re   string
		want int
	}{
		{"client certificates accepted", `CN '` + regexp.QuoteMeta(cn) + `' presented by client \(Certificate\)`, 1},
		{"DTLS sessions connected", `DTLS: session connected`, 1},
		{"POSTs of SenML CBOR to /telemetry", `t:CON c:POST i:[0-9a-f]+ \{[0-9a-f]*\} \[[^]]*Uri-Path:telemetry, Content-Format:application/senml\+cbor`, 2},
	} {
		if got := len(regexp.MustCompile(c.re).FindAllString(log, -1)); got != c.want {
			t.Errorf("server log: %d %s, want %d", got, c.what, c.want)
		}
	}
	// Each POST is acknowledged (same message ID and token): Created, then
	// Changed.
	var answers []string
	posts := regexp.MustCompile(`t:CON c:POST (i:[0-9a-f]+ \{[0-9a-f]*\}) `).FindAllStringSubmatch(log, -1)
	for _, p := range posts {
		m := regexp.MustCompile(`t:ACK c:(\d\.\d\d) ` + regexp.QuoteMeta(p[1]) + ` `).FindStringSubmatch(log)
		if m == nil {
			answers = append(answers, "none")
			continue
		}
		answers = append(answers, m[1])
	}
	if want := []string{"2.01", "2.04"}; !slices.Equal(answers, want) {
		t.Errorf("server answered the POSTs %v, want %v", answers, want)
	}
	if t.Failed() {
		t.Logf("server log:\n%s", log)
	}
}

func ptr[T any](v T) *T { return &v }
