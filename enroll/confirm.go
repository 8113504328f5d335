package enroll

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"iotagent.dev/iotagent/tpm"
)

// exchangeIssued trades a certificate fresh from /tpmenroll for the one
// the device keeps. The station issues a /tpmenroll certificate short-
// lived and unconfirmed, changing nothing about the device, because
// anyone holding the EK's public data can make it issue one (only the TPM
// holding the EK can recover it). Its first use over mutual TLS confirms
// it; that use is a simplereenroll of the same key, whose answer is the
// positive proof the station now knows the device by it, and carries the
// certificate of full lifetime. A failure is an error: the caller keeps
// nothing and enrolls again.
func exchangeIssued(ctx context.Context, cfg ClientConfig, chain []*x509.Certificate, key *tpm.Key, trust []*x509.Certificate) ([]*x509.Certificate, error) {
	cert := tlsCert(chain, key)
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	c, err := NewClient(cfg)
	if err != nil {
		return nil, err
	}
	defer c.CloseIdleConnections()
	csr, err := newCSR(key, chain[0].Subject.CommonName)
	if err != nil {
		return nil, fmt.Errorf("signing CSR in the TPM: %w", err)
	}
	full, err := c.SimpleReenroll(ctx, csr)
	if err != nil {
		return nil, fmt.Errorf("confirming the new certificate with the station: %w", err)
	}
	return verifyIssued(full, key, trust, cfg.Clock)
}
