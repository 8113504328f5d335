package enroll

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/tpm"
)

// Files in the agent's state dir (0700; files 0600, replaced atomically).
const (
	// KeyFile is the current device key (see tpm.KeyFile).
	KeyFile = "device-key.json"
	// nextKeyFile is a rotated key waiting for its certificate.
	nextKeyFile    = "device-key.next.json"
	certFile       = "cert.pem"  // device certificate, then the issuing chain
	trustFile      = "trust.pem" // the station's CA certificates (from /cacerts)
	enrollmentFile = "enrollment.json"
	renewalFile    = "renewal.json"
)

// ErrNotEnrolled: the state dir holds no certificate yet.
var ErrNotEnrolled = errors.New("not enrolled")

// Enrollment records how the device enrolled.
type Enrollment struct {
	Station  string `json:"station"`
	DeviceID string `json:"device_id"`
	// Method is tpmenroll or simpleenroll (no EK certificate: renewals use
	// simplereenroll and an expired certificate needs a new token).
	Method     string    `json:"method"`
	EnrolledAt time.Time `json:"enrolled_at"`
}

// State is what the state dir holds about the device's identity.
type State struct {
	Dir        string
	Key        *tpm.KeyFile
	Chain      []*x509.Certificate // device certificate first
	Trust      []*x509.Certificate
	Enrollment Enrollment
}

// Leaf returns the device certificate.
func (s *State) Leaf() *x509.Certificate { return s.Chain[0] }

// TrustPool returns the trust bundle as a pool.
func (s *State) TrustPool() *x509.CertPool { return certpem.Pool(s.Trust) }

// keyMatches reports whether the certificate certifies the key of kf.
func keyMatches(c *x509.Certificate, kf *tpm.KeyFile) bool {
	pk, err := kf.PublicKey()
	if err != nil {
		return false
	}
	eq, ok := pk.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(c.PublicKey)
}

// LoadState reads the state dir. It finishes a key rotation interrupted
// between storing the new certificate and renaming the new key into
// place, and drops a rotated key whose certificate never came.
func LoadState(dir string) (*State, error) {
	chain, err := certpem.ReadFile(filepath.Join(dir, certFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: no certificate in %s (run iotagent enroll)", ErrNotEnrolled, dir)
	}
	if err != nil {
		return nil, err
	}
	if err := recoverRotation(dir, chain[0]); err != nil {
		return nil, err
	}
	kf, err := tpm.ReadKeyFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, err
	}
	trust, err := certpem.ReadFile(filepath.Join(dir, trustFile))
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, enrollmentFile))
	if err != nil {
		return nil, err
	}
	var en Enrollment
	if err := json.Unmarshal(b, &en); err != nil {
		return nil, fmt.Errorf("%s: %w", enrollmentFile, err)
	}
	return &State{Dir: dir, Key: kf, Chain: chain, Trust: trust, Enrollment: en}, nil
}

// recoverRotation completes or abandons a rotation left by a crash.
func recoverRotation(dir string, leaf *x509.Certificate) error {
	next := filepath.Join(dir, nextKeyFile)
	kf, err := tpm.ReadKeyFile(next)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil && keyMatches(leaf, kf) {
		// The certificate for the new key was stored: the rotation
		// committed; finish it.
		return commitKey(dir)
	}
	// Never certified (or damaged): it is useless.
	return atomicfile.Remove(next)
}

// commitKey renames the rotated key into place.
func commitKey(dir string) error {
	if err := os.Rename(filepath.Join(dir, nextKeyFile), filepath.Join(dir, KeyFile)); err != nil {
		return fmt.Errorf("installing rotated key: %w", err)
	}
	return atomicfile.SyncDir(dir)
}

// saveIdentity stores a new certificate chain, trust bundle and enrollment
// record. The certificate file is written last among the identity files:
// its replacement is the commit point of a rotation.
func saveIdentity(dir string, chain, trust []*x509.Certificate, en Enrollment) error {
	b, err := json.MarshalIndent(en, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, enrollmentFile), append(b, '\n'), 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, trustFile), certpem.Encode(trust...), 0o600); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, certFile), certpem.Encode(chain...), 0o600)
}

// RenewalStatus is what the renewer last did, for iotagent status.
type RenewalStatus struct {
	NextRenewal time.Time `json:"next_renewal"`
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	LastRenewal time.Time `json:"last_renewal,omitzero"`
	LastError   string    `json:"last_renewal_error"`
	Renewals    int       `json:"renewals"`
	// Failures counts consecutive failed attempts.
	Failures int `json:"failures"`
}

// LoadRenewalStatus reads the renewer's status; zero when none.
func LoadRenewalStatus(dir string) (RenewalStatus, error) {
	var rs RenewalStatus
	b, err := os.ReadFile(filepath.Join(dir, renewalFile))
	if errors.Is(err, os.ErrNotExist) {
		return rs, nil
	}
	if err != nil {
		return rs, err
	}
	return rs, json.Unmarshal(b, &rs)
}

func saveRenewalStatus(dir string, rs RenewalStatus) error {
	b, err := json.MarshalIndent(rs, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, renewalFile), append(b, '\n'), 0o600)
}
