package station

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/backoff"
)

const (
	// crlValidity is how long a CRL is valid: well past its reissue, so a
	// broker that missed a reload (a failed CRL hook) still holds a valid
	// CRL for days; it is reissued every crlReissue and on every
	// revocation.
	crlValidity = 7 * 24 * time.Hour
	crlReissue  = 12 * time.Hour

	// crlHookTimeout bounds one run of the CRL hook; a failed run is
	// retried with internal/backoff from Config.CRLHookRetry (default
	// hookRetryMin) up to hookRetryMax, until one succeeds.
	crlHookTimeout = 30 * time.Second
	hookRetryMin   = 10 * time.Second
	hookRetryMax   = 10 * time.Minute

	// unconfirmedSweep: how often serve forgets the unconfirmed
	// certificates whose window ended.
	unconfirmedSweep = 5 * time.Minute
)

// CRL returns the current CRL (DER), issuing one if none exists yet.
func (s *Station) CRL() ([]byte, error) {
	if p := s.crl.Load(); p != nil {
		return *p, nil
	}
	der, _, err := s.refreshCRL(context.Background()) // a failed hook is logged, audited, retried by serve
	return der, err
}

// refreshCRL issues a new CRL, writes crl.pem and runs the CRL hook. err
// is an issuing failure (nothing changed); hookErr a failed hook (the new
// CRL is in place, the broker may not have it yet).
func (s *Station) refreshCRL(ctx context.Context) (der []byte, hookErr error, err error) {
	if der, err = s.issueCRL(); err != nil {
		return nil, nil, err
	}
	return der, s.runCRLHook(ctx), nil
}

// issueCRL issues a new CRL signed by the issuing CA listing every revoked
// certificate that has not expired, serves it and writes crl.pem for
// brokers.
func (s *Station) issueCRL() ([]byte, error) {
	s.crlMu.Lock()
	defer s.crlMu.Unlock()
	now := s.now()
	revoked, err := s.reg.revokedUnexpired(now)
	if err != nil {
		return nil, err
	}
	num, err := s.reg.nextCRLNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.RevocationList{
		Number:     num,
		ThisUpdate: now.Add(-backdate),
		NextUpdate: now.Add(crlValidity),
	}
	for _, r := range revoked {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber: r.serial, RevocationTime: r.revokedAt,
		})
	}
	der, err := x509.CreateRevocationList(s.rand, tmpl, s.ca.issuer, s.ca.issuerKey)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(s.path(fileCRLPEM), pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	s.crl.Store(&der)
	s.metrics.crlIssued(now)
	return der, nil
}

// runCRLHook runs the configured CRL hook (station.json crl_hook) with
// /bin/sh -c after crl.pem changed, in the station directory, with
// IOTSTATION_CRL_FILE and IOTSTATION_DIR as absolute paths: a broker such
// as mosquitto reads its crlfile only when it starts or reloads, and
// refuses every client once that CRL's nextUpdate has passed. The hook
// runs in its own process group, killed whole at the timeout or when ctx
// ends; a hook that exits 0 but leaves a child holding its output is a
// success. Runs are serialized; each is audited, a failure logged and
// marked for serve's retry.
func (s *Station) runCRLHook(ctx context.Context) error {
	if s.crlHook == "" {
		return nil
	}
	s.hookMu.Lock()
	defer s.hookMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, crlHookTimeout)
	defer cancel()
	crlFile, _ := filepath.Abs(s.path(fileCRLPEM))
	dir, _ := filepath.Abs(s.dir)
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", s.crlHook)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "IOTSTATION_CRL_FILE="+crlFile, "IOTSTATION_DIR="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState != nil && cmd.ProcessState.Success() {
		err = nil // exited 0; a background child kept its output open
	}
	entry := AuditEntry{Time: s.now().UTC(), Event: "crl-hook", Result: "accepted"}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("stopped after %v: %w", crlHookTimeout, ctx.Err())
		}
		msg := strings.TrimSpace(string(out))
		if len(msg) > 300 {
			msg = msg[:300] + "…"
		}
		if msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		err = fmt.Errorf("CRL hook %q: %w", s.crlHook, err)
		entry.Result, entry.Reason = "refused", err.Error()
		s.log.Error("CRL hook failed: a broker may still use the previous CRL; serve retries it", "err", err)
		s.hookPending.Store(true)
		select {
		case s.hookFailed <- struct{}{}:
		default:
		}
	} else {
		s.hookPending.Store(false)
	}
	if aerr := s.audit.write(entry); aerr != nil && err == nil {
		return aerr
	}
	return err
}

// crlLoop runs the CRL hook at once (serve's start), reissues the CRL
// every crlReissue, and retries a failed hook with backoff, until ctx
// ends.
func (s *Station) crlLoop(ctx context.Context) {
	t := time.NewTicker(crlReissue)
	defer t.Stop()
	sweep := time.NewTicker(unconfirmedSweep)
	defer sweep.Stop()
	var retry <-chan time.Time
	bo := backoff.New(backoff.Config{Base: s.hookRetry, Cap: hookRetryMax})
	arm := func() {
		if !s.hookPending.Load() {
			retry = nil
			bo.Reset()
			return
		}
		if retry == nil {
			retry = time.After(bo.Fail())
		}
	}
	s.runCRLHook(ctx)
	arm()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, _, err := s.refreshCRL(ctx); err != nil { // a failed hook is logged
				s.log.Error("reissuing CRL", "err", err)
			}

		case <-sweep.C:
			if _, err := s.reg.sweepUnconfirmed(s.now()); err != nil {
				s.log.Error("forgetting unconfirmed certificates", "err", err)
			}
		case <-s.hookFailed: // a run elsewhere (a revocation) failed
		case <-retry:
			retry = nil
			if s.hookPending.Load() {
				s.runCRLHook(ctx)
			}
		}
		arm()
	}
}

// Revoke revokes device id: every certificate issued to it goes on the
// CRL, which is reissued at once, and the device can no longer enroll.
func (s *Station) Revoke(id string) error {
	if err := s.reg.revoke(id, s.now()); err != nil {
		s.audit.write(AuditEntry{Time: s.now().UTC(), Event: "revoke", Result: "refused", Device: id, Reason: err.Error()})
		return err
	}
	_, hookErr, err := s.refreshCRL(context.Background())
	if err != nil {
		return errors.Join(errors.New("device revoked but the CRL could not be reissued"), err)
	}
	if err := s.audit.write(AuditEntry{Time: s.now().UTC(), Event: "revoke", Result: "accepted", Device: id}); err != nil {
		return err
	}
	if err := errors.Join(hookErr, s.endSessions(context.Background(), id)); err != nil {
		return fmt.Errorf("device revoked and crl.pem reissued, but %w", err)
	}
	return nil
}

// RevokeService revokes every certificate issued to service name: they
// go on the CRL, which is reissued at once. The name stays reserved.
func (s *Station) RevokeService(name string) error {
	n, err := s.reg.revokeService(name, s.now())
	e := AuditEntry{Time: s.now().UTC(), Event: "revoke-service", Result: "accepted", Device: name}
	if err != nil {
		e.Result, e.Reason = "refused", err.Error()
		s.audit.write(e)
		return err
	}
	e.Reason = fmt.Sprintf("%d certificates revoked", n)
	_, hookErr, err := s.refreshCRL(context.Background())
	if err != nil {
		return errors.Join(errors.New("service revoked but the CRL could not be reissued"), err)
	}
	if err := s.audit.write(e); err != nil {
		return err
	}
	if hookErr != nil {
		return fmt.Errorf("service revoked and crl.pem reissued, but %w", hookErr)
	}
	return nil
}

// RevokeSerial revokes one certificate by its serial (hex), whoever it
// was issued to: for a certificate the registry never recorded (a
// service certificate from before services were recorded), the serial is
// recorded revoked and stays on the CRL until the issuing CA expires.
func (s *Station) RevokeSerial(hexSerial string) error {
	serial, ok := new(big.Int).SetString(strings.TrimPrefix(strings.ToLower(hexSerial), "0x"), 16)
	e := AuditEntry{Time: s.now().UTC(), Event: "revoke-serial", Result: "accepted", Serial: hexSerial}
	if !ok || serial.Sign() <= 0 {
		err := fmt.Errorf("serial %q: want the certificate's serial number in hex", hexSerial)
		e.Result, e.Reason = "refused", err.Error()
		s.audit.write(e)
		return err
	}
	e.Serial = serialHex(serial)
	if _, err := s.reg.revokeSerial(e.Serial, s.ca.issuer.NotAfter, s.now()); err != nil {
		e.Result, e.Reason = "refused", err.Error()
		s.audit.write(e)
		return err
	}
	_, hookErr, err := s.refreshCRL(context.Background())
	if err != nil {
		return errors.Join(errors.New("serial revoked but the CRL could not be reissued"), err)
	}
	if err := s.audit.write(e); err != nil {
		return err
	}
	if hookErr != nil {
		return fmt.Errorf("serial revoked and crl.pem reissued, but %w", hookErr)
	}
	return nil
}

// CertificateRevoked reports whether c must be refused where a device is
// expected: the check for the station's own services (the CoAP
// collector), fresher than any CRL file. It refuses what is not a device
// certificate (a service's), what the registry never recorded (the
// station issued every certificate it accepts), and what is revoked or
// belongs to a revoked device. Call it only for a certificate whose key
// the peer has proved it holds (the collector calls it after pion
// verified the client's CertificateVerify, and on established sessions):
// for a /tpmenroll certificate not yet confirmed, that use confirms it,
// as its first use with the station's HTTPS endpoint does.
func (s *Station) CertificateRevoked(c *x509.Certificate) bool {
	return s.checkDeviceCertificate(c) != nil
}

func (s *Station) checkDeviceCertificate(c *x509.Certificate) error {
	if _, err := DeviceCertificateID(c); err != nil {
		return err
	}
	serial := serialHex(c.SerialNumber)
	ic, err := s.reg.certificate(c.SerialNumber)
	switch {
	case err != nil:
		return err
	case ic == nil:
		return fmt.Errorf("certificate %s is not in the registry", serial)
	case ic.Service != "":
		return fmt.Errorf("certificate %s is service %s's", serial, ic.Service)
	case !ic.RevokedAt.IsZero():
		return fmt.Errorf("certificate %s is revoked", serial)
	case ic.Unconfirmed:
		if ic, err = s.confirmCert(c, "collector"); err != nil {
			return err
		}
	}
	if ic == nil || ic.Device != c.Subject.CommonName {
		return fmt.Errorf("certificate %s was not issued to %s", serial, c.Subject.CommonName)
	}
	d, err := s.reg.device(ic.Device)
	if err != nil {
		return err
	}
	if d == nil || d.Status == StatusRevoked {
		return fmt.Errorf("device %s is revoked", ic.Device)
	}
	return nil
}
