package firmware

import (
	"errors"
	"fmt"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/tpm"
)

// Refusals of a release by the device's own state (the anti-rollback
// policy), beyond the metadata checks of release.Trust.
var (
	// ErrDowngrade: the release's version is not above the committed one.
	ErrDowngrade = errors.New("firmware: not above the committed version")
	// ErrSecurityVersion: the release's svn is below the TPM counter.
	ErrSecurityVersion = errors.New("firmware: security version below the TPM counter")
	// ErrMarkedBad: the release failed its trial here before; it is never
	// tried again.
	ErrMarkedBad = errors.New("firmware: release marked bad on this device")
	// ErrMinFrom: the release needs a newer running version first.
	ErrMinFrom = errors.New("firmware: the running version is below the release's min_from")
)

// Device is what a release is checked against: what the device runs and
// has committed, its TPM counter, its hardware and the releases it
// marked bad.
type Device struct {
	// Committed is the version committed last (the running one after a
	// commit).
	Committed release.Version
	// Counter is the TPM anti-rollback counter's value.
	Counter uint64
	// HW is GOOS/GOARCH with the ARM version (linux/armv7); Board the
	// configuration's board string, if any.
	HW, Board string
	// Bad holds the releases marked bad, as "NAME@VERSION".
	Bad map[string]bool
}

// BadKey names a release in Device.Bad: its name and version, build
// metadata left out (versions that differ only there are one release).
func BadKey(m *release.Manifest) string {
	v := m.SemVer()
	v.Build = ""
	return m.Name + "@" + v.String()
}

// Accept applies the anti-rollback policy to an opened manifest: for
// this hardware, not marked bad, its version above the committed one,
// its svn at least the TPM counter, the running version at least its
// min_from.
func Accept(m *release.Manifest, d Device) error {
	if err := m.Compatible(d.HW, d.Board); err != nil {
		return err
	}
	if d.Bad[BadKey(m)] {
		return fmt.Errorf("%w: %s", ErrMarkedBad, BadKey(m))
	}
	if v := m.SemVer(); v.Compare(d.Committed) <= 0 {
		return fmt.Errorf("%w: %s %s, the committed version is %s", ErrDowngrade, m.Name, v, d.Committed)
	}
	if uint64(m.SVN) < d.Counter {
		return fmt.Errorf("%w: %s %s has svn %d, the TPM counter is %d", ErrSecurityVersion, m.Name, m.Version, m.SVN, d.Counter)
	}
	if uint64(m.SVN) > d.Counter+tpm.MaxCounterStep {
		return fmt.Errorf("%w: %s %s has svn %d, more than %d above the TPM counter %d (it could never be recorded)", ErrSecurityVersion, m.Name, m.Version, m.SVN, tpm.MaxCounterStep, d.Counter)
	}
	if m.MinFrom != "" {
		least, _ := release.ParseVersion(m.MinFrom) // validated when opened
		if d.Committed.Compare(least) < 0 {
			return fmt.Errorf("%w: %s %s needs %s or later, this device runs %s", ErrMinFrom, m.Name, m.Version, least, d.Committed)
		}
	}
	return nil
}
