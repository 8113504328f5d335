package firmware_test

import (
	"errors"
	"testing"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
)

// The anti-rollback policy, one refusal per rule, and what passes.
func TestAcceptPolicy(t *testing.T) {
	v := func(s string) release.Version {
		t.Helper()
		r, err := release.ParseVersion(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	m := func(version string, svn uint32, minFrom string) *release.Manifest {
		return &release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: version, SVN: svn, HW: []string{"linux/armv7"}, MinFrom: minFrom}
	}
	dev := firmware.Device{Committed: v("1.4.0"), Counter: 5, HW: "linux/armv7", Bad: map[string]bool{"iotagent@1.6.0": true}}
	for _, tc := range []struct {
		name string
		m    *release.Manifest
		d    firmware.Device
		want error
	}{
		{"newer, same svn", m("1.5.0", 5, ""), dev, nil},
		{"newer, higher svn", m("2.0.0", 9, "1.0.0"), dev, nil},
		{"a pre-release above the committed one", m("1.5.0-rc.1", 5, ""), dev, nil},
		{"downgrade", m("1.3.9", 9, ""), dev, firmware.ErrDowngrade},
		{"the committed version again", m("1.4.0", 9, ""), dev, firmware.ErrDowngrade},
		{"the release of 1.4.0 is above its rc", m("1.4.0-rc.9", 9, ""), dev, firmware.ErrDowngrade},
		{"svn below the counter", m("1.5.0", 4, ""), dev, firmware.ErrSecurityVersion},
		{"svn too far above the counter to record", m("1.5.0", 5+1025, ""), dev, firmware.ErrSecurityVersion},
		{"marked bad, with other build metadata", m("1.6.0+b2", 9, ""), dev, firmware.ErrMarkedBad},
		{"marked bad", m("1.6.0", 9, ""), dev, firmware.ErrMarkedBad},
		{"needs a newer version first", m("3.0.0", 9, "2.0.0"), dev, firmware.ErrMinFrom},
		{"other hardware", m("1.5.0", 5, ""), func() firmware.Device { d := dev; d.HW = "linux/arm64"; return d }(), release.ErrIncompatible},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := firmware.Accept(tc.m, tc.d); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Errorf("Accept = %v, want %v", err, tc.want)
			}
		})
	}
}
