// Package releasetest makes keys and signed release metadata for tests.
// For tests only.
package releasetest

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"testing"

	"iotagent.dev/iotagent/firmware/release"
)

// Key is a new ed25519 key.
func Key(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Public is k's public key as key lists hold it.
func Public(k ed25519.PrivateKey) release.PublicKey {
	return release.PublicKey(k.Public().(ed25519.PublicKey))
}

// Sign marshals v to JSON and signs it as a typ document with keys.
func Sign(t testing.TB, typ string, v any, keys ...ed25519.PrivateKey) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	env, err := release.Sign(typ, b, keys...)
	if err != nil {
		t.Fatal(err)
	}
	return env
}
