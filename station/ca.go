package station

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/certpem"
)

// Files in the station directory.
const (
	fileConfig    = "station.json"
	fileRootCert  = "root.crt"
	fileRootKey   = "root.key"
	fileCACert    = "ca.crt"
	fileCAKey     = "ca.key"
	fileCATPMKey  = "ca.tpmkey" // the issuing CA key's TPM blobs, with init --ca-tpm
	fileTLSCert   = "tls.crt"
	fileTLSKey    = "tls.key"
	fileTPMRoots  = "tpm-roots.pem"
	fileManifest  = "manifest.txt"
	fileRegistry  = "registry.db"
	fileAudit     = "audit.log"
	fileCRLPEM    = "crl.pem"
	fileAdminSock = "admin.sock"
	rootLifetime  = 20 * 365 * 24 * time.Hour
	caLifetime    = 5 * 365 * 24 * time.Hour
	tlsLifetime   = 2 * 365 * 24 * time.Hour
	backdate      = 5 * time.Minute // tolerate devices whose clocks lag a little
)

// ca is the station's certificate authority: a root that signs the issuing
// CA, which signs device certificates, the station's TLS certificate and the
// CRL. The root's SHA-256 fingerprint is what agents pin.
type ca struct {
	root      *x509.Certificate
	issuer    *x509.Certificate
	issuerKey crypto.Signer
}

func newSerial(r io.Reader) (*big.Int, error) {
	// 128 random bits, positive: RFC 5280 allows up to 20 octets.
	b := make([]byte, 16)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	b[0] &= 0x7f
	if b[0] == 0 {
		b[0] = 1
	}
	return new(big.Int).SetBytes(b), nil
}

func writeKey(path string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func writeCerts(path string, certs ...*x509.Certificate) error {
	return atomicfile.Write(path, certpem.Encode(certs...), 0o644)
}

func readKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: not a signing key", path)
	}
	return s, nil
}

// Fingerprint returns "sha256:HEX" of a certificate's DER: what
// `iotagent enroll --station-fingerprint` pins.
func Fingerprint(c *x509.Certificate) string {
	s := sha256.Sum256(c.Raw)
	return "sha256:" + hex.EncodeToString(s[:])
}

func createCert(r io.Reader, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	serial, err := newSerial(r)
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(r, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// initCA creates the root, the issuing CA and the station TLS certificate
// for sans in dir. caKey, when not nil, is the issuing CA's key (held in a
// TPM); otherwise one is generated and written to ca.key.
func initCA(dir, name string, sans []string, now time.Time, caKey crypto.Signer) (*ca, error) {
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " Root CA"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(rootLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	root, err := createCert(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	var caFileKey *ecdsa.PrivateKey
	if caKey == nil {
		if caFileKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, err
		}
		caKey = caFileKey
	}
	issuer, err := createCert(rand.Reader, &x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " Issuing CA"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}, root, caKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name + " station"},
		NotBefore:   now.Add(-backdate),
		NotAfter:    now.Add(tlsLifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	tlsCert, err := createCert(rand.Reader, tmpl, issuer, &tlsKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	for _, w := range []func() error{
		func() error { return writeKey(filepath.Join(dir, fileRootKey), rootKey) },
		func() error {
			if caFileKey == nil {
				return nil // in the TPM
			}
			return writeKey(filepath.Join(dir, fileCAKey), caFileKey)
		},
		func() error { return writeKey(filepath.Join(dir, fileTLSKey), tlsKey) },
		func() error { return writeCerts(filepath.Join(dir, fileRootCert), root) },
		func() error { return writeCerts(filepath.Join(dir, fileCACert), issuer) },
		// The TLS chain includes the root so an agent can match the pinned
		// fingerprint against what the station presents.
		func() error { return writeCerts(filepath.Join(dir, fileTLSCert), tlsCert, issuer, root) },
	} {
		if err := w(); err != nil {
			return nil, err
		}
	}
	return &ca{root: root, issuer: issuer, issuerKey: caKey}, nil
}

// loadCA reads the CA from dir, with the issuing CA's key from ca.key, or
// key when not nil (held in a TPM), which must match the issuing CA
// certificate. The root key is not needed to run.
func loadCA(dir string, key crypto.Signer) (*ca, error) {
	roots, err := certpem.ReadFile(filepath.Join(dir, fileRootCert))
	if err != nil {
		return nil, err
	}
	issuers, err := certpem.ReadFile(filepath.Join(dir, fileCACert))
	if err != nil {
		return nil, err
	}
	if key == nil {
		if key, err = readKey(filepath.Join(dir, fileCAKey)); err != nil {
			return nil, err
		}
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(issuers[0].PublicKey) {
		return nil, fmt.Errorf("the issuing CA key does not match %s", fileCACert)
	}
	c := &ca{root: roots[0], issuer: issuers[0], issuerKey: key}
	if err := c.issuer.CheckSignatureFrom(c.root); err != nil {
		return nil, fmt.Errorf("issuing CA is not signed by the root: %w", err)
	}
	return c, nil
}

// DeviceURI is the URI SAN of a device certificate: brokers and collectors
// that map certificates to identities may use it or the CN.
func DeviceURI(id string) *url.URL {
	return &url.URL{Scheme: "urn", Opaque: "iotagent:device:" + id}
}

// Role is what a certificate the station issued is for, as its
// certificate policy says (a broker or backend can tell them apart).
type Role int

const (
	// RoleUnknown: not one of the station's policies (a certificate from
	// before policies were added, or not the station's).
	RoleUnknown Role = iota
	// RoleDeviceTPM: a device whose key was attested by TPM credential
	// activation against an EK the station trusts.
	RoleDeviceTPM
	// RoleDeviceToken: a device enrolled with a one-time bootstrap token;
	// its key was not attested.
	RoleDeviceToken
	// RoleService: a station service (broker, collector, subscriber),
	// never a device.
	RoleService
)

func (r Role) String() string {
	switch r {
	case RoleDeviceTPM:
		return "device-tpm"
	case RoleDeviceToken:
		return "device-token"
	case RoleService:
		return "service"
	}
	return "unknown"
}

// PolicyArc is the OID arc of the station's certificate policies
// (X.667 UUID arc, no registration needed); each role is PolicyArc.1.N.
const PolicyArc = "2.25.156331948843846159360629348017936784726"

var rolePolicies = func() map[Role]x509.OID {
	m := map[Role]x509.OID{}
	for r, suffix := range map[Role]string{RoleDeviceTPM: ".1.1", RoleDeviceToken: ".1.2", RoleService: ".1.3"} {
		oid, err := x509.ParseOID(PolicyArc + suffix)
		if err != nil {
			panic(err)
		}
		m[r] = oid
	}
	return m
}()

// CertificateRole returns the role c's certificate policy names.
func CertificateRole(c *x509.Certificate) Role {
	for r, oid := range rolePolicies {
		for _, p := range c.Policies {
			if p.Equal(oid) {
				return r
			}
		}
	}
	return RoleUnknown
}

// DeviceCertificateID returns the device ID a certificate names, or an
// error if it is not a device certificate: a device's CN is a valid
// device ID, its URI SAN is DeviceURI of it, and its policy (when it has
// one of the station's) is a device role. A service certificate is never
// a device's.
func DeviceCertificateID(c *x509.Certificate) (string, error) {
	id := c.Subject.CommonName
	switch CertificateRole(c) {
	case RoleService:
		return "", fmt.Errorf("certificate %s is a station service's, not a device's", id)
	case RoleUnknown:
		if slices.Contains(c.Subject.OrganizationalUnit, "service") {
			return "", fmt.Errorf("certificate %s is a station service's, not a device's", id)
		}
	}
	if err := ValidDeviceID(id); err != nil {
		return "", err
	}
	want := DeviceURI(id).String()
	if !slices.ContainsFunc(c.URIs, func(u *url.URL) bool { return u.String() == want }) {
		return "", fmt.Errorf("certificate %s has no device URI %s", id, want)
	}
	return id, nil
}

// issueDevice signs a client certificate for device id with pub, after
// the key policy every issuing path shares (checkCSRKey).
func (c *ca) issueDevice(r io.Reader, id string, pub crypto.PublicKey, now time.Time, lifetime time.Duration, role Role) (*x509.Certificate, error) {
	if err := checkCSRKey(pub); err != nil {
		return nil, refuse(400, "csr_key", "CSR: %v", err)
	}
	notAfter := now.Add(lifetime)
	if notAfter.After(c.issuer.NotAfter) {
		notAfter = c.issuer.NotAfter
	}
	// Backdating tolerates device clocks that lag a little; for short
	// lifetimes it must stay small, or it would eat the renewal window
	// agents compute from notBefore.
	back := min(backdate, lifetime/10)
	return createCert(r, &x509.Certificate{
		Subject:     pkix.Name{CommonName: id},
		URIs:        []*url.URL{DeviceURI(id)},
		NotBefore:   now.Add(-back),
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		Policies:    []x509.OID{rolePolicies[role]},
	}, c.issuer, pub, c.issuerKey)
}

// ServiceCert is a certificate the station issues to a fleet-side service:
// an MQTT broker or CoAP collector (server), or a backend subscriber
// (client). Key is PKCS#8 PEM; Chain is the certificate then the issuing
// CA, PEM.
type ServiceCert struct {
	Chain []byte            `json:"chain"`
	Key   []byte            `json:"key"`
	Cert  *x509.Certificate `json:"-"`
}

// ServiceRequest asks for a ServiceCert (see Station.IssueService).
type ServiceRequest struct {
	Name     string        `json:"name"`
	SANs     []string      `json:"sans"`
	Server   bool          `json:"server"`
	Lifetime time.Duration `json:"lifetime"`
}

// IssueService issues a certificate for the service r names: with
// r.Server, a TLS server certificate for r.SANs (DNS names or IPs);
// otherwise a client certificate (for example a backend subscriber reading
// every device's telemetry). Services are not devices: their names are
// reserved in the registry, so no device can ever enroll under one. The
// decision is audited either way. It is Admin.IssueService, in process.
func (s *Station) IssueService(_ context.Context, r ServiceRequest) (*ServiceCert, error) {
	c, err := s.issueService(r.Name, r.SANs, r.Server, r.Lifetime)
	serial := ""
	if err == nil {
		serial = serialHex(c.Cert.SerialNumber)
	}
	s.auditAdmin("issue-service", r.Name, serial, err)
	return c, err
}

func (s *Station) issueService(cn string, sans []string, server bool, lifetime time.Duration) (*ServiceCert, error) {
	if cn == "" {
		return nil, errors.New("service certificate needs a name")
	}
	// Brokers and the collector take identity from the CN: a name is a
	// device's or a service's, never both, now or later.
	if err := s.reg.reserveService(cn); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := s.now()
	tmpl := &x509.Certificate{
		Subject:   pkix.Name{CommonName: cn, OrganizationalUnit: []string{"service"}},
		NotBefore: now.Add(-serviceBackdate(lifetime)),
		NotAfter:  now.Add(lifetime),
		KeyUsage:  x509.KeyUsageDigitalSignature,
		Policies:  []x509.OID{rolePolicies[RoleService]},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, n := range sans {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	if tmpl.NotAfter.After(s.ca.issuer.NotAfter) {
		tmpl.NotAfter = s.ca.issuer.NotAfter
	}
	c, err := createCert(s.rand, tmpl, s.ca.issuer, &key.PublicKey, s.ca.issuerKey)
	if err != nil {
		return nil, err
	}
	// Recorded like every certificate the station signs: revocable, and
	// known to the station's own checks.
	if err := s.reg.recordService(cn, c); err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	out := &ServiceCert{Cert: c, Key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})}
	out.Chain = certpem.Encode(c, s.ca.issuer)
	return out, nil
}

// serviceBackdate is how far a service certificate's notBefore lies
// before its issue: as for devices, a short lifetime keeps its renewal
// window (ServiceIdentity renews two thirds into it). A lifetime that
// is not positive (an expired certificate, for tests) keeps the full
// backdate, so that its notBefore stays before its notAfter.
func serviceBackdate(lifetime time.Duration) time.Duration {
	if lifetime <= 0 {
		return backdate
	}
	return min(backdate, lifetime/10)
}

// TrustPEM returns the station's CA certificates (issuing CA, root) as PEM:
// the cafile a broker verifies device certificates with.
func (s *Station) TrustPEM() []byte { return certpem.Encode(s.CACerts()...) }
