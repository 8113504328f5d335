package telemetry

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry/senml"
)

// TLSStats counts an uplink's TLS (and DTLS) handshakes: the agent's own
// service-level indicators. Safe for concurrent use.
type TLSStats struct {
	mu       sync.Mutex
	ok       uint64
	resumed  uint64
	failedBy map[string]uint64
	last     time.Duration
}

// Succeeded counts a finished handshake that took d (resumed: an
// abbreviated one, no TPM signature).
func (s *TLSStats) Succeeded(resumed bool, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ok++
	if resumed {
		s.resumed++
	}
	s.last = d
}

// Failed counts a failed handshake by its reason (internal/handshake's
// words: "unknown_ca", "timeout", "peer_bad_certificate", …).
func (s *TLSStats) Failed(reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failedBy == nil {
		s.failedBy = make(map[string]uint64)
	}
	s.failedBy[reason]++
}

// TLSSnapshot is a copy of TLSStats.
type TLSSnapshot struct {
	OK, Failed, Resumed uint64
	FailedBy            map[string]uint64 // Failed by reason
	LastLatency         time.Duration
}

// Snapshot returns the counters.
func (s *TLSStats) Snapshot() TLSSnapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := TLSSnapshot{OK: s.ok, Resumed: s.resumed, LastLatency: s.last, FailedBy: maps.Clone(s.failedBy)}
	for _, n := range s.failedBy {
		snap.Failed += n
	}
	return snap
}

// Source produces records for the sampler; now is the agent's clock.
type Source func(now time.Time) (senml.Pack, error)

// SamplerConfig configures a Sampler.
type SamplerConfig struct {
	Store    *store.Store
	Interval time.Duration // default 60 s
	Sources  []Source
	Now      func() time.Time
	Logger   *slog.Logger
}

// Sampler appends what its sources report (the gateway's health, the
// agent's own SLIs) to the queue on an interval: the agent's built-in
// producers, beside the local ones that write to ingest.
type Sampler struct {
	cfg SamplerConfig
	log *slog.Logger
}

// NewSampler checks cfg.
func NewSampler(cfg SamplerConfig) (*Sampler, error) {
	if cfg.Store == nil {
		return nil, errors.New("sampler: no store")
	}
	if cfg.Interval == 0 {
		cfg.Interval = time.Minute
	}
	if cfg.Interval < time.Second {
		return nil, fmt.Errorf("sampling interval %v is below 1s", cfg.Interval)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Sampler{cfg: cfg, log: cfg.Logger}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Collect runs every source once and queues what they report.
func (c *Sampler) Collect(ctx context.Context) error {
	now := c.cfg.Now()
	var all senml.Pack
	for _, src := range c.cfg.Sources {
		p, err := src(now)
		if err != nil {
			c.log.Warn("sampler source", "err", err)
			continue
		}
		all = append(all, p...)
	}
	if len(all) == 0 {
		return nil
	}
	payloads, err := encodeResolved(all, now)
	if err != nil {
		return err
	}
	_, _, err = c.cfg.Store.Append(ctx, payloads...)
	return err
}

// Run collects at once, then every interval, until ctx ends.
func (c *Sampler) Run(ctx context.Context) error {
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	for {
		if err := c.Collect(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("collecting telemetry", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func num(name, unit string, v float64) senml.Record {
	return senml.Record{Name: name, Unit: unit, Value: &v}
}

func boolRec(name string, v bool) senml.Record {
	return senml.Record{Name: name, BoolValue: &v}
}

// HostSource reports the gateway's health from /proc and /sys: load,
// memory, free disk under dir, uptime and thermal zones (when the board
// has them). root is "/" except in tests.
func HostSource(root, dir string) Source {
	return func(time.Time) (senml.Pack, error) {
		var p senml.Pack
		if b, err := os.ReadFile(filepath.Join(root, "proc/loadavg")); err == nil {
			f := strings.Fields(string(b))
			for i, n := range []string{"host.load1", "host.load5", "host.load15"} {
				if i < len(f) {
					if v, err := strconv.ParseFloat(f[i], 64); err == nil {
						p = append(p, num(n, "", v))
					}
				}
			}
		}
		if mem, err := meminfo(filepath.Join(root, "proc/meminfo")); err == nil {
			if v, ok := mem["MemTotal"]; ok {
				p = append(p, num("host.mem.total", "B", v))
			}
			if v, ok := mem["MemAvailable"]; ok {
				p = append(p, num("host.mem.available", "B", v))
			}
		}
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err == nil {
			p = append(p,
				num("host.disk.free", "B", float64(st.Bavail)*float64(st.Bsize)),
				num("host.disk.total", "B", float64(st.Blocks)*float64(st.Bsize)))
		}
		if b, err := os.ReadFile(filepath.Join(root, "proc/uptime")); err == nil {
			if f := strings.Fields(string(b)); len(f) > 0 {
				if v, err := strconv.ParseFloat(f[0], 64); err == nil {
					p = append(p, num("host.uptime", "s", v))
				}
			}
		}
		zones, _ := filepath.Glob(filepath.Join(root, "sys/class/thermal/thermal_zone*/temp"))
		for _, z := range zones {
			b, err := os.ReadFile(z)
			if err != nil {
				continue
			}
			milli, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
			if err != nil {
				continue
			}
			zone := filepath.Base(filepath.Dir(z))
			p = append(p, num("host.temp."+zone, "Cel", milli/1000))
		}
		if len(p) == 0 {
			return nil, errors.New("host: nothing readable under /proc")
		}
		return p, nil
	}
}

func meminfo(path string) (map[string]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(rest)
		if len(fs) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fs[0], 64)
		if err != nil {
			continue
		}
		if len(fs) > 1 && fs[1] == "kB" {
			v *= 1024
		}
		out[k] = v
	}
	return out, sc.Err()
}

// AgentStats is what the agent reports about itself; the agent wires
// each field to the part that knows it.
type AgentStats struct {
	TLS           *TLSStats
	TPMSignatures func() uint64
	// CertNotAfter is the device certificate's expiry; zero while the
	// device has none (not enrolled yet).
	CertNotAfter   func() time.Time
	RenewalsOK     func() uint64
	RenewalsFailed func() uint64
	Queue          *store.Store
	Uplink         func() UplinkState
	// Rejected counts records the uplink's peer refused for good
	// (Pipeline.Rejected): undecodable or too large for it.
	Rejected func() uint64
}

// AgentSource reports the agent's service-level indicators: TLS handshakes
// by result and latency, TPM signatures spent, seconds to certificate
// expiry, renewals by result, queue depth and bytes, records dropped from
// a full queue, and the uplink state.
func AgentSource(a AgentStats) Source {
	return func(now time.Time) (senml.Pack, error) {
		var p senml.Pack
		if a.TLS != nil {
			s := a.TLS.Snapshot()
			p = append(p,
				num("agent.tls.handshakes.ok", "", float64(s.OK)),
				num("agent.tls.handshakes.failed", "", float64(s.Failed)),
				num("agent.tls.handshakes.resumed", "", float64(s.Resumed)))
			for _, reason := range slices.Sorted(maps.Keys(s.FailedBy)) {
				p = append(p, num("agent.tls.handshakes.failed."+reason, "", float64(s.FailedBy[reason])))
			}
			if s.LastLatency > 0 {
				p = append(p, num("agent.tls.handshake.latency", "s", s.LastLatency.Seconds()))
			}
		}
		if a.TPMSignatures != nil {
			p = append(p, num("agent.tpm.signatures", "", float64(a.TPMSignatures())))
		}
		if a.CertNotAfter != nil {
			if na := a.CertNotAfter(); !na.IsZero() {
				p = append(p, num("agent.cert.expiry", "s", na.Sub(now).Seconds()))
			}
		}
		if a.RenewalsOK != nil {
			p = append(p, num("agent.renewals.ok", "", float64(a.RenewalsOK())))
		}
		if a.RenewalsFailed != nil {
			p = append(p, num("agent.renewals.failed", "", float64(a.RenewalsFailed())))
		}
		if a.Queue != nil {
			s := a.Queue.Stats()
			p = append(p,
				num("agent.queue.depth", "", float64(s.Depth)),
				num("agent.queue.bytes", "B", float64(s.Bytes)),
				num("agent.queue.dropped", "", float64(s.Dropped)))
		}
		if a.Uplink != nil {
			st := a.Uplink()
			state := string(st.State)
			p = append(p,
				boolRec("agent.uplink.connected", st.State == LinkConnected),
				senml.Record{Name: "agent.uplink.state", StringValue: &state},
				num("agent.uplink.state.since", "s", now.Sub(st.Since).Seconds()))
		}
		if a.Rejected != nil {
			p = append(p, num("agent.uplink.rejected", "", float64(a.Rejected())))
		}
		return p, nil
	}
}
