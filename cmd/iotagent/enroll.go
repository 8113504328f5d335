package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

// clock builds the agent's clock with every floor it knows.
func (e *env) clock() *enroll.Clock {
	floor, _ := enroll.LoadClockFloor(e.stateDir)
	c := enroll.NewClock(e.now, buildinfo.Get().BuildTime, floor)
	return c
}

func (e *env) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func cmdEnroll(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("enroll")
	station := fs.String("station", "", "station `URL`, https://HOST:PORT")
	caFile := fs.String("station-ca", "", "PEM `FILE` of the station's CA (root) certificate")
	fingerprint := fs.String("station-fingerprint", "", "pin the station by a certificate fingerprint `sha256:HEX` (iotstation fingerprint)")
	token := fs.String("token", "", "one-time `DEVICE_ID:SECRET` for TPMs without an EK certificate")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *station == "" {
		return usagef("enroll: --station is required")
	}
	if (*caFile == "") == (*fingerprint == "") {
		return usagef("enroll: give exactly one of --station-ca and --station-fingerprint")
	}
	cfg := enroll.EnrollConfig{Dir: e.stateDir, Station: *station, Token: *token, Logger: e.logger()}
	if *caFile != "" {
		certs, err := readCertFile(*caFile)
		if err != nil {
			return usageError{fmt.Errorf("--station-ca: %w", err)}
		}
		cfg.StationCA = certs
	} else {
		pin, err := enroll.ParsePin(*fingerprint)
		if err != nil {
			return usageError{fmt.Errorf("--station-fingerprint: %w", err)}
		}
		cfg.Pin = pin
	}
	t, err := e.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	if err := atomicfile.MkdirPrivate(e.stateDir); err != nil {
		return fmt.Errorf("state dir %s: %w", e.stateDir, unwrapPath(err))
	}
	if err := e.lockState(); err != nil {
		return err
	}
	cfg.TPM, cfg.Clock = t, e.clock()
	res, err := enroll.Enroll(ctx, cfg)
	if err != nil {
		return err
	}
	leaf := res.State.Leaf()
	if res.Already {
		fmt.Fprintf(e.stdout, "already enrolled as %s (certificate %s, valid until %s)\n",
			res.State.Enrollment.DeviceID, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
		return nil
	}
	fmt.Fprintf(e.stdout, "enrolled as %s by %s (certificate %s, valid until %s)\n",
		res.State.Enrollment.DeviceID, res.State.Enrollment.Method, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

func readCertFile(path string) ([]*x509.Certificate, error) { return certpem.ReadFile(path) }

// lockFile is held (flock) by the process that owns the state dir's
// identity: iotagent run, or a one-shot enroll/renew.
const lockFile = "agent.lock"

// lockState takes the state dir lock for this process's lifetime. Its
// file holds the owner's PID, so iotagent renew can signal a running
// daemon.
func (e *env) lockState() error {
	f, err := os.OpenFile(e.stateDir+"/"+lockFile, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("state dir %s: %w", e.stateDir, unwrapPath(err))
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid, _ := os.ReadFile(f.Name())
		f.Close()
		return &lockedError{pid: strings.TrimSpace(string(pid))}
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	e.lock = f // released when the process exits
	return nil
}

type lockedError struct{ pid string }

func (l *lockedError) Error() string {
	return fmt.Sprintf("another iotagent (pid %s) is using the state dir", l.pid)
}

func (e *env) renewerConfig(t *tpm.TPM, keepKey bool) enroll.RenewerConfig {
	return enroll.RenewerConfig{TPM: t, Dir: e.stateDir, KeepKey: keepKey, Clock: e.clock(), Logger: e.logger()}
}

func cmdRenew(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("renew")
	keepKey := fs.Bool("keep-key", false, "renew the current key's certificate (simplereenroll) instead of rotating the key")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := e.lockState(); err != nil {
		var le *lockedError
		if errors.As(err, &le) {
			return signalDaemon(ctx, e, le.pid)
		}
		return err
	}
	t, err := e.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	r, err := enroll.NewRenewer(e.renewerConfig(t, *keepKey))
	if err != nil {
		return err
	}
	defer r.Close()
	if err := r.RenewNow(ctx); err != nil {
		return err
	}
	leaf := r.Identity().Leaf()
	fmt.Fprintf(e.stdout, "renewed %s: certificate %s, valid until %s\n", r.Identity().DeviceID(), leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// signalDaemon asks a running iotagent run to renew now (SIGUSR1) and
// waits for its attempt to be recorded.
func signalDaemon(ctx context.Context, e *env, pidText string) error {
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return fmt.Errorf("the state dir is locked by another iotagent whose pid is unknown")
	}
	before, _ := enroll.LoadRenewalStatus(e.stateDir)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return fmt.Errorf("asking iotagent (pid %d) to renew: %w", pid, err)
	}
	deadline := time.After(2 * time.Minute)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline:
			return fmt.Errorf("iotagent (pid %d) did not report a renewal attempt within 2 minutes", pid)
		case <-tick.C:
		}
		rs, _ := enroll.LoadRenewalStatus(e.stateDir)
		if rs.LastAttempt.Equal(before.LastAttempt) {
			continue
		}
		if rs.LastError != "" {
			return fmt.Errorf("renewal by the running agent failed: %s", rs.LastError)
		}
		fmt.Fprintf(e.stdout, "renewed by the running agent (pid %d); next renewal %s\n", pid, rs.NextRenewal.Format(time.RFC3339))
		return nil
	}
}

type statusJSON struct {
	DeviceID         string    `json:"device_id"`
	CertSerial       string    `json:"cert_serial"`
	CertNotAfter     time.Time `json:"cert_not_after"`
	NextRenewal      time.Time `json:"next_renewal"`
	LastRenewal      time.Time `json:"last_renewal,omitzero"`
	LastRenewalError string    `json:"last_renewal_error"`
	Renewals         int       `json:"renewals"`
	Station          string    `json:"station"`
	TPM              string    `json:"tpm"`
	// From the running agent (or the queue file when none runs).
	QueueDepth     int64     `json:"queue_depth"`
	QueueBytes     int64     `json:"queue_bytes"`
	RecordsDropped uint64    `json:"records_dropped"`
	Uplink         string    `json:"uplink"`
	UplinkError    string    `json:"uplink_error,omitempty"`
	LastAck        time.Time `json:"last_ack,omitzero"`
	Running        bool      `json:"running"`
}

func cmdStatus(_ context.Context, e *env, args []string) error {
	fs := e.flagSet("status")
	asJSON := fs.Bool("json", false, "print JSON")
	socket := fs.String("ingest-socket", telemetry.DefaultSocket, "the running agent's ingest socket `PATH` (its status file is beside it)")
	if err := parse(fs, args); err != nil {
		return err
	}
	st, err := enroll.LoadState(e.stateDir)
	if err != nil {
		return err
	}
	rs, err := enroll.LoadRenewalStatus(e.stateDir)
	if err != nil {
		return err
	}
	leaf := st.Leaf()
	next := rs.NextRenewal
	if next.IsZero() {
		next = enroll.RenewalTime(leaf.NotBefore, leaf.NotAfter, 0).UTC()
	}
	spec, _ := tpm.ParseSpec(e.tpmSpec)
	out := statusJSON{
		DeviceID: st.Enrollment.DeviceID, CertSerial: leaf.SerialNumber.Text(16), CertNotAfter: leaf.NotAfter.UTC(),
		NextRenewal: next, LastRenewal: rs.LastRenewal, LastRenewalError: rs.LastError, Renewals: rs.Renewals,
		Station: st.Enrollment.Station, TPM: spec.String(),
	}
	e.queueStatus(&out, filepath.Join(filepath.Dir(*socket), "status.json"))
	if *asJSON {
		return writeJSON(e, out)
	}
	fmt.Fprintf(e.stdout, "device:        %s\ncertificate:   %s, valid until %s\nnext renewal:  %s\nstation:       %s\ntpm:           %s\n",
		out.DeviceID, out.CertSerial, out.CertNotAfter.Format(time.RFC3339), out.NextRenewal.Format(time.RFC3339), out.Station, out.TPM)
	if out.LastRenewalError != "" {
		fmt.Fprintf(e.stdout, "last error:    %s\n", out.LastRenewalError)
	}
	fmt.Fprintf(e.stdout, "uplink:        %s\nqueue:         %d records, %d bytes, %d dropped\n", out.Uplink, out.QueueDepth, out.QueueBytes, out.RecordsDropped)
	if !out.LastAck.IsZero() {
		fmt.Fprintf(e.stdout, "last ack:      %s\n", out.LastAck.Format(time.RFC3339))
	}
	return nil
}

// queueStatus fills the queue and uplink fields: from the running agent's
// status file when it is fresh, else from the queue file itself.
func (e *env) queueStatus(out *statusJSON, statusFile string) {
	out.Uplink = "not running"
	if b, err := os.ReadFile(statusFile); err == nil {
		var rs runtimeStatus
		if json.Unmarshal(b, &rs) == nil && time.Since(rs.Updated) < 10*time.Second {
			out.Running = true
			out.QueueDepth, out.QueueBytes, out.RecordsDropped = rs.QueueDepth, rs.QueueBytes, rs.RecordsDropped
			out.Uplink = "none configured"
			if rs.Uplink != nil {
				out.Uplink, out.UplinkError, out.LastAck = string(rs.Uplink.State), rs.Uplink.LastError, rs.Uplink.LastAck
			}
			return
		}
	}
	path := filepath.Join(e.stateDir, "queue.db")
	if !fileExists(path) {
		return
	}
	q, err := store.Open(store.Options{Path: path, OpenTimeout: 200 * time.Millisecond})
	if err != nil {
		return
	}
	defer q.Close()
	st := q.Stats()
	out.QueueDepth, out.QueueBytes, out.RecordsDropped = st.Depth, st.Bytes, st.Dropped
}
