package station

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/google/go-tpm/tpm2"
	bolt "go.etcd.io/bbolt"

	"iotagent.dev/iotagent/est"
)

var cryptoRand = rand.Reader

// requestTimeout bounds the work of one request.
const requestTimeout = 20 * time.Second

// Handler returns the station's HTTP handler: the EST endpoints under
// /.well-known/est/, the CRL at /crl, metrics at /metrics, and the
// firmware repository and rollouts under /firmware/.
func (s *Station) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+est.PathCACerts, s.handleCACerts)
	mux.HandleFunc("GET "+est.PathCSRAttrs, s.handleCSRAttrs)
	mux.HandleFunc("POST "+est.PathEnroll, s.handleEnroll)
	mux.HandleFunc("POST "+est.PathReenroll, s.handleReenroll)
	mux.HandleFunc("POST "+est.PathTPMEnroll, s.handleTPMEnroll)
	mux.HandleFunc("GET /crl", s.handleCRL)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("POST /firmware/check", s.handleFirmwareCheck)
	mux.HandleFunc("POST /firmware/report", s.handleFirmwareReport)
	// Firmware is outside the request timeout, which buffers a whole
	// answer: payloads are streamed (and resumed with Range).
	top := http.NewServeMux()
	top.HandleFunc("GET /firmware/{what}", s.handleFirmware)
	top.HandleFunc("GET /firmware/{what}/{version}", s.handleFirmware)
	top.HandleFunc("GET /firmware/releases/{name}/{version}/{what}", s.handleFirmware)
	top.Handle("/", http.TimeoutHandler(mux, requestTimeout, "request timed out\n"))
	return top
}

// TLSConfig returns the HTTPS configuration: TLS 1.2+ with AEAD suites
// only, the station certificate chain, and client certificates requested
// (not required: bootstrap and first attestation have none) and verified
// by the handlers, which log why one is refused.
func (s *Station) TLSConfig() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(s.path(fileTLSCert), s.path(fileTLSKey))
	if err != nil {
		return nil, fmt.Errorf("loading station TLS certificate: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequestClientCert,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		NextProtos: []string{"h2", "http/1.1"},
		Time:       s.now,
	}, nil
}

func (s *Station) path(name string) string { return s.dir + "/" + name }

func remoteIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// fail answers a refused request that holds a reservation of the failure
// limiter (begin): audit line, metrics, the attempt settled, text/plain
// reason.
func (s *Station) fail(w http.ResponseWriter, r *http.Request, e AuditEntry, err error) {
	rf := s.refusalOf(e, err)
	outcome := outcomeFailed
	if rf.free {
		outcome = outcomeDone
	}
	s.limiter.end(sourceOf(r), outcome)
	s.answerRefusal(w, r, e, rf)
}

func (s *Station) refusalOf(e AuditEntry, err error) *refusal {
	var rf *refusal
	if !errors.As(err, &rf) {
		s.log.Error("enrollment error", "event", e.Event, "err", err)
		rf = refuse(http.StatusInternalServerError, "internal", "internal error")
		rf.free = true // the station's fault, not the client's
	}
	return rf
}

func (s *Station) answerRefusal(w http.ResponseWriter, r *http.Request, e AuditEntry, rf *refusal) {
	e.Time, e.Result, e.Reason, e.Remote = s.now().UTC(), "refused", cmp.Or(rf.detail, rf.reason), remoteIP(r)
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
	s.metrics.enrollment(e.Event, "refused", rf.code)
	writeRefusal(w, rf)
}

func writeRefusal(w http.ResponseWriter, rf *refusal) {
	if rf.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="est"`)
	}
	if rf.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(rf.retryAfter/time.Second)+1))
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(rf.status)
	fmt.Fprintln(w, rf.reason)
}

// pending answers 202 with Retry-After (RFC 7030 §4.2.3): the device is
// held for an operator's approval.
func (s *Station) pending(w http.ResponseWriter, r *http.Request, e AuditEntry) {
	s.limiter.end(sourceOf(r), outcomeDone)
	e.Time, e.Result, e.Remote = s.now().UTC(), "pending", remoteIP(r)
	e.Reason = "awaiting approval: iotstation approve " + e.Device
	if err := s.audit.write(e); err != nil {
		s.log.Error("audit log", "err", err)
	}
	s.metrics.enrollment(e.Event, "pending", "")
	w.Header().Set("Retry-After", strconv.Itoa(int(pendingRetry/time.Second)))
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusAccepted)
	fmt.Fprintln(w, e.Reason)
}

// accept records an accepted decision. proven says the client proved
// who it is (a token, its certificate): its failures are forgotten. An
// unconfirmed /tpmenroll certificate proves nothing yet.
func (s *Station) accept(r *http.Request, e AuditEntry, proven bool) {
	e.Time, e.Result, e.Remote = s.now().UTC(), "accepted", remoteIP(r)
	if err := s.audit.write(e); err != nil {
		s.log.Error("audit log", "err", err)
	}
	s.metrics.enrollment(e.Event, "accepted", "")
	outcome := outcomeDone
	if proven {
		outcome = outcomeProven
	}
	s.limiter.end(sourceOf(r), outcome)
}

// begin applies what every enrollment request gets before its body is
// read: it reserves the attempt with the failure limiter (settled by
// fail, pending or accept) and caps the body. It returns the body or
// writes the refusal.
func (s *Station) begin(w http.ResponseWriter, r *http.Request, e AuditEntry) ([]byte, bool) {
	switch wait := s.limiter.begin(sourceOf(r)); {
	case wait == limitBusy:
		rf := refuse(http.StatusTooManyRequests, "busy", "too many requests in flight from this address; retry in 1s")
		rf.retryAfter = time.Millisecond
		s.answerRefusal(w, r, e, rf)
		return nil, false
	case wait > 0:
		secs := int(wait/time.Second) + 1
		s.limiter.fail(sourceOf(r))
		rf := refuse(http.StatusTooManyRequests, "rate_limited", "too many failed requests from this address; retry in %ds", secs)
		rf.retryAfter = wait
		s.answerRefusal(w, r, e, rf)
		return nil, false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, est.MaxBody))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		s.fail(w, r, e, refuse(http.StatusRequestEntityTooLarge, "too_large", "request body over %d bytes", est.MaxBody))
		return nil, false
	}
	if err != nil {
		s.fail(w, r, e, refuse(http.StatusBadRequest, "malformed", "reading request body: %v", err))
		return nil, false
	}
	return body, true
}

func writeBase64(w http.ResponseWriter, contentType string, der []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set(est.HeaderCTE, "base64")
	w.WriteHeader(http.StatusOK)
	w.Write(est.EncodeBase64(der))
}

// confirm makes the unconfirmed certificate leaf current (its first use
// over mutual TLS, from r), audited either way.
func (s *Station) confirm(r *http.Request, leaf *x509.Certificate) (*issued, error) {
	ic, err := s.confirmCert(leaf, remoteIP(r))
	if err == nil {
		s.limiter.forgive(sourceOf(r))
	}
	return ic, err
}

// confirmCert confirms the unconfirmed certificate leaf, whose key the
// peer at remote just proved it holds; audited either way.
func (s *Station) confirmCert(leaf *x509.Certificate, remote string) (*issued, error) {
	serial := serialHex(leaf.SerialNumber)
	ic, err := s.reg.confirm(serial, s.now(), func(id, ek string) func(*Device) error { return canIssue(id, ek) })
	e := AuditEntry{Time: s.now().UTC(), Event: "confirm", Result: "accepted", Device: leaf.Subject.CommonName, Serial: serial, Remote: remote}
	if err != nil {
		rf := s.refusalOf(e, err)
		if errors.Is(err, errPending) {
			rf = refuse(http.StatusForbidden, "device_pending", "device %s awaits approval", e.Device)
		}
		e.Result, e.Reason = "refused", rf.reason
		rf.confirming = true
		err = rf
	}
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
	return ic, err
}

// handleCACerts serves the CA certificates to anyone. A device asking
// with its certificate is alive (its "last seen"), and a device asking
// with a certificate fresh from /tpmenroll confirms it: the agent does
// this first thing, so a confirmation that fails is answered (403) rather
// than hidden; other problems with a client certificate are answered
// where the certificate is needed.
func (s *Station) handleCACerts(w http.ResponseWriter, r *http.Request) {
	d, _, err := s.clientDevice(r)
	var rf *refusal
	if errors.As(err, &rf) && rf.confirming {
		writeRefusal(w, rf) // audited as the confirmation
		return
	}
	if err == nil && d != nil {
		if err := s.reg.touch(d.ID, s.now()); err != nil {
			s.log.Warn("registry", "err", err)
		}
	}
	writeBase64(w, est.MediaCertsOnly, est.MarshalCertsOnly(est.RawCertificates(s.CACerts())))
}

// csrAttrs tells clients what the station wants in a CSR (RFC 7030 §4.5):
// ECDSA with SHA-256 over a P-256 key.
var csrAttrs = func() []byte {
	type attr struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	b, err := asn1.Marshal([]any{
		asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}, // ecdsa-with-SHA256
		attr{asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}, []asn1.ObjectIdentifier{{1, 2, 840, 10045, 3, 1, 7}}},
	})
	if err != nil {
		panic(err)
	}
	return b
}()

func (s *Station) handleCSRAttrs(w http.ResponseWriter, r *http.Request) {
	writeBase64(w, est.MediaCSRAttrs, csrAttrs)
}

func (s *Station) handleCRL(w http.ResponseWriter, r *http.Request) {
	der, err := s.CRL()
	if err != nil {
		http.Error(w, "CRL unavailable", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/pkix-crl")
	w.Write(der)
}

// parseCSR decodes a base64 PKCS#10 body and checks its signature and key.
func parseCSR(r *http.Request, body []byte) (*x509.CertificateRequest, error) {
	if ct := r.Header.Get("Content-Type"); !est.MediaTypeIs(ct, est.MediaPKCS10) {
		return nil, refuse(http.StatusUnsupportedMediaType, "malformed", "Content-Type %q, want %s", ct, est.MediaPKCS10)
	}
	der, err := est.DecodeBase64(body)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "malformed", "body: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "malformed", "CSR does not parse: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(http.StatusBadRequest, "csr_signature", "CSR signature does not verify: %v", err)
	}
	return csr, nil
}

// clientDevice verifies the client certificate of r, if any, and returns
// it with the device it belongs to. No certificate: nil, nil, nil.
func (s *Station) clientDevice(r *http.Request) (*Device, *x509.Certificate, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil, nil, nil
	}
	leaf := r.TLS.PeerCertificates[0]
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(s.ca.root)
	inter.AddCert(s.ca.issuer)
	for _, c := range r.TLS.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	now := s.now()
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		var ie x509.CertificateInvalidError
		if errors.As(err, &ie) && ie.Reason == x509.Expired {
			return nil, nil, refuse(http.StatusForbidden, "cert_expired", "client certificate %s expired or not yet valid (valid %s to %s)",
				serialHex(leaf.SerialNumber), leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		return nil, nil, refuse(http.StatusForbidden, "cert_untrusted", "client certificate not issued by this station: %v", err)
	}
	ic, err := s.reg.certificate(leaf.SerialNumber)
	if err != nil {
		return nil, nil, err
	}
	if ic == nil {
		return nil, nil, refuse(http.StatusForbidden, "cert_unknown", "client certificate %s is not in the registry", serialHex(leaf.SerialNumber))
	}
	if ic.Service != "" {
		return nil, nil, refuse(http.StatusForbidden, "cert_service", "client certificate %s is service %s's, not a device's", serialHex(leaf.SerialNumber), ic.Service)
	}
	if ic.Unconfirmed && ic.RevokedAt.IsZero() {
		// The handshake proved the key; holding the certificate proves the
		// TPM with the EK recovered it: this use confirms it.
		if ic, err = s.confirm(r, leaf); err != nil {
			return nil, nil, err
		}
		if ic == nil {
			return nil, nil, refuse(http.StatusForbidden, "cert_unknown", "client certificate %s is not in the registry", serialHex(leaf.SerialNumber))
		}
	}
	if !ic.RevokedAt.IsZero() {
		return nil, nil, refuse(http.StatusForbidden, "cert_revoked", "client certificate %s was revoked at %s", serialHex(leaf.SerialNumber), ic.RevokedAt.UTC().Format(time.RFC3339))
	}
	d, err := s.reg.device(ic.Device)
	if err != nil {
		return nil, nil, err
	}
	if d == nil || d.Status == StatusRevoked {
		return nil, nil, refuse(http.StatusForbidden, "device_revoked", "device %s is revoked", ic.Device)
	}
	return d, leaf, nil
}

// currentCert extends check, a registry check run with the device entry
// inside the issuing transaction, to require that the client certificate
// leaf is still the device's current one. Renewing from a superseded
// certificate (its key may be gone from the TPM, or copied away before the
// rotation) would undo the rotation; run in the transaction, the check
// also keeps two renewals from one certificate from both succeeding. A
// device left holding a superseded certificate re-attests through
// tpmenroll without a client certificate.
//
// With sameKey (simplereenroll, which renews the key it is presented
// with), a superseded certificate of the current key is accepted: the
// device lost the response to its last renewal (a dropped link, a crash
// before the certificate was stored) and still holds that key, which the
// current certificate certifies anyway. Without this a device with no EK
// certificate, which cannot re-attest, would be locked out.
func currentCert(leaf *x509.Certificate, sameKey bool, check func(*Device) error) func(*Device) error {
	return func(d *Device) error {
		if err := check(d); err != nil {
			return err
		}
		serial := serialHex(leaf.SerialNumber)
		if d == nil {
			return refuse(http.StatusForbidden, "cert_unknown", "client certificate %s belongs to no registered device", serial)
		}
		if d.CertSerial != serial && !(sameKey && d.KeySHA256 != "" && d.KeySHA256 == keyHash(leaf)) {
			return refuse(http.StatusForbidden, "cert_superseded", "client certificate %s is not the current certificate of device %s (%s superseded it); a device holding an older certificate re-attests through tpmenroll without one", serial, d.ID, d.CertSerial)
		}
		return nil
	}
}

// errPending marks an admission held for approval.
var errPending = errors.New("awaiting approval")

// pendingRetry is what a held device is told to wait before asking again.
const pendingRetry = 60 * time.Second

// admit decides the device ID for an EK, or refuses. A device held for
// approval gets its ID and errPending.
func (s *Station) admit(ekHash string) (string, error) {
	if d, err := s.reg.deviceByEK(ekHash); err != nil {
		return "", err
	} else if d != nil {
		return d.ID, nil
	}
	m, err := s.manifest.get()
	if err != nil {
		s.log.Warn("manifest", "err", err)
	}
	if id, ok := m[ekHash]; ok {
		return id, nil
	}
	if s.autoApprove {
		return est.EKDeviceID(ekHash), nil
	}
	if s.holdUnknown {
		id := est.EKDeviceID(ekHash)
		if err := s.reg.hold(id, ekHash, s.now()); err != nil {
			return "", err
		}
		return id, errPending
	}
	return "", refuse(http.StatusForbidden, "unknown_ek", "EK sha256:%s is not in the manifest and auto-approve is off", ekHash)
}

// canIssue is the registry check run, inside the issuing transaction, for
// a device entry (nil when new).
func canIssue(id, ekHash string) func(*Device) error {
	return func(d *Device) error {
		if d == nil {
			return nil
		}
		if d.Status == StatusRevoked {
			return refuse(http.StatusForbidden, "device_revoked", "device %s is revoked", id)
		}
		if d.Status == StatusPending {
			return errPending
		}
		if ekHash != "" && d.EKSHA256 != "" && d.EKSHA256 != ekHash {
			return refuse(http.StatusForbidden, "ek_mismatch", "device %s is bound to another EK (sha256:%s)", id, d.EKSHA256)
		}
		return nil
	}
}

func (s *Station) handleTPMEnroll(w http.ResponseWriter, r *http.Request) {
	e := AuditEntry{Event: "tpmenroll"}
	body, ok := s.begin(w, r, e)
	if !ok {
		return
	}
	// Each attestation costs a CA signature and a credential: bounded per
	// source before any of it (SPIRE rate-limits attestation per source
	// too).
	if wait, ok := s.attestRate.take(sourceOf(r)); !ok {
		rf := refuse(http.StatusTooManyRequests, "rate_limited", "too many attestation requests from this address; retry in %ds", int(wait/time.Second)+1)
		rf.free, rf.retryAfter = true, wait
		s.fail(w, r, e, rf)
		return
	}
	req, err := est.DecodeTPMEnrollRequest(r.Header.Get("Content-Type"), bytes.NewReader(body))
	if err != nil {
		status := http.StatusBadRequest
		if errors.Is(err, est.ErrMediaType) {
			status = http.StatusUnsupportedMediaType
		}
		s.fail(w, r, e, refuse(status, "malformed", "%v", err))
		return
	}
	presented, leaf, err := s.clientDevice(r)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	att, err := s.verifyAttestation(req)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	e.EK = att.ekHash
	id, err := s.admit(att.ekHash)
	e.Device = id
	if errors.Is(err, errPending) {
		s.pending(w, r, e)
		return
	}
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	if presented != nil && presented.ID != id {
		s.fail(w, r, e, refuse(http.StatusForbidden, "other_device", "client certificate belongs to device %s, the EK to device %s", presented.ID, id))
		return
	}
	check, from := canIssue(id, att.ekHash), ""
	if presented != nil {
		// Over mTLS the certificate vouches for the request: only the
		// current one may, and it must still be current at confirmation.
		check, from = currentCert(leaf, false, check), serialHex(leaf.SerialNumber)
	}
	if d, err := s.reg.device(id); err != nil {
		s.fail(w, r, e, err)
		return
	} else if err := check(d); errors.Is(err, errPending) {
		s.pending(w, r, e)
		return
	} else if err != nil {
		s.fail(w, r, e, err)
		return
	}

	now := s.now()
	// Short-lived until the device trades it (see UnconfirmedLifetime).
	cert, err := s.ca.issueDevice(s.rand, id, att.csr.PublicKey, now, min(s.certLifetime, UnconfirmedLifetime), RoleDeviceTPM)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	e.Serial = serialHex(cert.SerialNumber)
	// The certificate is encrypted under a fresh key that only the TPM
	// holding both the EK and the certified key can recover.
	aesKey := make([]byte, 16)
	if _, err := io.ReadFull(s.rand, aesKey); err != nil {
		s.fail(w, r, e, err)
		return
	}
	ekey, err := tpm2.ImportEncapsulationKey(&att.ekPub)
	if err != nil {
		s.fail(w, r, e, refuse(http.StatusForbidden, "ek_mismatch", "EK public area cannot encrypt a credential: %v", err))
		return
	}
	blob, seed, err := tpm2.CreateCredential(s.rand, ekey, att.keyName, aesKey)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	enc, err := est.SealEncryptedData(s.rand, aesKey, cert.Raw)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	out, ct, err := (&est.TPMEnrollResponse{CredentialBlob: blob, EncryptedSeed: seed, EncryptedCert: enc}).Encode()
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	// Anyone holding the EK's public data gets this far: nothing about the
	// device changes until the certificate is used (confirm).
	if err := s.reg.recordUnconfirmed(id, att.ekHash, from, infoOf(cert), now, check); err != nil {
		e.Serial = ""
		s.fail(w, r, e, err)
		return
	}
	e.Reason = fmt.Sprintf("unconfirmed until the device uses it (within %v)", min(s.certLifetime, UnconfirmedLifetime))
	s.accept(r, e, false)
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(http.StatusOK)
	w.Write(out)
}

// errTokenRefused is the one answer to a token that does not work,
// whatever the reason (the audit log has it): an outsider learns nothing
// about which device IDs have a token.
const errTokenRefused = "token not accepted for this device ID (unknown, used, expired or wrong)"

// canIssueByToken is canIssue for simpleenroll: a token never issues for
// an ID bound to an EK (another TPM cannot take it over, nor can a
// software key).
func canIssueByToken(id string) func(*Device) error {
	return func(d *Device) error {
		if err := canIssue(id, "")(d); err != nil {
			return err
		}
		if d != nil && d.EKSHA256 != "" {
			return refuse(http.StatusForbidden, "ek_bound", "device %s is bound to a TPM (EK sha256:%s): only that TPM enrolls it", id, d.EKSHA256)
		}
		return nil
	}
}

func (s *Station) handleEnroll(w http.ResponseWriter, r *http.Request) {
	e := AuditEntry{Event: "simpleenroll"}
	body, ok := s.begin(w, r, e)
	if !ok {
		return
	}
	id, secret, ok := r.BasicAuth()
	if !ok {
		s.fail(w, r, e, refuse(http.StatusUnauthorized, "token_missing", "HTTP Basic credentials DEVICE_ID:TOKEN required (iotstation token create)"))
		return
	}
	e.Device = id
	if err := ValidDeviceID(id); err != nil {
		s.fail(w, r, e, refuse(http.StatusUnauthorized, "token_invalid", "%v", err))
		return
	}
	now := s.now()
	// Authenticated before anything is signed (libest does the same).
	if err := s.reg.checkToken(id, secret, now); err != nil {
		rf := refuse(http.StatusUnauthorized, "token_invalid", errTokenRefused)
		rf.detail = err.Error()
		s.fail(w, r, e, rf)
		return
	}
	if err := s.manifestFree(id); err != nil {
		s.fail(w, r, e, err)
		return
	}
	csr, err := parseCSR(r, body)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	cert, err := s.ca.issueDevice(s.rand, id, csr.PublicKey, now, s.certLifetime, RoleDeviceToken)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	e.Serial = serialHex(cert.SerialNumber)
	err = s.reg.consumeToken(id, secret, now, func(tx *bolt.Tx) error {
		return recordIssueTx(tx, id, "", infoOf(cert), now, canIssueByToken(id))
	})
	switch {
	case errors.Is(err, errTokenUnknown), errors.Is(err, errTokenExpired), errors.Is(err, errTokenWrong):
		e.Serial = ""
		rf := refuse(http.StatusUnauthorized, "token_invalid", errTokenRefused)
		rf.detail = err.Error()
		s.fail(w, r, e, rf)
		return
	case errors.Is(err, errPending):
		e.Serial = ""
		s.fail(w, r, e, refuse(http.StatusForbidden, "device_pending", "device %s is held for approval of its TPM: only that TPM enrolls it", id))
		return
	case err != nil:
		e.Serial = ""
		s.fail(w, r, e, err)
		return
	}
	s.accept(r, e, true)
	writeBase64(w, est.MediaCertsOnly, est.MarshalCertsOnly([][]byte{cert.Raw}))
}

// manifestFree refuses a device ID the manifest gives to an EK: only
// that TPM may enroll under it.
func (s *Station) manifestFree(id string) error {
	m, err := s.manifest.get()
	if err != nil {
		s.log.Warn("manifest", "err", err)
	}
	for ek, mid := range m {
		if mid == id {
			return refuse(http.StatusForbidden, "ek_bound", "device ID %s belongs to EK sha256:%s (manifest): only that TPM enrolls it", id, ek)
		}
	}
	return nil
}

func (s *Station) handleReenroll(w http.ResponseWriter, r *http.Request) {
	e := AuditEntry{Event: "simplereenroll"}
	body, ok := s.begin(w, r, e)
	if !ok {
		return
	}
	d, leaf, err := s.clientDevice(r)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	if d == nil {
		s.fail(w, r, e, refuse(http.StatusForbidden, "cert_missing", "simplereenroll needs the current device certificate (mutual TLS)"))
		return
	}
	e.Device, e.EK = d.ID, d.EKSHA256
	check := currentCert(leaf, true, canIssue(d.ID, ""))
	if err := check(d); err != nil {
		s.fail(w, r, e, err)
		return
	}
	csr, err := parseCSR(r, body)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	if !samePublicKey(csr.PublicKey, leaf.PublicKey) {
		s.fail(w, r, e, refuse(http.StatusForbidden, "csr_key_mismatch", "simplereenroll renews the same key; a new key is certified through tpmenroll"))
		return
	}
	// The renewal keeps how the device enrolled: an EK-bound device's key
	// was attested, a token device's was not.
	role := RoleDeviceToken
	if d.EKSHA256 != "" {
		role = RoleDeviceTPM
	}
	now := s.now()
	cert, err := s.ca.issueDevice(s.rand, d.ID, csr.PublicKey, now, s.certLifetime, role)
	if err != nil {
		s.fail(w, r, e, err)
		return
	}
	e.Serial = serialHex(cert.SerialNumber)
	if err := s.reg.recordIssue(d.ID, "", infoOf(cert), now, check); err != nil {
		e.Serial = ""
		s.fail(w, r, e, err)
		return
	}
	s.accept(r, e, true)
	writeBase64(w, est.MediaCertsOnly, est.MarshalCertsOnly([][]byte{cert.Raw}))
}

func samePublicKey(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// Serve runs the station's HTTPS server on l, its admin socket, the CRL
// refresher, the retries of session ends and the rollouts' clock
// (RunRollouts) until ctx is done, then shuts down within 5 seconds.
func (s *Station) Serve(ctx context.Context, l net.Listener) error {
	tlsCfg, err := s.TLSConfig()
	if err != nil {
		return err
	}
	// A fresh CRL; the CRL loop runs the hook (and retries it).
	if _, err := s.issueCRL(); err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           s.Handler(),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          newStdLogger(s.log),
	}
	admin, err := s.listenAdmin()
	if err != nil {
		return err
	}
	errc := make(chan error, 3)
	go func() { errc <- srv.ServeTLS(l, "", "") }()
	go func() { errc <- admin.serve() }()
	crlCtx, stopCRL := context.WithCancel(context.Background())
	defer stopCRL()
	crlDone := make(chan struct{})
	go func() {
		defer close(crlDone)
		s.crlLoop(crlCtx)
	}()
	sessionsDone := make(chan struct{})
	go func() {
		defer close(sessionsDone)
		s.RunSessionEnds(crlCtx) // returns nil when crlCtx ends
	}()
	rolloutsDone := make(chan struct{})
	go func() {
		defer close(rolloutsDone)
		s.RunRollouts(crlCtx) // returns nil when crlCtx ends
	}()
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	stopCRL() // ends a hook run too
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = errors.Join(srv.Shutdown(sctx), admin.close())
	<-crlDone
	<-sessionsDone
	<-rolloutsDone
	if runErr != nil && !errors.Is(runErr, http.ErrServerClosed) {
		return runErr
	}
	return err
}
