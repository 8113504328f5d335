package release_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
)

var now = time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)

// keyList is a key list of version v with root keys roots (threshold
// 1) and signing keys signers (threshold 1), valid for a day.
func keyList(v uint64, roots []ed25519.PrivateKey, signers ...ed25519.PrivateKey) *release.KeyList {
	l := &release.KeyList{Version: v, Expires: now.Add(24 * time.Hour), RootThreshold: 1, Threshold: 1}
	for _, r := range roots {
		l.RootKeys = append(l.RootKeys, releasetest.Public(r))
	}
	for _, s := range signers {
		l.SigningKeys = append(l.SigningKeys, release.SigningKey{Key: releasetest.Public(s), Expires: now.Add(24 * time.Hour)})
	}
	return l
}

func manifest() *release.Manifest {
	return &release.Manifest{
		Name: "iotagent", Type: release.TypeAgent, Version: "1.2.0", SVN: 3,
		HW: []string{"linux/armv7", "linux/arm64"}, Length: 1 << 20,
		SHA256: strings.Repeat("ab", 32), Expires: now.Add(time.Hour),
	}
}

func trust(t testing.TB, roots ...ed25519.PrivateKey) *release.Trust {
	t.Helper()
	var pubs []ed25519.PublicKey
	for _, r := range roots {
		pubs = append(pubs, r.Public().(ed25519.PublicKey))
	}
	tr, err := release.NewTrust(pubs, 1)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

func TestReleaseAccepted(t *testing.T) {
	root, signer := releasetest.Key(t), releasetest.Key(t)
	tr := trust(t, root)
	if _, err := tr.Manifest(releasetest.Sign(t, release.TypeManifest, manifest(), signer), now); !errors.Is(err, release.ErrNoKeyList) {
		t.Errorf("a manifest before any key list = %v, want ErrNoKeyList", err)
	}
	if _, err := tr.Update(releasetest.Sign(t, release.TypeKeyList, keyList(1, []ed25519.PrivateKey{root}, signer), root)); err != nil {
		t.Fatalf("key list: %v", err)
	}
	m, err := tr.Manifest(releasetest.Sign(t, release.TypeManifest, manifest(), signer), now)
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	if m.SemVer().String() != "1.2.0" || m.SVN != 3 || len(m.Digest()) != 32 {
		t.Errorf("manifest = %+v", m)
	}
	if err := m.Compatible("linux/armv7", ""); err != nil {
		t.Error(err)
	}
	if err := m.Compatible("linux/amd64", ""); !errors.Is(err, release.ErrIncompatible) {
		t.Errorf("Compatible(linux/amd64) = %v, want ErrIncompatible", err)
	}
	withBoard := manifest()
	withBoard.Board = "gw-rev-c"
	mb, err := tr.Manifest(releasetest.Sign(t, release.TypeManifest, withBoard, signer), now)
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Compatible("linux/armv7", "gw-rev-b"); !errors.Is(err, release.ErrIncompatible) {
		t.Errorf("Compatible(other board) = %v, want ErrIncompatible", err)
	}
}

// Every way a key list must be refused, each with its reason.
func TestKeyListRefused(t *testing.T) {
	root, root2, other, signer := releasetest.Key(t), releasetest.Key(t), releasetest.Key(t), releasetest.Key(t)
	v1 := releasetest.Sign(t, release.TypeKeyList, keyList(1, []ed25519.PrivateKey{root}, signer), root)
	fresh := func() *release.Trust {
		tr := trust(t, root)
		if _, err := tr.Update(v1); err != nil {
			t.Fatal(err)
		}
		return tr
	}
	two := keyList(2, []ed25519.PrivateKey{root, root2}, signer)
	two.RootThreshold = 2
	for _, tc := range []struct {
		name string
		raw  []byte
		want error
		text string
	}{
		{"signed by a key that is not a root", releasetest.Sign(t, release.TypeKeyList, keyList(2, []ed25519.PrivateKey{root}, signer), other), release.ErrSignature, "0 valid signatures by trusted keys, 1 needed (key " + release.KeyID(other.Public().(ed25519.PublicKey))[:16] + ": not a root key of key list version 1)"},
		{"signed by a signing key", releasetest.Sign(t, release.TypeKeyList, keyList(2, []ed25519.PrivateKey{root}, signer), signer), release.ErrSignature, "a signing key of key list version 1, not a root key"},
		{"version down", releasetest.Sign(t, release.TypeKeyList, keyList(0, []ed25519.PrivateKey{root}, signer), root), release.ErrRollback, "version 0, the current one is 1"},
		{"same version, other contents", releasetest.Sign(t, release.TypeKeyList, keyList(1, []ed25519.PrivateKey{root}, signer, other), root), release.ErrRollback, "other contents"},
		{"a missing root key", func() []byte {
			b, _ := json.Marshal(keyList(2, []ed25519.PrivateKey{root}, signer))
			b = bytes.Replace(b, []byte(`"root_keys":[`), []byte(`"root_keys":[null,`), 1)
			env, _ := release.Sign(release.TypeKeyList, b, root)
			return env
		}(), nil, "a root key of 0 bytes"},
		{"an upper-case key (another parser would read it otherwise)", func() []byte {
			b, _ := json.Marshal(keyList(2, []ed25519.PrivateKey{root}, signer))
			b = bytes.Replace(b, []byte(`"threshold":1`), []byte(`"threshold":1,"Threshold":1`), 1)
			env, _ := release.Sign(release.TypeKeyList, b, root)
			return env
		}(), nil, "key"},
		{"new roots that did not sign", releasetest.Sign(t, release.TypeKeyList, keyList(2, []ed25519.PrivateKey{root2}, signer), root), release.ErrSignature, "its own root keys"},
		{"below its own root threshold", releasetest.Sign(t, release.TypeKeyList, two, root), release.ErrSignature, "1 valid signatures by trusted keys, 2 needed"},
		{"a manifest offered as a key list", releasetest.Sign(t, release.TypeManifest, keyList(2, []ed25519.PrivateKey{root}, signer), root), nil, "where a"},
		{"unknown field", func() []byte {
			b, _ := json.Marshal(keyList(2, []ed25519.PrivateKey{root}, signer))
			b = bytes.Replace(b, []byte(`{`), []byte(`{"trust_everyone":true,`), 1)
			env, _ := release.Sign(release.TypeKeyList, b, root)
			return env
		}(), nil, "unknown field"},
		{"oversize", bytes.Repeat([]byte(" "), release.MaxKeyListSize+1), release.ErrTooLarge, ""},
		{"threshold above its keys", releasetest.Sign(t, release.TypeKeyList, func() *release.KeyList {
			l := keyList(2, []ed25519.PrivateKey{root}, signer)
			l.Threshold = 2
			return l
		}(), root), nil, "threshold 2 with 1 signing keys"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := fresh()
			_, err := tr.Update(tc.raw)
			if err == nil || tc.want != nil && !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("Update = %v, want %v containing %q", err, tc.want, tc.text)
			}
			if tr.KeyList().Version != 1 {
				t.Errorf("the refused list replaced the current one")
			}
		})
	}
	// The same list again is no change.
	tr := fresh()
	if _, err := tr.Update(v1); err != nil {
		t.Errorf("the current key list again = %v, want accepted", err)
	}
	// With a root threshold of 2, both roots sign.
	ok := releasetest.Sign(t, release.TypeKeyList, two, root, root2)
	if _, err := tr.Update(ok); err != nil {
		t.Fatalf("v2 signed by both roots: %v", err)
	}
	if _, err := tr.Update(releasetest.Sign(t, release.TypeKeyList, keyList(3, []ed25519.PrivateKey{root, root2}, signer), root)); !errors.Is(err, release.ErrSignature) {
		t.Errorf("v3 with one of v2's two required root signatures = %v, want ErrSignature", err)
	}
}

// Root rotation: the old roots hand over to new ones, which then sign
// alone; the retired root can no longer sign a key list.
func TestRootRotation(t *testing.T) {
	r1, r2, signer := releasetest.Key(t), releasetest.Key(t), releasetest.Key(t)
	tr := trust(t, r1)
	steps := [][]byte{
		releasetest.Sign(t, release.TypeKeyList, keyList(1, []ed25519.PrivateKey{r1}, signer), r1),
		releasetest.Sign(t, release.TypeKeyList, keyList(2, []ed25519.PrivateKey{r2}, signer), r1, r2),
		releasetest.Sign(t, release.TypeKeyList, keyList(3, []ed25519.PrivateKey{r2}, signer), r2),
	}
	for i, raw := range steps {
		if _, err := tr.Update(raw); err != nil {
			t.Fatalf("step %d: %v", i+1, err)
		}
	}
	if _, err := tr.Update(releasetest.Sign(t, release.TypeKeyList, keyList(4, []ed25519.PrivateKey{r1}, signer), r1)); !errors.Is(err, release.ErrSignature) {
		t.Errorf("a key list from the retired root = %v, want ErrSignature", err)
	}
	// A device that missed the rotation walks the chain, though the
	// intermediate list expired meanwhile (TUF checks only the last).
	expired := keyList(2, []ed25519.PrivateKey{r2}, signer)
	expired.Expires = now.Add(-time.Hour)
	late := trust(t, r1)
	for i, raw := range [][]byte{steps[0], releasetest.Sign(t, release.TypeKeyList, expired, r1, r2), steps[2]} {
		if _, err := late.Update(raw); err != nil {
			t.Fatalf("catching up, step %d: %v", i+1, err)
		}
	}
	if _, err := late.Manifest(releasetest.Sign(t, release.TypeManifest, manifest(), signer), now); err != nil {
		t.Errorf("a manifest after catching up: %v", err)
	}
	// Restored after a restart, the rotated list is trusted as kept, even
	// expired, and holds the version floor.
	later := now.Add(48 * time.Hour)
	back := trust(t, r1)
	if _, err := back.Restore(tr.Raw()); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if _, err := back.Update(steps[1]); !errors.Is(err, release.ErrRollback) && !errors.Is(err, release.ErrSignature) {
		t.Errorf("an older key list after Restore = %v, want refused", err)
	}
	if _, err := back.Manifest(releasetest.Sign(t, release.TypeManifest, manifest(), signer), later); !errors.Is(err, release.ErrExpired) {
		t.Errorf("a manifest under an expired key list = %v, want ErrExpired", err)
	}
	// Restore still wants the list's own root signatures.
	forged := releasetest.Sign(t, release.TypeKeyList, keyList(9, []ed25519.PrivateKey{r2}, signer), releasetest.Key(t))
	if _, err := trust(t, r1).Restore(forged); !errors.Is(err, release.ErrSignature) {
		t.Errorf("Restore of a list its roots did not sign = %v, want ErrSignature", err)
	}
}

// Every way a manifest must be refused.
func TestManifestRefused(t *testing.T) {
	root, signer, revoked, stale := releasetest.Key(t), releasetest.Key(t), releasetest.Key(t), releasetest.Key(t)
	l := keyList(1, []ed25519.PrivateKey{root}, signer, stale)
	l.SigningKeys[1].Expires = now.Add(-time.Minute)
	tr := trust(t, root)
	if _, err := tr.Update(releasetest.Sign(t, release.TypeKeyList, l, root)); err != nil {
		t.Fatal(err)
	}
	with := func(f func(*release.Manifest)) *release.Manifest {
		m := manifest()
		f(m)
		return m
	}
	good := releasetest.Sign(t, release.TypeManifest, manifest(), signer)
	for _, tc := range []struct {
		name string
		raw  []byte
		want error
		text string
	}{
		{"tampered payload", func() []byte {
			var env map[string]any
			json.Unmarshal(good, &env)
			p, _ := base64.StdEncoding.DecodeString(env["payload"].(string))
			p = bytes.Replace(p, []byte(`"svn":3`), []byte(`"svn":9`), 1)
			env["payload"] = base64.StdEncoding.EncodeToString(p)
			b, _ := json.Marshal(env)
			return b
		}(), release.ErrSignature, "the signature does not verify"},
		{"signed by a key not in the list (revoked)", releasetest.Sign(t, release.TypeManifest, manifest(), revoked), release.ErrSignature, "not a signing key of key list version 1"},
		{"signed by an expired signing key", releasetest.Sign(t, release.TypeManifest, manifest(), stale), release.ErrSignature, "that expired at"},
		{"signed by the root", releasetest.Sign(t, release.TypeManifest, manifest(), root), release.ErrSignature, "signs key lists, not releases"},
		{"a key list offered as a manifest", releasetest.Sign(t, release.TypeKeyList, manifest(), signer), nil, "where a"},
		{"expired", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.Expires = now }), signer), release.ErrExpired, "expired"},
		{"unknown field", func() []byte {
			b, _ := json.Marshal(manifest())
			b = bytes.Replace(b, []byte(`{`), []byte(`{"postinstall":"rm -rf /",`), 1)
			env, _ := release.Sign(release.TypeManifest, b, signer)
			return env
		}(), nil, "unknown field"},
		{"oversize", bytes.Repeat([]byte(" "), release.MaxManifestSize+1), release.ErrTooLarge, ""},
		{"bad sha256", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.SHA256 = "AB" }), signer), nil, "sha256"},
		{"bad version", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.Version = "v1.2" }), signer), nil, "MAJOR.MINOR.PATCH"},
		{"bad hw", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.HW = []string{"armv7"} }), signer), nil, "OS/ARCH"},
		{"bad type", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.Type = "script" }), signer), nil, "type"},
		{"length over the cap", releasetest.Sign(t, release.TypeManifest, with(func(m *release.Manifest) { m.Length = release.MaxLength + 1 }), signer), nil, "length"},
		{"data after the JSON", func() []byte {
			b, _ := json.Marshal(manifest())
			env, _ := release.Sign(release.TypeManifest, append(b, []byte(`{}`)...), signer)
			return env
		}(), nil, "after the JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tr.Manifest(tc.raw, now)
			if err == nil || tc.want != nil && !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("Manifest = %v, want %v containing %q", err, tc.want, tc.text)
			}
		})
	}
	if _, err := tr.Manifest(good, now); err != nil {
		t.Errorf("the good manifest: %v", err)
	}
}

func TestVersionOrder(t *testing.T) {
	// semver.org 2.0.0 §11's example, in order.
	order := []string{"1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"}
	for i := range order {
		for j := range order {
			a, err := release.ParseVersion(order[i])
			if err != nil {
				t.Fatal(err)
			}
			b, _ := release.ParseVersion(order[j])
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got := a.Compare(b); got != want {
				t.Errorf("%s vs %s = %d, want %d", order[i], order[j], got, want)
			}
		}
	}
	big, _ := release.ParseVersion("1.0.0-99999999999999999999")
	bigger, _ := release.ParseVersion("1.0.0-100000000000000000000")
	if big.Compare(bigger) != -1 {
		t.Error("numeric pre-release identifiers past uint64 compare as strings")
	}
	a, _ := release.ParseVersion("1.0.0+build.1")
	b, _ := release.ParseVersion("1.0.0+build.2")
	if a.Compare(b) != 0 || a.String() != "1.0.0+build.1" {
		t.Error("build metadata counts in comparisons")
	}
	for _, bad := range []string{"", "1", "1.2", "v1.2.3", "01.2.3", "1.2.3-", "1.2.3-01", "1.2.3-a..b", "1.2.3+", "1.2.3-a_b", "1.2.3.4", strings.Repeat("1", 200) + ".0.0"} {
		if _, err := release.ParseVersion(bad); err == nil {
			t.Errorf("ParseVersion(%q) accepted", bad)
		}
	}
}

// FuzzManifest: whatever the bytes, opening a manifest neither panics
// nor accepts what its key did not sign.
func FuzzManifest(f *testing.F) {
	root, signer := releasetest.Key(f), releasetest.Key(f)
	tr := trust(f, root)
	if _, err := tr.Update(releasetest.Sign(f, release.TypeKeyList, keyList(1, []ed25519.PrivateKey{root}, signer), root)); err != nil {
		f.Fatal(err)
	}
	good := releasetest.Sign(f, release.TypeManifest, manifest(), signer)
	f.Add(good)
	f.Add([]byte(`{"payloadType":"x","payload":"","signatures":[]}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		m, err := tr.Manifest(raw, now)
		if err == nil && !bytes.Equal(raw, good) {
			// Another encoding of the same signed payload may pass (the
			// envelope's JSON is not signed), but never other contents.
			if m.Name != "iotagent" || m.SVN != 3 || m.Version != "1.2.0" {
				t.Fatalf("accepted a manifest the key did not sign: %+v", m)
			}
		}
	})
}

func TestRolloutMessages(t *testing.T) {
	good := `{"rollout":"r1","name":"iotagent","version":"1.2.0","step":"rolled-back","reason":"3 starts without becoming healthy","running":"1.1.0","at":"2026-12-06T00:00:00Z"}`
	if r, err := release.ParseReport([]byte(good)); err != nil || r.Step != release.StepRolledBack || !release.Failed(r.Step) {
		t.Fatalf("ParseReport(good) = %+v, %v", r, err)
	}
	for name, bad := range map[string]string{
		"unknown step":   `{"name":"iotagent","version":"1.2.0","step":"exploded"}`,
		"unknown field":  `{"name":"iotagent","version":"1.2.0","step":"trial","extra":1}`,
		"two lines":      `{"name":"iotagent","version":"1.2.0","step":"refused","reason":"a\nb"}`,
		"bad version":    `{"name":"iotagent","version":"one","step":"trial"}`,
		"bad name":       `{"name":"../x","version":"1.0.0","step":"trial"}`,
		"upper-case key": `{"Name":"iotagent","version":"1.0.0","step":"trial"}`,
		"repeated key":   `{"name":"iotagent","version":"1.0.0","step":"trial","step":"committed"}`,
		"trailing":       `{"name":"iotagent","version":"1.0.0","step":"trial"} {}`,
		"long reason":    `{"name":"iotagent","version":"1.0.0","step":"refused","reason":"` + strings.Repeat("x", release.MaxReasonLen+1) + `"}`,
		"over the cap":   `{"name":"iotagent","version":"1.0.0","step":"trial","running":"` + strings.Repeat(" ", release.MaxReportSize) + `"}`,
		"bad rollout ID": `{"rollout":"a b","name":"iotagent","version":"1.0.0","step":"trial"}`,
	} {
		if _, err := release.ParseReport([]byte(bad)); err == nil {
			t.Errorf("%s: ParseReport accepted %.80s", name, bad)
		}
	}
	if c, err := release.ParseCheck([]byte(`{"agent":{"name":"iotagent","version":"1.0.0"},"images":[{"name":"rootfs","version":"7.0.0"}]}`)); err != nil || c.Images[0].Name != "rootfs" {
		t.Errorf("ParseCheck = %+v, %v", c, err)
	}
	if _, err := release.ParseCheck([]byte(`{"agent":{"name":"","version":"1.0.0"}}`)); err == nil {
		t.Error("ParseCheck accepted an empty agent name")
	}
	if a, err := release.ParseAssignment([]byte(`{"rollout":"r1","name":"iotagent","version":"1.2.0"}`)); err != nil || a.Version != "1.2.0" {
		t.Errorf("ParseAssignment = %+v, %v", a, err)
	}
	if _, err := release.ParseAssignment([]byte(`{"rollout":"r1","name":"iotagent"}`)); err == nil {
		t.Error("ParseAssignment accepted no version")
	}
}

// A device's text reaches an operator's terminal: control characters
// are refused; a long reason is cut at a character boundary and stays
// within the cap (a cut in the middle of one made JSON replace it, and
// the station refused the report for good).
func TestReportTextIsPrintable(t *testing.T) {
	for name, bad := range map[string]string{
		"escape in reason":  `{"name":"iotagent","version":"1.0.0","step":"refused","reason":"\u001b]0;pwned\u0007"}`,
		"escape in running": `{"name":"iotagent","version":"1.0.0","step":"trial","running":"1.0\u001b[2J"}`,
		"C1 control (CSI)":  `{"name":"iotagent","version":"1.0.0","step":"refused","reason":"\u009b2J"}`,
	} {
		if _, err := release.ParseReport([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := release.ParseCheck([]byte(`{"agent":{"name":"iotagent","version":"1.0\u001b[2J"}}`)); err == nil {
		t.Error("a check with an escape in its version was accepted")
	}
	long := strings.Repeat("é", release.MaxReasonLen) + "\nsecond line\x1b"
	r := release.CleanReason(long)
	if len(r) > release.MaxReasonLen || !utf8.ValidString(r) || strings.ContainsAny(r, "\n\x1b") {
		t.Fatalf("CleanReason gave %d bytes, valid UTF-8 %v", len(r), utf8.ValidString(r))
	}
	b, _ := json.Marshal(release.Report{Name: "iotagent", Version: "1.0.0", Step: release.StepRefused, Reason: r})
	if _, err := release.ParseReport(b); err != nil {
		t.Errorf("a report with a cleaned long reason is refused: %v", err)
	}
}
