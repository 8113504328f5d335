package main

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/coap"
	"iotagent.dev/iotagent/telemetry/mqtt"
	"iotagent.dev/iotagent/tpm"
)

// shutdownGrace bounds a clean shutdown after SIGTERM.
const shutdownGrace = 5 * time.Second

// runSettings is the configuration after file, defaults and flags.
type runSettings struct {
	cfg        *config
	uplinkURL  string
	uplinkCA   string
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
}

// settings reads the config file (when given, or the default one when it
// exists) and applies flags over it.
func (e *env) settings(configPath string, explicit bool, uplink, uplinkCA, socket string, keepKey bool) (*runSettings, error) {
	c := &config{}
	if explicit || fileExists(configPath) {
		var err error
		if c, err = loadConfig(configPath); err != nil {
			return nil, usageError{err}
		}
	}
	// Global flags given on the command line beat the file.
	if e.tpmSpec == "" && c.TPM != "" {
		e.tpmSpec = c.TPM
	}
	if !e.stateDirSet && c.StateDir != "" {
		e.stateDir = c.StateDir
	}
	s := &runSettings{cfg: c, uplinkURL: c.Uplink.URL, uplinkCA: c.Uplink.CAFile, socket: c.Ingest.Socket,
		maxBytes: store.DefaultMaxBytes, onFull: store.DropOldest, interval: time.Minute, host: true, keepKey: keepKey}
	if uplink != "" {
		s.uplinkURL = uplink
	}
	if uplinkCA != "" {
		s.uplinkCA = uplinkCA
	}
	if socket != "" {
		s.socket = socket
	}
	if s.socket == "" {
		s.socket = telemetry.DefaultSocket
	}
	var err error
	if c.Queue.MaxBytes != "" {
		if s.maxBytes, err = parseSize(c.Queue.MaxBytes); err != nil {
			return nil, usageError{fmt.Errorf("config [queue] max_bytes: %w", err)}
		}
	}
	switch c.Queue.OnFull {
	case "", "drop-oldest":
	case "reject":
		s.onFull = store.Reject
	default:
		return nil, usageError{fmt.Errorf("config [queue] on_full %q: want drop-oldest or reject", c.Queue.OnFull)}
	}
	if c.Collectors.Interval != "" {
		if s.interval, err = parseDuration("config [collectors] interval", c.Collectors.Interval, time.Second); err != nil {
			return nil, usageError{err}
		}
	}
	if c.Collectors.Host != nil {
		s.host = *c.Collectors.Host
	}
	if c.Renewal.RotateKey != nil && !*c.Renewal.RotateKey {
		s.keepKey = true
	}
	if c.Uplink.MaxPayload != "" {
		n, err := parseSize(c.Uplink.MaxPayload)
		if err != nil {
			return nil, usageError{fmt.Errorf("config [uplink] max_payload: %w", err)}
		}
		s.maxPayload = int(n)
	}
	if c.Ingest.GroupDelay != "" {
		if s.groupDelay, err = parseDuration("config [ingest] group_delay", c.Ingest.GroupDelay, 0); err != nil {
			return nil, usageError{err}
		}
		if s.groupDelay > time.Second {
			return nil, usageError{fmt.Errorf("config [ingest] group_delay %v is over 1s", s.groupDelay)}
		}
	}
	if c.Uplink.KeepAlive != "" {
		if s.keepAlive, err = parseDuration("config [uplink] keepalive", c.Uplink.KeepAlive, time.Second); err != nil {
			return nil, usageError{err}
		}
	}
	if c.Uplink.Window < 0 {
		return nil, usageError{fmt.Errorf("config [uplink] window %d: want a positive number", c.Uplink.Window)}
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
		return nil, usageError{fmt.Errorf("config [log] level %q: want debug, info, warn or error", c.Log.Level)}
	}
	return s, nil
}

// part is one long-running component of the agent.
type part struct {
	name string
	run  func(context.Context) error
}

// runGroup runs parts until ctx ends or one fails; the first failure
// cancels the others. It returns the first failure.
func runGroup(ctx context.Context, parts []part) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for _, p := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := p.run(ctx)
			if err != nil && !errors.Is(err, context.Canceled) {
				once.Do(func() { first = fmt.Errorf("%s: %w", p.name, err) })
			}
			cancel()
		}()
	}
	wg.Wait()
	return first
}

// cmdRun runs the agent until SIGTERM or SIGINT: certificate renewal,
// local ingest, collectors and the uplink. SIGUSR1 renews the certificate
// now.
func cmdRun(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("run")
	configPath := fs.String("config", defaultConfigFile, "configuration `FILE` (TOML)")
	uplinkURL := fs.String("uplink", "", "uplink `URL`: mqtts://HOST:PORT (MQTT over TLS) or coaps://HOST:PORT (CoAP over DTLS); overrides the config")
	uplinkCA := fs.String("uplink-ca", "", "PEM `FILE` to verify the uplink's server (default: the station's trust bundle)")
	socket := fs.String("ingest-socket", "", "ingest socket `PATH` (default "+telemetry.DefaultSocket+")")
	keepKey := fs.Bool("keep-key", false, "renew without rotating the TPM key (rotate_key = false)")
	if err := parse(fs, args); err != nil {
		return err
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	s, err := e.settings(*configPath, explicit, *uplinkURL, *uplinkCA, *socket, *keepKey)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: s.level}))
	if err := atomicfile.MkdirPrivate(e.stateDir); err != nil {
		return fmt.Errorf("state dir %s: %w", e.stateDir, unwrapPath(err))
	}
	if err := e.lockState(); err != nil {
		return err
	}
	t, err := e.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	clock := e.clock()
	if err := e.ensureEnrolled(ctx, t, s, clock, log); err != nil {
		return err
	}
	rc := e.renewerConfig(t, s.keepKey)
	rc.Clock, rc.Logger = clock, log
	r, err := enroll.NewRenewer(rc)
	if err != nil {
		return err
	}
	defer r.Close()

	q, err := store.Open(store.Options{Path: filepath.Join(e.stateDir, "queue.db"), MaxBytes: s.maxBytes, OnFull: s.onFull, Logger: log})
	if err != nil {
		return err
	}
	defer q.Close()
	ing, err := telemetry.NewIngest(telemetry.IngestConfig{Socket: s.socket, Store: q, Now: clock.Now, GroupDelay: s.groupDelay, Logger: log})
	if err != nil {
		return err
	}
	tlsStats := &telemetry.TLSStats{}
	started := time.Now()
	parts := []part{{"renewal", r.Run}, {"ingest", ing.Run}}
	var up uplink
	var pipe *telemetry.Pipeline
	if s.uplinkURL != "" {
		if up, err = e.newUplink(s, t, r, q, tlsStats, log); err != nil {
			return err
		}
		if pipe, err = telemetry.NewPipeline(telemetry.PipelineConfig{Store: q, Uplink: up, Logger: log}); err != nil {
			return err
		}
		parts = append(parts, part{"uplink", up.Run}, part{"pipeline", pipe.Run})
	} else {
		log.Warn("no uplink configured: telemetry is queued until one is ([uplink] url or --uplink)")
	}
	sources := []telemetry.Source{telemetry.AgentSource(telemetry.AgentStats{
		TLS:            tlsStats,
		TPMSignatures:  t.Signatures,
		CertNotAfter:   func() time.Time { return r.Identity().Leaf().NotAfter },
		RenewalsOK:     func() uint64 { return uint64(r.Status().Renewals) },
		RenewalsFailed: func() uint64 { return uint64(r.Status().Failures) },
		Queue:          q,
		Uplink: func() telemetry.UplinkState {
			if up == nil {
				return telemetry.UplinkState{State: telemetry.LinkNone, Since: started}
			}
			return up.State()
		},
		Rejected: func() uint64 {
			if pipe == nil {
				return 0
			}
			return pipe.Rejected()
		},
	})}
	if s.host {
		sources = append(sources, telemetry.HostSource("/", e.stateDir))
	}
	col, err := telemetry.NewSampler(telemetry.SamplerConfig{Store: q, Interval: s.interval, Sources: sources, Now: clock.Now, Logger: log})
	if err != nil {
		return usageError{err}
	}
	parts = append(parts, part{"collectors", col.Run})
	status := &statusWriter{path: filepath.Join(filepath.Dir(s.socket), "status.json"), q: q, up: up, pipe: pipe, log: log}
	parts = append(parts, part{"status", status.Run})

	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	parts = append(parts, part{"signals", func(ctx context.Context) error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-usr1:
				r.RenewNow(ctx)
			}
		}
	}})

	log.Info("iotagent running", "device", r.Identity().DeviceID(), "version", buildinfo.Get().Version,
		"uplink", s.uplinkURL, "ingest", s.socket)
	// Shutdown: every part returns on ctx; give them shutdownGrace, the
	// queue is consistent whatever the moment.
	done := make(chan error, 1)
	go func() { done <- runGroup(ctx, parts) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		select {
		case err = <-done:
		case <-time.After(shutdownGrace):
			err = errors.New("parts did not stop within the shutdown grace period")
		}
	}
	clock.Save(true)
	return err
}

// ensureEnrolled enrolls at first start when the config names a station:
// zero-touch provisioning. Failures are retried with backoff until ctx
// ends.
func (e *env) ensureEnrolled(ctx context.Context, t *tpm.TPM, s *runSettings, clock *enroll.Clock, log *slog.Logger) error {
	if _, err := enroll.LoadState(e.stateDir); !errors.Is(err, enroll.ErrNotEnrolled) {
		return err
	}
	st := s.cfg.Station
	if st.URL == "" {
		return fmt.Errorf("not enrolled: run iotagent enroll, or set [station] url in the config")
	}
	cfg := enroll.EnrollConfig{TPM: t, Dir: e.stateDir, Station: st.URL, Token: st.Token, Clock: clock, Logger: log}
	switch {
	case st.CAFile != "":
		certs, err := readCertFile(st.CAFile)
		if err != nil {
			return usageError{fmt.Errorf("config [station] ca_file: %w", err)}
		}
		cfg.StationCA = certs
	case st.Fingerprint != "":
		pin, err := enroll.ParsePin(st.Fingerprint)
		if err != nil {
			return usageError{fmt.Errorf("config [station] fingerprint: %w", err)}
		}
		cfg.Pin = pin
	default:
		return usageError{errors.New("config [station]: set fingerprint or ca_file to authenticate the station")}
	}
	wait := 5 * time.Second
	for {
		_, err := enroll.Enroll(ctx, cfg)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("enrollment failed; retrying", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 10*time.Minute)
	}
}

// uplink is what run needs of an uplink: the pipeline's interface, its
// connection loop and its state.
type uplink interface {
	telemetry.Uplink
	Run(context.Context) error
	State() telemetry.UplinkState
}

// newUplink builds the uplink the URL's scheme selects: mqtts:// (MQTT
// over TLS) or coaps:// (CoAP over DTLS).
func (e *env) newUplink(s *runSettings, t *tpm.TPM, r *enroll.Renewer, q *store.Store, stats *telemetry.TLSStats, log *slog.Logger) (uplink, error) {
	var roots *x509.CertPool
	if s.uplinkCA != "" {
		certs, err := readCertFile(s.uplinkCA)
		if err != nil {
			return nil, usageError{fmt.Errorf("uplink CA: %w", err)}
		}
		roots = x509.NewCertPool()
		for _, c := range certs {
			roots.AddCert(c)
		}
	} else {
		st, err := enroll.LoadState(e.stateDir)
		if err != nil {
			return nil, err
		}
		roots = st.TrustPool()
	}
	if strings.HasPrefix(s.uplinkURL, "coaps://") {
		// The DTLS session is sealed under a key only this TPM unseals.
		key, err := t.SealedSecret(filepath.Join(e.stateDir, "session-key.json"), 32, func(b []byte) error {
			_, err := rand.Read(b)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("DTLS session key: %w", err)
		}
		sealer, err := dtls.NewSealer(key, rand.Reader)
		if err != nil {
			return nil, err
		}
		up, err := coap.New(coap.Config{
			URL: s.uplinkURL, RootCAs: func() *x509.CertPool { return roots }, Identity: r.Identity(), Sessions: q, Sealer: sealer,
			MaxPayload: s.maxPayload, Window: s.cfg.Uplink.Window, Stats: stats, Logger: log,
		})
		if err != nil {
			return nil, usageError{err}
		}
		return up, nil
	}
	up, err := mqtt.New(mqtt.Config{
		URL: s.uplinkURL, RootCAs: func() *x509.CertPool { return roots }, Identity: r.Identity(), MaxPayload: s.maxPayload,
		Window: s.cfg.Uplink.Window, KeepAlive: s.keepAlive, Stats: stats, Logger: log, Version: buildinfo.Get().Version,
	})
	if err != nil {
		return nil, usageError{err}
	}
	return up, nil
}

// runtimeStatus is what the running agent publishes for iotagent status,
// in the runtime directory (tmpfs: no flash wear).
type runtimeStatus struct {
	PID            int                    `json:"pid"`
	Updated        time.Time              `json:"updated"`
	RecordsQueued  uint64                 `json:"records_ingested"` // sequence numbers handed out
	QueueDepth     int64                  `json:"queue_depth"`
	QueueBytes     int64                  `json:"queue_bytes"`
	RecordsDropped uint64                 `json:"records_dropped"`
	Delivered      uint64                 `json:"records_delivered"`
	Uplink         *telemetry.UplinkState `json:"uplink,omitempty"`
}

type statusWriter struct {
	path string
	q    *store.Store
	up   uplink
	pipe *telemetry.Pipeline
	log  *slog.Logger
}

// Run writes the status every 2 seconds and removes it at exit. A status
// file that cannot be written is logged, not fatal: telemetry matters more.
func (w *statusWriter) Run(ctx context.Context) error {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	defer os.Remove(w.path)
	var failing bool
	for {
		st := w.q.Stats()
		rs := runtimeStatus{PID: os.Getpid(), Updated: time.Now().UTC(), RecordsQueued: st.NextSeq - 1, QueueDepth: st.Depth, QueueBytes: st.Bytes, RecordsDropped: st.Dropped}
		if w.up != nil {
			u := w.up.State()
			rs.Uplink = &u
			rs.Delivered = w.pipe.Delivered()
		}
		b, _ := json.Marshal(rs)
		err := atomicfile.Write(w.path, b, 0o640)
		if err != nil && !failing && ctx.Err() == nil {
			w.log.Warn("writing the status file (iotagent status cannot see this agent)", "err", err)
		}
		failing = err != nil
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
