package release

import (
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// MarshalPrivateKey encodes a root or signing key as PEM (PKCS#8), for a
// file of mode 0600 kept offline.
func MarshalPrivateKey(k ed25519.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePrivateKey decodes what MarshalPrivateKey wrote.
func ParsePrivateKey(b []byte) (ed25519.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("release: no PEM PRIVATE KEY")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("release: %w", err)
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("release: a %T key, want ed25519", k)
	}
	return ek, nil
}

// TrustKeyList starts a Trust from a key list held as the owner's own
// (the station's installed one, which it serves): checked against its
// own root keys only, expiry not checked.
func TrustKeyList(raw []byte) (*Trust, error) {
	t := &Trust{cur: &KeyList{}}
	if _, err := t.Restore(raw); err != nil {
		return nil, err
	}
	return t, nil
}
