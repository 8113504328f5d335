package enroll

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/tpm"
)

// RenewerConfig configures a Renewer. Zero values mean the defaults.
type RenewerConfig struct {
	TPM *tpm.TPM
	// Dir is the state dir of an enrolled agent.
	Dir string
	// KeepKey renews the certificate of the current key (simplereenroll)
	// instead of rotating to a new TPM key and re-attesting (the default,
	// rotate_key = true).
	KeepKey bool
	// EKIntermediates are sent with the EK certificate when re-attesting
	// (see EnrollConfig.EKIntermediates).
	EKIntermediates []*x509.Certificate
	// BackoffBase and BackoffCap bound the wait after a failed attempt:
	// a random duration in [0, min(cap, base·2^failures)) (full jitter).
	// Defaults 10s and 1h.
	BackoffBase time.Duration
	BackoffCap  time.Duration
	// Recheck is the longest the renewer sleeps before looking at the
	// clock again, so a wall-clock jump is noticed (default 1 minute).
	Recheck time.Duration
	Clock   *Clock
	Logger  *slog.Logger
	// Rand draws jitter; nil uses a random source.
	Rand *rand.Rand
}

// Renewer keeps the device certificate fresh: it renews when a third of
// the lifetime is left (minus random jitter up to lifetime/20), backs off
// with full jitter on failure, never gives up, and re-attests when the
// certificate has expired or the station refuses it. Close releases the key.
//
// Each renewal attempt is a small state machine:
//
//	              ┌────────── certificate valid ──────────┐
//	              │                                       │
//	KeepKey or no EK certificate              rotate (default)
//	              │                                       │
//	      simplereenroll (mTLS,               new TPM key ─▶ tpmenroll (mTLS)
//	      same key)                                       │
//	              │                                       │
//	              └──────────────┬────────────────────────┘
//	                  refused (revoked, unknown…)
//	                             ▼
//	certificate expired ─▶ re-attest: tpmenroll without a client
//	                       certificate (new key unless KeepKey)
//	                             │
//	success: store chain, trust bundle (refreshed), key ─▶ swap the
//	live Identity ─▶ flush the old key ─▶ schedule the next renewal
//	failure: back off (Retry-After respected) ─▶ try again, forever
type Renewer struct {
	cfg   RenewerConfig
	log   *slog.Logger
	clock *Clock
	id    *Identity

	// mu serializes attempts (Run and RenewNow) and guards the attempt's
	// state. An attempt holds it across the network, up to a minute per
	// request: nothing that reports (Status) may wait on it.
	mu sync.Mutex
	// stMu guards st where it is replaced (install, mu held) and where it
	// is read without mu (StationClient, from other goroutines).
	stMu      sync.Mutex
	st        *State
	jitter    time.Duration // chosen once per certificate
	backoff   *backoff.Backoff
	retryAt   time.Time                   // zero: none scheduled
	reattest  bool                        // the station refused the current certificate
	attemptFn func(context.Context) error // replaced in schedule tests

	// statusMu guards status, which attempts update (with mu held) and
	// Status reads at any time.
	statusMu sync.Mutex
	status   RenewalStatus
}

// NewRenewer loads the enrolled state from cfg.Dir and the current key.
func NewRenewer(cfg RenewerConfig) (*Renewer, error) {
	st, err := recoverState(cfg.Dir)
	if err != nil {
		return nil, err
	}
	key, err := cfg.TPM.LoadKey(st.Key)
	if err != nil {
		return nil, fmt.Errorf("loading device key: %w", err)
	}
	r := newRenewer(cfg, st, newIdentity(st.Chain, st.TrustPool(), key))
	r.clock.Learn(st.Leaf().NotBefore)
	r.clock.PersistTo(cfg.Dir)
	r.status, _ = LoadRenewalStatus(cfg.Dir)
	return r, nil
}

// newRenewer fills cfg's defaults and returns a renewer of st and id.
func newRenewer(cfg RenewerConfig, st *State, id *Identity) *Renewer {
	if cfg.BackoffBase == 0 {
		cfg.BackoffBase = 10 * time.Second
	}
	if cfg.BackoffCap == 0 {
		cfg.BackoffCap = time.Hour
	}
	if cfg.Recheck == 0 {
		cfg.Recheck = time.Minute
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if cfg.Clock == nil {
		cfg.Clock = NewClock(nil)
	}
	r := &Renewer{cfg: cfg, log: cfg.Logger, clock: cfg.Clock, st: st, id: id,
		backoff: backoff.New(backoff.Config{Base: cfg.BackoffBase, Cap: cfg.BackoffCap, Rand: cfg.Rand})}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	r.pickJitter()
	r.attemptFn = r.attempt
	return r
}

// Identity returns the live credential.
func (r *Renewer) Identity() *Identity { return r.id }

// Close releases the device key.
func (r *Renewer) Close() error { return r.id.close() }

// Status returns what the renewer last did. It never waits for an
// attempt in progress.
func (r *Renewer) Status() RenewalStatus {
	r.statusMu.Lock()
	defer r.statusMu.Unlock()
	return r.status
}

// setStatus replaces the status and saves it. r.mu held.
func (r *Renewer) setStatus(rs RenewalStatus) {
	r.statusMu.Lock()
	r.status = rs
	r.statusMu.Unlock()
	if err := saveRenewalStatus(r.cfg.Dir, rs); err != nil {
		r.log.Warn("saving renewal status", "err", err)
	}
}

func (r *Renewer) pickJitter() {
	leaf := r.st.Leaf()
	lifetime := leaf.NotAfter.Sub(leaf.NotBefore)
	if max := int64(lifetime / 20); max > 0 {
		r.jitter = time.Duration(r.cfg.Rand.Int64N(max))
	} else {
		r.jitter = 0
	}
}

// RenewalTime is when a certificate valid from notBefore to notAfter is
// renewed: with a third of its lifetime left, minus jitter.
func RenewalTime(notBefore, notAfter time.Time, jitter time.Duration) time.Time {
	return notAfter.Add(-notAfter.Sub(notBefore) / 3).Add(-jitter)
}

// nextAttempt is when the next attempt is due. r.mu held.
func (r *Renewer) nextAttempt() time.Time { return r.nextAttemptAfter(r.Status().LastRenewal) }

// nextAttemptAfter is nextAttempt for a last renewal at last. r.mu held.
func (r *Renewer) nextAttemptAfter(last time.Time) time.Time {
	if !r.retryAt.IsZero() {
		return r.retryAt
	}
	leaf := r.st.Leaf()
	due := RenewalTime(leaf.NotBefore, leaf.NotAfter, r.jitter)
	// A station that issues certificates already inside their renewal
	// window (heavy backdating, a lifetime cut by its CA's expiry) must not
	// make the agent renew in a tight loop: wait a tenth of the lifetime
	// after a renewal, but never past expiry.
	if !last.IsZero() {
		floor := last.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 10)
		if due.Before(floor) {
			due = floor
		}
		if due.After(leaf.NotAfter) {
			due = leaf.NotAfter
		}
	}
	return due
}

// Run renews until ctx is done; it returns nil then.
func (r *Renewer) Run(ctx context.Context) error {
	r.mu.Lock()
	st := r.Status()
	st.NextRenewal = r.nextAttempt().UTC()
	r.setStatus(st)
	r.mu.Unlock()
	for {
		r.mu.Lock()
		due := r.nextAttempt()
		r.mu.Unlock()
		now := r.clock.Now()
		if now.Before(due) {
			// Sleep in bounded steps: timers run on the monotonic clock,
			// the schedule on wall time that may jump.
			t := time.NewTimer(min(due.Sub(now), r.cfg.Recheck))
			select {
			case <-ctx.Done():
				t.Stop()
				r.clock.Save(true)
				return nil
			case <-t.C:
			}
			continue
		}
		if err := r.RenewNow(ctx); err != nil && ctx.Err() != nil {
			r.clock.Save(true)
			return nil
		}
		r.clock.Save(false)
	}
}

// RenewNow makes one renewal attempt now and, on failure, schedules the
// next one with backoff.
func (r *Renewer) RenewNow(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.clock.Now()
	err := r.attemptFn(ctx)
	if err != nil && ctx.Err() != nil {
		// Interrupted by shutdown: not a failure of the station or TPM.
		return err
	}
	st := r.Status()
	st.LastAttempt, st.Failures = now.UTC(), 0
	if err != nil {
		var retryAfter time.Duration
		if se := (*StatusError)(nil); errors.As(err, &se) {
			retryAfter = se.RetryAfter
		}
		wait := r.backoff.FailAfter(retryAfter)
		r.retryAt = r.clock.Now().Add(wait)
		st.LastError, st.Failures = err.Error(), r.backoff.Failures()
		r.log.Warn("certificate renewal failed", "err", err, "failures", st.Failures, "retry_in", wait.Round(time.Millisecond))
	} else {
		r.backoff.Reset()
		r.retryAt = time.Time{}
		st.LastError, st.LastRenewal = "", r.clock.Now().UTC()
		st.Renewals++
		leaf := r.st.Leaf()
		r.log.Info("certificate renewed", "device", r.id.DeviceID(), "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter.UTC())
	}
	st.NextRenewal = r.nextAttemptAfter(st.LastRenewal).UTC()
	r.setStatus(st)
	return err
}

// attempt is one renewal. r.mu held.
func (r *Renewer) attempt(ctx context.Context) error {
	expired := !r.clock.Now().Before(r.st.Leaf().NotAfter)
	var ek *tpm.EK
	if eks, err := r.cfg.TPM.EndorsementKeys(); err == nil {
		ek = &eks[0]
	}
	reattest := expired || r.reattest
	mtls := !reattest
	switch {
	case reattest && ek == nil:
		if expired {
			return errors.New("the certificate has expired and the TPM has no EK certificate to re-attest with: enroll again with a token (iotagent enroll --token)")
		}
		return errors.New("the station refused the certificate and the TPM has no EK certificate to re-attest with: enroll again with a token")
	case !reattest && (r.cfg.KeepKey || ek == nil):
		err := r.reenroll(ctx)
		r.noteRefusal(err)
		return err
	}
	newKey := !r.cfg.KeepKey
	err := r.tpmRenew(ctx, ek, newKey, mtls)
	if mtls {
		r.noteRefusal(err)
	} else if err == nil {
		r.reattest = false
	}
	return err
}

// noteRefusal switches to re-attestation after the station refused an
// mTLS request (certificate revoked, unknown, or not trusted any more).
func (r *Renewer) noteRefusal(err error) {
	var se *StatusError
	if errors.As(err, &se) && se.Refused() {
		r.reattest = true
	}
}

// StationClient returns a client of the station that presents the
// device certificate (mutual TLS), for the station's other services
// (the firmware repository).
func (r *Renewer) StationClient() (*Client, error) {
	r.stMu.Lock()
	defer r.stMu.Unlock()
	return r.client(true)
}

func (r *Renewer) client(mtls bool) (*Client, error) {
	cfg := ClientConfig{URL: r.st.Enrollment.Station, Roots: r.st.TrustPool(), Clock: r.clock}
	if mtls {
		cfg.GetClientCertificate = r.id.GetClientCertificate
	}
	return NewClient(cfg)
}

// reenroll renews the current key's certificate with simplereenroll.
func (r *Renewer) reenroll(ctx context.Context) error {
	c, err := r.client(true)
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	trust, err := c.CACerts(ctx)
	if err != nil {
		return err
	}
	key := r.currentKey()
	csr, err := newCSR(key, r.id.DeviceID())
	if err != nil {
		return fmt.Errorf("signing CSR in the TPM: %w", err)
	}
	cert, err := c.SimpleReenroll(ctx, csr)
	if err != nil {
		return err
	}
	chain, err := verifyIssued(cert, key, trust, r.clock)
	if err != nil {
		return err
	}
	return r.install(chain, trust, key, nil)
}

func (r *Renewer) currentKey() *tpm.Key {
	r.id.mu.Lock()
	defer r.id.mu.Unlock()
	return r.id.key
}

// tpmRenew enrolls through /tpmenroll: with a new key (rotation) or the
// current one, over mTLS with the current certificate or without (after
// expiry or refusal).
func (r *Renewer) tpmRenew(ctx context.Context, ek *tpm.EK, newKey, mtls bool) (err error) {
	c, err := r.client(mtls)
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	trust, err := c.CACerts(ctx)
	if err != nil {
		return err
	}
	key := r.currentKey()
	var kf *tpm.KeyFile
	if newKey {
		// The new key's blobs are stored before it is used so that a
		// certificate for it is never without them; the old key stays in
		// place until the new certificate is stored.
		if kf, err = r.cfg.TPM.CreateKey(); err != nil {
			return err
		}
		if err := tpm.WriteKeyFile(statedir.Dir(r.cfg.Dir).NextDeviceKey(), kf); err != nil {
			return err
		}
		if key, err = r.cfg.TPM.LoadKey(kf); err != nil {
			atomicfile.Remove(statedir.Dir(r.cfg.Dir).NextDeviceKey())
			return err
		}
		defer func() {
			if err != nil {
				key.Close()
				atomicfile.Remove(statedir.Dir(r.cfg.Dir).NextDeviceKey())
			}
		}()
	}
	cert, err := attest(ctx, c, r.cfg.TPM, key, claim{ek: ek, chain: ekChain(r.cfg.TPM, ek, r.cfg.EKIntermediates, r.log), deviceID: r.id.DeviceID()})
	if err != nil {
		return err
	}
	chain, err := verifyIssued(cert, key, trust, r.clock)
	if err != nil {
		return err
	}
	if chain, err = exchangeIssued(ctx, ClientConfig{URL: r.st.Enrollment.Station, Roots: r.st.TrustPool(), Clock: r.clock}, chain, key, trust); err != nil {
		return err
	}
	return r.install(chain, trust, key, kf)
}

// install stores a new certificate (the commit point), installs a rotated
// key file, swaps the live identity and flushes the old key.
func (r *Renewer) install(chain, trust []*x509.Certificate, key *tpm.Key, kf *tpm.KeyFile) error {
	en := r.st.Enrollment
	en.DeviceID = chain[0].Subject.CommonName
	if err := saveIdentity(r.cfg.Dir, chain, trust, en); err != nil {
		return err
	}
	oldFile := r.st.Key
	if kf != nil {
		if err := commitKey(r.cfg.Dir); err != nil {
			return err
		}
	}
	st, err := recoverState(r.cfg.Dir)
	if err != nil {
		return err
	}
	r.stMu.Lock()
	r.st = st
	r.stMu.Unlock()
	r.pickJitter()
	if old := r.id.swap(st.Chain, st.TrustPool(), key); old != nil {
		old.Close()
	}
	if kf != nil && oldFile.Handle() != 0 {
		r.movePersistentHandle(oldFile, key)
	}
	return nil
}

// movePersistentHandle keeps an operator's persistent handle pointing at
// the current key after a rotation. Failures are logged: the key works
// from its blobs regardless.
func (r *Renewer) movePersistentHandle(old *tpm.KeyFile, key *tpm.Key) {
	h := old.Handle()
	if err := r.cfg.TPM.EvictKey(old); err != nil {
		r.log.Warn("evicting the old key's persistent handle", "handle", tpm.FormatHandle(h), "err", err)
		return
	}
	kf, err := r.cfg.TPM.Persist(key, h)
	if err != nil {
		r.log.Warn("persisting the rotated key", "handle", tpm.FormatHandle(h), "err", err)
		return
	}
	if err := tpm.WriteKeyFile(statedir.Dir(r.cfg.Dir).DeviceKey(), kf); err != nil {
		r.log.Warn("recording the rotated key's persistent handle", "err", err)
	}
	atomicfile.SyncDir(r.cfg.Dir)
}
