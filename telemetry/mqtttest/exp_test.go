package mqtttest_test

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/mqtttest"
)

func TestExpTicket(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	b := mqtttest.Start(t, st, mqtttest.Options{})
	sc, _ := st.IssueService("gw-9", nil, false, 3600e9)
	d := t.TempDir()
	os.WriteFile(filepath.Join(d, "c.pem"), sc.Chain, 0o600)
	os.WriteFile(filepath.Join(d, "k.pem"), sc.Key, 0o600)
	_ = pem.Decode
	_ = x509.ParseCertificate
	for _, v := range []string{"-tls1_3", "-tls1_2"} {
		sess := filepath.Join(d, "sess"+v)
		cmd := exec.Command("sh", "-c", "sleep 0.5 | openssl s_client "+v+" -connect "+b.Addr+" -cert "+filepath.Join(d, "c.pem")+" -key "+filepath.Join(d, "k.pem")+" -CAfile "+b.CAFile+" -sess_out "+sess)
		cmd.Stdin = nil
		out, err := cmd.CombinedOutput()
		t.Logf("%s: %v %d", v, err, len(out))
		out, err = exec.Command("openssl", "sess_id", "-in", sess, "-text", "-noout").CombinedOutput()
		t.Logf("%s\n%s %v", v, out, err)
		cmd = exec.Command("sh", "-c", "sleep 0.5 | openssl s_client "+v+" -connect "+b.Addr+" -CAfile "+b.CAFile+" -sess_in "+sess)
		out, err = cmd.CombinedOutput()
		t.Logf("resume without cert: %v\n%s", err, out)
	}
	t.Log(b.LogTail())
}
