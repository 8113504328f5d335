package firmware

import (
	"context"
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
// rotation rules from the one before), and keeps it.
func (c *Client) UpdateKeyList(ctx context.Context) (*release.KeyList, error) {
	next := uint64(1)
	if l := c.Trust.KeyList(); l != nil {
		next = l.Version + 1
	}
	changed := false
	for range maxKeyListSteps {
		raw, err := c.get(ctx, "/firmware/keylist/"+strconv.FormatUint(next, 10), release.MaxKeyListSize)
		if errors.Is(err, errNotFound) {
			break
		}
		if err != nil {
			return nil, err
		}
		l, err := c.Trust.Update(raw)
		if err != nil {
			return nil, fmt.Errorf("firmware: key list version %d from the station: %w", next, err)
		}
		if l.Version != next {
			return nil, fmt.Errorf("firmware: the station's key list %d says it is version %d", next, l.Version)
		}
		next, changed = next+1, true
	}
	if changed {
		if err := atomicfile.Write(c.KeyListFile, c.Trust.Raw(), 0o600); err != nil {
			return nil, fmt.Errorf("firmware: keeping the key list: %w", err)
		}
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

var errNotFound = errors.New("not found")

// get fetches path, at most max bytes.
func (c *Client) get(ctx context.Context, path string, max int) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(c.Station, "/")+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("firmware: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, errNotFound
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("firmware: GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(msg)))
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, int64(max)+1))
	if err != nil {
		return nil, fmt.Errorf("firmware: GET %s: %w", path, err)
	}
	if len(b) > max {
		return nil, fmt.Errorf("firmware: GET %s: %w", path, release.ErrTooLarge)
	}
	return b, nil
}
