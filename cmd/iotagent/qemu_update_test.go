package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/internal/testsync"
)

// armBinfmt says whether the kernel runs an ARM (EABI, 32-bit) ELF
// through an interpreter: an enabled binfmt_misc entry whose magic is
// the ARM ELF header's. qemu-user passes a guest's execve to the host
// kernel as it is, so without one the launcher's exec of the ARM slot
// binary (and Relaunch's of the launcher) fails with ENOEXEC.
func armBinfmt() (string, bool) {
	const armMagic = "7f454c4601010100000000000000000002002800"
	ents, _ := filepath.Glob("/proc/sys/fs/binfmt_misc/*")
	for _, p := range ents {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.HasPrefix(b, []byte("enabled\n")) {
			continue
		}
		if strings.Contains(string(b), "magic "+armMagic) {
			return filepath.Base(p), true
		}
	}
	return "", false
}

// armCrasher builds a real armv7 binary that exits 3 at once: a
// release that crashes at every start.
func armCrasher(t *testing.T) []byte {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module crasher\n\ngo 1.26\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\n\nimport \"os\"\n\nfunc main() { println(\"crashing\"); os.Exit(3) }\n"), 0o600)
	cmd := exec.Command("go", "build", "-o", "crasher", ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOARCH=arm", "GOARM=7")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build the armv7 crasher: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "crasher"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The armv7 agent under qemu-arm-static, against the real station,
// mosquitto and a swtpm over its unix socket: 1.1.0 (hw linux/armv7) is
// applied to the running 1.0.0 launcher.
//
// With binfmt_misc running ARM ELF files through qemu (scripts/test.sh
// registers it): the launcher execs the ARM slot binary in the same
// process (qemu-user's execve goes to the kernel, which starts qemu on
// the new binary; the PID holds), the trial commits and raises the TPM
// counter; then a real armv7 binary crashing at every start is rolled
// back at the fourth start (three attempts) and 1.1.0 runs again.
//
// Without it, the exec cannot work (the kernel has no ARM loader):
// the test proves the agent survives that as a device would survive a
// slot binary it cannot exec — Relaunch fails, the agent exits, and the
// next start's launcher fails to exec the trial, rolls it back with
// "exec format error" and runs its own binary, 1.0.0, marked bad — and
// then skips the rest, saying what to register.
func TestAgentUpdatesItselfArmv7UnderQEMU(t *testing.T) {
	qemu, err := exec.LookPath("qemu-arm-static")
	if err != nil {
		t.Skip("qemu-arm-static not installed (scripts/test.sh installs qemu-user-static)")
	}
	launcher := versionBinary(t, "1.0.0", "arm")
	next := versionBinary(t, "1.1.0", "arm")
	if out, err := exec.Command(qemu, next, "version").Output(); err != nil || !strings.Contains(string(out), "1.1.0") || !strings.Contains(string(out), "linux/armv7") {
		t.Fatalf("qemu-arm-static %s version = %q, %v", next, out, err)
	}
	r := newFWRig(t, launcher, "")
	run := append([]string{launcher}, r.args...)
	p := startAgent(t, qemu, run...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the agent's output:\n%s", p.out)
		}
	})
	pid := p.cmd.Process.Pid
	if s := r.waitFW("firmware status from the armv7 agent", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == pid && s.Running != "" }); s.Running != "1.0.0" {
		t.Fatalf("before any update: %+v", s)
	}
	payload, err := os.ReadFile(next)
	if err != nil {
		t.Fatal(err)
	}
	// The host's release is refused by the armv7 agent: its hw is
	// linux/armv7.
	file, manifest := r.releaseFor("linux/amd64", "1.1.0", 1, payload)
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...); code == 0 || !strings.Contains(errs, "linux/armv7") {
		t.Errorf("apply of a linux/amd64 release to the armv7 agent: exit %d, %q; want refused naming linux/armv7", code, errs)
	}
	file, manifest = r.releaseFor("linux/armv7", "1.1.0", 1, payload)
	if code, out, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...); code != 0 || !strings.Contains(out, "1.1.0 staged") {
		t.Fatalf("firmware apply 1.1.0: exit %d, %q, %s", code, out, errs)
	}

	entry, ok := armBinfmt()
	if !ok {
		// Relaunch's exec of the ARM launcher fails: the agent exits.
		select {
		case <-p.exited:
		case <-time.After(60 * time.Second):
			t.Fatalf("without binfmt_misc the armv7 agent did not exit after staging:\n%s", p.out)
		}
		if !strings.Contains(p.out.String(), "exec format error") {
			t.Errorf("the agent exited without an exec format error: %v\n%s", p.err, p.out)
		}
		// The next start, as systemd's: the launcher cannot exec the
		// trial either, rolls it back and runs itself.
		p = startAgent(t, qemu, run...)
		s := r.waitFW("the armv7 launcher back on 1.0.0", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == p.cmd.Process.Pid && s.Running != "" })
		if s.Running != "1.0.0" || s.Trial != nil || s.Last == nil || s.Last.Result != "rolled-back" || !strings.Contains(s.Last.Reason, "exec format error") || len(s.Bad) != 1 {
			t.Fatalf("after a start that could not exec the trial: %+v", s)
		}
		stopAgent(t, p)
		t.Skipf("no binfmt_misc entry runs ARM ELF files: qemu-user hands the launcher's execve of the armv7 slot binary to the host kernel, which fails with ENOEXEC; "+
			"rolled back as %q. Register one (scripts/test.sh: mount binfmt_misc, %s) for the update to commit", s.Last.Reason, "/usr/lib/binfmt.d/qemu-arm.conf > /proc/sys/fs/binfmt_misc/register")
	}
	t.Logf("binfmt_misc entry %s runs ARM ELF files", entry)

	// The trial runs in the same process, the slot binary exec'd through
	// binfmt_misc; it needs a record delivered.
	testsync.Until(t, 60*time.Second, "the armv7 trial's ingest socket", func() bool {
		s := r.fwStatus()
		return s.Running == "1.1.0" && s.DaemonPID == pid
	})
	send(t, r.sock, 1)
	s := r.waitFW("1.1.0 committed on armv7", 90*time.Second, func(s agent.FirmwareStatus) bool {
		return s.Trial == nil && s.Committed == "1.1.0" && s.Counter != nil && *s.Counter == 1
	})
	if s.DaemonPID != pid || s.Last == nil || s.Last.Result != "committed" || s.ActiveSlot == "" {
		t.Fatalf("after the commit: %+v (want pid %d: the same process, exec'd)", s, pid)
	}
	slot := filepath.Join(r.state, "firmware", "slots", s.ActiveSlot, "iotagent")
	if out, err := exec.Command(qemu, slot, "version").Output(); err != nil || !strings.HasPrefix(string(out), "iotagent 1.1.0\n") || !strings.Contains(string(out), "linux/armv7") {
		t.Errorf("the committed slot's binary: version = %q, %v", out, err)
	}

	// 1.2.0 is a real armv7 binary that crashes at every start.
	file, manifest = r.releaseFor("linux/armv7", "1.2.0", 2, armCrasher(t))
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code != 0 {
		t.Fatalf("firmware apply 1.2.0: %s", errs)
	}
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("the crashing armv7 trial did not exit:\n%s", p.out)
	}
	if !strings.Contains(p.out.String(), "crashing") {
		t.Fatalf("the agent exited before the crashing trial ran: %v\n%s", p.err, p.out)
	}
	for attempt := 2; attempt <= 3; attempt++ {
		out, err := exec.Command(qemu, run...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "crashing") {
			t.Fatalf("start %d of the crashing trial: %v\n%s", attempt, err, out)
		}
	}
	p = startAgent(t, qemu, run...) // the fourth start: rolled back
	s = r.waitFW("1.2.0 rolled back on armv7", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == p.cmd.Process.Pid && s.Running != "" })
	if s.Running != "1.1.0" || s.Trial != nil || s.Last == nil || s.Last.Result != "rolled-back" || !strings.Contains(s.Last.Reason, "3 starts") ||
		len(s.Bad) != 1 || s.Bad[0] != "iotagent@1.2.0" || s.Counter == nil || *s.Counter != 1 {
		t.Fatalf("after three crashing starts: %+v", s)
	}
	stopAgent(t, p)
}
