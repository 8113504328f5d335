package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"syscall"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/enroll"
)

// daemonRenewalWait bounds how long Renew waits for the running agent to
// record the attempt it asked for.
const daemonRenewalWait = 2 * time.Minute

// RenewResult says what Renew did.
type RenewResult struct {
	// DaemonPID is set when the running agent renewed (Renew signalled
	// it); Certificate is then nil and NextRenewal is what it recorded.
	DaemonPID   int
	Certificate *x509.Certificate
	NextRenewal time.Time
	DeviceID    string
}

// Renew renews the certificate now, as iotagent renew does: itself when no
// agent runs, or by asking the running agent (SIGUSR1) and waiting for the
// attempt it records, so that the two never race for the state directory.
func (a *Agent) Renew(ctx context.Context) (*RenewResult, error) {
	dir := string(a.s.dir)
	if _, err := enroll.LoadState(dir); err != nil {
		return nil, err
	}
	lock, err := a.s.dir.Lock()
	if le := (*statedir.LockedError)(nil); errors.As(err, &le) {
		return a.renewByDaemon(ctx, le.PID)
	}
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	inter, err := a.cfg.ekIntermediates()
	if err != nil {
		return nil, err
	}
	t, err := a.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	r, err := enroll.NewRenewer(enroll.RenewerConfig{TPM: t, Dir: dir, KeepKey: a.s.keepKey, EKIntermediates: inter, Clock: a.clock(), Logger: a.log, Rand: a.cfg.Rand})
	if err != nil {
		return nil, err
	}
	defer r.Close()
	if err := r.RenewNow(ctx); err != nil {
		return nil, err
	}
	return &RenewResult{Certificate: r.Identity().Leaf(), DeviceID: r.Identity().DeviceID(), NextRenewal: r.Status().NextRenewal}, nil
}

// renewByDaemon asks the running agent to renew now and waits for its
// attempt to be recorded.
func (a *Agent) renewByDaemon(ctx context.Context, pid int) (*RenewResult, error) {
	if pid <= 0 {
		return nil, errors.New("the state dir is locked by another iotagent whose pid is unknown")
	}
	dir := string(a.s.dir)
	before, _ := enroll.LoadRenewalStatus(dir)
	var rs enroll.RenewalStatus
	err := signalAndWait(ctx, pid, syscall.SIGUSR1, "to renew", daemonRenewalWait, func() bool {
		rs, _ = enroll.LoadRenewalStatus(dir)
		return !rs.LastAttempt.Equal(before.LastAttempt)
	})
	if err != nil {
		return nil, fmt.Errorf("%w (a renewal attempt)", err)
	}
	if rs.LastError != "" {
		return nil, fmt.Errorf("renewal by the running agent failed: %s", rs.LastError)
	}
	return &RenewResult{DaemonPID: pid, NextRenewal: rs.NextRenewal}, nil
}

// signalAndWait sends sig to the running agent pid (asking it what),
// then polls done until it is true, ctx ends or wait passes.
func signalAndWait(ctx context.Context, pid int, sig syscall.Signal, what string, wait time.Duration, done func() bool) error {
	if err := syscall.Kill(pid, sig); err != nil {
		return fmt.Errorf("asking iotagent (pid %d) %s: %w", pid, what, err)
	}
	deadline := time.After(wait)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for !done() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline:
			return fmt.Errorf("iotagent (pid %d) did not answer within %v", pid, wait)
		case <-tick.C:
		}
	}
	return nil
}
