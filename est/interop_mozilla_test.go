package est

import (
	"bytes"
	"crypto/rand"
	"testing"

	mozpkcs7 "go.mozilla.org/pkcs7"
)

// GlobalSign's EST client (github.com/globalsign/est, cmd/estclient)
// decrypts the /tpmenroll certificate with go.mozilla.org/pkcs7 at the
// version its go.mod pins (v0.0.0-20200128120323-432b2356ecb1, which
// go.mod here pins too): pkcs7.Parse, then DecryptUsingPSK with the
// activated credential. That version declares encryptedContent
// "tag:0,optional,explicit", so it reads only the constructed form
// [0] { OCTET STRING } and takes a primitive [0] for absent content.
// smallstep/pkcs7 (TestEncryptedDataInterop) and go.mozilla.org/pkcs7
// v0.10.0 read both forms and cannot catch that.
func TestEncryptedDataInteropGlobalSignClient(t *testing.T) {
	for _, n := range []int{1, 100, 600, 2000} { // short, one- and two-byte lengths
		key := make([]byte, 16)
		rand.Read(key)
		plain := bytes.Repeat([]byte{0x5a}, n)
		ours, err := SealEncryptedData(rand.Reader, key, plain)
		if err != nil {
			t.Fatal(err)
		}
		p7, err := mozpkcs7.Parse(ours)
		if err != nil {
			t.Fatalf("%d bytes: go.mozilla.org/pkcs7 Parse(ours) = %v", n, err)
		}
		got, err := p7.DecryptUsingPSK(key)
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("%d bytes: go.mozilla.org/pkcs7 DecryptUsingPSK(ours) = %d bytes, %v; want the plaintext", n, len(got), err)
		}
	}
}
