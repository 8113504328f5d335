package enroll_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// csrRecorder is a TLS-terminating proxy in front of a station that
// records the subject of every CSR it forwards. Its certificate is issued
// by the station, so the agent trusts it as it trusts the station; the
// station sees no client certificate through it (renewals re-attest).
type csrRecorder struct {
	URL string

	mu       sync.Mutex
	subjects []string // "endpoint CN"
}

func newCSRRecorder(t *testing.T, st *stationtest.Station) *csrRecorder {
	t.Helper()
	target, _ := url.Parse(st.URL)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: st.TrustPool()}}
	rec := &csrRecorder{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, est.MaxBody))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		rec.record(t, r, body)
		rp.ServeHTTP(w, r)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{st.ServiceCert(t, "csr-recorder", []string{"127.0.0.1"}, true)}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	rec.URL = srv.URL
	return rec
}

func (rec *csrRecorder) record(t *testing.T, r *http.Request, body []byte) {
	var der []byte
	switch r.URL.Path {
	case est.PathTPMEnroll:
		req, err := est.DecodeTPMEnrollRequest(r.Header.Get("Content-Type"), bytes.NewReader(body))
		if err != nil {
			t.Errorf("the agent sent a /tpmenroll body that does not decode: %v", err)
			return
		}
		der = req.CSR
	case est.PathEnroll, est.PathReenroll:
		var err error
		if der, err = est.DecodeBase64(body); err != nil {
			t.Errorf("the agent sent a CSR that is not base64: %v", err)
			return
		}
	default:
		return
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Errorf("the agent sent a CSR that does not parse: %v", err)
		return
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.subjects = append(rec.subjects, r.URL.Path[len(est.PathPrefix):]+" "+csr.Subject.String())
}

// take returns the subjects recorded since the last call.
func (rec *csrRecorder) take() []string {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	out := rec.subjects
	rec.subjects = nil
	return out
}

// A CA that copies the CSR's subject (GlobalSign's does) must get a name
// for this device, not one shared by the whole fleet: before it has an
// ID, the device asks for the name our station gives an EK it admits
// (dev- and 16 hex digits of the EK hash); after, for the ID it holds; a
// token names the device itself.
func TestCSRSubjectNamesTheDevice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	t.Run("tpmenroll, then renewal", func(t *testing.T) {
		d := newDevice(t, tpmtest.Options{})
		eks, err := d.tpm.EndorsementKeys()
		if err != nil {
			t.Fatal(err)
		}
		hash := est.EKHash(eks[0].Certificate.Cert)
		// The manifest names the device otherwise: its ID differs from
		// what it asked for at first.
		st := stationtest.Start(t, stationtest.Options{Manifest: hash + " gw-line-4\n"})
		rec := newCSRRecorder(t, st)
		// The exchange that confirms the tpmenroll certificate is a
		// simplereenroll over mutual TLS, which the TLS-terminating proxy
		// cannot forward: refused, after the CSR was recorded.
		_, err = enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: rec.URL, StationCA: st.CACerts()})
		if err == nil || !strings.Contains(err.Error(), "needs the current device certificate") {
			t.Fatalf("Enroll through the proxy = %v, want the exchange refused for want of the client certificate", err)
		}
		want := []string{"tpmenroll CN=dev-" + hash[:16], "simplereenroll CN=gw-line-4"}
		if got := rec.take(); !slices.Equal(got, want) {
			t.Errorf("first enrollment's CSRs = %q, want %q (then the ID the station gave)", got, want)
		}
	})

	t.Run("the station's own name for an EK", func(t *testing.T) {
		st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
		rec := newCSRRecorder(t, st)
		d := newDevice(t, tpmtest.Options{Identity: 1})
		eks, err := d.tpm.EndorsementKeys()
		if err != nil {
			t.Fatal(err)
		}
		id := "dev-" + est.EKHash(eks[0].Certificate.Cert)[:16]
		if _, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: rec.URL, StationCA: st.CACerts()}); err == nil {
			t.Fatal("Enroll through the proxy succeeded, want the exchange refused")
		}
		if got, want := rec.take(), []string{"tpmenroll CN=" + id, "simplereenroll CN=" + id}; !slices.Equal(got, want) {
			t.Errorf("CSRs = %q, want the ID the station gives, %q", got, want)
		}
	})

	t.Run("token", func(t *testing.T) {
		st := stationtest.Start(t, stationtest.Options{})
		rec := newCSRRecorder(t, st)
		tok, err := st.CreateToken("gw-token-9", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		d := newDevice(t, tpmtest.Options{NoEKCertificate: true})
		if _, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: rec.URL, StationCA: st.CACerts(), Token: tok.Credential()}); err != nil {
			t.Fatalf("Enroll: %v", err)
		}
		if got, want := rec.take(), []string{"simpleenroll CN=gw-token-9"}; !slices.Equal(got, want) {
			t.Errorf("token enrollment's CSRs = %q, want %q", got, want)
		}
	})
}
