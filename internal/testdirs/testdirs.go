// Package testdirs makes directories with properties tests need and a
// normal t.TempDir lacks. For tests only.
package testdirs

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// ReadOnly returns an empty directory in which no file can be created, as
// on a gateway whose root file system is mounted read-only. As root, which
// ignores permission bits, it is a read-only tmpfs mount (unmounted at
// cleanup); otherwise a directory of mode 0500.
func ReadOnly(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(dir, 0o700) })
		return dir
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("testdirs: mounting a read-only tmpfs (needed as root to get an unwritable dir): %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("testdirs: umount %s: %v\n%s", dir, err, out)
		}
	})
	return dir
}
