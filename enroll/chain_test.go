package enroll

import (
	"bytes"
	"crypto/x509"
	"log/slog"
	"testing"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestEKChainOrderAndDuplicates(t *testing.T) {
	inter, root := tpmtest.ManufacturerIntermediate(t), tpmtest.ManufacturerRoot(t)
	sim := tpmtest.New(t)
	sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst, Data: inter.Raw})
	sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst + 1, Data: []byte{0x30, 0x03, 0x02, 0x01, 0x01}}) // DER, not a certificate
	tp := sim.Open(t)
	eks, err := tp.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	got := ekChain(tp, &eks[0], []*x509.Certificate{inter, root, eks[0].Certificate.Cert}, slog.New(slog.DiscardHandler))
	want := [][]byte{eks[0].Certificate.Raw, inter.Raw, root.Raw}
	if len(got) != len(want) {
		t.Fatalf("ekChain = %d certificates, want EK, intermediate (NV), root (configured)", len(got))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("ekChain[%d] differs: want EK, intermediate (NV), root (configured), each once", i)
		}
	}
}
