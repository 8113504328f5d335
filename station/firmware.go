package station

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// The firmware repository in the station directory:
//
//	firmware/keylist.json                    the signed key list devices fetch
//	firmware/releases/NAME/VERSION/manifest   the signed manifest
//	firmware/releases/NAME/VERSION/payload    the payload it describes
//
// The station holds no firmware key: key lists are signed offline by
// the root keys, manifests by a signing key (iotstation firmware …). It
// checks what it is given before storing it, so that it never serves
// what a device would refuse.
const (
	// payloadWriteTimeout bounds one firmware answer.
	payloadWriteTimeout = 30 * time.Minute

	dirFirmware = "firmware"
	fwKeyList   = "keylist.json"
	fwManifest  = "manifest"
	fwPayload   = "payload"
)

func (s *Station) firmwarePath(elem ...string) string {
	return filepath.Join(append([]string{s.dir, dirFirmware}, elem...)...)
}

// InstallKeyList makes raw the key list the station serves. The first
// must be signed by its own root keys; a later one must pass the rules a
// device applies (the current root keys' threshold, its version above).
func (s *Station) InstallKeyList(raw []byte) error {
	err := s.installKeyList(raw)
	s.auditAdmin("firmware-keylist", "", "", err)
	return err
}

func (s *Station) installKeyList(raw []byte) error {
	cur, err := os.ReadFile(s.firmwarePath(fwKeyList))
	switch {
	case errors.Is(err, os.ErrNotExist):
		if _, err := release.TrustKeyList(raw); err != nil {
			return err
		}
	case err != nil:
		return err
	default:
		t, err := release.TrustKeyList(cur)
		if err != nil {
			return fmt.Errorf("the installed key list: %w", err)
		}
		if _, err := t.Update(raw); err != nil {
			return err
		}
	}
	t, _ := release.TrustKeyList(raw)
	if err := atomicfile.MkdirPrivate(s.firmwarePath("keylists")); err != nil {
		return err
	}
	// Every version stays served (keylists/N), so that a device that
	// missed rotations walks the chain; the current one also as keylist.
	if err := atomicfile.Write(s.firmwarePath("keylists", strconv.FormatUint(t.KeyList().Version, 10)), raw, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(s.firmwarePath(fwKeyList), raw, 0o600)
}

// published reports whether release name at version (canonical) is
// published: its manifest, written last, is there.
func (s *Station) published(name, version string) bool {
	fi, err := os.Stat(s.firmwarePath("releases", name, version, fwManifest))
	return err == nil && fi.Mode().IsRegular()
}

// trust is the installed key list as a Trust.
func (s *Station) trust() (*release.Trust, error) {
	raw, err := os.ReadFile(s.firmwarePath(fwKeyList))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errors.New("no firmware key list installed (iotstation firmware keys install)")
	}
	if err != nil {
		return nil, err
	}
	return release.TrustKeyList(raw)
}

// PublishRelease stores the payload at payloadPath under the signed
// manifest raw, after checking the manifest against the installed key
// list and the payload against the manifest. A release is published
// once: the same name and version again is refused.
func (s *Station) PublishRelease(payloadPath string, raw []byte) (*release.Manifest, error) {
	m, err := s.publishRelease(payloadPath, raw)
	name := ""
	if m != nil {
		name = m.Name + "@" + m.Version
	}
	s.auditAdmin("firmware-publish", name, "", err)
	return m, err
}

func (s *Station) publishRelease(payloadPath string, raw []byte) (*release.Manifest, error) {
	t, err := s.trust()
	if err != nil {
		return nil, err
	}
	m, err := t.Manifest(raw, s.now())
	if err != nil {
		return nil, err
	}
	dir := s.firmwarePath("releases", m.Name, m.SemVer().String())
	if _, err := os.Stat(dir); err == nil {
		return m, fmt.Errorf("release %s %s is already published", m.Name, m.Version)
	}
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return m, err
	}
	in, err := os.Open(payloadPath)
	if err != nil {
		os.Remove(dir)
		return m, err
	}
	defer in.Close()
	tmp := filepath.Join(dir, fwPayload+".new")
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return m, err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), io.LimitReader(in, m.Length+1))
	if err == nil {
		err = out.Sync()
	}
	out.Close()
	switch {
	case err != nil:
	case n != m.Length:
		err = fmt.Errorf("payload %s is %d bytes, the manifest says %d", payloadPath, n, m.Length)
	case !bytes.Equal(h.Sum(nil), m.Digest()):
		err = fmt.Errorf("payload %s does not match the manifest's sha256", payloadPath)
	}
	if err != nil {
		os.RemoveAll(dir)
		return m, err
	}
	if err := os.Rename(tmp, filepath.Join(dir, fwPayload)); err != nil {
		return m, err
	}
	// The manifest last: its presence means a complete release.
	return m, atomicfile.Write(filepath.Join(dir, fwManifest), raw, 0o600)
}

// handleFirmware serves the key list (the current one, or version N at
// /firmware/keylist/N), manifests and payloads to devices
// over mutual TLS (a device certificate is required; a revoked device is
// refused), payloads with Range and If-Range.
func (s *Station) handleFirmware(w http.ResponseWriter, r *http.Request) {
	if _, err := s.firmwareDevice(r); err != nil {
		rf := s.refusalOf(AuditEntry{Event: "firmware"}, err)
		writeRefusal(w, rf)
		return
	}
	var path string
	switch r.PathValue("what") {
	case "keylist":
		path = s.firmwarePath(fwKeyList)
		if n := r.PathValue("version"); n != "" {
			v, err := strconv.ParseUint(n, 10, 64)
			if err != nil || strconv.FormatUint(v, 10) != n {
				http.Error(w, "no such key list", http.StatusNotFound)
				return
			}
			path = s.firmwarePath("keylists", n)
		}
	case fwManifest, fwPayload:
		name, version := r.PathValue("name"), r.PathValue("version")
		v, err := release.ParseVersion(version)
		if err != nil || !release.ValidName(name) || v.String() != version {
			http.Error(w, "no such release", http.StatusNotFound)
			return
		}
		path = s.firmwarePath("releases", name, version, r.PathValue("what"))
	default:
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, "no such release", http.StatusNotFound)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		http.Error(w, "no such release", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	// Past the server's write timeout: a payload over a slow link takes
	// long, and a cut one resumes.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(payloadWriteTimeout))
	http.ServeContent(w, r, "", fi.ModTime(), f)
}
