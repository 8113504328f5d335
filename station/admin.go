package station

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/internal/unixsock"
)

// Token is a one-time bootstrap credential: HTTP Basic DEVICE:SECRET for
// simpleenroll.
type Token struct {
	Device  string    `json:"device"`
	Secret  string    `json:"secret"`
	Expires time.Time `json:"expires"`
}

// Credential returns the HTTP Basic credential, DEVICE:SECRET.
func (t Token) Credential() string { return t.Device + ":" + t.Secret }

// MaxTokenTTL bounds how long a bootstrap token stays usable.
const MaxTokenTTL = 30 * 24 * time.Hour

// CreateToken issues a one-time token for device id valid for ttl,
// replacing any unused earlier one. The decision is audited either way.
func (s *Station) CreateToken(id string, ttl time.Duration) (Token, error) {
	t, err := s.createToken(id, ttl)
	s.auditAdmin("token", id, "", err)
	return t, err
}

// auditAdmin records the decision on an administrative request: accepted,
// or refused with err as the reason.
func (s *Station) auditAdmin(event, device, serial string, err error) {
	e := AuditEntry{Time: s.now().UTC(), Event: event, Result: "accepted", Device: device, Serial: serial}
	if err != nil {
		e.Result, e.Reason, e.Serial = "refused", err.Error(), ""
	}
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
}

func (s *Station) createToken(id string, ttl time.Duration) (Token, error) {
	if err := ValidDeviceID(id); err != nil {
		return Token{}, err
	}
	if s.reg.isService(id) {
		return Token{}, errServiceName(id)
	}
	if ttl <= 0 || ttl > MaxTokenTTL {
		return Token{}, fmt.Errorf("token TTL %v: want more than 0 and at most %v", ttl, MaxTokenTTL)
	}
	if d, err := s.reg.device(id); err != nil {
		return Token{}, err
	} else if d != nil && d.Status == StatusRevoked {
		return Token{}, fmt.Errorf("device %s is revoked", id)
	} else if d != nil && d.EKSHA256 != "" {
		return Token{}, fmt.Errorf("device %s is bound to a TPM (EK sha256:%s): a token cannot enroll it, only that TPM can", id, d.EKSHA256)
	}
	if err := s.manifestFree(id); err != nil {
		return Token{}, err
	}
	raw := make([]byte, 24)
	if _, err := io.ReadFull(s.rand, raw); err != nil {
		return Token{}, err
	}
	t := Token{Device: id, Secret: base64.RawURLEncoding.EncodeToString(raw), Expires: s.now().Add(ttl).UTC().Truncate(time.Second)}
	if err := s.reg.putToken(id, t.Secret, t.Expires); err != nil {
		return Token{}, err
	}
	return t, nil
}

// Devices lists the registry.
func (s *Station) Devices() ([]Device, error) { return s.reg.devices() }

// Approve lets a device held for approval enroll at its next attempt.
func (s *Station) Approve(id string) error {
	err := s.reg.approve(id)
	s.auditAdmin("approve", id, "", err)
	return err
}

// Admin is the station's administrative operations. OpenAdmin returns one
// that talks to a running station through its admin socket, or opens the
// station directory itself when none runs.
type Admin interface {
	Devices(ctx context.Context) ([]Device, error)
	Revoke(ctx context.Context, id string) error
	// RevokeService revokes every certificate issued to a service.
	RevokeService(ctx context.Context, name string) error
	// RevokeSerial revokes one certificate by its serial (hex).
	RevokeSerial(ctx context.Context, serial string) error
	Approve(ctx context.Context, id string) error
	IssueService(ctx context.Context, req ServiceRequest) (*ServiceCert, error)
	TrustPEM(ctx context.Context) ([]byte, error)
	CreateToken(ctx context.Context, id string, ttl time.Duration) (Token, error)
	// InstallKeyList and PublishRelease are Station's, for the firmware
	// repository (the payload file is read by the station's process).
	InstallKeyList(ctx context.Context, raw []byte) error
	PublishRelease(ctx context.Context, payloadPath string, manifest []byte) (*release.Manifest, error)
	// CreateRollout, Rollouts, PauseRollout, ResumeRollout and
	// AbortRollout are Station's, for staged rollouts.
	CreateRollout(ctx context.Context, req RolloutRequest) (*RolloutStatus, error)
	Rollouts(ctx context.Context, id string) ([]RolloutStatus, error)
	PauseRollout(ctx context.Context, id string) error
	ResumeRollout(ctx context.Context, id string) error
	AbortRollout(ctx context.Context, id string) error
	Close() error
}

// OpenAdmin connects to the station serving dir, or opens dir directly.
func OpenAdmin(dir string) (Admin, error) {
	sock := filepath.Join(dir, fileAdminSock)
	if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
		c.Close()
		return &adminClient{c: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}}, nil
	}
	s, err := Open(Config{Dir: dir})
	if err != nil {
		return nil, err
	}
	return localAdmin{s}, nil
}

type localAdmin struct{ s *Station }

func (l localAdmin) Devices(context.Context) ([]Device, error)  { return l.s.Devices() }
func (l localAdmin) Revoke(_ context.Context, id string) error  { return l.s.Revoke(id) }
func (l localAdmin) Approve(_ context.Context, id string) error { return l.s.Approve(id) }
func (l localAdmin) RevokeService(_ context.Context, name string) error {
	return l.s.RevokeService(name)
}
func (l localAdmin) RevokeSerial(_ context.Context, serial string) error {
	return l.s.RevokeSerial(serial)
}
func (l localAdmin) IssueService(ctx context.Context, r ServiceRequest) (*ServiceCert, error) {
	return l.s.IssueService(ctx, r)
}
func (l localAdmin) TrustPEM(context.Context) ([]byte, error) { return l.s.TrustPEM(), nil }
func (l localAdmin) CreateToken(_ context.Context, id string, ttl time.Duration) (Token, error) {
	return l.s.CreateToken(id, ttl)
}
func (l localAdmin) InstallKeyList(_ context.Context, raw []byte) error {
	return l.s.InstallKeyList(raw)
}
func (l localAdmin) PublishRelease(_ context.Context, path string, manifest []byte) (*release.Manifest, error) {
	return l.s.PublishRelease(path, manifest)
}
func (l localAdmin) CreateRollout(_ context.Context, req RolloutRequest) (*RolloutStatus, error) {
	return l.s.CreateRollout(req)
}
func (l localAdmin) Rollouts(_ context.Context, id string) ([]RolloutStatus, error) {
	return l.s.Rollouts(id)
}
func (l localAdmin) PauseRollout(_ context.Context, id string) error  { return l.s.PauseRollout(id) }
func (l localAdmin) ResumeRollout(_ context.Context, id string) error { return l.s.ResumeRollout(id) }
func (l localAdmin) AbortRollout(_ context.Context, id string) error  { return l.s.AbortRollout(id) }
func (l localAdmin) Close() error                                     { return l.s.Close() }

// adminServer serves the admin API on admin.sock (mode 0600: whoever can
// read the station's keys may administer it, nobody else).
type adminServer struct {
	srv  *http.Server
	l    net.Listener
	path string
}

func (s *Station) listenAdmin() (*adminServer, error) {
	path := s.path(fileAdminSock)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another station is serving %s (admin socket %s answers)", s.dir, path)
	}
	// 0600 from its first moment (the directory is 0700 already; the
	// socket says the same, whatever the umask).
	l, err := unixsock.Listen(path, 0o600)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /devices", func(w http.ResponseWriter, r *http.Request) {
		d, err := s.Devices()
		adminReply(w, d, err)
	})
	mux.HandleFunc("POST /revoke", func(w http.ResponseWriter, r *http.Request) {
		err := s.Revoke(r.URL.Query().Get("id"))
		adminReply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /revoke-service", func(w http.ResponseWriter, r *http.Request) {
		err := s.RevokeService(r.URL.Query().Get("name"))
		adminReply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /revoke-serial", func(w http.ResponseWriter, r *http.Request) {
		err := s.RevokeSerial(r.URL.Query().Get("serial"))
		adminReply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /approve", func(w http.ResponseWriter, r *http.Request) {
		err := s.Approve(r.URL.Query().Get("id"))
		adminReply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /issue", func(w http.ResponseWriter, r *http.Request) {
		var req ServiceRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
			err = fmt.Errorf("service certificate request: %w", err)
			s.auditAdmin("issue-service", req.Name, "", err)
			adminReply(w, nil, err)
			return
		}
		c, err := s.IssueService(r.Context(), req)
		adminReply(w, c, err)
	})
	mux.HandleFunc("POST /firmware/keylist", func(w http.ResponseWriter, r *http.Request) {
		raw, err := io.ReadAll(io.LimitReader(r.Body, release.MaxKeyListSize+1))
		if err == nil {
			err = s.InstallKeyList(raw)
		}
		adminReply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /firmware/publish", func(w http.ResponseWriter, r *http.Request) {
		raw, err := io.ReadAll(io.LimitReader(r.Body, release.MaxManifestSize+1))
		var m *release.Manifest
		if err == nil {
			m, err = s.PublishRelease(r.URL.Query().Get("file"), raw)
		}
		adminReply(w, m, err)
	})
	mux.HandleFunc("POST /firmware/rollouts", func(w http.ResponseWriter, r *http.Request) {
		var req RolloutRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			err = fmt.Errorf("rollout request: %w", err)
			s.auditRollout("rollout-create", "", err)
			adminReply(w, nil, err)
			return
		}
		st, err := s.CreateRollout(req)
		adminReply(w, st, err)
	})
	mux.HandleFunc("GET /firmware/rollouts", func(w http.ResponseWriter, r *http.Request) {
		st, err := s.Rollouts(r.URL.Query().Get("id"))
		adminReply(w, st, err)
	})
	for action, op := range map[string]func(string) error{"pause": s.PauseRollout, "resume": s.ResumeRollout, "abort": s.AbortRollout} {
		mux.HandleFunc("POST /firmware/rollouts/"+action, func(w http.ResponseWriter, r *http.Request) {
			adminReply(w, struct{}{}, op(r.URL.Query().Get("id")))
		})
	}
	mux.HandleFunc("GET /trust", func(w http.ResponseWriter, r *http.Request) {
		adminReply(w, s.TrustPEM(), nil)
	})
	mux.HandleFunc("POST /tokens", func(w http.ResponseWriter, r *http.Request) {
		ttl, err := time.ParseDuration(r.URL.Query().Get("ttl"))
		if err != nil {
			err = fmt.Errorf("ttl: %w", err)
			s.auditAdmin("token", r.URL.Query().Get("device"), "", err)
			adminReply(w, nil, err)
			return
		}
		t, err := s.CreateToken(r.URL.Query().Get("device"), ttl)
		adminReply(w, t, err)
	})
	return &adminServer{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, l: l, path: path}, nil
}

func (a *adminServer) serve() error {
	err := a.srv.Serve(a.l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (a *adminServer) close() error {
	err := a.srv.Close()
	os.Remove(a.path)
	return err
}

type adminError struct {
	Error string `json:"error"`
}

func adminReply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status := http.StatusBadRequest
		if errors.Is(err, ErrUnknownDevice) || errors.Is(err, ErrUnknownRollout) {
			status = http.StatusNotFound
		}
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(adminError{err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

type adminClient struct{ c *http.Client }

func (a *adminClient) call(ctx context.Context, method, path string, q url.Values, out any) error {
	u := path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return a.callBody(ctx, method, u, nil, out)
}

func (a *adminClient) callBody(ctx context.Context, method, path string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://station"+path, rd)
	if err != nil {
		return err
	}
	resp, err := a.c.Do(req)
	if err != nil {
		return fmt.Errorf("station admin socket: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ae adminError
		if json.NewDecoder(resp.Body).Decode(&ae) == nil && ae.Error != "" {
			if resp.StatusCode == http.StatusNotFound {
				// The sentinel back, for errors.Is, its text unchanged.
				for _, sentinel := range []error{ErrUnknownDevice, ErrUnknownRollout} {
					if rest, ok := strings.CutPrefix(ae.Error, sentinel.Error()); ok {
						return fmt.Errorf("%w%s", sentinel, rest)
					}
				}
			}
			return errors.New(ae.Error)
		}
		return fmt.Errorf("station admin socket: %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func (a *adminClient) Devices(ctx context.Context) ([]Device, error) {
	var d []Device
	return d, a.call(ctx, http.MethodGet, "/devices", nil, &d)
}

func (a *adminClient) Revoke(ctx context.Context, id string) error {
	return a.call(ctx, http.MethodPost, "/revoke", url.Values{"id": {id}}, &struct{}{})
}

func (a *adminClient) RevokeService(ctx context.Context, name string) error {
	return a.call(ctx, http.MethodPost, "/revoke-service", url.Values{"name": {name}}, &struct{}{})
}

func (a *adminClient) RevokeSerial(ctx context.Context, serial string) error {
	return a.call(ctx, http.MethodPost, "/revoke-serial", url.Values{"serial": {serial}}, &struct{}{})
}

func (a *adminClient) Approve(ctx context.Context, id string) error {
	return a.call(ctx, http.MethodPost, "/approve", url.Values{"id": {id}}, &struct{}{})
}

func (a *adminClient) IssueService(ctx context.Context, r ServiceRequest) (*ServiceCert, error) {
	body, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	var c ServiceCert
	if err := a.callBody(ctx, http.MethodPost, "/issue", body, &c); err != nil {
		return nil, err
	}
	cert, err := certpem.Parse(c.Chain)
	if err != nil {
		return nil, err
	}
	c.Cert = cert[0]
	return &c, nil
}

func (a *adminClient) TrustPEM(ctx context.Context) ([]byte, error) {
	var b []byte
	return b, a.call(ctx, http.MethodGet, "/trust", nil, &b)
}

func (a *adminClient) CreateToken(ctx context.Context, id string, ttl time.Duration) (Token, error) {
	var t Token
	return t, a.call(ctx, http.MethodPost, "/tokens", url.Values{"device": {id}, "ttl": {ttl.String()}}, &t)
}

func (a *adminClient) InstallKeyList(ctx context.Context, raw []byte) error {
	return a.callBody(ctx, http.MethodPost, "/firmware/keylist", raw, &struct{}{})
}

func (a *adminClient) PublishRelease(ctx context.Context, path string, manifest []byte) (*release.Manifest, error) {
	var m release.Manifest
	if err := a.callBody(ctx, http.MethodPost, "/firmware/publish?"+url.Values{"file": {path}}.Encode(), manifest, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

func (a *adminClient) CreateRollout(ctx context.Context, req RolloutRequest) (*RolloutStatus, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	var st RolloutStatus
	if err := a.callBody(ctx, http.MethodPost, "/firmware/rollouts", body, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

func (a *adminClient) Rollouts(ctx context.Context, id string) ([]RolloutStatus, error) {
	var st []RolloutStatus
	return st, a.call(ctx, http.MethodGet, "/firmware/rollouts", url.Values{"id": {id}}, &st)
}

func (a *adminClient) PauseRollout(ctx context.Context, id string) error {
	return a.call(ctx, http.MethodPost, "/firmware/rollouts/pause", url.Values{"id": {id}}, &struct{}{})
}

func (a *adminClient) ResumeRollout(ctx context.Context, id string) error {
	return a.call(ctx, http.MethodPost, "/firmware/rollouts/resume", url.Values{"id": {id}}, &struct{}{})
}

func (a *adminClient) AbortRollout(ctx context.Context, id string) error {
	return a.call(ctx, http.MethodPost, "/firmware/rollouts/abort", url.Values{"id": {id}}, &struct{}{})
}

func (a *adminClient) Close() error { return nil }

// newStdLogger routes net/http's internal errors (TLS handshake failures,
// mostly) to slog at debug level: scanners would flood the log otherwise.
func newStdLogger(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}
