package agent

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

// DefaultConfigFile is read when no file is named and it exists.
const DefaultConfigFile = "/etc/iotagent/config.toml"

// Config is the agent's configuration: the TOML file whose every key
// examples/config.toml documents (the key names are a contract with
// operators' files and scripts), plus what a process injects. A zero field
// means its default. iotagent's flags override fields of the file.
type Config struct {
	// TPM is the TPM spec: /dev/tpmrm0 (default), unix:PATH, tcp:HOST:PORT.
	TPM string `toml:"tpm"`
	// EKChainFile is a PEM file of the TPM vendor's CA certificates
	// between the EK certificate and the root a station trusts, sent with
	// the EK certificate at each attestation along with those the TPM
	// holds in its EK chain NV range (read by enroll, run and renew).
	EKChainFile string `toml:"ek_chain_file"`
	// StateDir is the state directory (default statedir.Default).
	StateDir   string           `toml:"state_dir"`
	Station    StationConfig    `toml:"station"`
	Uplink     UplinkConfig     `toml:"uplink"`
	Queue      QueueConfig      `toml:"queue"`
	Ingest     IngestConfig     `toml:"ingest"`
	Collectors CollectorsConfig `toml:"collectors"`
	Renewal    RenewalConfig    `toml:"renewal"`
	Log        LogConfig        `toml:"log"`
	Firmware   FirmwareConfig   `toml:"firmware"`

	// LogOutput receives the agent's log as text at [log] level (default
	// os.Stderr). Logger, when set, is used instead.
	LogOutput io.Writer    `toml:"-"`
	Logger    *slog.Logger `toml:"-"`
	// Now is the wall clock (default time.Now; tests pass one that reads
	// 1970). The agent never trusts it below its clock floor.
	Now func() time.Time `toml:"-"`
	// Rand draws the jitter of the agent's retries (default: random).
	Rand *rand.Rand `toml:"-"`
}

// StationConfig is [station]: where and how to enroll at first start.
type StationConfig struct {
	URL         string `toml:"url"`
	Fingerprint string `toml:"fingerprint"`
	CAFile      string `toml:"ca_file"`
	// Token is the one-time DEVICE_ID:SECRET, or TokenFile a file holding
	// it (read when enrolling): one of the two.
	Token     string `toml:"token"`
	TokenFile string `toml:"token_file"`
}

// UplinkConfig is [uplink].
type UplinkConfig struct {
	URL        string `toml:"url"`
	CAFile     string `toml:"ca_file"`
	MaxPayload string `toml:"max_payload"`
	Window     int    `toml:"window"`
	KeepAlive  string `toml:"keepalive"`
}

// QueueConfig is [queue].
type QueueConfig struct {
	MaxBytes string `toml:"max_bytes"`
	OnFull   string `toml:"on_full"`
}

// IngestConfig is [ingest].
type IngestConfig struct {
	Socket     string `toml:"socket"`
	GroupDelay string `toml:"group_delay"`
}

// CollectorsConfig is [collectors]: the built-in sampler.
type CollectorsConfig struct {
	Interval string `toml:"interval"`
	Host     *bool  `toml:"host"`
}

// RenewalConfig is [renewal].
type RenewalConfig struct {
	RotateKey *bool `toml:"rotate_key"`
}

// LogConfig is [log].
type LogConfig struct {
	Level string `toml:"level"`
}

// ConfigError is a configuration the agent refuses: a bad key or value in
// the file, or a flag that overrides one. The error names what was wrong.
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

func configErrorf(format string, args ...any) error {
	return &ConfigError{fmt.Errorf(format, args...)}
}

// LoadConfig reads a TOML configuration file. Unknown keys are errors: a
// typo must not silently fall back to a default.
func LoadConfig(path string) (*Config, error) {
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, configErrorf("config %s: %s", path, strings.TrimSpace(pe.Error()))
		}
		return nil, configErrorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, configErrorf("config %s: unknown key %s", path, strings.Join(keys, ", "))
	}
	return &c, nil
}

// LoadDefaultConfig reads path if given (it must exist), else
// DefaultConfigFile if it exists, else returns the zero Config.
func LoadDefaultConfig(path string) (*Config, error) {
	if path == "" {
		if _, err := os.Stat(DefaultConfigFile); err != nil {
			return &Config{}, nil
		}
		path = DefaultConfigFile
	}
	return LoadConfig(path)
}

// settings is a Config checked, parsed and with its defaults.
type settings struct {
	dir        statedir.Dir
	socket     string
	maxBytes   int64
	onFull     store.FullPolicy
	interval   time.Duration
	host       bool
	keepKey    bool
	maxPayload int
	keepAlive  time.Duration
	groupDelay time.Duration
	level      slog.Level
	// firmware is nil when updates are off.
	firmware *fwSettings
}

// parse checks c and fills the defaults. Every error is a *ConfigError.
func (c *Config) parse() (*settings, error) {
	s := &settings{dir: statedir.Dir(c.StateDir), socket: c.Ingest.Socket,
		maxBytes: store.DefaultMaxBytes, onFull: store.DropOldest, interval: time.Minute, host: true}
	if s.dir == "" {
		s.dir = statedir.Default
	}
	if s.socket == "" {
		s.socket = telemetry.DefaultSocket
	}
	if _, err := tpm.ParseSpec(c.TPM); err != nil {
		return nil, configErrorf("tpm: %w", err)
	}
	var err error
	if c.Queue.MaxBytes != "" {
		if s.maxBytes, err = parseSize(c.Queue.MaxBytes); err != nil {
			return nil, configErrorf("config [queue] max_bytes: %w", err)
		}
	}
	switch c.Queue.OnFull {
	case "", "drop-oldest":
	case "reject":
		s.onFull = store.Reject
	default:
		return nil, configErrorf("config [queue] on_full %q: want drop-oldest or reject", c.Queue.OnFull)
	}
	if c.Collectors.Interval != "" {
		if s.interval, err = parseDuration("config [collectors] interval", c.Collectors.Interval, time.Second); err != nil {
			return nil, err
		}
	}
	if c.Collectors.Host != nil {
		s.host = *c.Collectors.Host
	}
	s.keepKey = c.Renewal.RotateKey != nil && !*c.Renewal.RotateKey
	if c.Uplink.MaxPayload != "" {
		n, err := parseSize(c.Uplink.MaxPayload)
		if err != nil {
			return nil, configErrorf("config [uplink] max_payload: %w", err)
		}
		s.maxPayload = int(n)
	}
	if c.Ingest.GroupDelay != "" {
		if s.groupDelay, err = parseDuration("config [ingest] group_delay", c.Ingest.GroupDelay, 0); err != nil {
			return nil, err
		}
		if s.groupDelay > time.Second {
			return nil, configErrorf("config [ingest] group_delay %v is over 1s", s.groupDelay)
		}
	}
	if c.Uplink.KeepAlive != "" {
		if s.keepAlive, err = parseDuration("config [uplink] keepalive", c.Uplink.KeepAlive, time.Second); err != nil {
			return nil, err
		}
	}
	if c.Uplink.Window < 0 {
		return nil, configErrorf("config [uplink] window %d: want a positive number", c.Uplink.Window)
	}
	if c.Uplink.URL != "" {
		if err := checkUplinkURL(c.Uplink.URL); err != nil {
			return nil, &ConfigError{err}
		}
	}
	if c.Uplink.CAFile != "" {
		if _, err := certpem.ReadFile(c.Uplink.CAFile); err != nil {
			return nil, configErrorf("uplink CA: %w", err)
		}
	}
	switch strings.ToLower(c.Log.Level) {
	case "", "info":
	case "debug":
		s.level = slog.LevelDebug
	case "warn":
		s.level = slog.LevelWarn
	case "error":
		s.level = slog.LevelError
	default:
		return nil, configErrorf("config [log] level %q: want debug, info, warn or error", c.Log.Level)
	}
	// [station] matters only to enrollment (renewals use the station
	// recorded then): its files are read when enrolling (stationTrust),
	// so an enrolled agent does not depend on a bootstrap CA file kept.
	if c.Station.CAFile != "" && c.Station.Fingerprint != "" {
		return nil, configErrorf("station: set one of the fingerprint and the CA file ([station] fingerprint, ca_file; --station-fingerprint, --station-ca), not both")
	}
	switch {
	case c.Station.Token != "" && c.Station.TokenFile != "":
		return nil, configErrorf("station: set one of the token and the token file ([station] token, token_file; --token, --token-file), not both")
	case c.Station.TokenFile == "-":
		return nil, configErrorf(`config [station] token_file "-": stdin is read by iotagent enroll --token-file - only`)
	}
	if c.Station.Fingerprint != "" {
		if _, err := enroll.ParsePin(c.Station.Fingerprint); err != nil {
			return nil, configErrorf("station fingerprint ([station] fingerprint, --station-fingerprint): %w", err)
		}
	}
	if s.firmware, err = c.parseFirmware(); err != nil {
		return nil, err
	}
	return s, nil
}

// stationTrust returns how enrollment authenticates the station on first
// contact: its CA certificates, or a pin of a certificate in its chain.
// Every error is a *ConfigError.
func (c *Config) stationTrust() ([]*x509.Certificate, []byte, error) {
	switch st := c.Station; {
	case st.URL == "":
		return nil, nil, &ConfigError{ErrNoStation}
	case st.CAFile != "":
		certs, err := certpem.ReadFile(st.CAFile)
		if err != nil {
			return nil, nil, configErrorf("station CA file ([station] ca_file, --station-ca): %w", err)
		}
		return certs, nil, nil
	case st.Fingerprint != "":
		pin, err := enroll.ParsePin(st.Fingerprint)
		return nil, pin, err // checked by parse
	}
	return nil, nil, configErrorf("station: set its fingerprint or CA file to authenticate it ([station] fingerprint or ca_file; --station-fingerprint or --station-ca)")
}

// ekIntermediates reads ek_chain_file (none when unset). Every error is a
// *ConfigError.
func (c *Config) ekIntermediates() ([]*x509.Certificate, error) {
	if c.EKChainFile == "" {
		return nil, nil
	}
	certs, err := certpem.ReadFile(c.EKChainFile)
	if err != nil {
		return nil, configErrorf("EK chain file (ek_chain_file): %w", err)
	}
	return certs, nil
}

// maxTokenFile bounds a token file: a token is a device ID and a secret.
const maxTokenFile = 4 << 10

// stationToken returns the enrollment token: [station] token, or the
// content of [station] token_file, surrounding white space removed. Every
// error is a *ConfigError.
func (c *Config) stationToken() (string, error) {
	if c.Station.TokenFile == "" {
		return c.Station.Token, nil
	}
	tok, err := ReadToken(c.Station.TokenFile, nil)
	if err != nil {
		return "", &ConfigError{fmt.Errorf("station token file ([station] token_file, --token-file): %w", err)}
	}
	return tok, nil
}

// ReadToken reads an enrollment token from the file at path, or from
// stdin when path is "-": a token given on the command line shows in
// /proc/PID/cmdline and ps to every local user, one read from a file or a
// pipe does not. Surrounding white space is removed; an empty token is an
// error.
func ReadToken(path string, stdin io.Reader) (string, error) {
	r := stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return "", err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, maxTokenFile+1))
	if err != nil {
		return "", err
	}
	if len(b) > maxTokenFile {
		return "", fmt.Errorf("%s: over %d bytes, not a token", tokenSource(path), maxTokenFile)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("%s: empty", tokenSource(path))
	}
	return tok, nil
}

func tokenSource(path string) string {
	if path == "-" {
		return "token from stdin"
	}
	return path
}

// parseSize parses "64MiB", "512KiB", "1GB", "1048576".
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"B", 1}}
	mult := int64(1)
	num := s
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional unit (KiB, MiB, GiB, KB, MB, GB)", s)
	}
	return n * mult, nil
}

func parseDuration(what, s string, min time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, configErrorf("%s %q: %w", what, s, err)
	}
	if d < min {
		return 0, configErrorf("%s %v is below %v", what, d, min)
	}
	return d, nil
}
