// Package buildinfo reports what a binary was built from: version, commit
// and time stamped by scripts/crossbuild.sh through -ldflags -X, and the Go
// toolchain and target read from the binary itself.
package buildinfo

import (
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// Stamped at link time (-X); never written at run time.
var (
	version   = "dev"
	commit    = ""
	buildTime = "" // Unix seconds of the commit, for reproducible builds
	// firmwareRootKeys are the firmware root public keys a build trusts
	// (base64 ed25519, comma-separated), besides the configured ones.
	firmwareRootKeys = ""
)

// FirmwareRootKeys returns the firmware root public keys built in
// (-X …/buildinfo.firmwareRootKeys=KEY,KEY), as base64 text.
func FirmwareRootKeys() []string {
	if firmwareRootKeys == "" {
		return nil
	}
	return strings.Split(firmwareRootKeys, ",")
}

// Info describes the running binary.
type Info struct {
	Version   string    `json:"version"`
	Commit    string    `json:"commit"`
	BuildTime time.Time `json:"build_time"`
	GoVersion string    `json:"go_version"`
	GOOS      string    `json:"goos"`
	GOARCH    string    `json:"goarch"`
	// GOARM is the ARM architecture level (6, 7) for GOARCH=arm.
	GOARM string `json:"goarm,omitempty"`
}

// Get returns the binary's build information. Fields not stamped at link
// time fall back to the VCS data the go command records, when present.
func Get() Info {
	info := Info{
		Version:   version,
		Commit:    commit,
		GoVersion: runtime.Version(),
		GOOS:      runtime.GOOS,
		GOARCH:    runtime.GOARCH,
	}
	if s, err := strconv.ParseInt(buildTime, 10, 64); err == nil {
		info.BuildTime = time.Unix(s, 0).UTC()
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "GOARM":
				info.GOARM = s.Value
			case "vcs.revision":
				if info.Commit == "" {
					info.Commit = s.Value
				}
			case "vcs.time":
				if info.BuildTime.IsZero() {
					info.BuildTime, _ = time.Parse(time.RFC3339, s.Value)
				}
			}
		}
	}
	return info
}

// Arch renders the target as GOARCH, or armv6/armv7 for 32-bit ARM.
func (i Info) Arch() string {
	if i.GOARCH == "arm" && i.GOARM != "" {
		return "armv" + i.GOARM[:1]
	}
	return i.GOARCH
}
