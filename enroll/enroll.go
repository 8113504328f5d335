// Package enroll is the device side of enrollment: the EST client
// (RFC 7030 and the /tpmenroll credential-activation extension), the
// credential files in the state dir, first enrollment, the renewal
// scheduler, the live certificate accessor for uplinks, and the clock floor
// for devices without a trustworthy clock.
package enroll

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/tpm"
)

// Identity is the device's live credential: the current certificate chain
// and its TPM key, and the station's trust bundle. Uplinks use
// GetClientCertificate and RootCAs at each handshake and so pick up a
// renewed certificate, and a CA rollover the renewal brought, with no
// restart. Safe for concurrent use.
type Identity struct {
	mu      sync.Mutex
	cert    *tls.Certificate
	key     *tpm.Key
	roots   *x509.CertPool
	changed chan struct{}
}

func newIdentity(chain []*x509.Certificate, roots *x509.CertPool, key *tpm.Key) *Identity {
	return &Identity{cert: tlsCert(chain, key), key: key, roots: roots, changed: make(chan struct{})}
}

func tlsCert(chain []*x509.Certificate, key *tpm.Key) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// GetClientCertificate returns the current certificate; it has the
// signature of tls.Config.GetClientCertificate.
func (i *Identity) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return i.Certificate(), nil
}

// Certificate returns the current certificate with its TPM key.
func (i *Identity) Certificate() *tls.Certificate {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.cert
}

// Leaf returns the current device certificate.
func (i *Identity) Leaf() *x509.Certificate { return i.Certificate().Leaf }

// DeviceID returns the device ID (the certificate's common name).
func (i *Identity) DeviceID() string { return i.Leaf().Subject.CommonName }

// RootCAs returns the trust bundle as of the last enrollment or renewal:
// the station's CA certificates, which verify the fleet's servers.
func (i *Identity) RootCAs() *x509.CertPool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.roots
}

// Changed returns a channel closed at the next certificate change.
func (i *Identity) Changed() <-chan struct{} {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.changed
}

// swap installs a new certificate, trust bundle and key and returns the
// old key, which the caller closes once nothing needs it.
func (i *Identity) swap(chain []*x509.Certificate, roots *x509.CertPool, key *tpm.Key) (old *tpm.Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	old = i.key
	i.cert, i.key, i.roots = tlsCert(chain, key), key, roots
	close(i.changed)
	i.changed = make(chan struct{})
	if old == key {
		return nil
	}
	return old
}

// close releases the key.
func (i *Identity) close() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.key.Close()
}

// newCSR makes a PKCS#10 request signed by key for the device deviceID.
// Our station names devices itself (manifest, registry, or the EK) and
// ignores the subject; a CA that copies the subject into the certificate
// (GlobalSign's, many others) makes it the device's identity, so it must
// name this device and no other.
func newCSR(key *tpm.Key, deviceID string) ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: deviceID},
	}, key)
}

// ekDeviceID is the subject of a device that has no ID yet: the name our
// station gives a device it admits by its EK alone (est.EKDeviceID).
func ekDeviceID(ek *tpm.EK) string {
	return est.EKDeviceID(est.EKHash(ek.Certificate.Cert))
}

// claim is what a device presents to /tpmenroll: its EK, the EK's
// certificate chain (EK certificate first) and the device ID its CSR
// names.
type claim struct {
	ek       *tpm.EK
	chain    [][]byte
	deviceID string
}

// ekChain is the chain /tpmenroll sends for ek: its certificate, then the
// intermediates the TPM holds in NV and the configured ones, each once, so
// that a station trusting only the TPM vendor's root admits the EK. NV
// certificates that do not parse are left out (our station refuses a
// request holding one); problems reading NV are logged, not fatal: the
// station may know the intermediates itself.
func ekChain(t *tpm.TPM, ek *tpm.EK, configured []*x509.Certificate, log *slog.Logger) [][]byte {
	chain := [][]byte{ek.Certificate.Raw}
	add := func(der []byte) {
		if !slices.ContainsFunc(chain, func(b []byte) bool { return bytes.Equal(b, der) }) {
			chain = append(chain, der)
		}
	}
	nv, err := t.EKChain()
	if err != nil {
		log.Warn("reading the EK certificate chain from the TPM", "err", err)
	}
	for _, der := range nv {
		if _, err := x509.ParseCertificate(der); err != nil {
			log.Warn("leaving out an EK chain certificate from the TPM that does not parse", "err", err)
			continue
		}
		add(der)
	}
	for _, c := range configured {
		add(c.Raw)
	}
	return chain
}

// attest enrolls key through /tpmenroll with cl: the station encrypts the
// certificate so that only this TPM, holding both the EK and key,
// recovers it.
func attest(ctx context.Context, c *Client, t *tpm.TPM, key *tpm.Key, cl claim) (*x509.Certificate, error) {
	csr, err := newCSR(key, cl.deviceID)
	if err != nil {
		return nil, fmt.Errorf("signing CSR in the TPM: %w", err)
	}
	resp, err := c.TPMEnroll(ctx, &est.TPMEnrollRequest{
		CSR:       csr,
		EKChain:   cl.chain,
		EKPublic:  cl.ek.MarshalPublicArea(),
		KeyPublic: key.MarshalPublicArea(),
	})
	if err != nil {
		return nil, err
	}
	secret, err := t.ActivateCredential(key, cl.ek, resp.CredentialBlob, resp.EncryptedSeed)
	if err != nil {
		return nil, fmt.Errorf("tpmenroll: the TPM could not recover the credential (not made for this TPM and key): %w", err)
	}
	der, err := est.OpenEncryptedData(secret, resp.EncryptedCert)
	if err != nil {
		return nil, fmt.Errorf("tpmenroll: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tpmenroll: issued certificate: %w", err)
	}
	return cert, nil
}

// verifyIssued checks a new certificate before anything is stored: it is
// for key, for client authentication, and chains to the trust bundle at
// the clock's time. It returns the chain to store (leaf, intermediates).
func verifyIssued(cert *x509.Certificate, key *tpm.Key, trust []*x509.Certificate, clock *Clock) ([]*x509.Certificate, error) {
	if !key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) {
		return nil, errors.New("the station issued a certificate for another key")
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range trust {
		if isRoot(c) {
			roots.AddCert(c)
		} else {
			inter.AddCert(c)
		}
	}
	clock.Learn(cert.NotBefore)
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("issued certificate does not verify against the station's CA certificates: %w", err)
	}
	// Store the leaf and its intermediates, not the root.
	out := []*x509.Certificate{cert}
	for _, c := range chains[0][1:] {
		if !isRoot(c) {
			out = append(out, c)
		}
	}
	return out, nil
}

func isRoot(c *x509.Certificate) bool {
	return c.IsCA && c.CheckSignatureFrom(c) == nil && c.Subject.String() == c.Issuer.String()
}

// EnrollConfig configures Enroll.
type EnrollConfig struct {
	TPM *tpm.TPM
	Dir string
	// Station is the station URL, https://HOST[:PORT].
	Station string
	// StationCA authenticates the station's TLS certificate; or Pin, the
	// SHA-256 of a certificate in its chain.
	StationCA []*x509.Certificate
	Pin       []byte
	// Token is DEVICE_ID:SECRET from iotstation token create, for TPMs
	// without an EK certificate (or an EK the station does not admit).
	Token string
	// EKIntermediates are sent after the EK certificate, with those the
	// TPM holds in its EK chain NV range: the TPM vendor's CAs between the
	// EK certificate and the root a station trusts.
	EKIntermediates []*x509.Certificate
	Clock           *Clock
	Logger          *slog.Logger
}

// EnrollResult says what Enroll did.
type EnrollResult struct {
	State *State
	// Already is true when the agent was enrolled before and nothing
	// changed.
	Already bool
}

// Enroll enrolls the device: it creates the device key if needed, fetches
// the station's CA certificates, then enrolls through /tpmenroll (or
// /simpleenroll with a token when the TPM has no EK certificate), and
// stores key, certificate, chain and trust bundle. An agent holding a valid
// certificate is left alone.
func Enroll(ctx context.Context, cfg EnrollConfig) (*EnrollResult, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = NewClock(nil)
	}
	var deviceID string // the ID of an earlier enrollment, if any
	if st, err := recoverState(cfg.Dir); err == nil {
		if keyMatches(st.Leaf(), st.Key) && cfg.Clock.Now().Before(st.Leaf().NotAfter) {
			return &EnrollResult{State: st, Already: true}, nil
		}
		deviceID = st.Enrollment.DeviceID
		log.Info("existing certificate is expired or does not match the key; enrolling again")
	} else if !errors.Is(err, ErrNotEnrolled) {
		return nil, err
	}
	var roots *x509.CertPool
	if len(cfg.StationCA) > 0 {
		roots = certpem.Pool(cfg.StationCA)
	}
	if err := tpm.CheckWritableDir(cfg.Dir); err != nil {
		return nil, err
	}
	kf, _, err := cfg.TPM.EnsureKey(statedir.Dir(cfg.Dir).DeviceKey(), tpm.KeyOptions{})
	if err != nil {
		return nil, err
	}
	key, err := cfg.TPM.LoadKey(kf)
	if err != nil {
		return nil, err
	}
	defer key.Close()

	c, err := NewClient(ClientConfig{URL: cfg.Station, Roots: roots, Pin: cfg.Pin, Clock: cfg.Clock})
	if err != nil {
		return nil, err
	}
	trust, err := c.CACerts(ctx)
	if err != nil {
		return nil, err
	}
	var cert *x509.Certificate
	method := "tpmenroll"
	eks, ekErr := cfg.TPM.EndorsementKeys()
	switch {
	case ekErr == nil:
		cl := claim{ek: &eks[0], chain: ekChain(cfg.TPM, &eks[0], cfg.EKIntermediates, log), deviceID: deviceID}
		if cl.deviceID == "" {
			cl.deviceID = ekDeviceID(cl.ek)
		}
		log.Info("enrolling by TPM credential activation", "ek", cl.ek.KeyType, "ek_chain", len(cl.chain))
		cert, err = attestWaiting(ctx, c, cfg.TPM, key, cl, log)
		var se *StatusError
		if err != nil && cfg.Token != "" && errors.As(err, &se) && se.Refused() {
			log.Info("tpmenroll refused; trying the token", "reason", se.Message)
			method = "simpleenroll"
			cert, err = tokenEnroll(ctx, c, key, cfg.Token)
		}
	case errors.Is(ekErr, tpm.ErrNoEK) && cfg.Token != "":
		method = "simpleenroll"
		cert, err = tokenEnroll(ctx, c, key, cfg.Token)
	case errors.Is(ekErr, tpm.ErrNoEK):
		return nil, fmt.Errorf("%w; enroll with --token DEVICE_ID:SECRET (iotstation token create)", ekErr)
	default:
		return nil, ekErr
	}
	if err != nil {
		return nil, err
	}
	chain, err := verifyIssued(cert, key, trust, cfg.Clock)
	if err != nil {
		return nil, err
	}
	if method == "tpmenroll" {
		if chain, err = exchangeIssued(ctx, ClientConfig{URL: cfg.Station, Roots: roots, Pin: cfg.Pin, Clock: cfg.Clock}, chain, key, trust); err != nil {
			return nil, err
		}
	}
	en := Enrollment{Station: cfg.Station, DeviceID: chain[0].Subject.CommonName, Method: method, EnrolledAt: cfg.Clock.Now().UTC()}
	if err := saveIdentity(cfg.Dir, chain, trust, en); err != nil {
		return nil, err
	}
	cfg.Clock.PersistTo(cfg.Dir)
	if err := cfg.Clock.Save(true); err != nil {
		log.Warn("saving trusted time", "err", err)
	}
	st, err := recoverState(cfg.Dir)
	if err != nil {
		return nil, err
	}
	return &EnrollResult{State: st}, nil
}

// attestWaiting is attest that, while the station holds the device for an
// operator's approval (202 Accepted), waits as told by Retry-After and asks
// again, until ctx ends.
func attestWaiting(ctx context.Context, c *Client, t *tpm.TPM, key *tpm.Key, cl claim, log *slog.Logger) (*x509.Certificate, error) {
	for {
		cert, err := attest(ctx, c, t, key, cl)
		var se *StatusError
		if !errors.As(err, &se) || se.Code != http.StatusAccepted {
			return cert, err
		}
		wait := min(max(se.RetryAfter, time.Second), 10*time.Minute)
		if se.RetryAfter == 0 {
			wait = time.Minute
		}
		log.Info("the station holds this device for approval; asking again later", "station_says", se.Message, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (still awaiting approval)", ctx.Err())
		case <-time.After(wait):
		}
	}
}

// tokenEnroll enrolls key with a one-time token DEVICE_ID:SECRET.
func tokenEnroll(ctx context.Context, c *Client, key *tpm.Key, token string) (*x509.Certificate, error) {
	id, secret, ok := strings.Cut(token, ":")
	if !ok || id == "" || secret == "" {
		return nil, errors.New("token: want DEVICE_ID:SECRET as iotstation token create prints it")
	}
	csr, err := newCSR(key, id)
	if err != nil {
		return nil, fmt.Errorf("signing CSR in the TPM: %w", err)
	}
	return c.SimpleEnroll(ctx, csr, id, secret)
}
