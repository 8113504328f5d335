// Package agent is the gateway daemon, and the one-shot commands that
// share its state: Config (the TOML file), New, and Run, which runs every
// long-running part as one group where the first failure stops the rest:
//
//	Run ─┬─ ingest       local producers ─▶ queue, from the first second
//	     ├─ collectors   host health and the agent's SLIs ─▶ queue
//	     ├─ status       the status file iotagent status reads
//	     └─ identity ─── first enrollment (zero-touch, retried with jitter)
//	                     └─┬─ renewal     the certificate kept fresh
//	                       ├─ uplink      MQTT over TLS or CoAP over DTLS
//	                       └─ pipeline    queue ─▶ uplink, at-least-once
//
// Ingest and the queue start before the device is enrolled, so readings
// taken while a gateway is being provisioned are kept; the uplink starts
// once it has an identity to present. Enroll, Renew, Status, TPMInfo and
// Keygen are the commands iotagent runs beside (or instead of) the daemon;
// every file they touch is named by package statedir.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/internal/rungroup"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

// ShutdownGrace bounds a clean stop: once Run's context ends, every part
// has this long to return. The queue is consistent whatever the moment.
const ShutdownGrace = 5 * time.Second

// lockWait is how long a starting agent waits for the state directory's
// lock while a command holds it.
const lockWait = 10 * time.Second

// Agent is a configured agent. Its methods may be called concurrently;
// Run runs once at a time (the state directory's lock sees to it, across
// processes too).
type Agent struct {
	cfg   Config
	s     *settings
	log   *slog.Logger
	renew chan struct{} // RequestRenewal's requests to the running daemon
	// fwCheck: RequestFirmwareCheck's requests (and the station's nudges).
	fwCheck chan struct{}

	// enrollRetry paces first enrollment's retries (tests shorten it and
	// give it a clock that records the waits).
	enrollRetry backoff.Config
}

// New checks cfg and fills its defaults. It does no I/O beyond reading the
// CA files cfg names; a configuration it refuses is a *ConfigError.
func New(cfg Config) (*Agent, error) {
	s, err := cfg.parse()
	if err != nil {
		return nil, err
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		out := cfg.LogOutput
		if out == nil {
			out = os.Stderr
		}
		log = slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: s.level}))
	}
	return &Agent{cfg: cfg, s: s, log: log, renew: make(chan struct{}, 1), fwCheck: make(chan struct{}, 1),
		enrollRetry: backoff.Config{Base: enrollRetryBase, Cap: enrollRetryCap, Rand: cfg.Rand}}, nil
}

// HasStation reports whether the configuration names a station to enroll
// with.
func (a *Agent) HasStation() bool { return a.cfg.Station.URL != "" }

// RequestRenewal asks the running daemon (Run) to renew the certificate
// now, as SIGUSR1 does. It does not wait; the attempt shows in the renewal
// status (enroll.LoadRenewalStatus).
func (a *Agent) RequestRenewal() {
	select {
	case a.renew <- struct{}{}:
	default: // one is pending already
	}
}

// openTPM opens the configured TPM.
func (a *Agent) openTPM() (*tpm.TPM, error) { return tpm.Open(a.cfg.TPM) }

// openTPMForKeys opens the TPM and creates the state directory: what a
// command that stores key material needs first. The caller closes the TPM.
func (a *Agent) openTPMForKeys() (*tpm.TPM, error) {
	t, err := a.openTPM()
	if err != nil {
		return nil, err
	}
	if err := a.s.dir.Create(); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// clock is the agent's clock with every floor it knows: the build time and
// the trusted time persisted in the state directory.
func (a *Agent) clock() *enroll.Clock {
	floor, _ := enroll.LoadClockFloor(string(a.s.dir))
	return enroll.NewClock(a.cfg.Now, buildinfo.Get().BuildTime, floor)
}

// daemon is one Run: the parts that exist from the start and those that
// appear once the device has an identity.
type daemon struct {
	a        *Agent
	t        *tpm.TPM
	clock    *enroll.Clock
	q        *store.Store
	tlsStats *telemetry.TLSStats
	started  time.Time
	// ekIntermediates are ek_chain_file's certificates, read at start.
	ekIntermediates []*x509.Certificate

	renewer  atomic.Pointer[enroll.Renewer]
	delivery atomic.Pointer[delivery]
	// enrolling is the last first-enrollment failure, while the device is
	// not enrolled ("" before the first attempt).
	enrolling atomic.Pointer[string]
	// firmware is the updater's state for the status file.
	firmware atomic.Pointer[fwRuntime]
}

// delivery is the uplink and the pipeline feeding it.
type delivery struct {
	up   uplink
	pipe *telemetry.Pipeline
}

// Run runs the agent until ctx ends: ingest and the sampler at once, then
// first enrollment if the state directory holds no certificate, then
// renewal, the uplink and the pipeline. It returns nil after a clean stop
// (within ShutdownGrace of ctx ending), or the first part's failure. If
// a part does not stop within ShutdownGrace, Run returns an error without
// waiting for it, and closes the queue and the TPM under it: the process
// is expected to exit then (the queue stays consistent whatever the
// moment).
func (a *Agent) Run(ctx context.Context) error {
	dir := a.s.dir
	if err := dir.Create(); err != nil {
		return err
	}
	lock, err := dir.LockWait(lockWait)
	if err != nil {
		return err
	}
	defer lock.Close()
	enrolled := true
	if _, err := enroll.LoadState(string(dir)); errors.Is(err, enroll.ErrNotEnrolled) {
		if a.cfg.Station.URL == "" {
			return errors.New("not enrolled: run iotagent enroll, or set [station] url in the config")
		}
		enrolled = false
	} else if err != nil {
		return err
	}
	inter, err := a.cfg.ekIntermediates()
	if err != nil {
		return err
	}
	t, err := a.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	d := &daemon{a: a, t: t, clock: a.clock(), ekIntermediates: inter, tlsStats: &telemetry.TLSStats{}, started: time.Now()}
	var first enroll.EnrollConfig // first enrollment, checked before anything starts
	if !enrolled {
		if first, err = a.enrollConfig(t, d.clock); err != nil {
			return err
		}
	}
	log := a.log
	q, err := store.Open(store.Options{Path: dir.Queue(), MaxBytes: a.s.maxBytes, OnFull: a.s.onFull, Logger: log})
	if err != nil {
		return err
	}
	defer q.Close()
	d.q = q
	ing, err := telemetry.NewIngest(telemetry.IngestConfig{Socket: a.s.socket, Store: q, Now: d.clock.Now, GroupDelay: a.s.groupDelay, Logger: log})
	if err != nil {
		return err
	}
	sampler, err := telemetry.NewSampler(telemetry.SamplerConfig{Store: q, Interval: a.s.interval, Sources: d.sources(), Now: d.clock.Now, Logger: log})
	if err != nil {
		return &ConfigError{err}
	}
	status := &statusWriter{path: statusFile(a.s.socket), d: d}
	if enrolled {
		log.Info("iotagent running", "version", buildinfo.Get().Version, "uplink", a.cfg.Uplink.URL, "ingest", a.s.socket)
	} else {
		log.Info("iotagent running; enrolling first", "version", buildinfo.Get().Version, "station", a.cfg.Station.URL, "ingest", a.s.socket)
	}
	done := make(chan error, 1)
	go func() {
		done <- rungroup.Run(ctx,
			rungroup.Part{Name: "ingest", Run: ing.Run},
			rungroup.Part{Name: "collectors", Run: sampler.Run},
			rungroup.Part{Name: "status", Run: status.Run},
			rungroup.Part{Run: func(ctx context.Context) error { return d.runIdentity(ctx, enrolled, first) }},
		)
	}()
	select {
	case err = <-done:
	case <-ctx.Done():
		select {
		case err = <-done:
		case <-time.After(ShutdownGrace):
			err = errors.New("parts did not stop within the shutdown grace period")
		}
	}
	d.clock.Save(true)
	return err
}

// runIdentity enrolls with first (unless enrolled), then runs renewal,
// the uplink and the pipeline until ctx ends.
func (d *daemon) runIdentity(ctx context.Context, enrolled bool, first enroll.EnrollConfig) error {
	a := d.a
	if !enrolled {
		if err := d.enrollFirst(ctx, first); err != nil || ctx.Err() != nil {
			return err
		}
	}
	r, err := enroll.NewRenewer(enroll.RenewerConfig{TPM: d.t, Dir: string(a.s.dir), KeepKey: a.s.keepKey, EKIntermediates: d.ekIntermediates,
		Clock: d.clock, Logger: a.log, Rand: a.cfg.Rand})
	if err != nil {
		return err
	}
	defer r.Close()
	d.renewer.Store(r)
	// A request made before there was a certificate costs one renewal
	// more: dropping it could drop one iotagent renew waits for.
	parts := []rungroup.Part{{Name: "renewal", Run: r.Run}, {Name: "renewal requests", Run: func(ctx context.Context) error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-a.renew:
				r.RenewNow(ctx)
			}
		}
	}}}
	if a.cfg.Uplink.URL != "" {
		up, err := a.newUplink(d.t, r.Identity(), d.q, d.tlsStats)
		if err != nil {
			return err
		}
		pipe, err := telemetry.NewPipeline(telemetry.PipelineConfig{Store: d.q, Uplink: up, Logger: a.log})
		if err != nil {
			return err
		}
		d.delivery.Store(&delivery{up: up, pipe: pipe})
		parts = append(parts, rungroup.Part{Name: "uplink", Run: up.Run}, rungroup.Part{Name: "pipeline", Run: pipe.Run})
	} else {
		a.log.Warn("no uplink configured: telemetry is queued until one is ([uplink] url or --uplink)")
	}
	if a.s.firmware != nil {
		u, err := d.newUpdater()
		if err != nil {
			return err
		}
		parts = append(parts, rungroup.Part{Name: "firmware", Run: u.Run})
	}
	a.log.Info("identity ready", "device", r.Identity().DeviceID())
	return rungroup.Run(ctx, parts...)
}

// sources are what the sampler records: the agent's SLIs (those of parts
// not started yet are left out) and, unless turned off, the host's health.
func (d *daemon) sources() []telemetry.Source {
	uplinkState := func() telemetry.UplinkState {
		if dl := d.delivery.Load(); dl != nil {
			return dl.up.State()
		}
		return telemetry.UplinkState{State: telemetry.LinkNone, Since: d.started}
	}
	src := []telemetry.Source{telemetry.AgentSource(telemetry.AgentStats{
		TLS:           d.tlsStats,
		TPMSignatures: d.t.Signatures,
		CertNotAfter: func() time.Time {
			if r := d.renewer.Load(); r != nil {
				return r.Identity().Leaf().NotAfter
			}
			return time.Time{}
		},
		RenewalsOK: func() uint64 {
			if r := d.renewer.Load(); r != nil {
				return uint64(r.Status().Renewals)
			}
			return 0
		},
		RenewalsFailed: func() uint64 {
			if r := d.renewer.Load(); r != nil {
				return uint64(r.Status().Failures)
			}
			return 0
		},
		Queue:  d.q,
		Uplink: uplinkState,
		Rejected: func() uint64 {
			if dl := d.delivery.Load(); dl != nil {
				return dl.pipe.Rejected()
			}
			return 0
		},
	})}
	if d.a.s.host {
		src = append(src, telemetry.HostSource("/", string(d.a.s.dir)))
	}
	return src
}
