package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// ek_chain_file gives the agent the TPM vendor's intermediate CA when the
// TPM does not hold it, for a station that trusts the vendor's root only.
func TestEKChainFileConfig(t *testing.T) {
	url, fp := enrolltest.RootOnlyStation(t)
	sim := tpmtest.New(t)
	state := filepath.Join(t.TempDir(), "state")
	config := func(chainFile string) string {
		p := filepath.Join(t.TempDir(), "config.toml")
		body := fmt.Sprintf("tpm = %q\nstate_dir = %q\nek_chain_file = %q\n[station]\nurl = %q\nfingerprint = %q\n", sim.Spec, state, chainFile, url, fp)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	chain := filepath.Join(t.TempDir(), "ek-chain.pem")
	if err := os.WriteFile(chain, tpmtest.ManufacturerIntermediatePEM(t), 0o600); err != nil {
		t.Fatal(err)
	}

	if code, _, errs := cli(t, "--config", config("/nonexistent/ek-chain.pem"), "enroll"); code != 2 || !strings.Contains(errs, "ek_chain_file") || !strings.Contains(errs, "/nonexistent/ek-chain.pem") {
		t.Errorf("enroll with a missing ek_chain_file = %d, %q; want 2 naming the key and the file", code, errs)
	}
	if _, err := os.Stat(state); err == nil {
		t.Error("enroll with a missing ek_chain_file created the state dir")
	}
	good := config(chain)
	if code, out, errs := cli(t, "--config", good, "enroll"); code != 0 || !strings.Contains(out, "by tpmenroll") {
		t.Fatalf("enroll with ek_chain_file = %d, %q, %q", code, out, errs)
	}
	// The default renewal rotates the key and re-attests: the chain again.
	if code, out, errs := cli(t, "--config", good, "renew"); code != 0 || !strings.Contains(out, "renewed dev-") {
		t.Errorf("renew with ek_chain_file = %d, %q, %q", code, out, errs)
	}
}
