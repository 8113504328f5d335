package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
)

// DefaultSpec is the TPM used when none is named: the kernel's resource
// manager, which lets several processes share the TPM and virtualizes
// transient handles.
const DefaultSpec = "/dev/tpmrm0"

// Spec names a TPM. Its text forms are:
//
//	/dev/tpmrm0, /dev/tpm0   a character device (any absolute path)
//	unix:PATH                a swtpm unix socket (--server type=unixio)
//	tcp:HOST:PORT            a swtpm TCP command port (--server type=tcp)
type Spec struct {
	Kind SpecKind
	// Path is the device or socket path; Addr the TCP address.
	Path string
	Addr string
}

// SpecKind says how a TPM is reached.
type SpecKind int

const (
	Device SpecKind = iota + 1
	UnixSocket
	TCP
)

// ParseSpec parses the text form of a Spec.
func ParseSpec(s string) (Spec, error) {
	switch {
	case s == "":
		return Spec{Kind: Device, Path: DefaultSpec}, nil
	case strings.HasPrefix(s, "/"):
		return Spec{Kind: Device, Path: s}, nil
	case strings.HasPrefix(s, "unix:"):
		p := strings.TrimPrefix(s, "unix:")
		if p == "" {
			return Spec{}, fmt.Errorf("%w %q: unix: needs a socket path", ErrBadSpec, s)
		}
		return Spec{Kind: UnixSocket, Path: p}, nil
	case strings.HasPrefix(s, "tcp:"):
		a := strings.TrimPrefix(s, "tcp:")
		if _, _, err := net.SplitHostPort(a); err != nil {
			return Spec{}, fmt.Errorf("%w %q: tcp: needs HOST:PORT", ErrBadSpec, s)
		}
		return Spec{Kind: TCP, Addr: a}, nil
	}
	scheme, _, ok := strings.Cut(s, ":")
	if ok {
		return Spec{}, fmt.Errorf("%w %q: unknown scheme %q (want a device path, unix:PATH or tcp:HOST:PORT)", ErrBadSpec, s, scheme)
	}
	return Spec{}, fmt.Errorf("%w %q: want a device path, unix:PATH or tcp:HOST:PORT", ErrBadSpec, s)
}

// String returns the text form of s.
func (s Spec) String() string {
	switch s.Kind {
	case UnixSocket:
		return "unix:" + s.Path
	case TCP:
		return "tcp:" + s.Addr
	default:
		return s.Path
	}
}

// commandTimeout bounds one TPM command on a socket. Real TPMs take seconds
// for RSA key generation; a hung emulator must not hang the agent forever.
const commandTimeout = 2 * time.Minute

// maxResponse bounds a TPM response; the largest TPM2 responses are a few KiB.
const maxResponse = 64 << 10

// openTransport connects to the TPM named by spec and checks that it is
// reachable, so that a wrong path is reported at open, naming the path.
func openTransport(spec Spec) (transport.TPMCloser, error) {
	switch spec.Kind {
	case Device:
		fi, err := os.Stat(spec.Path)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrUnreachable, spec.Path, unwrapPathError(err))
		}
		if fi.Mode()&os.ModeDevice == 0 {
			return nil, fmt.Errorf("%w: %s is not a character device (for swtpm use unix:PATH or tcp:HOST:PORT)", ErrUnreachable, spec.Path)
		}
		f, err := os.OpenFile(spec.Path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrUnreachable, spec.Path, unwrapPathError(err))
		}
		return retryTransport{&deviceTransport{f: f}}, nil
	case UnixSocket, TCP:
		st := &socketTransport{network: "unix", addr: spec.Path}
		if spec.Kind == TCP {
			st.network, st.addr = "tcp", spec.Addr
		}
		c, err := st.dial()
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrUnreachable, spec, err)
		}
		c.Close()
		return retryTransport{st}, nil
	}
	return nil, fmt.Errorf("%w: empty spec", ErrBadSpec)
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// retryTransport resends a command the TPM answered with a warning that
// means "not started, try again" (TPM 2.0 Part 1 §6.6.2, Part 2 §6.6.3):
// TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING. The TPM did not execute the
// command, so resending the same bytes is safe, sessions included.
type retryTransport struct {
	transport.TPMCloser
}

const (
	rcRetry   = 0x922
	rcYielded = 0x908
	rcTesting = 0x90A
)

func (r retryTransport) Send(cmd []byte) ([]byte, error) {
	delay := time.Millisecond
	for attempt := 0; ; attempt++ {
		rsp, err := r.TPMCloser.Send(cmd)
		if err != nil || len(rsp) < 10 || attempt == 20 {
			return rsp, err
		}
		switch binary.BigEndian.Uint32(rsp[6:10]) {
		case rcRetry, rcYielded, rcTesting:
			time.Sleep(delay)
			delay = min(2*delay, 100*time.Millisecond)
		default:
			return rsp, nil
		}
	}
}

// socketTransport speaks the raw TPM command protocol to swtpm. swtpm serves
// one connection at a time, so a connection is opened per command: other
// processes (tpm2-tools, a second iotagent command) can use the same
// emulator between our commands. Transient objects survive the disconnect:
// swtpm is not a resource manager.
type socketTransport struct {
	network, addr string
}

func (s *socketTransport) dial() (net.Conn, error) {
	c, err := net.DialTimeout(s.network, s.addr, 10*time.Second)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err != nil {
			return nil, oe.Err
		}
		return nil, err
	}
	return c, nil
}

func (s *socketTransport) Send(cmd []byte) ([]byte, error) {
	c, err := s.dial()
	if err != nil {
		return nil, fmt.Errorf("tpm %s:%s: %w", s.network, s.addr, err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(commandTimeout)); err != nil {
		return nil, err
	}
	if _, err := c.Write(cmd); err != nil {
		return nil, fmt.Errorf("tpm %s:%s: sending command: %w", s.network, s.addr, err)
	}
	return readResponse(c)
}

func (s *socketTransport) Close() error { return nil }

// readResponse reads one TPM response: a 10-byte header whose size field
// gives the length of the whole response.
func readResponse(r io.Reader) ([]byte, error) {
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, fmt.Errorf("reading TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("TPM response size %d out of range", size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(r, rsp[10:]); err != nil {
		return nil, fmt.Errorf("reading TPM response body: %w", err)
	}
	return rsp, nil
}

// deviceTransport talks to /dev/tpm* : one write per command, one read of
// the whole response.
type deviceTransport struct {
	f *os.File
}

func (d *deviceTransport) Send(cmd []byte) ([]byte, error) {
	if _, err := d.f.Write(cmd); err != nil {
		return nil, fmt.Errorf("tpm %s: %w", d.f.Name(), err)
	}
	buf := make([]byte, maxResponse)
	n, err := d.f.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("tpm %s: %w", d.f.Name(), err)
	}
	return buf[:n], nil
}

func (d *deviceTransport) Close() error { return d.f.Close() }
