package mqtttest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
)

// Identities the broker knows besides devices.
const (
	// ReaderName is the CN (and so the MQTT user and client ID) of the
	// fleet-side subscriber: the ACL lets it read devices/#.
	ReaderName = "fleet-reader"
	// probeName is the CN Start and Restart use to check that the broker
	// answers; the ACL grants it nothing.
	probeName = "mqtttest-probe"
)

// DefaultACL is the broker's ACL (mosquitto acl_file syntax; %u is the
// user, which is the certificate's CN): the fleet reader reads every
// device's topics, the station's session ender (station.SessionsClientName)
// sends commands to the dynamic-security plugin and reads its answers,
// the station's firmware nudger (station.NudgeClientName) writes devices'
// commands, a device writes its telemetry, reads and writes its status and reads its
// commands, and nothing else.
const DefaultACL = `user ` + ReaderName + `
topic read devices/#

user ` + station.SessionsClientName + `
topic write $CONTROL/dynamic-security/v1
topic read $CONTROL/dynamic-security/v1/response

user ` + station.NudgeClientName + `
topic write devices/+/cmd

pattern write devices/%u/telemetry
pattern readwrite devices/%u/status
pattern read devices/%u/cmd
`

// Timeouts of the fixture. They are generous: they bound a broken test,
// not a healthy one (a start takes tens of milliseconds).
const (
	startTimeout = 10 * time.Second
	stopTimeout  = 5 * time.Second
	probeTimeout = 2 * time.Second
)

// certLifetime is the lifetime of the certificates the fixture issues:
// longer than any test.
const certLifetime = 24 * time.Hour

// Options configure a test broker. The zero value is the production-like
// broker described in the package documentation.
type Options struct {
	// Config holds extra mosquitto.conf lines, written after the listener's
	// own settings (so listener options apply to the test listener), for
	// example "max_inflight_messages 1" or "max_keepalive 5". They must
	// leave log_dest and log_type alone: Start and ReloadCRL read the log.
	Config []string
	// ACL holds extra acl_file lines appended to DefaultACL, for example
	// "user fleet-commander" then "topic write devices/+/cmd".
	ACL []string
	// NoCRL leaves crlfile out: the broker does not check revocation. For
	// tests that show what a broker without a CRL accepts.
	NoCRL bool
	// Debug logs everything (log_type all): every packet in and out. Noisy;
	// for debugging a test, not for committed tests.
	Debug bool
	// DynSec loads mosquitto's dynamic-security plugin, its configuration
	// in DynSecFile (empty at start: no dynsec client, role or group), as
	// the broker the station ends revoked devices' sessions through
	// (station.SessionsConfig). The plugin defers every check on a user it
	// does not know to the ACL file, so devices need not be dynsec
	// clients.
	DynSec bool
}

// Broker is a mosquitto process serving mutual TLS on a loopback port,
// started by Start and stopped at the test's cleanup. Its methods are safe
// for concurrent use. Addr, URL and CAFile never change, across Restart
// too.
type Broker struct {
	// Addr is 127.0.0.1:PORT.
	Addr string
	// URL is mqtts://127.0.0.1:PORT, as paho's AddBroker takes it.
	URL string
	// CAFile is the PEM file of the station's CA certificates (issuing CA
	// and root) the broker verifies clients with. The broker's own
	// certificate chains to the same root, so clients verify the broker
	// with this file too.
	CAFile string
	// Dir holds mosquitto.conf, acl, the broker's key and certificate and
	// mosquitto.log. It is removed at cleanup.
	Dir string
	// DynSecFile is the dynamic-security plugin's configuration, which the
	// plugin rewrites on every change; empty without Options.DynSec.
	DynSecFile string

	t        testing.TB
	st       *stationtest.Station
	bin      string
	dynsec   string // the plugin's path, with Options.DynSec
	opts     Options
	logFile  string
	trust    *x509.CertPool
	probeTLS *tls.Config

	mu   sync.Mutex // serializes process changes
	proc *process   // nil while stopped

	subMu     sync.Mutex
	sub       *Subscriber // the open subscriber, if any
	subBuffer int         // Messages capacity; 0 means MessageBuffer
}

// process is one run of mosquitto.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd.Wait returns
}

// errAddrInUse: mosquitto could not bind its port.
var errAddrInUse = errors.New("address already in use")

// Start starts a broker trusting st's CA, with a server certificate from
// st, on a free loopback port, and stops it at cleanup. It returns once
// the broker completes an MQTT connection over mutual TLS. The test fails
// (it is not skipped) when mosquitto is not installed.
//
// The certificates Start issues are valid from the station's clock: a
// station with a fake Now far from real time gives certificates mosquitto
// (which uses the real clock) rejects.
func Start(t testing.TB, st *stationtest.Station, opts Options) *Broker {
	t.Helper()
	bin, err := lookMosquitto()
	if err != nil {
		t.Fatal(err)
	}
	b := &Broker{t: t, st: st, bin: bin, opts: opts, Dir: t.TempDir()}
	b.logFile = filepath.Join(b.Dir, "mosquitto.log")
	b.CAFile = filepath.Join(b.Dir, "ca.pem")
	if opts.DynSec {
		if b.dynsec, err = lookDynSec(); err != nil {
			t.Fatal(err)
		}
		b.DynSecFile = filepath.Join(b.Dir, "dynamic-security.json")
	}
	if err := b.writeFiles(); err != nil {
		t.Fatalf("mqtttest: %v", err)
	}
	b.probeTLS = b.ClientTLS(t, probeName)
	t.Cleanup(b.Stop)

	// The port is free when chosen but not reserved: another process may
	// take it before mosquitto binds it. Choose again then.
	const attempts = 5
	for i := 1; ; i++ {
		addr, err := freeAddr()
		if err != nil {
			t.Fatalf("mqtttest: %v", err)
		}
		b.setAddr(addr)
		err = b.start()
		if err == nil {
			return b
		}
		if !errors.Is(err, errAddrInUse) || i == attempts {
			t.Fatalf("mqtttest: starting mosquitto: %v\n%s", err, b.LogTail())
		}
	}
}

func lookMosquitto() (string, error) {
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	// Debian installs it in /usr/sbin, which a user's PATH may lack.
	if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
		return "/usr/sbin/mosquitto", nil
	}
	return "", errors.New("mqtttest: mosquitto not found; install mosquitto and mosquitto-clients (scripts/test.sh does)")
}

// lookDynSec finds the dynamic-security plugin: Debian's mosquitto
// package installs it in the multiarch library directory.
func lookDynSec() (string, error) {
	const name = "mosquitto_dynamic_security.so"
	for _, pattern := range []string{"/usr/lib/*/" + name, "/usr/lib/" + name, "/usr/lib/mosquitto/" + name, "/usr/local/lib/" + name} {
		if m, _ := filepath.Glob(pattern); len(m) > 0 {
			return m[0], nil
		}
	}
	return "", errors.New("mqtttest: " + name + " not found; Debian's mosquitto package ships it")
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func (b *Broker) setAddr(addr string) {
	b.Addr = addr
	b.URL = "mqtts://" + addr
}

// writeFiles writes everything but mosquitto.conf, which names the port.
func (b *Broker) writeFiles() error {
	trust := b.st.TrustPEM()
	b.trust = x509.NewCertPool()
	if !b.trust.AppendCertsFromPEM(trust) {
		return errors.New("station trust PEM holds no certificate")
	}
	srv, err := b.st.IssueService(context.Background(), station.ServiceRequest{Name: "broker", SANs: []string{"127.0.0.1", "localhost"}, Server: true, Lifetime: certLifetime})
	if err != nil {
		return fmt.Errorf("issuing the broker certificate: %w", err)
	}
	if !b.opts.NoCRL {
		// Creates crl.pem in the station directory if it is not there yet.
		if _, err := b.st.CRL(); err != nil {
			return fmt.Errorf("issuing the CRL: %w", err)
		}
	}
	acl := DefaultACL
	if len(b.opts.ACL) > 0 {
		acl += "\n" + strings.Join(b.opts.ACL, "\n") + "\n"
	}
	files := map[string][]byte{
		"ca.pem":     trust,
		"server.pem": srv.Chain,
		"server.key": srv.Key,
		"acl":        []byte(acl),
	}
	if b.opts.DynSec {
		files[filepath.Base(b.DynSecFile)] = nil // the plugin accepts an empty file
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(b.Dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// config returns mosquitto.conf for the current port.
func (b *Broker) config() string {
	_, port, _ := net.SplitHostPort(b.Addr)
	var c strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&c, format+"\n", args...) }
	line("# Written by iotagent's mqtttest for %s.", b.t.Name())
	line("per_listener_settings false")
	line("allow_anonymous false")
	line("persistence false")
	line("acl_file %s", filepath.Join(b.Dir, "acl"))
	if os.Geteuid() == 0 {
		// As root, mosquitto would switch to the mosquitto user, who cannot
		// read this test's files.
		line("user root")
	}
	// stderr goes to mosquitto.log (see start): one file also holds what
	// mosquitto prints before it has read this file.
	line("log_dest stderr")
	line("log_timestamp_format %%Y-%%m-%%dT%%H:%%M:%%S")
	if b.opts.Debug {
		line("log_type all")
	}
	line("listener %s 127.0.0.1", port)
	line("set_tcp_nodelay true")
	line("cafile %s", b.CAFile)
	line("certfile %s", filepath.Join(b.Dir, "server.pem"))
	line("keyfile %s", filepath.Join(b.Dir, "server.key"))
	line("require_certificate true")
	line("use_identity_as_username true")
	// A gateway cannot take over another's session.
	line("use_username_as_clientid true")
	if !b.opts.NoCRL {
		line("crlfile %s", filepath.Join(b.st.Dir, "crl.pem"))
	}
	if b.opts.DynSec {
		line("plugin %s", b.dynsec)
		line("plugin_opt_config_file %s", b.DynSecFile)
	}
	for _, l := range b.opts.Config {
		line("%s", l)
	}
	return c.String()
}

// start runs mosquitto on b.Addr and waits until it answers. The caller
// holds b.mu or has not shared b yet.
func (b *Broker) start() error {
	conf := filepath.Join(b.Dir, "mosquitto.conf")
	if err := os.WriteFile(conf, []byte(b.config()), 0o600); err != nil {
		return err
	}
	logf, err := os.OpenFile(b.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "--- mqtttest: starting mosquitto on %s at %s\n", b.Addr, time.Now().Format(time.RFC3339Nano))
	off, _ := logf.Seek(0, io.SeekEnd)

	cmd := exec.Command(b.bin, "-c", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	// If the test binary dies, mosquitto must not outlive it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(p.done)
	}()

	deadline := time.Now().Add(startTimeout)
	for {
		err := b.probe()
		if err == nil {
			b.proc = p
			return nil
		}
		select {
		case <-p.done:
			if bytes.Contains(b.logSince(off), []byte("Address already in use")) {
				return errAddrInUse
			}
			return fmt.Errorf("mosquitto exited: %v", cmd.ProcessState)
		default:
		}
		if time.Now().After(deadline) {
			stopProcess(p, syscall.SIGKILL)
			return fmt.Errorf("mosquitto did not answer within %v: %w", startTimeout, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// probe connects as probeName over mutual TLS and sends an MQTT CONNECT:
// the broker is ready when it answers with an accepting CONNACK.
func (b *Broker) probe() error {
	d := &net.Dialer{Timeout: probeTimeout}
	conn, err := tls.DialWithDialer(d, "tcp", b.Addr, b.probeTLS)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(probeTimeout))
	if err := mqttConnect(conn); err != nil {
		return err
	}
	_, err = conn.Write([]byte{0xe0, 0}) // DISCONNECT
	return err
}

// mqttConnect sends an MQTT 3.1.1 CONNECT with clean session and an empty
// client ID (mosquitto uses the username, from the certificate) and reads
// an accepting CONNACK.
func mqttConnect(rw io.ReadWriter) error {
	connect := []byte{
		0x10, 12, // CONNECT, remaining length
		0, 4, 'M', 'Q', 'T', 'T', 4, // protocol name, level 4 (3.1.1)
		0x02,  // flags: clean session
		0, 60, // keepalive
		0, 0, // client ID ""
	}
	if _, err := rw.Write(connect); err != nil {
		return err
	}
	var ack [4]byte
	if _, err := io.ReadFull(rw, ack[:]); err != nil {
		return fmt.Errorf("reading CONNACK: %w", err)
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		return fmt.Errorf("want CONNACK, got % x", ack)
	}
	if ack[3] != 0 {
		return fmt.Errorf("CONNACK refused the connection: return code %d", ack[3])
	}
	return nil
}

// PID is the mosquitto process's ID, 0 while the broker is stopped: what
// a station's CRL hook signals to make the broker reload its CRL.
func (b *Broker) PID() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.proc == nil {
		return 0
	}
	return b.proc.cmd.Process.Pid
}

// Stop stops the broker (SIGTERM, then SIGKILL if it lingers) and waits
// for it to exit. Clients see their connections closed. Stopping a stopped
// broker does nothing; Restart starts it again.
func (b *Broker) Stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stop(syscall.SIGTERM)
}

// Kill kills the broker with SIGKILL, as a crash would, and waits for it
// to exit. Nothing is persisted (persistence is off), so sessions and
// queued messages are lost. Restart starts it again.
func (b *Broker) Kill() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stop(syscall.SIGKILL)
}

func (b *Broker) stop(sig syscall.Signal) {
	if b.proc == nil {
		return
	}
	if !stopProcess(b.proc, sig) {
		b.t.Errorf("mqtttest: mosquitto ignored SIGTERM for %v; killed it\n%s", stopTimeout, b.LogTail())
	}
	b.proc = nil
}

// stopProcess signals p and waits for it to exit, killing it if it does
// not within stopTimeout. It reports whether p exited on sig.
func stopProcess(p *process, sig syscall.Signal) bool {
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return true
	case <-time.After(stopTimeout):
		p.cmd.Process.Kill()
		<-p.done
		return false
	}
}

// Restart stops the broker (if it runs) and starts it again on the same
// port, with the same configuration and certificates. Clients lose their
// connections and sessions and must reconnect.
//
// mosquitto reads crlfile when it starts: Restart is how a test makes the
// broker apply the station's current CRL (after st.Revoke) and drop every
// connection, a revoked device's included. ReloadCRL applies it without
// dropping connections.
//
// A failure is reported with Errorf on the test that called Start (so
// Restart may be called from its subtests and other goroutines); the
// broker is then down and the test's next connection fails.
func (b *Broker) Restart() {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stop(syscall.SIGTERM)
	// mosquitto sets SO_REUSEADDR, so the old connections in TIME_WAIT do
	// not hold the port; another process that took it meanwhile does.
	var err error
	for range 50 {
		if err = b.start(); !errors.Is(err, errAddrInUse) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		b.t.Errorf("mqtttest: restarting mosquitto on %s: %v\n%s", b.Addr, err, b.LogTail())
	}
}

// ReloadCRL makes the running broker apply the station's current CRL to
// new connections, and returns once it does. It sends SIGHUP, which on
// mosquitto 2.0.11 (measured by TestReloadCRL and TestTLSResumption):
//   - re-reads crlfile: a handshake with a certificate revoked since is
//     refused with a "revoked certificate" alert;
//   - keeps established connections, a revoked device's included, until
//     they end (Restart drops them all);
//   - invalidates TLS sessions issued before it: no client resumes one,
//     so no revoked device skips the CRL check by resuming.
//
// A failure is reported with Errorf on the test that called Start, as
// with Restart.
func (b *Broker) ReloadCRL() {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.proc == nil {
		b.t.Error("mqtttest: ReloadCRL on a stopped broker")
		return
	}
	before := b.logSize()
	if err := b.proc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		b.t.Errorf("mqtttest: SIGHUP: %v", err)
		return
	}
	// mosquitto's single-threaded main loop logs this line and then
	// reloads: a connection accepted after the line is served by the
	// reloaded configuration. The probe also shows the listener survived.
	deadline := time.Now().Add(startTimeout)
	for !bytes.Contains(b.logSince(before), []byte("Reloading config.")) {
		if time.Now().After(deadline) {
			b.t.Errorf("mqtttest: mosquitto did not reload within %v\n%s", startTimeout, b.LogTail())
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := b.probe(); err != nil {
		b.t.Errorf("mqtttest: mosquitto does not answer after reloading: %v\n%s", err, b.LogTail())
	}
}

// LogTail returns the end of mosquitto's log (the last 50 lines), for
// failure messages.
func (b *Broker) LogTail() string {
	data, err := os.ReadFile(b.logFile)
	if err != nil {
		return fmt.Sprintf("(no mosquitto log: %v)", err)
	}
	const max = 50
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > 2*max {
			lines = append(lines[:0], lines[len(lines)-max:]...)
		}
	}
	if len(lines) > max {
		lines = lines[len(lines)-max:]
	}
	return "mosquitto log (" + b.logFile + "):\n" + strings.Join(lines, "\n")
}

func (b *Broker) logSize() int64 {
	fi, err := os.Stat(b.logFile)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func (b *Broker) logSince(off int64) []byte {
	data, _ := os.ReadFile(b.logFile)
	if off > int64(len(data)) {
		return nil
	}
	return data[off:]
}

// ClientTLS issues a client certificate with common name cn from the
// station and returns a TLS configuration presenting it and trusting the
// broker. The broker takes cn as the MQTT user and client ID, so the ACL
// treats the client as device cn: a test can act as a rogue device. The
// certificate is not a device's (it is not in the station's registry and
// cannot be revoked there). ServerName is left empty: tls.Dial and paho
// take it from the address, and the broker's certificate covers 127.0.0.1
// and localhost.
func (b *Broker) ClientTLS(t testing.TB, cn string) *tls.Config {
	t.Helper()
	sc, err := b.st.IssueService(context.Background(), station.ServiceRequest{Name: cn, Lifetime: certLifetime})
	if err != nil {
		t.Fatalf("mqtttest: issuing a client certificate for %q: %v", cn, err)
	}
	cert, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		t.Fatalf("mqtttest: %v", err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      b.trust,
		MinVersion:   tls.VersionTLS12,
	}
}
