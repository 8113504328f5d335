package station

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
)

// crlValidity is how long a CRL is valid; it is reissued at half that, and
// on every revocation.
const crlValidity = 24 * time.Hour

// CRL returns the current CRL (DER), issuing one if none exists yet.
func (s *Station) CRL() ([]byte, error) {
	if p := s.crl.Load(); p != nil {
		return *p, nil
	}
	der, _, err := s.refreshCRL() // a failed hook is logged and audited
	return der, err
}

// refreshCRL issues a new CRL, writes crl.pem and runs the CRL hook. err
// is an issuing failure (nothing changed); hookErr a failed hook (the new
// CRL is in place, the broker may not have it).
func (s *Station) refreshCRL() (der []byte, hookErr error, err error) {
	if der, err = s.issueCRL(); err != nil {
		return nil, nil, err
	}
	return der, s.runCRLHook(), nil
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

// crlHookTimeout bounds one run of the CRL hook.
const crlHookTimeout = 30 * time.Second

// runCRLHook runs the configured CRL hook (station.json crl_hook) with
// /bin/sh -c after crl.pem changed, with IOTSTATION_CRL_FILE naming it: a
// broker such as mosquitto reads its crlfile only when it starts or
// reloads, and refuses every client once that CRL's nextUpdate has
// passed. Runs are serialized; each is audited and a failure logged.
func (s *Station) runCRLHook() error {
	if s.crlHook == "" {
		return nil
	}
	s.hookMu.Lock()
	defer s.hookMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), crlHookTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", s.crlHook)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "IOTSTATION_CRL_FILE="+s.path(fileCRLPEM), "IOTSTATION_DIR="+s.dir)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	entry := AuditEntry{Time: s.now().UTC(), Event: "crl-hook", Result: "accepted"}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("timed out after %v", crlHookTimeout)
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
		s.log.Error("CRL hook failed: a broker may still use the previous CRL", "err", err)
	}
	if aerr := s.audit.write(entry); aerr != nil && err == nil {
		return aerr
	}
	return err
}

// crlLoop reissues the CRL before it expires until stop is closed.
func (s *Station) crlLoop(stop <-chan struct{}) {
	t := time.NewTicker(crlValidity / 2)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if _, _, err := s.refreshCRL(); err != nil { // a failed hook is logged
				s.log.Error("reissuing CRL", "err", err)
			}
		}
	}
}

// Revoke revokes device id: every certificate issued to it goes on the
// CRL, which is reissued at once, and the device can no longer enroll.
func (s *Station) Revoke(id string) error {
	if err := s.reg.revoke(id, s.now()); err != nil {
		s.audit.write(AuditEntry{Time: s.now().UTC(), Event: "revoke", Result: "refused", Device: id, Reason: err.Error()})
		return err
	}
	_, hookErr, err := s.refreshCRL()
	if err != nil {
		return errors.Join(errors.New("device revoked but the CRL could not be reissued"), err)
	}
	if err := s.audit.write(AuditEntry{Time: s.now().UTC(), Event: "revoke", Result: "accepted", Device: id}); err != nil {
		return err
	}
	if hookErr != nil {
		return fmt.Errorf("device revoked and crl.pem reissued, but %w", hookErr)
	}
	return nil
}

// CertificateRevoked reports whether the registry knows c as revoked, or
// as issued to a revoked device: the check for the station's own
// services (the CoAP collector), fresher than any CRL file.
func (s *Station) CertificateRevoked(c *x509.Certificate) bool {
	ic, err := s.reg.certificate(c.SerialNumber)
	if err != nil || ic == nil {
		// Not issued to a device (a service certificate) or unknown: the
		// chain check decides.
		return false
	}
	if !ic.RevokedAt.IsZero() {
		return true
	}
	d, err := s.reg.device(ic.Device)
	return err == nil && d != nil && d.Status == StatusRevoked
}
