package firmware_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// A device given only the first root key catches up with two rotations
// from the station, keeps the result across a restart, and takes a
// release published under the latest list: the manifest, the payload
// over mutual TLS with Range, the policy, the slot.
func TestClientCatchesUpAndTakesARelease(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	r1, r2, signer := releasetest.Key(t), releasetest.Key(t), releasetest.Key(t)
	exp := time.Now().Add(time.Hour)
	list := func(v uint64, roots ...ed25519.PrivateKey) *release.KeyList {
		l := &release.KeyList{Version: v, Expires: exp, RootThreshold: 1, Threshold: 1,
			SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer), Expires: exp}}}
		for _, r := range roots {
			l.RootKeys = append(l.RootKeys, releasetest.Public(r))
		}
		return l
	}
	for _, raw := range [][]byte{
		releasetest.Sign(t, release.TypeKeyList, list(1, r1), r1),
		releasetest.Sign(t, release.TypeKeyList, list(2, r2), r1, r2),
		releasetest.Sign(t, release.TypeKeyList, list(3, r2), r2),
	} {
		if err := st.InstallKeyList(raw); err != nil {
			t.Fatal(err)
		}
	}
	payload := make([]byte, 300_000)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	file := filepath.Join(t.TempDir(), "iotagent")
	os.WriteFile(file, payload, 0o600)
	if _, err := st.PublishRelease(file, releasetest.Sign(t, release.TypeManifest, release.Manifest{Name: "iotagent", Type: release.TypeAgent,
		Version: "1.1.0", SVN: 1, HW: []string{"linux/armv7"}, Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: exp}, signer)); err != nil {
		t.Fatal(err)
	}

	dev := st.Device(t, "gw-update")
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: st.TrustPool(), Certificates: []tls.Certificate{dev.TLS}}}}
	t.Cleanup(hc.CloseIdleConnections)
	state := t.TempDir()
	client := func() *firmware.Client {
		tr, err := release.NewTrust([]ed25519.PublicKey{r1.Public().(ed25519.PublicKey)}, 1)
		if err != nil {
			t.Fatal(err)
		}
		c := &firmware.Client{HTTP: hc, Station: st.URL, Trust: tr, KeyListFile: filepath.Join(state, "keylist.json")}
		if err := c.Restore(); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := client()
	l, err := c.UpdateKeyList(context.Background())
	if err != nil || l.Version != 3 {
		t.Fatalf("UpdateKeyList = %v, %v; want version 3", l, err)
	}
	// After a restart: the kept list, no walk needed.
	c = client()
	if l := c.Trust.KeyList(); l == nil || l.Version != 3 {
		t.Fatalf("the kept key list after a restart = %+v", l)
	}
	if l, err := c.UpdateKeyList(context.Background()); err != nil || l.Version != 3 {
		t.Errorf("UpdateKeyList again = %v, %v", l, err)
	}
	m, _, err := c.Manifest(context.Background(), "iotagent", "1.1.0", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Manifest(context.Background(), "iotagent", "9.9.9", time.Now()); err == nil {
		t.Error("a manifest that does not exist was opened")
	}
	v, _ := release.ParseVersion("1.0.0")
	if err := firmware.Accept(m, firmware.Device{Committed: v, Counter: 1, HW: "linux/armv7"}); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "iotagent.new")
	d := &firmware.Downloader{Client: hc}
	if err := d.Fetch(context.Background(), c.PayloadURL(m), dst, firmware.Target{Length: m.Length, SHA256: m.Digest()}); err != nil {
		t.Fatal(err)
	}
	slots, err := firmware.OpenSlots(filepath.Join(state, "fw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := slots.Stage(dst, m); err != nil {
		t.Fatal(err)
	}
	if p, trial, err := slots.Next(); err != nil || !trial || filepath.Base(p) != "iotagent" {
		t.Fatalf("Next = %q %v %v", p, trial, err)
	}
}

// A walk that meets a refused key list keeps the ones it accepted
// before: after a restart the device trusts them, as it did in memory.
func TestClientKeepsKeyListsBeforeARefusedOne(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	root, signer := releasetest.Key(t), releasetest.Key(t)
	exp := time.Now().Add(time.Hour)
	list := func(v uint64) *release.KeyList {
		return &release.KeyList{Version: v, Expires: exp, RootKeys: []release.PublicKey{releasetest.Public(root)}, RootThreshold: 1, Threshold: 1,
			SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer), Expires: exp}}}
	}
	for v := uint64(1); v <= 2; v++ {
		if err := st.InstallKeyList(releasetest.Sign(t, release.TypeKeyList, list(v), root)); err != nil {
			t.Fatal(err)
		}
	}
	// Version 3 signed by the signing key, not the root: served as a
	// station that was tampered with would (InstallKeyList refuses it).
	if err := os.WriteFile(filepath.Join(st.Dir, "firmware", "keylists", "3"), releasetest.Sign(t, release.TypeKeyList, list(3), signer), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := st.Device(t, "gw-walk")
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: st.TrustPool(), Certificates: []tls.Certificate{dev.TLS}}}}
	t.Cleanup(hc.CloseIdleConnections)
	file := filepath.Join(t.TempDir(), "keylist.json")
	client := func() *firmware.Client {
		tr, err := release.NewTrust([]ed25519.PublicKey{root.Public().(ed25519.PublicKey)}, 1)
		if err != nil {
			t.Fatal(err)
		}
		c := &firmware.Client{HTTP: hc, Station: st.URL, Trust: tr, KeyListFile: file}
		if err := c.Restore(); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := client()
	if _, err := c.UpdateKeyList(context.Background()); !errors.Is(err, release.ErrSignature) {
		t.Fatalf("UpdateKeyList = %v, want the refusal of version 3 (ErrSignature)", err)
	}
	if l := c.Trust.KeyList(); l == nil || l.Version != 2 {
		t.Fatalf("trusted after the walk: %+v, want version 2", l)
	}
	if l := client().Trust.KeyList(); l == nil || l.Version != 2 {
		t.Errorf("kept after the walk: %+v, want version 2", l)
	}
}
