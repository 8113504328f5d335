package enroll

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"iotagent.dev/iotagent/tpm"
)

// confirmIssued makes the first mutual-TLS use of a certificate fresh
// from /tpmenroll, with the station that issued it. The station keeps
// such a certificate unconfirmed, changing nothing about the device,
// until it is used: anyone holding the EK's public data can make the
// station issue one, but only the TPM that holds the EK can recover it.
// The agent confirms before it stores the certificate, so that a
// certificate it keeps is one the station knows as current (the station's
// CoAP collector would confirm it too, at its first handshake; a broker
// elsewhere cannot).
func confirmIssued(ctx context.Context, cfg ClientConfig, chain []*x509.Certificate, key *tpm.Key) error {
	cert := tlsCert(chain, key)
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	c, err := NewClient(cfg)
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	if _, err := c.CACerts(ctx); err != nil {
		return fmt.Errorf("confirming the new certificate with the station: %w", err)
	}
	return nil
}
