// Package tpmtest gives tests a real TPM: a swtpm process, manufactured like
// a device off a production line, with EK certificates signed by a private
// "TPM manufacturer" CA.
//
// Manufacturing (swtpm_setup, about 1.5 s) runs once per test binary and
// identity; each test then starts swtpm on a private copy of that state
// (about 12 ms), so tests never share TPM state. Clones of one identity
// share their seeds and EK: tests that need distinct TPMs ask for distinct
// identities.
//
// A package using the fixture must run it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }
//
// Tests fail, never skip, when swtpm is missing: scripts/test.sh installs it.
//
// This package is for tests only; the agent binary must not link it.
package tpmtest

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"iotagent.dev/iotagent/tpm"
)

// workspace holds manufactured identities for the life of the test binary.
// It is process-wide state by necessity: manufacturing is too slow to repeat
// per test.
type workspace struct {
	mu         sync.Mutex
	dir        string
	identities map[identity]string // identity -> manufactured state dir
	seq        int
}

var ws struct {
	sync.Mutex
	w *workspace
}

// Main runs m with the fixture's workspace and removes the workspace (and
// every manufactured TPM) afterwards. It returns m.Run's exit code.
func Main(m *testing.M) int {
	dir, err := os.MkdirTemp("", "tpmtest-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "tpmtest: %v\n", err)
		return 1
	}
	ws.Lock()
	ws.w = &workspace{dir: dir, identities: map[identity]string{}}
	ws.Unlock()
	code := m.Run()
	os.RemoveAll(dir)
	return code
}

func current(t testing.TB) *workspace {
	t.Helper()
	ws.Lock()
	defer ws.Unlock()
	if ws.w == nil {
		t.Fatal("tpmtest: the package's TestMain must call tpmtest.Main(m)")
	}
	return ws.w
}

// Tools checks that the swtpm programs are installed, naming what is
// missing and how to get it.
func Tools() error {
	var missing []string
	for _, p := range []string{"swtpm", "swtpm_setup", "swtpm_localca", "certtool"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("tpmtest: %s not found; install swtpm and swtpm-tools (scripts/test.sh does)", strings.Join(missing, ", "))
	}
	return nil
}

// identity names a manufactured TPM.
type identity struct {
	n    int
	noEK bool
}

// manufacture returns the template state dir of identity id, creating it on
// first use.
func (w *workspace) manufacture(id identity) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if dir, ok := w.identities[id]; ok {
		return dir, nil
	}
	if err := Tools(); err != nil {
		return "", err
	}
	cfg := filepath.Join(w.dir, "cfg")
	ca := filepath.Join(w.dir, "ca")
	for _, d := range []string{cfg, ca} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return "", err
		}
	}
	files := map[string]string{
		"swtpm_setup.conf": fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
			mustLook("swtpm_localca"), filepath.Join(cfg, "swtpm-localca.conf"), filepath.Join(cfg, "swtpm-localca.options")),
		"swtpm-localca.conf": fmt.Sprintf("statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n",
			ca, filepath.Join(ca, "signkey.pem"), filepath.Join(ca, "issuercert.pem"), filepath.Join(ca, "certserial")),
		"swtpm-localca.options": "--platform-manufacturer ExampleCorp\n--platform-version 1.0\n--platform-model IoTGateway\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(cfg, name), []byte(content), 0o600); err != nil {
			return "", err
		}
	}
	state := filepath.Join(w.dir, fmt.Sprintf("id-%d-%v", id.n, id.noEK))
	if err := os.MkdirAll(state, 0o700); err != nil {
		return "", err
	}
	args := []string{"--tpm2", "--tpmstate", state, "--config", filepath.Join(cfg, "swtpm_setup.conf"), "--lock-nvram", "--overwrite"}
	if id.noEK {
		// EKs are still created, but no certificates: like TPMs whose
		// vendor ships none.
		args = append(args, "--createek")
	} else {
		args = append(args, "--create-ek-cert", "--create-platform-cert")
	}
	cmd := exec.Command("swtpm_setup", args...)
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+cfg, "HOME="+w.dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("tpmtest: swtpm_setup: %v\n%s", err, out)
	}
	w.identities[id] = state
	return state, nil
}

func mustLook(p string) string {
	if full, err := exec.LookPath(p); err == nil {
		return full
	}
	return p
}

// ManufacturerRootPEM returns the PEM of the private CA that signed the
// simulated TPMs' EK certificates: what a station trusts as a TPM vendor.
func ManufacturerRootPEM(t testing.TB) []byte {
	t.Helper()
	return caFile(t, "swtpm-localca-rootca-cert.pem")
}

// ManufacturerIntermediatePEM returns the PEM of the intermediate CA that
// directly signs EK certificates.
func ManufacturerIntermediatePEM(t testing.TB) []byte {
	t.Helper()
	return caFile(t, "issuercert.pem")
}

func caFile(t testing.TB, name string) []byte {
	t.Helper()
	w := current(t)
	if _, err := w.manufacture(identity{}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(w.dir, "ca", name))
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	return b
}

// ManufacturerRoot returns the manufacturer root as a certificate.
func ManufacturerRoot(t testing.TB) *x509.Certificate {
	t.Helper()
	return parsePEM(t, ManufacturerRootPEM(t))
}

// Options configure a simulator.
type Options struct {
	// Identity selects the manufactured TPM: simulators with the same
	// identity are clones (same seeds, same EK); different identities are
	// different TPMs with EK certificates from the same manufacturer CA.
	Identity int
	// NoEKCertificate manufactures the TPM without EK certificates (the
	// device must enroll with a token).
	NoEKCertificate bool
	// TCP serves the TPM on a loopback TCP port instead of a unix socket.
	TCP bool
}

// Simulator is a running swtpm. Its methods are not safe for concurrent use.
type Simulator struct {
	t        testing.TB
	opts     Options
	StateDir string
	// Spec is what tpm.Open takes to reach this TPM: unix:SOCKET or
	// tcp:127.0.0.1:PORT.
	Spec string
	// Socket is the unix socket path (empty with TCP); its control socket is
	// Socket+".ctrl", so tpm2-tools reach it with
	// TPM2TOOLS_TCTI=swtpm:path=Socket.
	Socket string

	cmd  *exec.Cmd
	done chan struct{}
	out  *lockedBuffer
}

// New starts a fresh clone of identity 0 and stops it at cleanup.
func New(t testing.TB) *Simulator {
	t.Helper()
	return Start(t, Options{})
}

// Start starts a simulator with opts. At cleanup it checks that no
// transient objects or sessions were left loaded, then stops swtpm.
func Start(t testing.TB, opts Options) *Simulator {
	t.Helper()
	w := current(t)
	tmpl, err := w.manufacture(identity{opts.Identity, opts.NoEKCertificate})
	if err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	w.seq++
	// Socket paths are limited to 108 bytes: keep them short and out of
	// t.TempDir, whose names grow with the test name.
	dir := filepath.Join(w.dir, "s"+strconv.Itoa(w.seq))
	w.mu.Unlock()
	state := filepath.Join(dir, "state")
	if err := copyDir(tmpl, state); err != nil {
		t.Fatalf("tpmtest: cloning TPM state: %v", err)
	}
	s := &Simulator{t: t, opts: opts, StateDir: state}
	if opts.TCP {
		s.Spec = "tcp:" + freeTCPAddr(t)
	} else {
		s.Socket = filepath.Join(dir, "tpm.sock")
		s.Spec = "unix:" + s.Socket
	}
	s.start()
	t.Cleanup(func() {
		s.checkLeaks()
		s.Stop()
		os.RemoveAll(dir)
	})
	return s
}

// Open opens the simulator with tpm.Open and closes it at cleanup.
func (s *Simulator) Open(t testing.TB) *tpm.TPM {
	t.Helper()
	tp, err := tpm.Open(s.Spec)
	if err != nil {
		t.Fatalf("tpm.Open(%s): %v", s.Spec, err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

func (s *Simulator) start() {
	s.t.Helper()
	args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + s.StateDir,
		"--flags", "not-need-init,startup-clear"}
	if s.opts.TCP {
		addr := strings.TrimPrefix(s.Spec, "tcp:")
		host, port, _ := net.SplitHostPort(addr)
		ctrl := freeTCPAddr(s.t)
		_, cport, _ := net.SplitHostPort(ctrl)
		args = append(args,
			"--server", "type=tcp,port="+port+",bindaddr="+host,
			"--ctrl", "type=tcp,port="+cport+",bindaddr="+host)
	} else {
		os.Remove(s.Socket)
		args = append(args,
			"--server", "type=unixio,path="+s.Socket,
			"--ctrl", "type=unixio,path="+s.Socket+".ctrl")
	}
	cmd := exec.Command("swtpm", args...)
	s.out = &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	// If the test binary dies, swtpm must not outlive it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("tpmtest: starting swtpm: %v", err)
	}
	s.cmd = cmd
	s.done = make(chan struct{})
	go func() { cmd.Wait(); close(s.done) }()

	deadline := time.Now().Add(10 * time.Second)
	for {
		tp, err := tpm.Open(s.Spec)
		if err == nil {
			tp.Close()
			return
		}
		select {
		case <-s.done:
			s.t.Fatalf("tpmtest: swtpm exited at start: %s", s.out.String())
		default:
		}
		if time.Now().After(deadline) {
			s.Stop()
			s.t.Fatalf("tpmtest: swtpm did not answer within 10s: %v\n%s", err, s.out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// NewKey creates a device key in tp and loads it; it is closed at
// cleanup.
func NewKey(t testing.TB, tp *tpm.TPM) *tpm.Key {
	t.Helper()
	kf, err := tp.CreateKey()
	if err != nil {
		t.Fatal(err)
	}
	k, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

// NVIndex is an NV index WriteNV provisions.
type NVIndex struct {
	Index uint32
	Data  []byte
	// OwnerReadOnly leaves out AUTHREAD: only the owner hierarchy reads
	// the index (EK certificate indices are readable with their own
	// empty auth value too).
	OwnerReadOnly bool
}

// WriteNV defines the NV index with the platform hierarchy and writes
// its data, as a TPM or platform vendor provisions EK certificates and
// their chain. Unix-socket simulators only.
func (s *Simulator) WriteNV(t testing.TB, nv NVIndex) {
	t.Helper()
	if s.Socket == "" {
		t.Fatal("tpmtest: WriteNV needs a unix-socket simulator")
	}
	tr, err := linuxudstpm.Open(s.Socket)
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	defer tr.Close()
	h := tpm2.TPMHandle(nv.Index)
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: platform,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: h,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: !nv.OwnerReadOnly,
				NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary},
			DataSize: uint16(len(nv.Data)),
		}),
	}).Execute(tr); err != nil {
		t.Fatalf("tpmtest: NV_DefineSpace %#x: %v", nv.Index, err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: h}.Execute(tr)
	if err != nil {
		t.Fatalf("tpmtest: NV_ReadPublic %#x: %v", nv.Index, err)
	}
	for off := 0; off < len(nv.Data); off += 1024 {
		if _, err := (tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    tpm2.NamedHandle{Handle: h, Name: pub.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: nv.Data[off:min(off+1024, len(nv.Data))]},
			Offset:     uint16(off),
		}).Execute(tr); err != nil {
			t.Fatalf("tpmtest: NV_Write %#x at %d: %v", nv.Index, off, err)
		}
	}
}

// ManufacturerIntermediate returns the intermediate CA that signs EK
// certificates as a certificate.
func ManufacturerIntermediate(t testing.TB) *x509.Certificate {
	t.Helper()
	return parsePEM(t, ManufacturerIntermediatePEM(t))
}

func parsePEM(t testing.TB, b []byte) *x509.Certificate {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("tpmtest: manufacturer certificate is not PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	return c
}

// Stop terminates swtpm. Transient objects and sessions are lost, as on a
// power cut; NV and persistent objects survive in the state dir.
func (s *Simulator) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

// Restart stops swtpm and starts it again on the same state, as a reboot
// does.
func (s *Simulator) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

// checkLeaks fails the test if transient objects or sessions are loaded.
func (s *Simulator) checkLeaks() {
	if s.cmd == nil {
		return
	}
	tp, err := tpm.Open(s.Spec)
	if err != nil {
		s.t.Errorf("tpmtest: leak check: %v", err)
		return
	}
	defer tp.Close()
	hs, err := tp.TransientHandles()
	if err != nil {
		s.t.Errorf("tpmtest: leak check: %v", err)
		return
	}
	ss, err := tp.OpenSessions()
	if err != nil {
		s.t.Errorf("tpmtest: leak check: %v", err)
		return
	}
	if len(hs) > 0 || len(ss) > 0 {
		s.t.Errorf("tpmtest: TPM handles leaked at end of test: %d transient objects %v, %d sessions %v", len(hs), hs, len(ss), ss)
	}
}

func freeTCPAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

func copyDir(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".lock") {
			continue
		}
		if err := copyFile(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) < 1<<16 {
		b.buf = append(b.buf, p...)
	}
	return len(p), nil
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
