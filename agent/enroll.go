package agent

import (
	"context"
	"errors"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/tpm"
)

// First enrollment's retries: a fleet powered up together spreads over
// the interval instead of asking the station in lockstep.
const (
	enrollRetryBase = 5 * time.Second
	enrollRetryCap  = 10 * time.Minute
)

// ErrNoStation is returned (in a *ConfigError) when enrollment is due and
// the configuration names no station.
var ErrNoStation = errors.New("no station to enroll with: give --station, or set [station] url in the config")

// enrollConfig is the enrollment [station] configures.
func (a *Agent) enrollConfig(t *tpm.TPM, clock *enroll.Clock) (enroll.EnrollConfig, error) {
	cas, pin, err := a.cfg.stationTrust()
	if err != nil {
		return enroll.EnrollConfig{}, err
	}
	if _, err := enroll.ParseStationURL(a.cfg.Station.URL); err != nil {
		return enroll.EnrollConfig{}, err // never works: not worth retrying
	}
	token, err := a.cfg.stationToken()
	if err != nil {
		return enroll.EnrollConfig{}, err
	}
	inter, err := a.cfg.ekIntermediates()
	if err != nil {
		return enroll.EnrollConfig{}, err
	}
	return enroll.EnrollConfig{TPM: t, Dir: string(a.s.dir), Station: a.cfg.Station.URL, Token: token,
		StationCA: cas, Pin: pin, EKIntermediates: inter, Clock: clock, Logger: a.log}, nil
}

// Enroll enrolls the device with the configured station now (TPM
// attestation, or the token for a TPM without an EK certificate), as
// iotagent enroll does; an agent holding a valid certificate is left alone
// (the result says Already). It takes the state directory's lock: with the
// daemon running it fails with a *statedir.LockedError.
func (a *Agent) Enroll(ctx context.Context) (*enroll.EnrollResult, error) {
	if _, _, err := a.cfg.stationTrust(); err != nil {
		return nil, err
	}
	if _, err := a.cfg.stationToken(); err != nil {
		return nil, err
	}
	if _, err := a.cfg.ekIntermediates(); err != nil {
		return nil, err
	}
	t, err := a.openTPMForKeys()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	lock, err := a.s.dir.Lock()
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	cfg, err := a.enrollConfig(t, a.clock())
	if err != nil {
		return nil, err
	}
	return enroll.Enroll(ctx, cfg)
}

// enrollFirst enrolls at first start (zero-touch provisioning), retrying
// with the project's backoff, full jitter and the station's Retry-After,
// until it succeeds or ctx ends.
func (d *daemon) enrollFirst(ctx context.Context, cfg enroll.EnrollConfig) error {
	a := d.a
	bo := backoff.New(a.enrollRetry)
	for {
		_, err := enroll.Enroll(ctx, cfg)
		if err == nil {
			d.enrolling.Store(nil)
			return nil
		}
		if ctx.Err() != nil {
			return nil
		}
		var retryAfter time.Duration
		if se := (*enroll.StatusError)(nil); errors.As(err, &se) {
			retryAfter = se.RetryAfter
		}
		wait := bo.FailAfter(retryAfter)
		msg := err.Error()
		d.enrolling.Store(&msg)
		a.log.Warn("enrollment failed; retrying", "err", err, "retry_in", wait.Round(time.Millisecond))
		if bo.Sleep(ctx, wait) != nil {
			return nil
		}
	}
}
