package firmware_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
)

// fakeSystem is an A/B system image installer in shell scripts, the
// shape of RAUC with a bootloader: slot.A and slot.B hold the image
// versions, booted and primary name slots, state.X is good or bad. The
// test is the bootloader: reboot starts the primary slot unless it is
// bad, and changes the boot id.
type fakeSystem struct {
	t      *testing.T
	dir    string
	script string
	boot   int
	// crash, when set, is given to every Images opened.
	crash func(string) error
}

const fakeInstaller = `#!/bin/sh
S='DIR'
echo "$*" >> "$S/calls"
booted=$(cat "$S/booted")
other=A
if [ "$booted" = A ]; then other=B; fi
case "$1" in
install)
	if [ $# -ne 2 ]; then echo "want one file argument, got $(($# - 1))" >&2; exit 2; fi
	if [ -e "$S/fail" ]; then
		echo "Checking bundle"
		echo "signature verification failed: bad signature" >&2
		exit 1
	fi
	cat "$2" > "$S/slot.$other"
	echo good > "$S/state.$other"
	echo "$other" > "$S/primary" ;;
mark-good) echo good > "$S/state.$booted" ;;
mark-bad)
	echo bad > "$S/state.$booted"
	if [ "$(cat "$S/primary")" = "$booted" ]; then echo "$other" > "$S/primary"; fi ;;
reboot) ;;
version) cat "$S/slot.$booted" ;;
*) exit 2 ;;
esac
`

func newFakeSystem(t *testing.T) *fakeSystem {
	t.Helper()
	f := &fakeSystem{t: t, dir: t.TempDir()}
	f.script = filepath.Join(f.dir, "installer")
	if err := os.WriteFile(f.script, []byte(strings.ReplaceAll(fakeInstaller, "DIR", f.dir)), 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{"slot.A": "1.0.0", "slot.B": "", "booted": "A", "primary": "A", "state.A": "good", "state.B": "good", "calls": ""} {
		f.set(k, v)
	}
	return f
}

func (f *fakeSystem) set(name, v string) {
	if err := os.WriteFile(filepath.Join(f.dir, name), []byte(v+"\n"), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeSystem) get(name string) string {
	return strings.TrimSpace(read(f.t, filepath.Join(f.dir, name)))
}

// running is the version in the booted slot.
func (f *fakeSystem) running() string { return f.get("slot." + f.get("booted")) }

func (f *fakeSystem) calls() []string {
	return strings.Split(strings.TrimSpace(f.get("calls")), "\n")
}

// reboot is the bootloader: the primary slot, unless it is bad.
func (f *fakeSystem) reboot() {
	next := f.get("primary")
	if f.get("state."+next) == "bad" {
		next = map[string]string{"A": "B", "B": "A"}[next]
	}
	f.set("booted", next)
	f.boot++
}

func (f *fakeSystem) commands(withVersion bool) firmware.ImageCommands {
	c := firmware.ImageConfig{
		Install:  f.script + " install {file}",
		MarkGood: f.script + " mark-good",
		MarkBad:  f.script + " mark-bad",
		Reboot:   f.script + " reboot",
	}
	if withVersion {
		c.Version = f.script + " version"
	}
	cmds, err := firmware.ParseImageCommands(c)
	if err != nil {
		f.t.Fatal(err)
	}
	return cmds
}

// open is the agent starting: its Images on dir.
func (f *fakeSystem) open(dir string, withVersion bool) *firmware.Images {
	f.t.Helper()
	im, err := firmware.OpenImages(dir, f.commands(withVersion))
	if err != nil {
		f.t.Fatal(err)
	}
	im.SetBootID(func() (string, error) { return fmt.Sprintf("boot-%d", f.boot), nil })
	if f.crash != nil {
		im.SetCrash(f.crash)
	}
	return im
}

// imageRelease is an image payload holding version, in a file whose
// path has a space (it must reach the installer as one argument), and
// its manifest.
func imageRelease(t *testing.T, version string) (string, *release.Manifest) {
	t.Helper()
	content := version + "\n"
	p := filepath.Join(t.TempDir(), "my image.raucb")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(content))
	return p, &release.Manifest{Name: "rootfs", Type: release.TypeImage, Version: version, SVN: 2, HW: []string{"linux/armv7"},
		Length: int64(len(content)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}
}

func imageState(t *testing.T, im *firmware.Images) firmware.ImageState {
	t.Helper()
	st, err := im.State()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestImagesInstallRebootCommit(t *testing.T) {
	ctx := t.Context()
	f := newFakeSystem(t)
	dir := filepath.Join(t.TempDir(), "fw")
	im := f.open(dir, false)
	if tr, err := im.Boot(ctx); tr != nil || err != nil {
		t.Fatalf("Boot with nothing installed = %+v, %v", tr, err)
	}
	file, m := imageRelease(t, "2.0.0+build.7")
	if err := im.InstallFor(ctx, file, m, "r1"); err != nil {
		t.Fatal(err)
	}
	if got := f.calls(); !slices.Equal(got, []string{"install " + file}) {
		t.Errorf("installer calls = %q, want the file as one argument", got)
	}
	st := imageState(t, im)
	if tr := st.Trial; tr == nil || tr.Phase != firmware.PhaseInstalled || tr.Version != "2.0.0" || tr.SVN != 2 {
		t.Fatalf("trial after Install = %+v, want 2.0.0 installed", tr)
	}
	if err := im.Install(ctx, file, m); !errors.Is(err, firmware.ErrTrialPending) {
		t.Errorf("Install during a trial = %v, want ErrTrialPending", err)
	}
	if _, err := im.Commit(ctx); err == nil || !strings.Contains(err.Error(), "installed, not running") {
		t.Errorf("Commit before the reboot = %v", err)
	}
	// The agent restarts before the system did: the reboot is due again.
	if tr, err := f.open(dir, false).Boot(ctx); tr != nil || !errors.Is(err, firmware.ErrRebooting) {
		t.Fatalf("Boot before the reboot = %+v, %v, want ErrRebooting", tr, err)
	}
	if err := im.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	f.reboot()
	if f.running() != "2.0.0+build.7" {
		t.Fatalf("the bootloader started %s", f.running())
	}
	im = f.open(dir, false)
	tr, err := im.Boot(ctx)
	if err != nil || tr == nil || tr.Phase != firmware.PhaseTrial || tr.Attempts != 1 || tr.Deadline.IsZero() {
		t.Fatalf("Boot after the reboot = %+v, %v, want the trial's first start", tr, err)
	}
	tr, err = im.Commit(ctx)
	if err != nil || tr.Version != "2.0.0" {
		t.Fatalf("Commit = %+v, %v", tr, err)
	}
	if got, want := f.calls(), []string{"install " + file, "reboot", "reboot", "mark-good"}; !slices.Equal(got, want) {
		t.Errorf("installer calls = %q, want %q", got, want)
	}
	if f.get("state.B") != "good" {
		t.Error("mark_good did not reach the installer")
	}
	st = imageState(t, im)
	v, svn := st.CommittedVersion("rootfs")
	if v.String() != "2.0.0" || svn != 2 || st.Trial != nil {
		t.Errorf("state after Commit = %+v (committed %s svn %d)", st, v, svn)
	}
	if st.Last == nil || st.Last.Result != "committed" || st.Last.Release != "rootfs@2.0.0" || st.Last.Rollout != "r1" || st.Last.Reported {
		t.Errorf("last result = %+v, want committed, not reported", st.Last)
	}
	if err := im.MarkReported(firmware.ImageResult{Release: "rootfs@1.0.0", At: st.Last.At}); err != nil {
		t.Fatal(err)
	}
	if st := imageState(t, im); st.Last.Reported {
		t.Error("MarkReported of another result marked the last one")
	}
	if err := im.MarkReported(*st.Last); err != nil {
		t.Fatal(err)
	}
	if st := imageState(t, f.open(dir, false)); !st.Last.Reported {
		t.Error("MarkReported did not stick")
	}
	// The policy sees the committed version.
	m.Version = "2.0.0"
	if err := firmware.Accept(m, firmware.Device{Committed: v, HW: "linux/armv7", Bad: st.BadReleases()}); !errors.Is(err, firmware.ErrDowngrade) {
		t.Errorf("Accept of the committed release again = %v, want ErrDowngrade", err)
	}
	if tr, err := f.open(dir, false).Boot(ctx); tr != nil || err != nil {
		t.Errorf("Boot after the commit = %+v, %v, want nothing on trial", tr, err)
	}
}

func TestImagesInstallFails(t *testing.T) {
	ctx := t.Context()
	f := newFakeSystem(t)
	dir := filepath.Join(t.TempDir(), "fw")
	im := f.open(dir, false)
	f.set("fail", "")
	file, m := imageRelease(t, "2.0.0")
	err := im.Install(ctx, file, m)
	if err == nil || !strings.Contains(err.Error(), "install") || !strings.Contains(err.Error(), "exit status 1") ||
		!strings.HasSuffix(err.Error(), ": signature verification failed: bad signature") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("a failing install = %v, want one line naming the command, its exit and its last line", err)
	}
	if st := imageState(t, im); st.Trial != nil || len(st.Bad) != 0 || st.Last != nil {
		t.Errorf("state after a failed install = %+v, want no trial", st)
	}
	os.Remove(filepath.Join(f.dir, "fail"))
	if err := im.Install(ctx, file, m); err != nil {
		t.Errorf("installing again once the installer works: %v", err)
	}
}

// A trial that crashes at every start is rolled back after the attempt
// limit, one that never becomes healthy at its deadline, and one the
// bootloader did not start when the Version command says so.
func TestImagesRollBackByThemselves(t *testing.T) {
	ctx := t.Context()
	installed := func(t *testing.T, withVersion bool) (*fakeSystem, string) {
		f := newFakeSystem(t)
		dir := filepath.Join(t.TempDir(), "fw")
		im := f.open(dir, withVersion)
		file, m := imageRelease(t, "2.0.0")
		if err := im.Install(ctx, file, m); err != nil {
			t.Fatal(err)
		}
		if err := im.Reboot(ctx); err != nil {
			t.Fatal(err)
		}
		f.reboot()
		return f, dir
	}
	rolledBack := func(t *testing.T, f *fakeSystem, dir, reason string) {
		t.Helper()
		f.reboot()
		im := f.open(dir, false)
		if tr, err := im.Boot(ctx); tr != nil || err != nil {
			t.Fatalf("Boot after the rollback's reboot = %+v, %v", tr, err)
		}
		if f.running() != "1.0.0" || f.get("state.B") != "bad" {
			t.Errorf("the system runs %s, slot B is %s; want 1.0.0 and B bad", f.running(), f.get("state.B"))
		}
		st := imageState(t, im)
		if st.Trial != nil || st.Last == nil || st.Last.Result != "rolled-back" || !strings.Contains(st.Last.Reason, reason) {
			t.Errorf("state = %+v, last %+v; want rolled back for %q", st, st.Last, reason)
		}
		file, m := imageRelease(t, "2.0.0+rebuilt")
		if err := im.Install(ctx, file, m); !errors.Is(err, firmware.ErrMarkedBad) {
			t.Errorf("installing the release marked bad = %v, want ErrMarkedBad", err)
		}
		if err := firmware.Accept(m, firmware.Device{HW: "linux/armv7", Bad: st.BadReleases()}); !errors.Is(err, firmware.ErrMarkedBad) {
			t.Errorf("Accept of the release marked bad = %v, want ErrMarkedBad", err)
		}
	}

	t.Run("crash loop", func(t *testing.T) {
		f, dir := installed(t, false)
		for i := range 3 {
			// The agent crashes at each start (some of them taking the
			// system down with it).
			if i == 1 {
				f.reboot()
			}
			if tr, err := f.open(dir, false).Boot(ctx); err != nil || tr == nil || tr.Attempts != i+1 {
				t.Fatalf("start %d = %+v, %v", i+1, tr, err)
			}
		}
		if tr, err := f.open(dir, false).Boot(ctx); tr != nil || !errors.Is(err, firmware.ErrRebooting) {
			t.Fatalf("the 4th start = %+v, %v, want the rollback's reboot", tr, err)
		}
		if got := f.calls(); !slices.Equal(got[len(got)-2:], []string{"mark-bad", "reboot"}) {
			t.Errorf("installer calls = %q, want mark-bad then reboot last", got)
		}
		rolledBack(t, f, dir, "3 starts without becoming healthy")
	})
	t.Run("deadline", func(t *testing.T) {
		f, dir := installed(t, false)
		now := time.Now()
		im := f.open(dir, false)
		im.Now = func() time.Time { return now }
		if tr, err := im.Boot(ctx); err != nil || tr == nil {
			t.Fatalf("first start = %+v, %v", tr, err)
		}
		now = now.Add(im.Deadline + time.Second)
		if tr, err := im.Boot(ctx); tr != nil || !errors.Is(err, firmware.ErrRebooting) {
			t.Fatalf("a start past the deadline = %+v, %v, want the rollback's reboot", tr, err)
		}
		rolledBack(t, f, dir, "not healthy within 5m0s")
	})
	t.Run("unhealthy", func(t *testing.T) {
		f, dir := installed(t, false)
		im := f.open(dir, false)
		if _, err := im.Boot(ctx); err != nil {
			t.Fatal(err)
		}
		if err := im.Rollback(ctx, "the uplink never delivered"); err != nil {
			t.Fatal(err)
		}
		rolledBack(t, f, dir, "the uplink never delivered")
	})
	t.Run("bootloader fell back", func(t *testing.T) {
		f, dir := installed(t, true)
		f.set("booted", "A") // B did not boot, and the bootloader went back
		im := f.open(dir, true)
		if tr, err := im.Boot(ctx); tr != nil || err != nil {
			t.Fatalf("Boot on the old image = %+v, %v, want no trial", tr, err)
		}
		st := imageState(t, im)
		if st.Last == nil || st.Last.Reason != "the system started 1.0.0 after the install, not the trial" || !slices.Contains(st.Bad, "rootfs@2.0.0") {
			t.Errorf("state = %+v, last %+v", st, st.Last)
		}
		if slices.Contains(f.calls(), "mark-bad") {
			t.Error("mark_bad ran on the image the bootloader went back to")
		}
	})
}

// A crash between any two steps (the agent killed, or the system losing
// power: then images.json is the last version written in full and the
// bootloader starts what it chooses) leaves a state the next starts
// finish consistently: no trial left, the system running what
// images.json says is committed, now and after one more reboot.
func TestImagesCrashAtEveryStep(t *testing.T) {
	ctx := t.Context()
	errCrash := errors.New("crash")
	// flow is the agent from Install to the end of the trial; after the
	// crash, the agent starts again and finishes with starts.
	starts := func(f *fakeSystem, dir string, withVersion, healthy bool) error {
		for range 10 {
			im := f.open(dir, withVersion)
			tr, err := im.Boot(ctx)
			switch {
			case errors.Is(err, firmware.ErrRebooting):
				f.reboot()
				continue
			case err != nil:
				return err
			case tr == nil:
				return nil
			case healthy:
				_, err := im.Commit(ctx)
				return err
			}
			if err := im.Rollback(ctx, "unhealthy"); err != nil {
				return err
			}
			f.reboot()
		}
		return errors.New("no end after 10 starts")
	}
	flow := func(f *fakeSystem, dir string, withVersion, healthy bool) error {
		file, m := imageRelease(f.t, "2.0.0")
		im := f.open(dir, withVersion)
		if err := im.Install(ctx, file, m); err != nil {
			return err
		}
		if err := im.Reboot(ctx); err != nil {
			return err
		}
		f.reboot()
		return starts(f, dir, withVersion, healthy)
	}

	for _, withVersion := range []bool{false, true} {
		for _, healthy := range []bool{true, false} {
			// The steps of the whole flow, in order.
			var steps []string
			f := newFakeSystem(t)
			f.crash = func(step string) error { steps = append(steps, step); return nil }
			if err := flow(f, filepath.Join(t.TempDir(), "fw"), withVersion, healthy); err != nil {
				t.Fatal(err)
			}
			for i, step := range steps {
				for _, powerCut := range []bool{false, true} {
					name := fmt.Sprintf("version=%v/healthy=%v/%02d %s/power cut=%v", withVersion, healthy, i, step, powerCut)
					t.Run(name, func(t *testing.T) {
						f := newFakeSystem(t)
						dir := filepath.Join(t.TempDir(), "fw")
						n := 0
						f.crash = func(string) error {
							// Dead from the crash on: no step after it runs.
							if n++; n > i {
								return errCrash
							}
							return nil
						}
						if err := flow(f, dir, withVersion, healthy); !errors.Is(err, errCrash) {
							t.Fatalf("the flow = %v, want the crash", err)
						}
						f.crash = nil
						if powerCut {
							if strings.HasPrefix(step, "writing") {
								// The write was under way: its temporary
								// file is left, half written.
								os.WriteFile(filepath.Join(dir, ".images.json.tmp-123"), []byte(`{"trial":{"na`), 0o600)
							}
							f.reboot()
						}
						if err := starts(f, dir, withVersion, healthy); err != nil {
							t.Fatalf("after the crash: %v", err)
						}
						if stale, _ := filepath.Glob(filepath.Join(dir, ".images.json.tmp-*")); len(stale) > 0 {
							t.Errorf("temporary files left: %v", stale)
						}
						im := f.open(dir, withVersion)
						st := imageState(t, im)
						if st.Trial != nil {
							t.Fatalf("a trial is left: %+v", st.Trial)
						}
						committed := "1.0.0"
						if c, ok := st.Committed["rootfs"]; ok {
							committed = c.Version
						}
						// The windows the Caveats document, closed by the
						// Version command once the system rebooted: a
						// completed install not recorded yet, and a power
						// cut after a rollback's record, before mark_bad.
						switch {
						case (step == "install ran" || step == "writing installed") && (!withVersion || !powerCut):
							if st.Last == nil || st.Last.Reason != "install interrupted" {
								t.Errorf("last result = %+v, want install interrupted", st.Last)
							}
							return
						case step == "running mark_bad" && powerCut && !withVersion:
							if st.Last == nil || st.Last.Result != "rolled-back" || f.running() != "2.0.0" {
								t.Errorf("last result = %+v, running %s; want rolled back, 2.0.0 running unconfirmed", st.Last, f.running())
							}
							return
						}
						if got := f.running(); got != committed {
							t.Fatalf("the system runs %s, images.json says %s is committed (last %+v)", got, committed, st.Last)
						}
						if f.get("state."+f.get("booted")) != "good" {
							t.Errorf("the running slot is %s", f.get("state."+f.get("booted")))
						}
						switch {
						case committed == "2.0.0":
							if !healthy || st.Last == nil || st.Last.Result != "committed" {
								t.Errorf("committed with last result %+v (healthy %v)", st.Last, healthy)
							}
						case strings.HasPrefix(step, "writing installing") || step == "file checked":
							// Nothing was recorded: as if Install never ran.
							if len(st.Bad) != 0 || st.Last != nil {
								t.Errorf("state = %+v after a crash before the first record", st)
							}
						case !slices.Contains(st.Bad, "rootfs@2.0.0") || st.Last == nil || st.Last.Result != "rolled-back":
							t.Errorf("not committed, and state = %+v, last %+v", st, st.Last)
						}
						// One more reboot starts the same image.
						f.reboot()
						if tr, err := f.open(dir, withVersion).Boot(ctx); tr != nil || err != nil {
							t.Errorf("Boot after one more reboot = %+v, %v", tr, err)
						}
						if got := f.running(); got != committed {
							t.Errorf("after one more reboot the system runs %s, images.json says %s", got, committed)
						}
					})
				}
			}
		}
	}
}

func TestImageCommandsRefused(t *testing.T) {
	good := firmware.ImageConfig{
		Install:  "rauc install {file}",
		MarkGood: "rauc status mark-good booted",
		MarkBad:  "rauc status mark-bad booted",
		Reboot:   "systemctl reboot",
	}
	cmds, err := firmware.ParseImageCommands(good)
	if err != nil || !slices.Equal(cmds.Install, []string{"rauc", "install", "{file}"}) || len(cmds.Version) != 0 {
		t.Fatalf("ParseImageCommands(%+v) = %q, %v", good, cmds, err)
	}
	for _, tc := range []struct {
		name string
		edit func(*firmware.ImageConfig)
		want string
	}{
		{"install without file", func(c *firmware.ImageConfig) { c.Install = "rauc install" }, "has no {file} argument"},
		{"install empty", func(c *firmware.ImageConfig) { c.Install = "  " }, "install: no command"},
		{"mark_good empty", func(c *firmware.ImageConfig) { c.MarkGood = "" }, "mark_good: no command"},
		{"reboot empty", func(c *firmware.ImageConfig) { c.Reboot = "" }, "reboot: no command"},
		{"file elsewhere", func(c *firmware.ImageConfig) { c.MarkBad = "rauc status mark-bad {file}" }, "only install takes {file}"},
		{"quotes", func(c *firmware.ImageConfig) { c.Install = `sh -c "rauc install {file}"` }, "quotes and backslashes are not supported"},
		{"pipe", func(c *firmware.ImageConfig) { c.Install = "cat {file} | swupdate -i -" }, "is a shell operator"},
		{"and", func(c *firmware.ImageConfig) { c.Reboot = "sync && reboot" }, "is a shell operator"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := good
			tc.edit(&c)
			if _, err := firmware.ParseImageCommands(c); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ParseImageCommands(%+v) = %v, want %q", c, err, tc.want)
			}
		})
	}
	if _, err := firmware.OpenImages(t.TempDir(), firmware.ImageCommands{Install: []string{"rauc", "install"}}); err == nil {
		t.Error("OpenImages took commands without {file} nor mark_good")
	}
}

// What the images refuse besides the trial's rules.
func TestImagesRefuse(t *testing.T) {
	ctx := t.Context()
	f := newFakeSystem(t)
	dir := filepath.Join(t.TempDir(), "fw")
	im := f.open(dir, false)
	file, m := imageRelease(t, "2.0.0")
	os.WriteFile(file, []byte("3.0.0\n"), 0o600) // changed after it was verified
	if err := im.Install(ctx, file, m); !errors.Is(err, firmware.ErrDigest) {
		t.Errorf("installing a file that is not the signed payload = %v, want ErrDigest", err)
	}
	file, m = imageRelease(t, "2.0.0")
	m.Type = release.TypeAgent
	if err := im.Install(ctx, file, m); err == nil || !strings.Contains(err.Error(), `only "image" releases`) {
		t.Errorf("installing an agent release = %v", err)
	}
	if got := f.calls(); len(got) != 1 || got[0] != "" {
		t.Errorf("the installer ran for refused files: %q", got)
	}
	if _, err := im.Commit(ctx); err == nil || !strings.Contains(err.Error(), "no image on trial") {
		t.Errorf("Commit without a trial = %v", err)
	}
	if err := im.Rollback(ctx, "x"); err == nil {
		t.Error("Rollback without a trial succeeded")
	}
	// A reboot command that returns without rebooting is not run in a
	// loop.
	m.Type = release.TypeImage
	if err := im.Install(ctx, file, m); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := f.open(dir, false).Boot(ctx); !errors.Is(err, firmware.ErrRebooting) {
			t.Fatalf("Boot with the reboot due = %v", err)
		}
	}
	if _, err := f.open(dir, false).Boot(ctx); err == nil || !strings.Contains(err.Error(), "3 reboots did not restart the system") {
		t.Errorf("the 4th Boot without a reboot = %v", err)
	}
	// A state naming an unknown phase is refused.
	os.WriteFile(filepath.Join(dir, "images.json"), []byte(`{"trial":{"name":"rootfs","version":"2.0.0","phase":"done"}}`), 0o600)
	if _, err := im.Boot(ctx); err == nil || !strings.Contains(err.Error(), `unknown phase "done"`) {
		t.Errorf("Boot with an unknown phase = %v", err)
	}
}

// raucSystem is Debian's RAUC on this machine (../shared/notes/firmware.md,
// "Real RAUC runs here"): its own system D-Bus daemon on a socket in a
// temporary directory (rauc finds it through DBUS_SYSTEM_BUS_ADDRESS),
// two file-backed raw slots, the custom bootloader backend of
// examples/firmware/rauc keeping its state in a temporary directory, and
// rauc service with --override-boot-slot standing in for the kernel
// command line. The test is the board's bootloader: reboot restarts the
// service on the slot the backend's state says.
type raucSystem struct {
	t                  *testing.T
	dir, conf, backend string
	boot               int
	service            *exec.Cmd
	serviceOut         *bytes.Buffer
}

// raucStatus is what the test reads of rauc status --output-format=json.
type raucStatus struct {
	Booted      string `json:"booted"`
	BootPrimary string `json:"boot_primary"`
	Slots       []map[string]struct {
		Bootname   string `json:"bootname"`
		State      string `json:"state"`
		BootStatus string `json:"boot_status"`
	} `json:"slots"`
}

// bootStatus is slot's (rootfs.0, rootfs.1) boot status.
func (st raucStatus) bootStatus(slot string) string {
	for _, m := range st.Slots {
		if s, ok := m[slot]; ok {
			return s.BootStatus
		}
	}
	return ""
}

func startRAUC(t *testing.T, ctx context.Context) *raucSystem {
	t.Helper()
	for _, bin := range []string{"dbus-daemon", "mksquashfs", "openssl"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("rauc is installed but %s is not (apt packages: rauc rauc-service squashfs-tools dbus openssl): %v", bin, err)
		}
	}
	r := &raucSystem{t: t, dir: t.TempDir()}
	r.run(ctx, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
		"-keyout", r.path("key.pem"), "-out", r.path("cert.pem"), "-days", "2", "-subj", "/CN=iotagent firmware test")
	for _, slot := range []string{"a.img", "b.img"} {
		if err := os.WriteFile(r.path(slot), make([]byte, 8<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	backend, err := filepath.Abs("../examples/firmware/rauc/bootloader-backend.sh")
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(backend); err != nil || fi.Mode().Perm()&0o100 == 0 {
		t.Fatalf("the custom bootloader backend %s is missing or not executable: %v", backend, err)
	}
	r.backend = backend
	r.conf = r.path("system.conf")
	conf := fmt.Sprintf(`[system]
compatible=iotagent-test-board
bootloader=custom
data-directory=%[1]s/rauc-data

[handlers]
bootloader-custom-backend=%[2]s

[keyring]
path=%[1]s/cert.pem

[slot.rootfs.0]
device=%[1]s/a.img
type=raw
bootname=A

[slot.rootfs.1]
device=%[1]s/b.img
type=raw
bootname=B
`, r.dir, backend)
	if err := os.WriteFile(r.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(r.path("rauc-data"), 0o700)

	// A system bus of our own, on a socket of ours, so that a system bus
	// already running is left alone and none is left behind. Not
	// Debian's system.conf: its service directories would let the bus
	// start rauc-service.sh (with /etc/rauc/system.conf) whenever the CLI
	// calls before our service owns its name.
	busConf := r.path("bus.conf")
	if err := os.WriteFile(busConf, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=`+r.path("system_bus_socket")+`</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
`), 0o600); err != nil {
		t.Fatal(err)
	}
	bus := exec.Command("dbus-daemon", "--config-file="+busConf, "--nopidfile", "--nofork", "--print-address=1")
	stdout, err := bus.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var busErr bytes.Buffer
	bus.Stderr = &busErr
	if err := bus.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(bus) })
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("dbus-daemon: %v: %s", err, busErr.String())
	}
	go io.Copy(io.Discard, stdout)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", strings.TrimSpace(addr))
	t.Setenv("RAUC_BOOT_STATE", r.path("boot-state"))
	t.Cleanup(r.stopService)
	r.startService(ctx, "A")
	return r
}

func (r *raucSystem) path(name string) string { return filepath.Join(r.dir, name) }

func (r *raucSystem) run(ctx context.Context, name string, args ...string) string {
	r.t.Helper()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		r.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// startService starts rauc service as if the system had booted slot, and
// waits until it answers.
func (r *raucSystem) startService(ctx context.Context, slot string) {
	r.t.Helper()
	r.serviceOut = new(bytes.Buffer)
	r.service = exec.Command("rauc", "service", "--conf="+r.conf, "--override-boot-slot="+slot)
	r.service.Stdout, r.service.Stderr = r.serviceOut, r.serviceOut
	if err := r.service.Start(); err != nil {
		r.t.Fatal(err)
	}
	for {
		out, err := exec.CommandContext(ctx, "rauc", "status", "--output-format=json").Output()
		if err == nil {
			var st raucStatus
			if json.Unmarshal(out, &st) == nil && st.Booted == slot {
				return
			}
		}
		select {
		case <-ctx.Done():
			r.t.Fatalf("rauc service on slot %s did not answer: %s", slot, r.serviceOut)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (r *raucSystem) stopService() {
	if r.service != nil {
		stop(r.service)
		r.service = nil
	}
}

// stop ends a process the test started: SIGTERM, so that it reaps its
// own children, then SIGKILL after 5 s.
func stop(cmd *exec.Cmd) {
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// reboot is the board's boot script: the primary slot unless it is
// bad, then the other one.
func (r *raucSystem) reboot(ctx context.Context) string {
	r.t.Helper()
	next := strings.TrimSpace(r.run(ctx, r.backend, "get-primary"))
	if strings.TrimSpace(r.run(ctx, r.backend, "get-state", next)) == "bad" {
		next = map[string]string{"A": "B", "B": "A"}[next]
	}
	r.stopService()
	r.boot++
	r.startService(ctx, next)
	return next
}

func (r *raucSystem) status(ctx context.Context) raucStatus {
	r.t.Helper()
	out, err := exec.CommandContext(ctx, "rauc", "status", "--output-format=json").Output()
	if err != nil {
		r.t.Fatalf("rauc status: %v", err)
	}
	r.t.Logf("rauc status --output-format=json: %s", out)
	var st raucStatus
	if err := json.Unmarshal(out, &st); err != nil {
		r.t.Fatal(err)
	}
	return st
}

// bundle signs a bundle of an image holding version, and returns it
// with its manifest and the image's bytes.
func (r *raucSystem) bundle(ctx context.Context, version string) (string, *release.Manifest, []byte) {
	r.t.Helper()
	src := r.path("bundle-" + version)
	os.Mkdir(src, 0o700)
	img := make([]byte, 256<<10)
	rand.Read(img)
	copy(img, "image "+version)
	os.WriteFile(filepath.Join(src, "rootfs.img"), img, 0o600)
	os.WriteFile(filepath.Join(src, "manifest.raucm"), []byte(`[update]
compatible=iotagent-test-board
version=`+version+`

[bundle]
format=plain

[image.rootfs]
filename=rootfs.img
`), 0o600)
	out := r.path("rootfs-" + version + ".raucb")
	r.run(ctx, "rauc", "--cert", r.path("cert.pem"), "--key", r.path("key.pem"), "bundle", src, out)
	b, err := os.ReadFile(out)
	if err != nil {
		r.t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return out, &release.Manifest{Name: "rootfs", Type: release.TypeImage, Version: version, SVN: 1, HW: []string{"linux/amd64"},
		Length: int64(len(b)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}, img
}

func (r *raucSystem) slotHolds(slot string, img []byte) bool {
	b, err := os.ReadFile(r.path(slot))
	return err == nil && bytes.HasPrefix(b, img)
}

// Against Debian's real RAUC: an image installed through Images, the
// reboot into it, the commit (rauc status mark-good booted); then the
// next release rolled back (mark-bad) and the system back on the first.
func TestImagesRAUC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("RAUC's service needs root (its own system D-Bus daemon, the bus name de.pengutronix.rauc)")
	}
	if _, err := exec.LookPath("rauc"); err != nil {
		t.Skip("rauc is not installed (apt-get install rauc rauc-service squashfs-tools dbus)")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	r := startRAUC(t, ctx)

	reboot := filepath.Join(r.dir, "reboot")
	os.WriteFile(reboot, []byte("#!/bin/sh\necho reboot >> "+r.path("reboots")+"\n"), 0o755)
	cmds, err := firmware.ParseImageCommands(firmware.ImageConfig{
		Install:  "rauc install {file}",
		MarkGood: "rauc status mark-good booted",
		MarkBad:  "rauc status mark-bad booted",
		Reboot:   reboot,
	})
	if err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(r.dir, "agent")
	open := func() *firmware.Images {
		im, err := firmware.OpenImages(stateDir, cmds)
		if err != nil {
			t.Fatal(err)
		}
		im.SetBootID(func() (string, error) { return fmt.Sprintf("boot-%d", r.boot), nil })
		return im
	}
	im := open()
	if st := r.status(ctx); st.Booted != "A" || st.BootPrimary != "rootfs.0" {
		t.Fatalf("rauc starts booted %s, primary %s; want A, rootfs.0", st.Booted, st.BootPrimary)
	}

	// 2.0.0 goes to slot B and commits.
	bundle, m, img := r.bundle(ctx, "2.0.0")
	if err := im.Install(ctx, bundle, m); err != nil {
		t.Fatal(err)
	}
	if st := r.status(ctx); st.BootPrimary != "rootfs.1" || !r.slotHolds("b.img", img) {
		t.Fatalf("after rauc install: primary %s, slot B holds the image: %v", st.BootPrimary, r.slotHolds("b.img", img))
	}
	if err := im.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	if slot := r.reboot(ctx); slot != "B" {
		t.Fatalf("the board booted %s after the install, want B", slot)
	}
	im = open()
	if tr, err := im.Boot(ctx); err != nil || tr == nil || tr.Phase != firmware.PhaseTrial {
		t.Fatalf("Boot on B = %+v, %v", tr, err)
	}
	if _, err := im.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.status(ctx)
	if st.Booted != "B" || st.BootPrimary != "rootfs.1" || st.bootStatus("rootfs.1") != "good" {
		t.Fatalf("after Commit rauc says booted %s, primary %s, rootfs.1 %s; want B, rootfs.1, good", st.Booted, st.BootPrimary, st.bootStatus("rootfs.1"))
	}

	// 3.0.0 goes to slot A, proves unhealthy, and is rolled back.
	bundle, m, img = r.bundle(ctx, "3.0.0")
	if err := im.Install(ctx, bundle, m); err != nil {
		t.Fatal(err)
	}
	if !r.slotHolds("a.img", img) {
		t.Fatal("slot A does not hold 3.0.0 after the install")
	}
	im.Reboot(ctx)
	if slot := r.reboot(ctx); slot != "A" {
		t.Fatalf("the board booted %s after the second install, want A", slot)
	}
	im = open()
	if tr, err := im.Boot(ctx); err != nil || tr == nil || tr.Version != "3.0.0" {
		t.Fatalf("Boot on A = %+v, %v", tr, err)
	}
	if err := im.Rollback(ctx, "the uplink never delivered"); err != nil {
		t.Fatal(err)
	}
	if st := r.status(ctx); st.bootStatus("rootfs.0") != "bad" || st.BootPrimary != "rootfs.1" {
		t.Fatalf("after mark-bad rauc says rootfs.0 %s, primary %s; want bad, rootfs.1", st.bootStatus("rootfs.0"), st.BootPrimary)
	}
	if slot := r.reboot(ctx); slot != "B" {
		t.Fatalf("the board booted %s after the rollback, want B", slot)
	}
	im = open()
	if tr, err := im.Boot(ctx); tr != nil || err != nil {
		t.Fatalf("Boot after the rollback = %+v, %v", tr, err)
	}
	images := imageState(t, im)
	if v, _ := images.CommittedVersion("rootfs"); v.String() != "2.0.0" || !slices.Contains(images.Bad, "rootfs@3.0.0") || images.Last.Reason != "the uplink never delivered" {
		t.Errorf("images.json = %+v, last %+v", images, images.Last)
	}
	if got := strings.Count(read(t, r.path("reboots")), "reboot"); got != 3 {
		t.Errorf("the reboot command ran %d times, want 3", got)
	}
	if st := r.status(ctx); st.Booted != "B" || st.bootStatus("rootfs.1") != "good" {
		t.Errorf("the system is back on %s (rootfs.1 %s), want B, good", st.Booted, st.bootStatus("rootfs.1"))
	}
}

// A version command that fails after the reboot (the installer's
// service not up yet) does not keep the trial from being counted: each
// start is an attempt, and the attempt limit rolls it back. Before, Boot
// returned the command's error at every start with the trial never
// counted, and the agent stopped on it: a crash loop with no rollback.
func TestImagesVersionCommandFailing(t *testing.T) {
	ctx := t.Context()
	f := newFakeSystem(t)
	dir := filepath.Join(t.TempDir(), "fw")
	im := f.open(dir, true)
	file, m := imageRelease(t, "2.0.0")
	if err := im.Install(ctx, file, m); err != nil {
		t.Fatal(err)
	}
	f.reboot()
	broken := firmware.ImageConfig{Install: f.script + " install {file}", MarkGood: f.script + " mark-good", MarkBad: f.script + " mark-bad",
		Reboot: f.script + " reboot", Version: "/bin/false"}
	cmds, err := firmware.ParseImageCommands(broken)
	if err != nil {
		t.Fatal(err)
	}
	for attempt := 1; attempt <= 3; attempt++ {
		im, err := firmware.OpenImages(dir, cmds)
		if err != nil {
			t.Fatal(err)
		}
		im.SetBootID(func() (string, error) { return fmt.Sprintf("boot-%d", f.boot), nil })
		tr, err := im.Boot(ctx)
		if err != nil || tr == nil || tr.Attempts != attempt {
			t.Fatalf("start %d with the version command failing: Boot = %+v, %v; want the trial, attempt %d", attempt, tr, err, attempt)
		}
	}
	im, _ = firmware.OpenImages(dir, cmds)
	im.SetBootID(func() (string, error) { return fmt.Sprintf("boot-%d", f.boot), nil })
	if tr, err := im.Boot(ctx); tr != nil || !errors.Is(err, firmware.ErrRebooting) {
		t.Fatalf("the fourth start = %+v, %v; want rolled back (mark_bad, reboot)", tr, err)
	}
	if st := imageState(t, im); st.Last == nil || st.Last.Result != "rolled-back" || !slices.Contains(st.Bad, "rootfs@2.0.0") {
		t.Errorf("after the attempt limit: %+v", st)
	}
}
