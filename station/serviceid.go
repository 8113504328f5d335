package station

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"iotagent.dev/iotagent/internal/backoff"
)

// ServiceIdentity is a service certificate kept fresh for a process
// that runs beside the station (serve's CoAP collector and its MQTT
// republisher, watch): like a device's, it has a bounded lifetime and is
// renewed before it ends, instead of living a year from each start. Each
// renewal is a new certificate (and key, held only in memory) from
// Issue, recorded and revocable like every service certificate. Safe for
// concurrent use; Run renews until its context ends.
type ServiceIdentity struct {
	req   ServiceRequest
	issue func(context.Context, ServiceRequest) (*ServiceCert, error)
	log   *slog.Logger
	cur   atomic.Pointer[tls.Certificate]
	// notAfter and lifetime of the current certificate: Run's schedule.
	notBefore, notAfter atomic.Int64
}

// NewServiceIdentity issues the first certificate for req with issue
// (Station.IssueService, or Admin.IssueService through a running
// station). req.Lifetime is each certificate's lifetime.
func NewServiceIdentity(ctx context.Context, req ServiceRequest, issue func(context.Context, ServiceRequest) (*ServiceCert, error), log *slog.Logger) (*ServiceIdentity, error) {
	if req.Lifetime <= 0 {
		return nil, errors.New("service identity: lifetime must be positive")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	si := &ServiceIdentity{req: req, issue: issue, log: log}
	if err := si.renew(ctx); err != nil {
		return nil, err
	}
	return si, nil
}

func (si *ServiceIdentity) renew(ctx context.Context) error {
	sc, err := si.issue(ctx, si.req)
	if err != nil {
		return fmt.Errorf("service certificate for %s: %w", si.req.Name, err)
	}
	c, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		return fmt.Errorf("service certificate for %s: %w", si.req.Name, err)
	}
	si.cur.Store(&c)
	si.notBefore.Store(c.Leaf.NotBefore.UnixNano())
	si.notAfter.Store(c.Leaf.NotAfter.UnixNano())
	return nil
}

// Certificate returns the current certificate.
func (si *ServiceIdentity) Certificate() *tls.Certificate { return si.cur.Load() }

// GetCertificate has the signature of tls.Config.GetCertificate.
func (si *ServiceIdentity) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return si.cur.Load(), nil
}

// GetClientCertificate has the signature of
// tls.Config.GetClientCertificate.
func (si *ServiceIdentity) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return si.cur.Load(), nil
}

// renewAt is when the current certificate is renewed: two thirds into
// its life, less a jitter of up to a twentieth, as devices do.
func (si *ServiceIdentity) renewAt() time.Time {
	nb, na := time.Unix(0, si.notBefore.Load()), time.Unix(0, si.notAfter.Load())
	life := na.Sub(nb)
	return nb.Add(life*2/3 - time.Duration(rand.Int64N(int64(life/20)+1)))
}

// Run renews the certificate before it ends, retrying a failed renewal
// with internal/backoff, until ctx ends (nil then).
func (si *ServiceIdentity) Run(ctx context.Context) error {
	bo := backoff.New(backoff.Config{Cap: time.Minute})
	var retry time.Duration
	for {
		wait := time.Until(si.renewAt())
		if retry > 0 {
			wait = retry
		}
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		if err := si.renew(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			si.log.Error("renewing the service certificate; the current one stays in use", "service", si.req.Name, "err", err,
				"not_after", time.Unix(0, si.notAfter.Load()).UTC())
			retry = bo.Fail()
			continue
		}
		retry = 0
		bo.Reset()
		si.log.Info("service certificate renewed", "service", si.req.Name, "not_after", time.Unix(0, si.notAfter.Load()).UTC())
	}
}
