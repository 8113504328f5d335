package tpm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"testing"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func benchKey(b *testing.B) *tpm.Key {
	b.Helper()
	return tpmtest.NewKey(b, tpmtest.New(b).Open(b))
}

// BenchmarkSign measures one ECDSA P-256 signature by the TPM (including
// the software verification every signature gets).
func BenchmarkSign(b *testing.B) {
	k := benchKey(b)
	d := sha256.Sum256([]byte("bench"))
	for b.Loop() {
		if _, err := k.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTLS13MutualHandshake compares a full TLS 1.3 mutual handshake on
// loopback with the client key in the TPM against a software key, in the
// same run. Session resumption is off: every iteration signs.
func BenchmarkTLS13MutualHandshake(b *testing.B) {
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tc := range []struct {
		name string
		key  func(*testing.B) crypto.Signer
	}{
		{"tpm", func(b *testing.B) crypto.Signer { return benchKey(b) }},
		{"software", func(*testing.B) crypto.Signer { return soft }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			benchHandshake(b, tc.key(b))
		})
	}
}

func benchHandshake(b *testing.B, clientKey crypto.Signer) {
	srvCfg, cliCfg := tlsConfigs(b, clientKey)
	addr, _, stop := serveHandshakes(b, srvCfg)
	defer stop()
	buf := make([]byte, 1)
	for b.Loop() {
		c, err := tls.Dial("tcp", addr, cliCfg)
		if err != nil {
			b.Fatal(err)
		}
		// The server writes after verifying the client: one byte read
		// means the mutual handshake completed on both sides.
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
