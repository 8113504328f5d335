package station_test

import (
	"bytes"
	"io"
	"net/http"
	"testing"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/station/stationtest"
)

// BenchmarkTPMEnroll measures the station's /tpmenroll throughput: EK
// chain verification, attestation checks, issuing, credential creation,
// encryption and the registry update, over one kept-alive TLS connection.
// The TPM material is made once, before timing: the station needs no TPM.
func BenchmarkTPMEnroll(b *testing.B) {
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
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
