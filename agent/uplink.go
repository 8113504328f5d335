package agent

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/coap"
	"iotagent.dev/iotagent/telemetry/mqtt"
	"iotagent.dev/iotagent/tpm"
)

// uplink is what the agent needs of an uplink: the pipeline's interface,
// its connection loop and its state.
type uplink interface {
	telemetry.Uplink
	Run(context.Context) error
	State() telemetry.UplinkState
}

func isCoAP(url string) bool { return strings.HasPrefix(url, "coaps://") }

// checkUplinkURL checks the URL as the uplink it selects would.
func checkUplinkURL(url string) error {
	if isCoAP(url) {
		_, _, err := coap.ParseURL(url)
		return err
	}
	_, _, err := mqtt.ParseURL(url)
	return err
}

// newUplink builds the uplink the URL's scheme selects: coaps:// (CoAP
// over DTLS) or mqtts:// (MQTT over TLS), presenting id.
func (a *Agent) newUplink(t *tpm.TPM, id *enroll.Identity, q *store.Store, stats *telemetry.TLSStats) (uplink, error) {
	roots := id.RootCAs
	if a.cfg.Uplink.CAFile != "" {
		roots = (&caFile{path: a.cfg.Uplink.CAFile, log: a.log}).pool
	}
	if isCoAP(a.cfg.Uplink.URL) {
		// The DTLS session is sealed under a key only this TPM unseals.
		key, err := t.SealedSecret(a.s.dir.SessionKey(), 32, func(b []byte) error {
			_, err := rand.Read(b)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("DTLS session key: %w", err)
		}
		sealer, err := dtls.NewSealer(key, rand.Reader)
		if err != nil {
			return nil, err
		}
		return coap.New(coap.Config{
			URL: a.cfg.Uplink.URL, RootCAs: roots, Identity: id, Sessions: q, Sealer: sealer,
			MaxPayload: a.s.maxPayload, Window: a.cfg.Uplink.Window, Stats: stats, Logger: a.log,
		})
	}
	return mqtt.New(mqtt.Config{
		URL: a.cfg.Uplink.URL, RootCAs: roots, Identity: id, MaxPayload: a.s.maxPayload,
		Window: a.cfg.Uplink.Window, KeepAlive: a.s.keepAlive, Stats: stats, Logger: a.log, Version: buildinfo.Get().Version,
		Command: a.command,
	})
}

// command is a command from the station (MQTT devices/ID/cmd).
func (a *Agent) command(op string) {
	switch op {
	case "firmware-check":
		if a.s.firmware != nil {
			a.log.Info("firmware: the station asks for a check")
			a.RequestFirmwareCheck()
		}
	default:
		a.log.Warn("ignoring an unknown command from the station", "op", op)
	}
}

// caFile is [uplink] ca_file, read again at each handshake once it
// changed, so that an operator's new CA file is used without a restart.
// A file that cannot be read keeps the last good certificates (and is
// logged once).
type caFile struct {
	path string
	log  *slog.Logger

	mu      sync.Mutex
	read    fileVersion // of the certificates in use
	certs   *x509.CertPool
	failing bool
}

// fileVersion tells a changed file apart: a replacement (rename) changes
// the inode, an edit in place the size or the modification time.
type fileVersion struct {
	ino     uint64
	size    int64
	modTime time.Time
}

func versionOf(fi os.FileInfo) fileVersion {
	v := fileVersion{size: fi.Size(), modTime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		v.ino = st.Ino
	}
	return v
}

func (f *caFile) pool() *x509.CertPool {
	f.mu.Lock()
	defer f.mu.Unlock()
	fi, err := os.Stat(f.path)
	if err == nil && f.certs != nil && versionOf(fi) == f.read {
		return f.certs
	}
	var certs []*x509.Certificate
	if err == nil {
		certs, err = certpem.ReadFile(f.path)
	}
	if err != nil {
		if !f.failing {
			f.log.Warn("reading [uplink] ca_file; the last certificates read stay in use", "err", err)
		}
		f.failing = true
		if f.certs == nil {
			return x509.NewCertPool() // trusts nothing: the handshake fails, naming an unknown CA
		}
		return f.certs
	}
	f.certs, f.read, f.failing = certpem.Pool(certs), versionOf(fi), false
	return f.certs
}
