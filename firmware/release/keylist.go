package release

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"time"
)

// PublicKey is an ed25519 public key, in JSON the base64 (standard) of
// its 32 bytes.
type PublicKey ed25519.PublicKey

func (k PublicKey) MarshalText() ([]byte, error) {
	return []byte(base64.StdEncoding.EncodeToString(k)), nil
}

func (k *PublicKey) UnmarshalText(b []byte) error {
	raw, err := base64.StdEncoding.DecodeString(string(b))
	if err != nil {
		return fmt.Errorf("public key: %w", err)
	}
	if len(raw) != ed25519.PublicKeySize {
		return fmt.Errorf("public key: %d bytes, want %d (ed25519)", len(raw), ed25519.PublicKeySize)
	}
	*k = raw
	return nil
}

// SigningKey is a release-signing key and when it stops being valid.
type SigningKey struct {
	Key     PublicKey `json:"key"`
	Expires time.Time `json:"expires"`
}

// KeyList is what the root keys sign: the keys that sign releases.
// Revoking a signing key is a new key list without it.
type KeyList struct {
	// Version only goes up: a key list with a lower version, or the same
	// version and other contents, is refused.
	Version uint64    `json:"version"`
	Expires time.Time `json:"expires"`
	// RootKeys and RootThreshold sign the next key list (root rotation:
	// it must carry RootThreshold signatures of these, and the threshold
	// of its own root keys).
	RootKeys      []PublicKey `json:"root_keys"`
	RootThreshold int         `json:"root_threshold"`
	// SigningKeys sign manifests; Threshold of them must sign each.
	SigningKeys []SigningKey `json:"signing_keys"`
	Threshold   int          `json:"threshold"`
}

// MaxKeys bounds RootKeys and SigningKeys each.
const MaxKeys = 32

func (l *KeyList) validate() error {
	switch {
	case len(l.RootKeys) == 0 || len(l.RootKeys) > MaxKeys:
		return fmt.Errorf("key list: %d root keys, want 1 to %d", len(l.RootKeys), MaxKeys)
	case l.RootThreshold < 1 || l.RootThreshold > len(l.RootKeys):
		return fmt.Errorf("key list: root threshold %d with %d root keys", l.RootThreshold, len(l.RootKeys))
	case len(l.SigningKeys) > MaxKeys:
		return fmt.Errorf("key list: %d signing keys, at most %d", len(l.SigningKeys), MaxKeys)
	case l.Threshold < 1 || l.Threshold > len(l.SigningKeys):
		return fmt.Errorf("key list: threshold %d with %d signing keys", l.Threshold, len(l.SigningKeys))
	case l.Expires.IsZero():
		return errors.New("key list: no expiry")
	}
	for _, k := range l.RootKeys {
		if len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("key list: a root key of %d bytes, want %d", len(k), ed25519.PublicKeySize)
		}
	}
	for _, k := range l.SigningKeys {
		if len(k.Key) != ed25519.PublicKeySize {
			return fmt.Errorf("key list: a signing key of %d bytes, want %d", len(k.Key), ed25519.PublicKeySize)
		}
	}
	seen := map[string]bool{}
	for _, k := range l.RootKeys {
		if id := KeyID(ed25519.PublicKey(k)); seen[id] {
			return fmt.Errorf("key list: root key %s listed twice", id[:16])
		} else {
			seen[id] = true
		}
	}
	for _, k := range l.SigningKeys {
		id := KeyID(ed25519.PublicKey(k.Key))
		if seen[id] {
			return fmt.Errorf("key list: key %s listed twice (a root key never signs releases)", id[:16])
		}
		seen[id] = true
		if k.Expires.IsZero() {
			return fmt.Errorf("key list: signing key %s has no expiry", id[:16])
		}
	}
	return nil
}

func (l *KeyList) roots() map[string]ed25519.PublicKey {
	m := map[string]ed25519.PublicKey{}
	for _, k := range l.RootKeys {
		m[KeyID(ed25519.PublicKey(k))] = ed25519.PublicKey(k)
	}
	return m
}

// signers are the signing keys valid at now.
func (l *KeyList) signers(now time.Time) map[string]ed25519.PublicKey {
	m := map[string]ed25519.PublicKey{}
	for _, k := range l.SigningKeys {
		if now.Before(k.Expires) {
			m[KeyID(ed25519.PublicKey(k.Key))] = ed25519.PublicKey(k.Key)
		}
	}
	return m
}

// ParsePublicKey reads a public key as PublicKey's text form (base64 of
// its 32 bytes), as `iotstation firmware key new` prints it.
func ParsePublicKey(s string) (ed25519.PublicKey, error) {
	var k PublicKey
	if err := k.UnmarshalText([]byte(s)); err != nil {
		return nil, err
	}
	return ed25519.PublicKey(k), nil
}
