package station_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/station/stationtest"
)

// The repository: the station stores only what checks against its key
// list, and serves it to devices alone, payloads with Range, so that the
// agent's resumable download works over mutual TLS.
func TestFirmwareRepository(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	root, signer := releasetest.Key(t), releasetest.Key(t)
	kl := &release.KeyList{Version: 1, Expires: time.Now().Add(time.Hour), RootThreshold: 1, Threshold: 1,
		RootKeys:    []release.PublicKey{releasetest.Public(root)},
		SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer), Expires: time.Now().Add(time.Hour)}}}
	if err := st.InstallKeyList(releasetest.Sign(t, release.TypeKeyList, kl, signer)); err == nil {
		t.Error("a key list its root did not sign was installed")
	}
	v1 := releasetest.Sign(t, release.TypeKeyList, kl, root)
	if err := st.InstallKeyList(v1); err != nil {
		t.Fatal(err)
	}
	if err := st.InstallKeyList(v1); err != nil {
		t.Errorf("the same key list again: %v", err)
	}
	kl2 := *kl
	kl2.Version = 2
	v2 := releasetest.Sign(t, release.TypeKeyList, &kl2, root)
	if err := st.InstallKeyList(v2); err != nil {
		t.Fatal(err)
	}
	if err := st.InstallKeyList(v1); err == nil {
		t.Error("an older key list was installed over a newer one")
	}
	payload := make([]byte, 700_000)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	file := filepath.Join(t.TempDir(), "iotagent")
	os.WriteFile(file, payload, 0o600)
	m := release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: "1.5.0", SVN: 2, HW: []string{"linux/armv7"},
		Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}
	manifest := releasetest.Sign(t, release.TypeManifest, m, signer)
	if _, err := st.PublishRelease(file, releasetest.Sign(t, release.TypeManifest, m, root)); err == nil {
		t.Error("a manifest signed by the root, not a signing key, was published")
	}
	bad := m
	bad.Version, bad.Length = "1.5.1", int64(len(payload))+1
	if _, err := st.PublishRelease(file, releasetest.Sign(t, release.TypeManifest, bad, signer)); err == nil || !strings.Contains(err.Error(), "bytes, the manifest says") {
		t.Errorf("a payload shorter than its manifest = %v, want refused", err)
	}
	if _, err := st.PublishRelease(file, manifest); err != nil {
		t.Fatal(err)
	}
	if _, err := st.PublishRelease(file, manifest); err == nil {
		t.Error("the same release was published twice")
	}

	dev := st.Device(t, "gw-fw")
	pool := st.TrustPool()
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{dev.TLS}}}}
	t.Cleanup(c.CloseIdleConnections)
	anon := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	t.Cleanup(anon.CloseIdleConnections)
	get := func(c *http.Client, path string, hdr ...string) (int, http.Header, []byte) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, st.URL+path, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, b
	}
	if code, _, _ := get(anon, "/firmware/keylist"); code != http.StatusForbidden {
		t.Errorf("key list without a device certificate = %d, want 403", code)
	}
	// Every version of the key list, for a device that missed some.
	for path, want := range map[string][]byte{"/firmware/keylist": v2, "/firmware/keylist/1": v1, "/firmware/keylist/2": v2} {
		if code, _, b := get(c, path); code != http.StatusOK || string(b) != string(want) {
			t.Errorf("GET %s = %d, not the key list it names", path, code)
		}
	}
	for _, path := range []string{"/firmware/keylist/3", "/firmware/keylist/01", "/firmware/keylist/..%2fkeylist.json"} {
		if code, _, _ := get(c, path); code != http.StatusNotFound {
			t.Errorf("GET %s = %d, want 404", path, code)
		}
	}
	if code, _, b := get(c, "/firmware/releases/iotagent/1.5.0/manifest"); code != http.StatusOK || string(b) != string(manifest) {
		t.Errorf("manifest = %d", code)
	}
	code, hdr, b := get(c, "/firmware/releases/iotagent/1.5.0/payload", "Range", "bytes=600000-")
	if code != http.StatusPartialContent || hdr.Get("Content-Range") != "bytes 600000-699999/700000" || len(b) != 100_000 {
		t.Errorf("ranged payload = %d %q %d bytes", code, hdr.Get("Content-Range"), len(b))
	}
	for _, p := range []string{"/firmware/releases/iotagent/01.5.0/payload", "/firmware/releases/..%2f..%2fca.key/1.0.0/payload", "/firmware/releases/iotagent/1.5.0/state"} {
		if code, _, _ := get(c, p); code != http.StatusNotFound {
			t.Errorf("GET %s = %d, want 404", p, code)
		}
	}
	// The agent's downloader, over the station's mutual TLS.
	dst := filepath.Join(t.TempDir(), "iotagent.new")
	d := &firmware.Downloader{Client: c}
	if err := d.Fetch(context.Background(), st.URL+"/firmware/releases/iotagent/1.5.0/payload", dst, firmware.Target{Length: m.Length, SHA256: sum[:]}); err != nil {
		t.Fatalf("download: %v", err)
	}
	// A revoked device gets nothing.
	if err := st.Revoke("gw-fw"); err != nil {
		t.Fatal(err)
	}
	c.CloseIdleConnections()
	if code, _, _ := get(c, "/firmware/keylist"); code != http.StatusForbidden {
		t.Errorf("key list for a revoked device = %d, want 403", code)
	}
}
