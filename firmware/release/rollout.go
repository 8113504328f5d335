package release

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// The device's side of a rollout, spoken over the station's mutual TLS
// (the device is the certificate's subject):
//
//	POST /firmware/check   Check      → 200 Assignment, or 204 (nothing for it)
//	POST /firmware/report  Report     → 204
//
// A device checks at its poll interval (with jitter), when nudged
// (MQTT devices/ID/cmd {"op":"firmware-check"}) and when asked by
// iotagent firmware check; it reports every step of an update.

// Steps of a device's update, in the order they happen; Committed,
// RolledBack and Refused end it.
const (
	StepDownloading = "downloading"
	StepDownloaded  = "downloaded"
	StepInstalling  = "installing"
	StepTrial       = "trial"
	StepCommitted   = "committed"
	StepRolledBack  = "rolled-back"
	StepRefused     = "refused"
	// StepCurrent is recorded by the station, never reported: the device
	// already runs the release (it told so in its check), so the rollout
	// has nothing to do there. It ends the update without counting as a
	// failure.
	StepCurrent = "current"
)

// Final reports whether step ends an update on the device.
func Final(step string) bool {
	return step == StepCommitted || step == StepRolledBack || step == StepRefused || step == StepCurrent
}

// Failed reports whether step ends an update as a failure.
func Failed(step string) bool { return step == StepRolledBack || step == StepRefused }

func validStep(step string) bool {
	switch step {
	case StepDownloading, StepDownloaded, StepInstalling, StepTrial, StepCommitted, StepRolledBack, StepRefused:
		return true
	}
	return false
}

// Size caps of the rollout messages.
const (
	MaxCheckSize  = 4 << 10
	MaxReportSize = 4 << 10
	// MaxReasonLen caps a report's reason (a one-line error).
	MaxReasonLen = 512
)

// Check is what a device sends when it asks for its assignment: what
// it runs, so that the station knows each device's version.
type Check struct {
	// Agent is the running agent's release name and version.
	Agent Running `json:"agent"`
	// Images are the committed system images, by release name.
	Images []Running `json:"images,omitempty"`
}

// Running is a release a device runs.
type Running struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Assignment is the release a rollout assigns a device.
type Assignment struct {
	Rollout string `json:"rollout"`
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Report is one step of a device's update.
type Report struct {
	// Rollout is the rollout that assigned the release; "" for an update
	// applied locally (iotagent firmware apply).
	Rollout string `json:"rollout,omitempty"`
	Name    string `json:"name"`
	Version string `json:"version"`
	Step    string `json:"step"`
	// Reason is why it was refused or rolled back (one line).
	Reason string `json:"reason,omitempty"`
	// Running is the agent version running when the report is sent.
	Running string    `json:"running,omitempty"`
	At      time.Time `json:"at"`
}

// ValidRolloutID reports whether id is a rollout ID: what ValidName
// allows.
func ValidRolloutID(id string) bool { return ValidName(id) }

// ParseCheck reads a Check strictly (caps, known fields, valid names).
func ParseCheck(b []byte) (*Check, error) {
	var c Check
	if err := decodeMessage(b, MaxCheckSize, "check", &c); err != nil {
		return nil, err
	}
	if len(c.Images) > 16 {
		return nil, errors.New("release: check names more than 16 images")
	}
	for _, r := range append([]Running{c.Agent}, c.Images...) {
		if !ValidName(r.Name) {
			return nil, fmt.Errorf("release: check: release name %q", r.Name)
		}
		if len(r.Version) > 64 || !printable(r.Version) {
			return nil, errors.New("release: check: a version is not at most 64 bytes of printable UTF-8")
		}
	}
	return &c, nil
}

// ParseReport reads a Report strictly (caps, known fields, a known
// step, a valid name and version).
func ParseReport(b []byte) (*Report, error) {
	var r Report
	if err := decodeMessage(b, MaxReportSize, "report", &r); err != nil {
		return nil, err
	}
	if r.Rollout != "" && !ValidRolloutID(r.Rollout) {
		return nil, fmt.Errorf("release: report: rollout ID %q", r.Rollout)
	}
	if !ValidName(r.Name) {
		return nil, fmt.Errorf("release: report: release name %q", r.Name)
	}
	if _, err := ParseVersion(r.Version); err != nil {
		return nil, fmt.Errorf("release: report: %w", err)
	}
	if !validStep(r.Step) {
		return nil, fmt.Errorf("release: report: unknown step %q", r.Step)
	}
	if len(r.Reason) > MaxReasonLen || !printable(r.Reason) {
		return nil, fmt.Errorf("release: report: a reason is one line of at most %d bytes of printable UTF-8", MaxReasonLen)
	}
	if len(r.Running) > 64 || !printable(r.Running) {
		return nil, errors.New("release: report: the running version is not at most 64 bytes of printable UTF-8")
	}
	return &r, nil
}

// ParseAssignment reads an Assignment strictly.
func ParseAssignment(b []byte) (*Assignment, error) {
	var a Assignment
	if err := decodeMessage(b, MaxCheckSize, "assignment", &a); err != nil {
		return nil, err
	}
	if !ValidRolloutID(a.Rollout) || !ValidName(a.Name) {
		return nil, fmt.Errorf("release: assignment of %q to rollout %q", a.Name, a.Rollout)
	}
	if _, err := ParseVersion(a.Version); err != nil {
		return nil, fmt.Errorf("release: assignment: %w", err)
	}
	return &a, nil
}

// printable reports whether s is valid UTF-8 without control
// characters: what a device sends ends up on an operator's terminal.
func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// CleanReason makes an error's text a report's reason: control
// characters (line breaks among them) become spaces, invalid UTF-8 is
// replaced, and it is cut, at a character boundary, to MaxReasonLen
// bytes as JSON will carry it.
func CleanReason(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
	if len(s) <= MaxReasonLen {
		return s
	}
	cut := MaxReasonLen - len("...")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// decodeMessage decodes one JSON object of at most max bytes, as
// strictly as signed metadata.
func decodeMessage(b []byte, max int, what string, v any) error {
	if len(b) > max {
		return fmt.Errorf("release: %s: %w", what, ErrTooLarge)
	}
	if err := strictUnmarshal(b, v); err != nil {
		return fmt.Errorf("release: %s: %w", what, err)
	}
	return nil
}
