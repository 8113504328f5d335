package station_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/station/stationtest"
)

func tool(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Independent tools speak RFC 7030 with the station: curl fetches
// /cacerts and OpenSSL reads the certs-only PKCS#7; an OpenSSL-made CSR
// enrolls through /simpleenroll with a token.
func TestRFC7030WithCurlAndOpenSSL(t *testing.T) {
	for _, bin := range []string{"curl", "openssl", "base64"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found (scripts/test.sh installs it)", bin)
		}
	}
	st := stationtest.Start(t, stationtest.Options{})
	dir := t.TempDir()

	tool(t, dir, "curl", "-sS", "--fail", "--cacert", st.RootFile, "-D", "cacerts.h", "-o", "cacerts.b64", st.URL+est.PathCACerts)
	hdr, _ := os.ReadFile(filepath.Join(dir, "cacerts.h"))
	h := strings.ToLower(string(hdr))
	if !strings.Contains(h, "content-type: application/pkcs7-mime; smime-type=certs-only") || !strings.Contains(h, "content-transfer-encoding: base64") {
		t.Errorf("cacerts headers:\n%s", hdr)
	}
	tool(t, dir, "sh", "-c", "tr -d '\\r' < cacerts.b64 | base64 -d > cacerts.p7")
	out := tool(t, dir, "openssl", "pkcs7", "-inform", "DER", "-in", "cacerts.p7", "-print_certs", "-noout")
	if !strings.Contains(out, "Issuing CA") || !strings.Contains(out, "Root CA") {
		t.Errorf("openssl pkcs7 -print_certs on /cacerts:\n%s", out)
	}

	// /csrattrs (RFC 7030 §4.5.2): base64 DER that OpenSSL parses, asking
	// for ECDSA with SHA-256 over P-256.
	tool(t, dir, "curl", "-sS", "--fail", "--cacert", st.RootFile, "-D", "csrattrs.h", "-o", "csrattrs.b64", st.URL+est.PathCSRAttrs)
	hdr, _ = os.ReadFile(filepath.Join(dir, "csrattrs.h"))
	if h := strings.ToLower(string(hdr)); !strings.Contains(h, "content-type: application/csrattrs") || !strings.Contains(h, "content-transfer-encoding: base64") {
		t.Errorf("csrattrs headers:\n%s", hdr)
	}
	tool(t, dir, "sh", "-c", "tr -d '\\r' < csrattrs.b64 | base64 -d > csrattrs.der")
	out = tool(t, dir, "openssl", "asn1parse", "-inform", "DER", "-in", "csrattrs.der")
	for _, want := range []string{"ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1"} {
		if !strings.Contains(out, want) {
			t.Errorf("openssl asn1parse on /csrattrs lacks %s:\n%s", want, out)
		}
	}

	tok, err := st.CreateToken("gw-openssl", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tool(t, dir, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", "key.pem", "-subj", "/CN=whatever", "-outform", "DER", "-out", "csr.der")
	tool(t, dir, "sh", "-c", "base64 csr.der > csr.b64")
	tool(t, dir, "curl", "-sS", "--fail", "--cacert", st.RootFile,
		"-H", "Content-Type: application/pkcs10", "-H", "Content-Transfer-Encoding: base64",
		"-u", tok.Credential(), "--data-binary", "@csr.b64", "-o", "cert.b64", st.URL+est.PathEnroll)
	tool(t, dir, "sh", "-c", "tr -d '\\r' < cert.b64 | base64 -d > cert.p7")
	out = tool(t, dir, "openssl", "pkcs7", "-inform", "DER", "-in", "cert.p7", "-print_certs")
	if !strings.Contains(out, "CN = gw-openssl") {
		t.Errorf("enrolled certificate:\n%s", out)
	}
	os.WriteFile(filepath.Join(dir, "cert.pem"), []byte(out), 0o600)
	tool(t, dir, "sh", "-c", "openssl x509 -in cert.pem -noout -pubkey > cert.pub && openssl pkey -in key.pem -pubout > key.pub && cmp cert.pub key.pub")
	out = tool(t, dir, "openssl", "verify", "-CAfile", st.RootFile, "-untrusted", filepath.Join(st.Dir, "ca.crt"), "cert.pem")
	if !strings.Contains(out, "cert.pem: OK") {
		t.Errorf("openssl verify: %s", out)
	}

	// The CRL is served as DER and written as PEM for brokers.
	tool(t, dir, "curl", "-sS", "--fail", "--cacert", st.RootFile, "-o", "crl.der", st.URL+"/crl")
	out = tool(t, dir, "openssl", "crl", "-inform", "DER", "-in", "crl.der", "-noout", "-issuer")
	if !strings.Contains(out, "Issuing CA") {
		t.Errorf("openssl crl: %s", out)
	}
	tool(t, dir, "openssl", "crl", "-in", filepath.Join(st.Dir, "crl.pem"), "-noout")
}
