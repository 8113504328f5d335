package station_test

import (
	"bytes"
	"io"
	"net/http"
	"testing"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// BenchmarkTPMEnroll measures the station's /tpmenroll throughput: EK
// chain verification, attestation checks, issuing, credential creation,
// encryption and the registry update, over one kept-alive TLS connection.
// The device's TPM material is made once, before timing. With the issuing
// CA key in a file the station needs no TPM; with it in the station's TPM
// (init --ca-tpm, swtpm here) every issuance is a TPM signature.
func BenchmarkTPMEnroll(b *testing.B) {
	benchTPMEnroll(b, stationtest.Start(b, stationtest.Options{AutoApprove: true}))
}

func BenchmarkTPMEnrollCAInTPM(b *testing.B) {
	caTPM := tpmtest.Start(b, tpmtest.Options{Identity: 1})
	benchTPMEnroll(b, stationtest.Start(b, stationtest.Options{AutoApprove: true, CATPM: caTPM.Spec}))
}

func benchTPMEnroll(b *testing.B, st *stationtest.Station) {
	d := newTPMDevice(b, 0)
	body, ct, err := d.request(b).Encode()
	if err != nil {
		b.Fatal(err)
	}
	c := client(b, st, nil)
	b.ResetTimer()
	for b.Loop() {
		benchPost(b, c, st.URL+est.PathTPMEnroll, ct, body)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enrollments/s")
}

// BenchmarkSimpleReenroll measures /simplereenroll over mutual TLS (the
// client certificate's key in swtpm signs the handshake once; the
// connection is kept alive).
func BenchmarkSimpleReenroll(b *testing.B) {
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
	d := newTPMDevice(b, 0)
	c, _ := enrolledClient(b, st, d)
	body := reenrollBody(b, d.key)
	b.ResetTimer()
	for b.Loop() {
		benchPost(b, c, st.URL+est.PathReenroll, est.MediaPKCS10, body)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "renewals/s")
}

func benchPost(b *testing.B, c *http.Client, url, ct string, body []byte) {
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	req.Header.Set("Content-Type", ct)
	resp, err := c.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("status %d", resp.StatusCode)
	}
}
