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
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return nil, fmt.Errorf("asking iotagent (pid %d) to renew: %w", pid, err)
	}
	deadline := time.After(daemonRenewalWait)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, fmt.Errorf("iotagent (pid %d) did not report a renewal attempt within %v", pid, daemonRenewalWait)
		case <-tick.C:
		}
		rs, _ := enroll.LoadRenewalStatus(dir)
		if rs.LastAttempt.Equal(before.LastAttempt) {
			continue
		}
		if rs.LastError != "" {
			return nil, fmt.Errorf("renewal by the running agent failed: %s", rs.LastError)
		}
		return &RenewResult{DaemonPID: pid, NextRenewal: rs.NextRenewal}, nil
	}
}
