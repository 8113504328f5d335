package senml

import (
	"errors"
	"fmt"
)

// ErrInvalid is matched, with errors.Is, by every error of the parsers and
// of Validate: the input is not well-formed JSON or CBOR, breaks a rule of
// RFC 8428, uses what this package does not support (a newer version, a
// must-understand label, a CBOR tag) or exceeds a limit. Such input is
// rejected for good; sending it again cannot help.
var ErrInvalid = errors.New("senml: invalid pack")

// invalidError carries the message that names the record and the label;
// its text does not repeat ErrInvalid's.
type invalidError struct {
	msg string
	err error // the underlying error, e.g. a *json.SyntaxError, or nil
}

func (e *invalidError) Error() string {
	if e.err != nil {
		return "senml: " + e.msg + ": " + e.err.Error()
	}
	return "senml: " + e.msg
}

func (e *invalidError) Is(target error) bool { return target == ErrInvalid }
func (e *invalidError) Unwrap() error        { return e.err }

func invalidf(format string, args ...any) error {
	return &invalidError{msg: fmt.Sprintf(format, args...)}
}

// recordf is invalidf for a fault of record i.
func recordf(i int, format string, args ...any) error {
	return &invalidError{msg: fmt.Sprintf("record %d: ", i) + fmt.Sprintf(format, args...)}
}
