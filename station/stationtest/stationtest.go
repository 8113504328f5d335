// Package stationtest runs a real station in-process for tests: a fresh
// station directory trusting the tpmtest manufacturer CA, serving HTTPS on
// a loopback port chosen at run time. For tests only.
package stationtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// Options configure a test station.
type Options struct {
	AutoApprove  bool
	HoldUnknown  bool
	CertLifetime time.Duration // default 1h
	// Manifest lines, "EK_SHA256 DEVICE_ID".
	Manifest string
	// Now overrides the station's clock.
	Now func() time.Time
	// Lenient lets a client fail many times before it is slowed down,
	// and attest many times at once
	// (tests that send many bad requests in a row).
	Lenient bool
	// FailuresBeforeSlowdown is station.Config.FailuresBeforeSlowdown
	// (default 5) when Lenient is off.
	FailuresBeforeSlowdown int
	// CRLHook is the station's crl_hook (station.Config.CRLHook), and
	// CRLHookRetry its first retry delay.
	CRLHook      string
	CRLHookRetry time.Duration
	// CATPM, a TPM spec, holds the issuing CA's key in that TPM
	// (station.InitOptions.CATPM).
	CATPM string
}

// Station is a running test station.
type Station struct {
	*station.Station
	t    testing.TB
	Dir  string
	Addr string // 127.0.0.1:PORT, kept across Restart
	// URL is https://127.0.0.1:PORT.
	URL string
	// Fingerprint is the root's sha256:HEX; RootFile its PEM file.
	Fingerprint string
	RootFile    string
	opts        Options

	cancel context.CancelFunc
	done   chan error
}

// Start initializes and serves a station; it stops at cleanup.
func Start(t testing.TB, opts Options) *Station {
	t.Helper()
	if opts.CertLifetime == 0 {
		opts.CertLifetime = time.Hour
	}
	// A short path: the admin socket lives in the directory.
	dir, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	rootsFile := filepath.Join(dir, "mfr-roots.pem")
	pemData := append(tpmtest.ManufacturerRootPEM(t), tpmtest.ManufacturerIntermediatePEM(t)...)
	if err := os.WriteFile(rootsFile, pemData, 0o600); err != nil {
		t.Fatal(err)
	}
	var manifest string
	if opts.Manifest != "" {
		manifest = filepath.Join(dir, "manifest.in")
		os.WriteFile(manifest, []byte(opts.Manifest), 0o600)
	}
	sdir := filepath.Join(dir, "station")
	if err := station.Init(station.InitOptions{
		Dir: sdir, TPMRoots: []string{rootsFile}, Manifest: manifest,
		CertLifetime: opts.CertLifetime, AutoApprove: opts.AutoApprove, HoldUnknown: opts.HoldUnknown, Now: opts.Now,
		CATPM: opts.CATPM,
	}); err != nil {
		t.Fatalf("station.Init: %v", err)
	}
	s := &Station{t: t, Dir: sdir, opts: opts, RootFile: filepath.Join(sdir, "root.crt")}
	s.Fingerprint, err = station.RootFingerprint(sdir)
	if err != nil {
		t.Fatal(err)
	}
	s.open()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = l.Addr().String()
	s.URL = "https://" + s.Addr
	s.serve(l)
	t.Cleanup(s.shutdown)
	return s
}

func (s *Station) open() {
	cfg := station.Config{Dir: s.Dir, Now: s.opts.Now, CRLHook: s.opts.CRLHook, CRLHookRetry: s.opts.CRLHookRetry}
	cfg.FailuresBeforeSlowdown = s.opts.FailuresBeforeSlowdown
	if s.opts.Lenient {
		cfg.FailuresBeforeSlowdown, cfg.AttestationBurst = 1000, 1000
	}
	st, err := station.Open(cfg)
	if err != nil {
		s.t.Fatalf("station.Open: %v", err)
	}
	s.Station = st
}

func (s *Station) serve(l net.Listener) {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan error, 1)
	go func() { s.done <- s.Station.Serve(ctx, l) }()
}

// Stop stops serving: connections are refused, as when the station is
// down. The station stays open for inspection.
func (s *Station) Stop() {
	s.t.Helper()
	if s.cancel == nil {
		return
	}
	s.cancel()
	if err := <-s.done; err != nil {
		s.t.Errorf("station Serve: %v", err)
	}
	s.cancel = nil
}

// Restart serves again on the same address.
func (s *Station) Restart() {
	s.t.Helper()
	var l net.Listener
	var err error
	// The port was just released; another process may race for it.
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", s.Addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("re-listening on %s: %v", s.Addr, err)
	}
	s.serve(l)
}

// Admin returns a client of the serving station's admin socket, as the
// iotstation commands use it, once the socket answers. It is closed at
// cleanup.
func (s *Station) Admin() station.Admin {
	s.t.Helper()
	sock := filepath.Join(s.Dir, "admin.sock")
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("admin socket %s: %v", sock, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a, err := station.OpenAdmin(s.Dir)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { a.Close() })
	return a
}

func (s *Station) shutdown() {
	s.Stop()
	s.Station.Close()
}

// ServiceCert issues a certificate for the service name (IssueService,
// an hour's lifetime), ready for a TLS server (server, valid for sans) or
// a TLS client.
func (s *Station) ServiceCert(t testing.TB, name string, sans []string, server bool) tls.Certificate {
	t.Helper()
	sc, err := s.IssueService(context.Background(), station.ServiceRequest{Name: name, SANs: sans, Server: server, Lifetime: time.Hour})
	if err != nil {
		t.Fatalf("IssueService(%s): %v", name, err)
	}
	c, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TrustPool is the station's trust bundle (TrustPEM) as a pool: what
// verifies the devices and services it issued certificates to.
func (s *Station) TrustPool() *x509.CertPool {
	return certpem.Pool(s.CACerts())
}
