package release

import (
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Release types.
const (
	// TypeAgent: the agent binary itself (self-update, A/B slots).
	TypeAgent = "agent"
	// TypeImage: anything handed to an installer command (a RAUC bundle,
	// an SWUpdate image).
	TypeImage = "image"
)

// MaxLength caps a payload's signed length (4 GiB).
const MaxLength = 4 << 30

// Manifest is what a signing key signs about one payload.
type Manifest struct {
	Name    string `json:"name"`
	Type    string `json:"type"`
	Version string `json:"version"` // semver; only goes up
	// SVN is the security version: a device refuses a release below the
	// value its TPM counter holds, and raises the counter to it once the
	// release is committed.
	SVN uint32 `json:"svn"`
	// HW lists the targets the payload runs on, GOOS/GOARCH with the ARM
	// version (linux/armv7, linux/arm64); Board, when set, must equal the
	// board string of the device's configuration.
	HW      []string  `json:"hw"`
	Board   string    `json:"board,omitempty"`
	Length  int64     `json:"length"`
	SHA256  string    `json:"sha256"` // hex, lower case
	Expires time.Time `json:"expires"`
	// MinFrom, when set, is the lowest version a device must run to take
	// this release (a migration that needs an intermediate step).
	MinFrom string `json:"min_from,omitempty"`
}

// The syntax of names, targets and digests, checked by hand: regexp
// would add about 0.25 MB to the agent for three patterns
// (TestSyntaxMatchesPatterns holds them to the regular expressions
// they stand for).

func lowerAlnum(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }

// all reports whether s is min to max bytes, each allowed by ok.
func all(s string, min, max int, ok func(byte) bool) bool {
	if len(s) < min || len(s) > max {
		return false
	}
	for i := range len(s) {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

// validName: ^[a-z0-9][a-z0-9._-]{0,63}$
func validName(s string) bool {
	return len(s) > 0 && lowerAlnum(s[0]) && all(s[1:], 0, 63, func(c byte) bool { return lowerAlnum(c) || c == '.' || c == '_' || c == '-' })
}

// validHW: ^[a-z0-9]{1,16}/[a-z0-9_]{1,16}$
func validHW(s string) bool {
	osName, arch, ok := strings.Cut(s, "/")
	return ok && all(osName, 1, 16, lowerAlnum) && all(arch, 1, 16, func(c byte) bool { return lowerAlnum(c) || c == '_' })
}

// validHex64: ^[0-9a-f]{64}$
func validHex64(s string) bool {
	return all(s, 64, 64, func(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' })
}

// MaxHW bounds a manifest's targets.
const MaxHW = 16

func (m *Manifest) validate() error {
	switch {
	case !validName(m.Name):
		return fmt.Errorf("manifest: name %q: want 1-64 of a-z 0-9 . _ - starting with a letter or digit", m.Name)
	case m.Type != TypeAgent && m.Type != TypeImage:
		return fmt.Errorf("manifest %s: type %q, want %q or %q", m.Name, m.Type, TypeAgent, TypeImage)
	case len(m.HW) == 0 || len(m.HW) > MaxHW:
		return fmt.Errorf("manifest %s: %d hw targets, want 1 to %d", m.Name, len(m.HW), MaxHW)
	case len(m.Board) > 64:
		return fmt.Errorf("manifest %s: board longer than 64 bytes", m.Name)
	case m.Length < 1 || m.Length > MaxLength:
		return fmt.Errorf("manifest %s: length %d, want 1 to %d", m.Name, m.Length, int64(MaxLength))
	case !validHex64(m.SHA256):
		return fmt.Errorf("manifest %s: sha256 %q is not 64 lower-case hex digits", m.Name, m.SHA256)
	case m.Expires.IsZero():
		return fmt.Errorf("manifest %s: no expiry", m.Name)
	}
	for _, hw := range m.HW {
		if !validHW(hw) {
			return fmt.Errorf("manifest %s: hw %q: want OS/ARCH such as linux/armv7", m.Name, hw)
		}
	}
	if _, err := ParseVersion(m.Version); err != nil {
		return fmt.Errorf("manifest %s: %w", m.Name, err)
	}
	if m.MinFrom != "" {
		if _, err := ParseVersion(m.MinFrom); err != nil {
			return fmt.Errorf("manifest %s: min_from: %w", m.Name, err)
		}
	}
	return nil
}

// SemVer is the parsed Version (validated when the manifest was opened).
func (m *Manifest) SemVer() Version {
	v, _ := ParseVersion(m.Version)
	return v
}

// Digest is the decoded SHA256.
func (m *Manifest) Digest() []byte {
	b, _ := hex.DecodeString(m.SHA256)
	return b
}

// ErrIncompatible: the release is not for this device's hardware.
var ErrIncompatible = errors.New("release: not for this hardware")

// Compatible checks that the release runs on hw (linux/armv7) and, when
// the manifest names a board, on board.
func (m *Manifest) Compatible(hw, board string) error {
	if !slices.Contains(m.HW, hw) {
		return fmt.Errorf("%w: %s is for %v, this device is %s", ErrIncompatible, m.Name, m.HW, hw)
	}
	if m.Board != "" && m.Board != board {
		return fmt.Errorf("%w: %s is for board %q, this device is %q", ErrIncompatible, m.Name, m.Board, board)
	}
	return nil
}

// ValidName reports whether s can name a release.
func ValidName(s string) bool { return validName(s) }
