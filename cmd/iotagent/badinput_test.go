package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
)

// badRig is an fwRig whose station is made to serve bad releases and
// key lists, to one running agent.
type badRig struct {
	*fwRig
	p   *agentProcess
	pid int
	id  string // the device
	// signer signs the releases the current key list trusts.
	signer ed25519.PrivateKey
}

// fwDir is a path in the station's firmware repository (see
// station/firmware.go), written to directly: PublishRelease and
// InstallKeyList refuse what these tests serve.
func (b *badRig) fwDir(elem ...string) string {
	return filepath.Join(append([]string{b.st.Dir, "firmware"}, elem...)...)
}

// manifest is a good manifest of payload as release version.
func (b *badRig) manifest(version string, svn uint32, payload []byte) release.Manifest {
	sum := sha256.Sum256(payload)
	return release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: version, SVN: svn,
		HW: []string{hardwareOf()}, Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}
}

func hardwareOf() string { return "linux/" + buildinfo.Get().Arch() }

// publish stores payload under the signed manifest raw through the
// station's own checks.
func (b *badRig) publish(t *testing.T, payload, raw []byte) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "payload")
	os.WriteFile(f, payload, 0o755)
	if _, err := b.st.PublishRelease(f, raw); err != nil {
		t.Fatalf("PublishRelease: %v", err)
	}
}

// serve puts payload and raw in place as release version, unchecked.
func (b *badRig) serve(t *testing.T, version string, payload, raw []byte) {
	t.Helper()
	dir := b.fwDir("releases", "iotagent", version)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "payload"), payload, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest"), raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

// serveKeyList serves raw as key list version n, unchecked, until t
// ends.
func (b *badRig) serveKeyList(t *testing.T, n uint64, raw []byte) {
	t.Helper()
	p := b.fwDir("keylists", strconv.FormatUint(n, 10))
	if err := os.WriteFile(p, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(p) })
}

func randomPayload(n int) []byte {
	p := make([]byte, n)
	rand.Read(p)
	return p
}

// status is iotagent firmware status --json.
func (b *badRig) status(t *testing.T) agent.FirmwareStatus {
	t.Helper()
	code, out, errs := cli(t, append(b.global, "firmware", "status", "--json")...)
	if code != 0 {
		t.Fatalf("firmware status: %s", errs)
	}
	var s agent.FirmwareStatus
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("firmware status --json: %v: %s", err, out)
	}
	return s
}

// rollout assigns release version to the device, nudges it, and
// returns the device's final step in that rollout.
func (b *badRig) rollout(t *testing.T, version string) station.RolloutDevice {
	t.Helper()
	ro, err := b.st.CreateRollout(station.RolloutRequest{Release: "iotagent@" + version, Devices: []string{b.id}, Waves: []int{100}})
	if err != nil {
		t.Fatalf("CreateRollout %s: %v", version, err)
	}
	// A refusal halts the rollout by itself; one still running (the test
	// failed) would block the next rollout of the release name.
	defer b.st.AbortRollout(ro.ID)
	if code, _, errs := cli(t, append(b.global, "firmware", "check")...); code != 0 {
		t.Fatalf("firmware check: %s", errs)
	}
	return b.waitStep(t, ro.ID, release.Final)
}

// waitStep waits for the device's step in rollout id to satisfy ok.
func (b *badRig) waitStep(t *testing.T, id string, ok func(string) bool) station.RolloutDevice {
	t.Helper()
	var d station.RolloutDevice
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := b.st.Rollouts(id)
		if err != nil {
			t.Fatal(err)
		}
		if d = st[0].DeviceSteps[0]; ok(d.Step) {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("rollout %s: the device's step is still %q (%s) after 30s; the agent's output:\n%s", id, d.Step, d.Reason, b.p.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// installed is what an update would change.
type installed struct {
	Committed, ActiveSlot string
	CommittedSVN          uint32
	Counter               uint64
	KeyList               uint64
	Slots                 map[string]string // slot: the sha256 of its binary
}

func (b *badRig) installed(t *testing.T) installed {
	t.Helper()
	s := b.status(t)
	if s.Trial != nil {
		t.Errorf("state.json holds a trial: %+v", *s.Trial)
	}
	if s.Counter == nil {
		t.Fatalf("firmware status shows no TPM counter: %+v", s)
	}
	in := installed{Committed: s.Committed, ActiveSlot: s.ActiveSlot, CommittedSVN: s.CommittedSVN, Counter: *s.Counter, KeyList: s.KeyList, Slots: map[string]string{}}
	for _, slot := range []string{"a", "b"} {
		if f, err := os.ReadFile(filepath.Join(b.state, "firmware", "slots", slot, "iotagent")); err == nil {
			sum := sha256.Sum256(f)
			in.Slots[slot] = hex.EncodeToString(sum[:8])
		}
	}
	return in
}

// refused has the device refuse release version, served bad by setup:
// the station gets a refusal whose one-line reason holds want, nothing
// is installed, nothing of the release is left in the download
// directory, the agent runs on, and its key list is then version
// keyList.
func (b *badRig) refused(t *testing.T, version, want string, keyList uint64, setup func(t *testing.T)) {
	t.Helper()
	before := b.installed(t)
	setup(t)
	d := b.rollout(t, version)
	if d.Step != release.StepRefused || !strings.Contains(d.Reason, want) || strings.ContainsAny(d.Reason, "\r\n") {
		t.Errorf("the station got %s %q; want refused, one line naming %q", d.Step, d.Reason, want)
	}
	t.Logf("refused: %s", d.Reason)
	select {
	case <-b.p.exited:
		t.Fatalf("the agent exited: %v\n%s", b.p.err, b.p.out)
	default:
	}
	s := b.status(t)
	if s.DaemonPID != b.pid {
		t.Errorf("the agent's pid is %d, want %d", s.DaemonPID, b.pid)
	}
	before.KeyList = keyList
	after := b.installed(t)
	if a, w := jsonText(after), jsonText(before); a != w {
		t.Errorf("after the refusal: %s, want %s", a, w)
	}
	ents, _ := os.ReadDir(filepath.Join(b.state, "firmware", "download"))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "iotagent-"+version) {
			t.Errorf("the download directory holds %s", e.Name())
		}
	}
}

func jsonText(v any) string { b, _ := json.Marshal(v); return string(b) }

// rollOut publishes release version (a real agent binary), rolls it
// out to the device and nudges it; it returns the rollout.
func (b *badRig) rollOut(t *testing.T, version string, svn uint32) string {
	t.Helper()
	bin, err := os.ReadFile(versionBinary(t, version, ""))
	if err != nil {
		t.Fatal(err)
	}
	b.publish(t, bin, releasetest.Sign(t, release.TypeManifest, b.manifest(version, svn, bin), b.signer))
	ro, err := b.st.CreateRollout(station.RolloutRequest{Release: "iotagent@" + version, Devices: []string{b.id}, Waves: []int{100}})
	if err != nil {
		t.Fatal(err)
	}
	if code, _, errs := cli(t, append(b.global, "firmware", "check")...); code != 0 {
		t.Fatalf("firmware check: %s", errs)
	}
	return ro.ID
}

// Each bad input of issue 11 assigned to one running agent through a
// station rollout: refused with a one-line reason the station records,
// nothing installed (no trial in state.json, the slots, committed
// version, svn and TPM counter unchanged, no part file left), the agent
// running on in the same process. Every case reaches the device through
// the station (its files edited where its own checks would refuse to
// store the input); none had to be tested at a lower level.
func TestBadReleasesRefused(t *testing.T) {
	launcher := versionBinary(t, "1.0.0", "")
	// Built now, so that the cases before the trials do not wait on them.
	versionBinary(t, "1.3.0", "")
	versionBinary(t, "1.4.0", "")
	r := newFWRig(t, launcher, "")
	devs, err := r.st.Devices()
	if err != nil || len(devs) != 1 {
		t.Fatalf("Devices = %v, %v; want the one enrolled", devs, err)
	}
	p := startAgent(t, launcher, r.args...)
	b := &badRig{fwRig: r, p: p, pid: p.cmd.Process.Pid, id: devs[0].ID, signer: r.signer}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the agent's output:\n%s", p.out)
		}
	})
	testsync.Until(t, 30*time.Second, "firmware status from the running agent", func() bool { s := b.status(t); return s.DaemonPID == b.pid && s.Running != "" })
	// The cases build on each other; a case failing does not stop the
	// others, an agent that died does.
	run := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) && !b.alive() {
			t.FailNow()
		}
	}

	// The first assignment has the device take key list 1 (signing key
	// r.signer).
	small := randomPayload(4096)
	// A good release whose payload file at the station is then edited.
	edited := func(t *testing.T, version string, edit func([]byte) []byte) {
		b.publish(t, small, releasetest.Sign(t, release.TypeManifest, b.manifest(version, 0, small), b.signer))
		p := b.fwDir("releases", "iotagent", version, "payload")
		f, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, edit(f), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run("tampered payload", func(t *testing.T) {
		b.refused(t, "1.1.0", "SHA-256", 1, func(t *testing.T) {
			edited(t, "1.1.0", func(f []byte) []byte { f[len(f)/2] ^= 0xff; return f })
		})
	})
	run("truncated payload", func(t *testing.T) {
		b.refused(t, "1.1.1", "signed length", 1, func(t *testing.T) {
			edited(t, "1.1.1", func(f []byte) []byte { return f[:len(f)/2] })
		})
	})
	run("overlong payload", func(t *testing.T) {
		b.refused(t, "1.1.2", "signed length", 1, func(t *testing.T) {
			edited(t, "1.1.2", func(f []byte) []byte { return append(f, "and then some"...) })
		})
	})
	run("bad signature", func(t *testing.T) {
		b.refused(t, "1.1.3", "does not verify", 1, func(t *testing.T) {
			// The envelope of a good manifest, its payload changed (the
			// svn raised) under the same signature.
			raw := releasetest.Sign(t, release.TypeManifest, b.manifest("1.1.3", 0, small), b.signer)
			m := b.manifest("1.1.3", 7, small)
			mb, _ := json.Marshal(m)
			var env map[string]any
			if err := json.Unmarshal(raw, &env); err != nil {
				t.Fatal(err)
			}
			env["payload"] = base64.StdEncoding.EncodeToString(mb)
			raw, _ = json.Marshal(env)
			b.serve(t, "1.1.3", small, raw)
		})
	})
	run("wrong hw", func(t *testing.T) {
		b.refused(t, "1.1.4", "not for this hardware", 1, func(t *testing.T) {
			m := b.manifest("1.1.4", 0, small)
			m.HW = []string{"linux/s390x"}
			if hardwareOf() == m.HW[0] {
				m.HW = []string{"linux/arm64"}
			}
			b.publish(t, small, releasetest.Sign(t, release.TypeManifest, m, b.signer))
		})
	})
	run("wrong board", func(t *testing.T) {
		b.refused(t, "1.1.5", "board", 1, func(t *testing.T) {
			m := b.manifest("1.1.5", 0, small)
			m.Board = "other-board"
			b.publish(t, small, releasetest.Sign(t, release.TypeManifest, m, b.signer))
		})
	})
	run("expired manifest", func(t *testing.T) {
		b.refused(t, "1.1.6", "expired", 1, func(t *testing.T) {
			m := b.manifest("1.1.6", 0, small)
			m.Expires = time.Now().Add(-time.Minute)
			b.serve(t, "1.1.6", small, releasetest.Sign(t, release.TypeManifest, m, b.signer))
		})
	})
	run("manifest over the size cap", func(t *testing.T) {
		b.refused(t, "1.1.7", "too large", 1, func(t *testing.T) {
			// Validly signed: white space in the envelope, which the
			// signature does not cover, brings it over the cap, so that
			// the cap alone refuses it.
			raw := releasetest.Sign(t, release.TypeManifest, b.manifest("1.1.7", 0, small), b.signer)
			raw = append(append(raw[:len(raw)-1:len(raw)-1], bytes.Repeat([]byte(" "), release.MaxManifestSize)...), '}')
			b.serve(t, "1.1.7", small, raw)
		})
	})
	run("disk too small", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("mounting a small tmpfs for the download directory needs root")
		}
		// The download directory (where the payload lands and free space
		// is checked) on a 1 MiB tmpfs: a 512 KiB payload plus the 1 MiB
		// margin does not fit. Only for this case, as the trials below
		// download whole agent binaries.
		dl := filepath.Join(b.state, "firmware", "download")
		if err := os.MkdirAll(dl, 0o700); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", dl).CombinedOutput(); err != nil {
			t.Fatalf("mounting a small tmpfs on %s: %v\n%s", dl, err, out)
		}
		defer func() {
			if out, err := exec.Command("umount", dl).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v\n%s", dl, err, out)
			}
		}()
		b.refused(t, "1.1.8", "free space", 1, func(t *testing.T) {
			big := randomPayload(512 << 10)
			b.publish(t, big, releasetest.Sign(t, release.TypeManifest, b.manifest("1.1.8", 0, big), b.signer))
		})
	})

	// Key list 2 revokes the first signing key and lists one that has
	// expired.
	root, signer2, expired := r.root, releasetest.Key(t), releasetest.Key(t)
	exp := time.Now().Add(24 * time.Hour)
	kl2 := &release.KeyList{Version: 2, Expires: exp, RootKeys: []release.PublicKey{releasetest.Public(root)}, RootThreshold: 1, Threshold: 1,
		SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer2), Expires: exp}, {Key: releasetest.Public(expired), Expires: time.Now().Add(-time.Hour)}}}
	if err := r.st.InstallKeyList(releasetest.Sign(t, release.TypeKeyList, kl2, root)); err != nil {
		t.Fatal(err)
	}
	revoked := b.signer
	b.signer = signer2
	run("signature by a revoked signing key", func(t *testing.T) {
		// The device walks to key list 2 first, then finds the manifest
		// signed by a key it no longer lists.
		b.refused(t, "1.2.0", "revoked", 2, func(t *testing.T) {
			b.serve(t, "1.2.0", small, releasetest.Sign(t, release.TypeManifest, b.manifest("1.2.0", 0, small), revoked))
		})
	})
	run("signature by an expired signing key", func(t *testing.T) {
		b.refused(t, "1.2.1", "that expired at", 2, func(t *testing.T) {
			b.serve(t, "1.2.1", small, releasetest.Sign(t, release.TypeManifest, b.manifest("1.2.1", 0, small), expired))
		})
	})
	good := func(t *testing.T, version string) {
		b.publish(t, small, releasetest.Sign(t, release.TypeManifest, b.manifest(version, 0, small), b.signer))
	}
	run("key list version going down", func(t *testing.T) {
		// The device only ever asks for the version after its own
		// (/firmware/keylist/3), so a station cannot hand it an older
		// list as "the current one"; what it can do is serve an older
		// list there. One signed by roots rotated away fails on its
		// signature (the non-root case below); the replay that gets
		// past the signature check is an older list the current root
		// signed: version 1, exactly as served before.
		b.refused(t, "1.2.2", "goes down", 2, func(t *testing.T) {
			v1, err := os.ReadFile(r.keyList)
			if err != nil {
				t.Fatal(err)
			}
			b.serveKeyList(t, 3, v1)
			good(t, "1.2.2")
		})
	})
	root2 := releasetest.Key(t)
	kl3 := &release.KeyList{Version: 3, Expires: exp, RootKeys: []release.PublicKey{releasetest.Public(root), releasetest.Public(root2)}, RootThreshold: 2, Threshold: 1,
		SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer2), Expires: exp}}}
	run("key list signed by a non-root key", func(t *testing.T) {
		b.refused(t, "1.2.3", "not a root key", 2, func(t *testing.T) {
			b.serveKeyList(t, 3, releasetest.Sign(t, release.TypeKeyList, kl3, signer2, root2))
			good(t, "1.2.3")
		})
	})

	// Key list 3 (from the station) needs two root signatures for the
	// next; the device takes it on the way to version 4, signed by one.
	if err := r.st.InstallKeyList(releasetest.Sign(t, release.TypeKeyList, kl3, root, root2)); err != nil {
		t.Fatal(err)
	}
	run("key list below the root threshold", func(t *testing.T) {
		b.refused(t, "1.2.4", "2 needed", 3, func(t *testing.T) {
			kl4 := *kl3
			kl4.Version = 4
			b.serveKeyList(t, 4, releasetest.Sign(t, release.TypeKeyList, &kl4, root))
			good(t, "1.2.4")
		})
	})

	// 1.3.0 runs on trial and, unable to deliver (the broker is down), is
	// rolled back by the operator: marked bad.
	run("rolled-back trial", func(t *testing.T) {
		r.br.Stop()
		defer r.br.Restart()
		id := b.rollOut(t, "1.3.0", 1)
		testsync.Until(t, 30*time.Second, "1.3.0 on trial", func() bool {
			s := b.status(t)
			return s.Running == "1.3.0" && s.Trial != nil && s.DaemonPID == b.pid
		})
		if code, out, errs := cli(t, append(b.global, "firmware", "rollback")...); code != 0 || !strings.Contains(out, "marked bad") {
			t.Fatalf("firmware rollback: %d %s %s", code, out, errs)
		}
		if d := b.waitStep(t, id, release.Final); d.Step != release.StepRolledBack {
			t.Fatalf("the station got %s %q; want rolled-back", d.Step, d.Reason)
		}
		testsync.Until(t, 30*time.Second, "1.0.0 running again", func() bool {
			s := b.status(t)
			return s.Running == "1.0.0" && s.DaemonPID == b.pid && len(s.Bad) == 1
		})
	})
	run("release marked bad", func(t *testing.T) {
		b.refused(t, "1.3.0", "marked bad", 3, func(*testing.T) {})
	})

	// 1.4.0 with svn 2 is healthy on trial and commits: the counter is 2.
	run("committed trial", func(t *testing.T) {
		id := b.rollOut(t, "1.4.0", 2)
		if d := b.waitStep(t, id, release.Final); d.Step != release.StepCommitted {
			t.Fatalf("the station got %s %q; want committed", d.Step, d.Reason)
		}
		testsync.Until(t, 30*time.Second, "1.4.0 committed, the counter at 2", func() bool {
			s := b.status(t)
			return s.Committed == "1.4.0" && s.Running == "1.4.0" && s.Trial == nil && s.Counter != nil && *s.Counter == 2 && s.DaemonPID == b.pid
		})
	})
	run("svn below the TPM counter", func(t *testing.T) {
		b.refused(t, "1.5.0", "below the TPM counter", 3, func(t *testing.T) {
			b.publish(t, small, releasetest.Sign(t, release.TypeManifest, b.manifest("1.5.0", 1, small), b.signer))
		})
	})
	run("downgrade", func(t *testing.T) {
		b.refused(t, "1.3.9", "not above the committed version", 3, func(t *testing.T) {
			b.publish(t, small, releasetest.Sign(t, release.TypeManifest, b.manifest("1.3.9", 2, small), b.signer))
		})
	})
	if s := b.status(t); s.Running != "1.4.0" || s.DaemonPID != b.pid {
		t.Errorf("at the end: %+v; want 1.4.0 running in pid %d", s, b.pid)
	}
	stopAgent(t, p)
}

// alive reports whether the agent process still runs.
func (b *badRig) alive() bool {
	select {
	case <-b.p.exited:
		return false
	default:
		return true
	}
}
