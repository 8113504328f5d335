package tpm_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestEKCertificatesChainToManufacturer(t *testing.T) {
	tp := tpmtest.New(t).Open(t)
	certs, err := tp.EKCertificates()
	if err != nil {
		t.Fatal(err)
	}
	// swtpm 0.7 provisions an RSA-2048 EK and an ECC P-384 EK.
	gotIdx := map[uint32]string{}
	for _, c := range certs {
		gotIdx[c.NVIndex] = c.KeyType
	}
	if gotIdx[tpm.NVIndexRSA2048EKCert] != "rsa2048" || gotIdx[tpm.NVIndexECCP384EKCert] != "ecc-p384" {
		t.Fatalf("EK certificates at %v, want rsa2048 at 0x01c00002 and ecc-p384 at 0x01c00016", gotIdx)
	}

	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(tpmtest.ManufacturerRoot(t))
	blk, _ := pem.Decode(tpmtest.ManufacturerIntermediatePEM(t))
	ic, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	inter.AddCert(ic)
	sanOID := asn1.ObjectIdentifier{2, 5, 29, 17}
	for _, c := range certs {
		if c.Cert == nil {
			t.Fatalf("EK certificate at %#x does not parse: %v", c.NVIndex, c.ParseErr)
		}
		// EK certificates carry a critical SAN holding only a
		// directoryName (TPM manufacturer, model, version), which Go
		// leaves unhandled.
		var rest []asn1.ObjectIdentifier
		for _, oid := range c.Cert.UnhandledCriticalExtensions {
			if !oid.Equal(sanOID) {
				rest = append(rest, oid)
			}
		}
		c.Cert.UnhandledCriticalExtensions = rest
		if _, err := c.Cert.Verify(x509.VerifyOptions{
			Roots: roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		}); err != nil {
			t.Errorf("EK certificate %s does not chain to the manufacturer root: %v", c.KeyType, err)
		}
	}
}

func TestEndorsementKeysMatchCertificates(t *testing.T) {
	tp := tpmtest.New(t).Open(t)
	eks, err := tp.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	if len(eks) != 2 || eks[0].KeyType != "rsa2048" || eks[1].KeyType != "ecc-p384" {
		t.Fatalf("EndorsementKeys = %d keys, want rsa2048 then ecc-p384", len(eks))
	}
	for _, ek := range eks {
		pub, err := ek.PublicKey()
		if err != nil {
			t.Fatal(err)
		}
		if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(ek.Certificate.Cert.PublicKey) {
			t.Errorf("%s EK public area does not match its certificate", ek.KeyType)
		}
		if ek.Handle == 0 {
			t.Errorf("%s EK: swtpm persists it, Handle = 0", ek.KeyType)
		}
	}
}

// makeCredential is what the station does: no TPM, only the EK's public
// area and the name of the key to certify.
func makeCredential(t *testing.T, ek tpm.EK, keyName, secret []byte) (blob, encSecret []byte) {
	t.Helper()
	pub := ek.Public
	ekey, err := tpm2.ImportEncapsulationKey(&pub)
	if err != nil {
		t.Fatal(err)
	}
	blob, encSecret, err = tpm2.CreateCredential(rand.Reader, ekey, keyName, secret)
	if err != nil {
		t.Fatal(err)
	}
	return blob, encSecret
}

func TestActivateCredential(t *testing.T) {
	simA := tpmtest.New(t)
	tpA := simA.Open(t)
	tpB := tpmtest.Start(t, tpmtest.Options{Identity: 1}).Open(t)

	key := tpmtest.NewKey(t, tpA)
	otherKey := tpmtest.NewKey(t, tpA)

	eksA, err := tpA.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	eksB, err := tpB.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(eksA[0].Certificate.Raw, eksB[0].Certificate.Raw) {
		t.Fatal("identities 0 and 1 share an EK; the fixture must make distinct TPMs")
	}

	for i, ek := range eksA {
		t.Run(ek.KeyType, func(t *testing.T) {
			secret := []byte("0123456789abcdef")
			blob, enc := makeCredential(t, ek, key.Name(), secret)
			got, err := tpA.ActivateCredential(key, &eksA[i], blob, enc)
			if err != nil {
				t.Fatalf("ActivateCredential: %v", err)
			}
			if !bytes.Equal(got, secret) {
				t.Errorf("ActivateCredential = %x, want %x", got, secret)
			}

			// Bound to another key's name: the TPM refuses.
			blob, enc = makeCredential(t, ek, otherKey.Name(), secret)
			if _, err := tpA.ActivateCredential(key, &eksA[i], blob, enc); err == nil {
				t.Error("credential for another key's name activated")
			}

			// Made for TPM B's EK: TPM A cannot recover it.
			blob, enc = makeCredential(t, eksB[i], key.Name(), secret)
			if _, err := tpA.ActivateCredential(key, &eksA[i], blob, enc); err == nil {
				t.Error("credential for another TPM's EK activated")
			}
		})
	}
}
