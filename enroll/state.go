package enroll

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/tpm"
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

// LoadState reads the state dir without changing it: it is safe while
// another process (the running agent) owns the directory and is in the
// middle of a key rotation. If a rotation was interrupted after the
// certificate for the new key was stored, the State's key is the rotated
// one; the owner completes the rotation when it loads the state.
func LoadState(dir string) (*State, error) { return loadState(dir, false) }

// recoverState is LoadState for the owner of the state dir (who holds its
// lock): it finishes a key rotation interrupted between storing the new
// certificate and renaming the new key into place, and drops a rotated key
// whose certificate never came. Only the owner may: to anyone else, a
// rotated key without its certificate is a rotation in progress.
func recoverState(dir string) (*State, error) { return loadState(dir, true) }

func loadState(dir string, recover bool) (*State, error) {
	chain, err := certpem.ReadFile(statedir.Dir(dir).Certificate())
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: no certificate in %s (run iotagent enroll)", ErrNotEnrolled, dir)
	}
	if err != nil {
		return nil, err
	}
	keyFile := statedir.Dir(dir).DeviceKey()
	if recover {
		if err := recoverRotation(dir, chain[0]); err != nil {
			return nil, err
		}
	} else if next, err := tpm.ReadKeyFile(statedir.Dir(dir).NextDeviceKey()); err == nil && keyMatches(chain[0], next) {
		keyFile = statedir.Dir(dir).NextDeviceKey()
	}
	kf, err := tpm.ReadKeyFile(keyFile)
	if err != nil {
		return nil, err
	}
	trust, err := certpem.ReadFile(statedir.Dir(dir).Trust())
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(statedir.Dir(dir).Enrollment())
	if err != nil {
		return nil, err
	}
	var en Enrollment
	if err := json.Unmarshal(b, &en); err != nil {
		return nil, fmt.Errorf("%s: %w", statedir.Dir(dir).Enrollment(), err)
	}
	return &State{Dir: dir, Key: kf, Chain: chain, Trust: trust, Enrollment: en}, nil
}

// recoverRotation completes or abandons a rotation left by a crash.
func recoverRotation(dir string, leaf *x509.Certificate) error {
	next := statedir.Dir(dir).NextDeviceKey()
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
	if err := os.Rename(statedir.Dir(dir).NextDeviceKey(), statedir.Dir(dir).DeviceKey()); err != nil {
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
	if err := atomicfile.Write(statedir.Dir(dir).Enrollment(), append(b, '\n'), 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(statedir.Dir(dir).Trust(), certpem.Encode(trust...), 0o600); err != nil {
		return err
	}
	return atomicfile.Write(statedir.Dir(dir).Certificate(), certpem.Encode(chain...), 0o600)
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
	b, err := os.ReadFile(statedir.Dir(dir).RenewalStatus())
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
	return atomicfile.Write(statedir.Dir(dir).RenewalStatus(), append(b, '\n'), 0o600)
}
