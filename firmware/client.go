package firmware

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// Client is the device's side of the station's firmware repository: it
// keeps the trusted key list current and fetches manifests, over the
// station's mutual TLS. Not safe for concurrent use.
type Client struct {
	// HTTP reaches the station with the device certificate.
	HTTP *http.Client
	// Station is the station's base URL (https://HOST:PORT).
	Station string
	// Trust starts from the configured root keys; KeyListFile keeps the
	// latest accepted key list across restarts (0600, atomic).
	Trust       *release.Trust
	KeyListFile string
}

// maxKeyListSteps bounds one catch-up walk.
const maxKeyListSteps = 64

// Restore takes back the kept key list, if any.
func (c *Client) Restore() error {
	raw, err := os.ReadFile(c.KeyListFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if _, err := c.Trust.Restore(raw); err != nil {
		return fmt.Errorf("firmware: the kept key list %s: %w", c.KeyListFile, err)
	}
	return nil
}

// UpdateKeyList brings the trusted key list up to the station's
// current one, walking every version in between (each must pass the
// rotation rules from the one before), and keeps it. When a step fails,
// the lists accepted before it are kept all the same: the file says
// what Trust holds.
func (c *Client) UpdateKeyList(ctx context.Context) (*release.KeyList, error) {
	next := uint64(1)
	if l := c.Trust.KeyList(); l != nil {
		next = l.Version + 1
	}
	changed := false
	keep := func() error {
		if !changed {
			return nil
		}
		if err := atomicfile.Write(c.KeyListFile, c.Trust.Raw(), 0o600); err != nil {
			return fmt.Errorf("firmware: keeping the key list: %w", err)
		}
		return nil
	}
	for range maxKeyListSteps {
		raw, err := c.get(ctx, "/firmware/keylist/"+strconv.FormatUint(next, 10), release.MaxKeyListSize)
		if errors.Is(err, errNotFound) {
			break
		}
		if err != nil {
			return nil, errors.Join(err, keep())
		}
		l, err := c.Trust.Update(raw)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("firmware: key list version %d from the station: %w", next, err), keep())
		}
		changed = true
		if l.Version != next {
			return nil, errors.Join(fmt.Errorf("firmware: the station's key list %d says it is version %d", next, l.Version), keep())
		}
		next++
	}
	if err := keep(); err != nil {
		return nil, err
	}
	if c.Trust.KeyList() == nil {
		return nil, fmt.Errorf("firmware: the station serves no key list (%w)", release.ErrNoKeyList)
	}
	return c.Trust.KeyList(), nil
}

// Manifest fetches and opens the manifest of release name at version,
// checked against the key list at now (the device's clock floor).
func (c *Client) Manifest(ctx context.Context, name, version string, now time.Time) (*release.Manifest, []byte, error) {
	if !release.ValidName(name) {
		return nil, nil, fmt.Errorf("firmware: release name %q", name)
	}
	v, err := release.ParseVersion(version)
	if err != nil {
		return nil, nil, err
	}
	raw, err := c.get(ctx, "/firmware/releases/"+name+"/"+v.String()+"/manifest", release.MaxManifestSize)
	if err != nil {
		return nil, nil, err
	}
	m, err := c.Trust.Manifest(raw, now)
	if err != nil {
		return nil, nil, err
	}
	if m.Name != name || m.SemVer().Compare(v) != 0 {
		return nil, nil, fmt.Errorf("firmware: asked for %s %s, the station sent the manifest of %s %s", name, version, m.Name, m.Version)
	}
	return m, raw, nil
}

// PayloadURL is where the payload of m is served.
func (c *Client) PayloadURL(m *release.Manifest) string {
	return strings.TrimSuffix(c.Station, "/") + "/firmware/releases/" + m.Name + "/" + m.SemVer().String() + "/payload"
}

// Check tells the station what the device runs and returns its
// assignment, or nil when a rollout assigns it nothing.
func (c *Client) Check(ctx context.Context, ch release.Check) (*release.Assignment, error) {
	body, _ := json.Marshal(ch)
	b, err := c.do(ctx, http.MethodPost, "/firmware/check", body, release.MaxCheckSize)
	if err != nil || len(b) == 0 {
		return nil, err
	}
	a, err := release.ParseAssignment(b)
	if err != nil {
		return nil, fmt.Errorf("firmware: the station's assignment: %w", err)
	}
	return a, nil
}

// Report sends one step of an update to the station.
func (c *Client) Report(ctx context.Context, r release.Report) error {
	r.Reason = release.CleanReason(r.Reason)
	body, _ := json.Marshal(r)
	_, err := c.do(ctx, http.MethodPost, "/firmware/report", body, 512)
	return err
}

var errNotFound = errors.New("not found")

// ErrUnreachable: the station could not be asked (the network, or its
// answer was 5xx or 429): a reason to try again later, not to refuse a
// release.
var ErrUnreachable = errors.New("firmware: station unreachable")

// get fetches path, at most max bytes.
func (c *Client) get(ctx context.Context, path string, max int) ([]byte, error) {
	return c.do(ctx, http.MethodGet, path, nil, max)
}

// do makes one request and returns the answer's body (at most max
// bytes; empty for 204).
func (c *Client) do(ctx context.Context, method, path string, body []byte, max int) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.Station, "/")+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound && method == http.MethodGet:
		return nil, errNotFound
	case resp.StatusCode == http.StatusNoContent:
		return nil, nil
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("%w: %s %s: %s: %s", ErrUnreachable, method, path, resp.Status, strings.TrimSpace(string(msg)))
	case resp.StatusCode != http.StatusOK:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("firmware: %s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(msg)))
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, int64(max)+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %s %s: %w", ErrUnreachable, method, path, err)
	}
	if len(b) > max {
		return nil, fmt.Errorf("firmware: %s %s: %w", method, path, release.ErrTooLarge)
	}
	return b, nil
}
