package tpm_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestEKChainFromNV(t *testing.T) {
	inter := tpmtest.ManufacturerIntermediate(t).Raw
	root := tpmtest.ManufacturerRoot(t).Raw
	pad := func(b []byte, n int) []byte { return append(slices.Clone(b), bytes.Repeat([]byte{0xff}, n)...) }

	t.Run("none", func(t *testing.T) {
		chain, err := tpmtest.New(t).Open(t).EKChain()
		if err != nil || len(chain) != 0 {
			t.Errorf("EKChain of a TPM without a chain = %d certificates, %v; want none", len(chain), err)
		}
	})
	t.Run("one index, padded", func(t *testing.T) {
		sim := tpmtest.New(t)
		sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst, Data: pad(inter, 100)})
		chain, err := sim.Open(t).EKChain()
		if err != nil || len(chain) != 1 || !bytes.Equal(chain[0], inter) {
			t.Errorf("EKChain = %d certificates, %v; want the intermediate", len(chain), err)
		}
	})
	t.Run("concatenated, then another index", func(t *testing.T) {
		sim := tpmtest.New(t)
		// swtpm's indices hold at most 2 KiB: a small certificate after
		// the intermediate.
		small := smallCert(t)
		sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst, Data: pad(append(slices.Clone(inter), small...), 7)})
		sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst + 1, Data: root, OwnerReadOnly: true})
		chain, err := sim.Open(t).EKChain()
		if err != nil || len(chain) != 3 || !bytes.Equal(chain[0], inter) || !bytes.Equal(chain[1], small) || !bytes.Equal(chain[2], root) {
			t.Errorf("EKChain = %d certificates, %v; want intermediate, small, root", len(chain), err)
		}
	})
	t.Run("bounded", func(t *testing.T) {
		sim := tpmtest.New(t)
		// One index that holds no DER is skipped and reported; indices
		// past the eighth are not read, nor those outside the range.
		sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst, Data: []byte("not a certificate")})
		for i := uint32(1); i < 10; i++ {
			sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst + i, Data: inter})
		}
		sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainLast + 1, Data: root})
		chain, err := sim.Open(t).EKChain()
		if len(chain) != 7 {
			t.Errorf("EKChain = %d certificates, want the 7 of the first 8 indices that hold one", len(chain))
		}
		if want := "NV 0x1c00100 holds no DER certificate"; err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("EKChain error = %v, want it to name %q", err, want)
		}
	})
}

// smallCert is a self-signed ECDSA certificate of a few hundred bytes.
func smallCert(t *testing.T) []byte {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "small"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
