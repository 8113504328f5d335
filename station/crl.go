package station

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
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
	return s.refreshCRL()
}

// refreshCRL issues a new CRL signed by the issuing CA listing every
// revoked certificate that has not expired, serves it and writes crl.pem
// for brokers.
func (s *Station) refreshCRL() ([]byte, error) {
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

// crlLoop reissues the CRL before it expires until stop is closed.
func (s *Station) crlLoop(stop <-chan struct{}) {
	t := time.NewTicker(crlValidity / 2)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if _, err := s.refreshCRL(); err != nil {
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
	if _, err := s.refreshCRL(); err != nil {
		return errors.Join(errors.New("device revoked but the CRL could not be reissued"), err)
	}
	return s.audit.write(AuditEntry{Time: s.now().UTC(), Event: "revoke", Result: "accepted", Device: id})
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
