// Package station is the fleet side of enrollment: a certificate authority,
// an EST (RFC 7030) server with TPM credential activation (/tpmenroll), the
// device registry, the CRL and the audit log.
//
// A station directory (iotstation init) holds:
//
//	station.json        configuration (name, SANs, certificate lifetime, policy)
//	root.crt, root.key  the root CA (agents pin its fingerprint; keep root.key offline)
//	ca.crt, ca.key      the issuing CA: device certificates, the TLS certificate, the CRL
//	tls.crt, tls.key    the station's HTTPS certificate (chain includes the root)
//	tpm-roots.pem       trusted TPM manufacturer CAs (roots and intermediates)
//	manifest.txt        EK SHA-256 → device ID, one pair per line
//	registry.db         devices, EK bindings, issued certificates, tokens (bbolt)
//	audit.log           JSON lines: every decision with its reason
//	crl.pem             the current CRL, for brokers (mosquitto crlfile)
//	admin.sock          while serving: the admin API used by iotstation commands
//	sessions-pending.json  revoked devices whose broker sessions are still to be ended
//	firmware/           the firmware repository (key lists, releases); rollouts are in the registry
//
// Keys are written 0600 and atomically.
package station

import (
	"bufio"
	"cmp"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/tpm"
)

// fileConfigJSON is station.json.
type fileConfigJSON struct {
	Name         string   `json:"name"`
	SANs         []string `json:"sans"`
	CertLifetime string   `json:"cert_lifetime"`
	AutoApprove  bool     `json:"auto_approve"`
	HoldUnknown  bool     `json:"hold_unknown"`
	CRLHook      string   `json:"crl_hook,omitempty"`
	CATPM        string   `json:"ca_tpm,omitempty"`
	// EndSessions is read at each use (sessionsConfig).
	EndSessions *SessionsConfig `json:"end_sessions,omitempty"`
	// FirmwareNudge is read at each use (nudgeConfig).
	FirmwareNudge *NudgeConfig `json:"firmware_nudge,omitempty"`
}

// InitOptions configures Init.
type InitOptions struct {
	Dir string
	// Name prefixes the CA and station certificate names (default
	// "iotagent").
	Name string
	// SANs are the DNS names and IP addresses the station is reached at
	// (default localhost, 127.0.0.1, ::1).
	SANs []string
	// TPMRoots are PEM files of TPM manufacturer CAs; self-signed ones are
	// trust anchors, others intermediates.
	TPMRoots []string
	// Manifest is a file of "EK_SHA256 DEVICE_ID" lines, copied in.
	Manifest string
	// CertLifetime of device certificates (default 168h).
	CertLifetime time.Duration
	AutoApprove  bool
	// HoldUnknown registers devices whose EK chains to a trusted root but
	// is not in the manifest as pending: they are answered 202 with
	// Retry-After until an operator runs iotstation approve.
	HoldUnknown bool
	// CRLHook is a shell command run after every change of crl.pem (see
	// Config.CRLHook).
	CRLHook string
	// CATPM, a TPM spec (tpm.Open), creates the issuing CA's key in that
	// TPM (ca.tpmkey holds its wrapped blobs; no ca.key is written): every
	// device certificate and CRL is then signed by a key that cannot leave
	// the station's TPM. Kept in station.json as ca_tpm.
	CATPM string
	// EndSessions says how a revocation ends a device's live sessions at
	// the broker (see SessionsConfig); kept in station.json as
	// end_sessions.
	EndSessions SessionsConfig
	// FirmwareNudge says where devices are told to check for firmware at
	// once when a wave of a rollout opens (see NudgeConfig); kept in
	// station.json as firmware_nudge.
	FirmwareNudge NudgeConfig
	Now           func() time.Time
}

// ErrInitialized: Init on a directory that already holds a station.
var ErrInitialized = errors.New("station directory already initialized")

// Init creates a station directory.
func Init(opts InitOptions) error {
	if opts.Dir == "" {
		return errors.New("station directory not set")
	}
	if opts.Name == "" {
		opts.Name = "iotagent"
	}
	if len(opts.SANs) == 0 {
		opts.SANs = []string{"localhost", "127.0.0.1", "::1"}
	}
	if opts.CertLifetime == 0 {
		opts.CertLifetime = 168 * time.Hour
	}
	if opts.CertLifetime < 10*time.Second {
		return fmt.Errorf("certificate lifetime %v is too short (minimum 10s)", opts.CertLifetime)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if _, err := os.Stat(filepath.Join(opts.Dir, fileConfig)); err == nil {
		return fmt.Errorf("%w: %s", ErrInitialized, opts.Dir)
	}
	// The directory will hold the CA's keys: one others can enter or list
	// is refused, not silently kept.
	if fi, err := os.Stat(opts.Dir); err == nil && fi.IsDir() && fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("station directory %s has mode %04o: it will hold the CA keys, so only its owner may use it (chmod 700 %s)", opts.Dir, fi.Mode().Perm(), opts.Dir)
	}
	// Validate every input before writing anything.
	var roots []byte
	for _, f := range opts.TPMRoots {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("--tpm-roots: %w", err)
		}
		if _, err := certpem.Parse(b); err != nil {
			return fmt.Errorf("--tpm-roots %s: %w", f, err)
		}
		roots = append(roots, b...)
	}
	var manifest []byte
	if opts.Manifest != "" {
		b, err := os.ReadFile(opts.Manifest)
		if err != nil {
			return fmt.Errorf("--manifest: %w", err)
		}
		if _, err := parseManifest(b); err != nil {
			return fmt.Errorf("--manifest %s: %w", opts.Manifest, err)
		}
		manifest = b
	}
	for _, b := range []struct {
		flag, caFlag string
		url, ca      *string
	}{
		{"--end-sessions-dynsec", "--end-sessions-ca", &opts.EndSessions.MosquittoDynsec, &opts.EndSessions.CAFile},
		{"--nudge-broker", "--nudge-ca", &opts.FirmwareNudge.Broker, &opts.FirmwareNudge.CAFile},
	} {
		if u := *b.url; u != "" {
			if pu, err := url.Parse(u); err != nil || pu.Scheme != "mqtts" || pu.Host == "" {
				return fmt.Errorf("%s %q: want mqtts://HOST:PORT", b.flag, u)
			}
		}
		if f := *b.ca; f != "" {
			if _, err := certpem.ReadFile(f); err != nil {
				return fmt.Errorf("%s: %w", b.caFlag, err)
			}
			// Kept in station.json: serve may start in another directory.
			abs, err := filepath.Abs(f)
			if err != nil {
				return fmt.Errorf("%s: %w", b.caFlag, err)
			}
			*b.ca = abs
		}
	}
	// The TPM comes before anything is written: a bad spec changes nothing.
	var caKey crypto.Signer
	var caKeyFile *tpm.KeyFile
	if path, ok := strings.CutPrefix(opts.CATPM, "unix:"); ok && !filepath.IsAbs(path) {
		// Kept in station.json: serve may start in another directory.
		abs, err := filepath.Abs(path)
		if err != nil {
			return fmt.Errorf("--ca-tpm: %w", err)
		}
		opts.CATPM = "unix:" + abs
	}
	if opts.CATPM != "" {
		tp, err := tpm.Open(opts.CATPM)
		if err != nil {
			return fmt.Errorf("--ca-tpm: %w", err)
		}
		defer tp.Close()
		if caKeyFile, err = tp.CreateKey(); err != nil {
			return fmt.Errorf("--ca-tpm: creating the issuing CA key: %w", err)
		}
		k, err := tp.LoadKey(caKeyFile)
		if err != nil {
			return fmt.Errorf("--ca-tpm: %w", err)
		}
		defer k.Close()
		caKey = k
	}
	if err := atomicfile.MkdirPrivate(opts.Dir); err != nil {
		return err
	}
	if caKeyFile != nil {
		if err := tpm.WriteKeyFile(filepath.Join(opts.Dir, fileCATPMKey), caKeyFile); err != nil {
			return err
		}
	}
	if _, err := initCA(opts.Dir, opts.Name, opts.SANs, opts.Now(), caKey); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(opts.Dir, fileTPMRoots), roots, 0o644); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(opts.Dir, fileManifest), manifest, 0o644); err != nil {
		return err
	}
	fc := fileConfigJSON{
		Name: opts.Name, SANs: opts.SANs, CertLifetime: opts.CertLifetime.String(), AutoApprove: opts.AutoApprove, HoldUnknown: opts.HoldUnknown,
		CRLHook: opts.CRLHook, CATPM: opts.CATPM,
	}
	if opts.EndSessions != (SessionsConfig{}) {
		fc.EndSessions = &opts.EndSessions
	}
	if opts.FirmwareNudge != (NudgeConfig{}) {
		fc.FirmwareNudge = &opts.FirmwareNudge
	}
	cfg, err := json.MarshalIndent(fc, "", "  ")
	if err != nil {
		return err
	}
	// The config is written last: its presence means a complete directory.
	return atomicfile.Write(filepath.Join(opts.Dir, fileConfig), append(cfg, '\n'), 0o644)
}

// RootFingerprint returns the "sha256:HEX" fingerprint of the station root
// in dir.
func RootFingerprint(dir string) (string, error) {
	c, err := certpem.ReadFile(filepath.Join(dir, fileRootCert))
	if err != nil {
		return "", err
	}
	return Fingerprint(c[0]), nil
}

// Per source (IPv4 address or IPv6 /64), /tpmenroll requests beyond
// AttestationBurst at once are answered 429 with Retry-After, one more
// allowed each AttestationInterval.
// There is no bound for all sources together: whoever holds admitted
// devices' public EK data could keep it spent from a few addresses and
// stop every enrollment.
const (
	AttestationBurst    = 10
	AttestationInterval = time.Second
)

// Config configures Open.
type Config struct {
	Dir string
	// AutoApprove, when true, admits any device whose EK chains to a
	// trusted TPM root, overriding station.json. False keeps the file's
	// setting.
	AutoApprove bool
	// HoldUnknown, when true, holds unknown EKs for approval (see
	// InitOptions.HoldUnknown), overriding station.json.
	HoldUnknown bool
	// CertLifetime overrides station.json when non-zero.
	CertLifetime time.Duration
	// CRLHook, a shell command, is run with /bin/sh -c after every change
	// of crl.pem (a revocation, the reissue every 12 hours, serve's
	// start), with IOTSTATION_CRL_FILE set: e.g. "systemctl reload
	// mosquitto". Non-empty overrides station.json's crl_hook.
	CRLHook string
	// CRLHookRetry bounds the first wait before serve retries a failed CRL
	// hook (internal/backoff: jittered, the bound doubling up to 10
	// minutes; default 10s).
	CRLHookRetry time.Duration
	// FailuresBeforeSlowdown is how many failed enrollment requests a
	// client address may make within a minute before it is answered 429
	// (default 5).
	FailuresBeforeSlowdown int
	// AttestationBurst is how many /tpmenroll requests a client address
	// may make at once (default AttestationBurst); after them, one per
	// AttestationInterval.
	AttestationBurst int
	Logger           *slog.Logger
	Now              func() time.Time
	Rand             io.Reader
}

// Station is an opened station directory. Safe for concurrent use; Close
// releases the registry and the audit log.
type Station struct {
	dir          string
	name         string
	autoApprove  bool
	holdUnknown  bool
	certLifetime time.Duration
	log          *slog.Logger
	now          func() time.Time
	rand         io.Reader

	ca         *ca
	tpmRoots   *x509.CertPool
	tpmInter   *x509.CertPool
	reg        *registry
	audit      *auditLog
	limiter    *failureLimiter
	attestRate *rateLimiter
	manifest   manifestCache
	crl        atomic.Pointer[[]byte]
	crlMu      sync.Mutex
	crlHook    string
	caTPMKey   *tpmCAKey  // with ca_tpm: the issuing CA key, in the TPM
	hookMu     sync.Mutex // one CRL hook at a time
	// hookPending: the last hook run failed; hookFailed tells serve's
	// CRL loop to schedule a retry.
	hookPending atomic.Bool
	hookFailed  chan struct{}
	hookRetry   time.Duration
	metrics     metrics

	sessionsCert serviceCertCache
	nudgeCert    serviceCertCache
	// rolloutWake has RunRollouts nudge a wave that just opened.
	rolloutWake chan struct{}
}

// Open opens the station in cfg.Dir.
func Open(cfg Config) (*Station, error) {
	b, err := os.ReadFile(filepath.Join(cfg.Dir, fileConfig))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s is not a station directory (run iotstation init --dir %s)", cfg.Dir, cfg.Dir)
	}
	if err != nil {
		return nil, err
	}
	var fc fileConfigJSON
	if err := json.Unmarshal(b, &fc); err != nil {
		return nil, fmt.Errorf("%s: %w", fileConfig, err)
	}
	s := &Station{
		dir: cfg.Dir, name: fc.Name, autoApprove: fc.AutoApprove || cfg.AutoApprove,
		holdUnknown: fc.HoldUnknown || cfg.HoldUnknown,
		crlHook:     cmp.Or(cfg.CRLHook, fc.CRLHook),
		hookFailed:  make(chan struct{}, 1),
		rolloutWake: make(chan struct{}, 1),
		hookRetry:   cmp.Or(cfg.CRLHookRetry, hookRetryMin),
		log:         cfg.Logger, now: cfg.Now, rand: cfg.Rand,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.rand == nil {
		s.rand = cryptoRand
	}
	s.limiter = newFailureLimiter(s.now)
	if cfg.FailuresBeforeSlowdown > 0 {
		s.limiter.maxFailures = cfg.FailuresBeforeSlowdown
	}
	s.attestRate = newRateLimiter(s.now, cmp.Or(cfg.AttestationBurst, AttestationBurst), AttestationInterval)
	s.certLifetime = cfg.CertLifetime
	if s.certLifetime == 0 {
		if s.certLifetime, err = time.ParseDuration(fc.CertLifetime); err != nil {
			return nil, fmt.Errorf("%s: cert_lifetime: %w", fileConfig, err)
		}
	}
	var caKey crypto.Signer
	if fc.CATPM != "" {
		issuers, err := certpem.ReadFile(filepath.Join(cfg.Dir, fileCACert))
		if err != nil {
			return nil, err
		}
		s.caTPMKey = &tpmCAKey{spec: fc.CATPM, path: filepath.Join(cfg.Dir, fileCATPMKey), pub: issuers[0].PublicKey}
		caKey = s.caTPMKey
	}
	if s.ca, err = loadCA(cfg.Dir, caKey); err != nil {
		return nil, err
	}
	s.tpmRoots, s.tpmInter = x509.NewCertPool(), x509.NewCertPool()
	if rb, err := os.ReadFile(filepath.Join(cfg.Dir, fileTPMRoots)); err == nil && len(rb) > 0 {
		certs, err := certpem.Parse(rb)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", fileTPMRoots, err)
		}
		for _, c := range certs {
			if isSelfSigned(c) {
				s.tpmRoots.AddCert(c)
			} else {
				s.tpmInter.AddCert(c)
			}
		}
	}
	s.manifest.path = filepath.Join(cfg.Dir, fileManifest)
	if _, err := s.manifest.get(); err != nil {
		return nil, err
	}
	if s.reg, err = openRegistry(filepath.Join(cfg.Dir, fileRegistry)); err != nil {
		return nil, err
	}
	if s.audit, err = openAudit(filepath.Join(cfg.Dir, fileAudit)); err != nil {
		s.reg.close()
		return nil, err
	}
	return s, nil
}

// readFileConfig reads station.json: the settings read at each use
// (end_sessions, firmware_nudge), which a CLI process and serve share.
func (s *Station) readFileConfig() (*fileConfigJSON, error) {
	b, err := os.ReadFile(s.path(fileConfig))
	if err != nil {
		return nil, err
	}
	var fc fileConfigJSON
	if err := json.Unmarshal(b, &fc); err != nil {
		return nil, fmt.Errorf("%s: %w", fileConfig, err)
	}
	return &fc, nil
}

// Close releases the registry and the audit log.
func (s *Station) Close() error {
	var errTPM error
	if s.caTPMKey != nil {
		errTPM = s.caTPMKey.Close()
	}
	return errors.Join(s.reg.close(), s.audit.close(), errTPM)
}

// CertLifetime is the lifetime of the device certificates the station
// issues; its own services' certificates (ServiceIdentity) get the same.
func (s *Station) CertLifetime() time.Duration { return s.certLifetime }

// Root returns the station's root certificate.
func (s *Station) Root() *x509.Certificate { return s.ca.root }

// CACerts returns the certificates /cacerts serves: the issuing CA, then
// the root.
func (s *Station) CACerts() []*x509.Certificate {
	return []*x509.Certificate{s.ca.issuer, s.ca.root}
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil && c.Subject.String() == c.Issuer.String()
}

// deviceIDPattern: IDs end up in certificate CNs and MQTT topics, so no
// slashes, wildcards or spaces.
var deviceIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidDeviceID reports whether id can name a device.
func ValidDeviceID(id string) error {
	if !deviceIDPattern.MatchString(id) {
		return fmt.Errorf("device ID %q: want 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit", id)
	}
	return nil
}

var hexPattern = regexp.MustCompile(`^[0-9a-f]{64}$`)

// parseManifest reads "EK_SHA256 DEVICE_ID" lines; '#' starts a comment.
func parseManifest(b []byte) (map[string]string, error) {
	out := map[string]string{}
	ids := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d: want EK_SHA256 DEVICE_ID", n)
		}
		ek := strings.ToLower(strings.TrimPrefix(f[0], "sha256:"))
		if !hexPattern.MatchString(ek) {
			return nil, fmt.Errorf("line %d: %q is not a SHA-256 in hex", n, f[0])
		}
		if err := ValidDeviceID(f[1]); err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		if prev, ok := ids[f[1]]; ok {
			return nil, fmt.Errorf("line %d: device ID %s already on line %d", n, f[1], prev)
		}
		ids[f[1]] = n
		out[ek] = f[1]
	}
	return out, sc.Err()
}

// manifestCache reloads manifest.txt when it changes, so operators add
// devices without restarting the station.
type manifestCache struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	entries map[string]string
}

func (m *manifestCache) get() (map[string]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fi, err := os.Stat(m.path)
	if errors.Is(err, os.ErrNotExist) {
		m.entries = map[string]string{}
		return m.entries, nil
	}
	if err != nil {
		return nil, err
	}
	if m.entries != nil && fi.ModTime().Equal(m.modTime) && fi.Size() == m.size {
		return m.entries, nil
	}
	b, err := os.ReadFile(m.path)
	if err != nil {
		return nil, err
	}
	e, err := parseManifest(b)
	if err != nil {
		if m.entries != nil {
			// Keep serving the last good manifest; the edit is broken.
			return m.entries, fmt.Errorf("%s: %w (still using the previous version)", m.path, err)
		}
		return nil, fmt.Errorf("%s: %w", m.path, err)
	}
	m.entries, m.modTime, m.size = e, fi.ModTime(), fi.Size()
	return e, nil
}
