package station

// Ending a revoked device's live MQTT sessions.
//
// A broker checks the CRL at a handshake only: mosquitto 2.0.11 keeps an
// established connection across the SIGHUP that reloads its crlfile, so a
// revoked device that stays connected keeps publishing until the broker
// restarts. A revocation therefore also ends the device's sessions at the
// broker, as the CoAP collector (which checks the registry on every
// request) does by itself.
//
// For mosquitto the station drives its dynamic-security plugin ("dynsec")
// over MQTT: it connects as SessionsClientName, with a certificate it
// issues itself, and publishes commands to $CONTROL/dynamic-security/v1.
// Two facts of mosquitto 2.0.11 (src/handle_connect.c,
// plugins/dynamic-security/acl.c) shape the commands:
//
//   - With use_identity_as_username the broker never asks the plugin to
//     authenticate a client: a disabled dynsec client still connects with
//     its certificate. Only the CRL keeps a revoked certificate out.
//   - The plugin's ACL check defers a user it does not know to the next
//     check (the acl_file), so devices need not be dynsec clients; one it
//     knows is decided by its roles, then by the plugin's default access
//     (which lets a client subscribe to anything).
//
// So for each revoked device the station sends one message, which the
// broker's single thread applies at once:
//
//	createRole    iotstation-revoked: deny publishing, receiving and
//	              subscribing on every topic ("Role already exists" is fine)
//	createClient  DEVICE-ID with that role ("Client already exists" is fine:
//	              the operator's own client keeps its roles)
//	disableClient DEVICE-ID: the broker closes every connection whose user
//	              name is the device ID
//
// A revoked device that gets back in (a broker that missed the CRL
// reload) can neither publish nor subscribe. A device counts as done once
// disableClient succeeded after a successful CRL hook run and with none
// failed since (the broker had the CRL listing it, so the device's
// reconnection fails its handshake); until then it stays queued in
// sessions-pending.json and RunSessionEnds retries it, across restarts
// too.

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/internal/certpem"
)

// SessionsClientName is the service the station connects to a broker as
// to end revoked devices' sessions; the broker's ACL must let it write
// $CONTROL/dynamic-security/v1 and read $CONTROL/dynamic-security/v1/response.
const SessionsClientName = "iotstation-sessions"

const (
	fileSessionsPending = "sessions-pending.json"
	// revokedRole is the dynsec role every revoked device is given.
	revokedRole = "iotstation-revoked"
	// sessionsTimeout bounds the connection to the broker and each answer.
	sessionsTimeout = 10 * time.Second
	// sessionsCertLifetime is the lifetime of the certificate the station
	// issues itself to connect as SessionsClientName (or NudgeClientName);
	// its key never leaves memory. It is reused for two thirds of it
	// (serviceCertCache): far longer than RunSessionEnds waits between
	// retries (at most hookRetryMax), so that a broker down for a day
	// costs a certificate or two, not one an attempt.
	sessionsCertLifetime = 24 * time.Hour
	dynsecTopic          = "$CONTROL/dynamic-security/v1"
)

// SessionsConfig says how a revocation ends the device's live sessions
// at the fleet's broker: station.json's "end_sessions" object. The zero
// value ends none (a connected device then keeps its session until the
// broker drops it).
type SessionsConfig struct {
	// MosquittoDynsec is the mqtts://HOST:PORT of a mosquitto broker with
	// the dynamic-security plugin loaded (plugin
	// .../mosquitto_dynamic_security.so, plugin_opt_config_file FILE).
	MosquittoDynsec string `json:"mosquitto_dynsec,omitempty"`
	// CAFile, a PEM file, verifies that broker's certificate (default: the
	// station's CA certificates, which certify a broker whose certificate
	// came from iotstation issue --server).
	CAFile string `json:"ca_file,omitempty"`
}

// sessionsConfig reads station.json's end_sessions at each use: a
// revocation in a CLI process and serve's retries read the same file.
func (s *Station) sessionsConfig() (SessionsConfig, error) {
	fc, err := s.readFileConfig()
	if err != nil || fc.EndSessions == nil {
		return SessionsConfig{}, err
	}
	return *fc.EndSessions, nil
}

// pendingSessions is sessions-pending.json: each device whose sessions
// are still to be ended, with when it was queued.
type pendingSessions map[string]time.Time

func (s *Station) readPendingSessions() (pendingSessions, error) {
	p := pendingSessions{}
	b, err := os.ReadFile(s.path(fileSessionsPending))
	if errors.Is(err, fs.ErrNotExist) {
		return p, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%s: %w", fileSessionsPending, err)
	}
	return p, nil
}

func (s *Station) writePendingSessions(p pendingSessions) error {
	if len(p) == 0 {
		err := os.Remove(s.path(fileSessionsPending))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(s.path(fileSessionsPending), append(b, '\n'), 0o600)
}

// endSessions queues revoked device id and ends its sessions at the
// broker (see the comment at the top of this file). It returns nil when
// station.json configures no broker, an error when id stays queued for
// RunSessionEnds.
func (s *Station) endSessions(ctx context.Context, id string) error {
	cfg, err := s.sessionsConfig()
	if err != nil {
		return fmt.Errorf("its live sessions were not ended: %w", err)
	}
	if cfg.MosquittoDynsec == "" {
		s.log.Warn("no end_sessions broker in station.json: a connected device keeps its MQTT session until the broker drops it", "device", id)
		return nil
	}
	s.hookMu.Lock()
	p, err := s.readPendingSessions()
	if err == nil {
		if _, ok := p[id]; !ok {
			p[id] = s.now().UTC()
		}
		err = s.writePendingSessions(p)
	}
	s.hookMu.Unlock()
	if err != nil {
		return fmt.Errorf("its live sessions were not ended: %w", err)
	}
	return s.flushSessionEnds(ctx)
}

// flushSessionEnds tries to end the sessions of every queued device, over
// one connection to the broker; flushes run one at a time. Each device's
// result is audited (end-sessions); the error names those still queued.
//
// The broker must reload its CRL before the kick, or a kicked device
// could reconnect before the reload, and stay connected. Every device is
// queued after its revocation's CRL hook run, so a flush that starts
// with no hook run under way (hookMu) and none failed (hookPending) kicks
// devices the broker's CRL lists already; one that starts with a failed
// run, or sees one fail by the time a device's kick is answered, keeps
// the device queued. hookMu is held only for that look and for the queue
// file, never while the broker answers (up to sessionsTimeout for each
// step): a broker that is down delays no CRL hook run.
func (s *Station) flushSessionEnds(ctx context.Context) error {
	s.sessionsCert.mu.Lock()
	defer s.sessionsCert.mu.Unlock()
	s.hookMu.Lock()
	p, err := s.readPendingSessions()
	crlLoaded := !s.hookPending.Load()
	s.hookMu.Unlock()
	if err != nil || len(p) == 0 {
		return err
	}
	cfg, err := s.sessionsConfig()
	if err == nil && cfg.MosquittoDynsec == "" {
		return nil // queued while configured; kept for when it is again
	}
	var dc *dynsecClient
	if err == nil {
		dc, err = s.dialDynsec(ctx, cfg)
	}
	ids := make([]string, 0, len(p))
	for id := range p {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var failed []error
	var done []string
	for _, id := range ids {
		derr := err
		if derr == nil {
			derr = dc.endSessions(ctx, id)
			var refused *dynsecRefusal
			if derr != nil && !errors.As(derr, &refused) {
				err = derr // no answer: the same for the others
			}
		}
		entry := AuditEntry{Time: s.now().UTC(), Event: "end-sessions", Result: "accepted", Device: id}
		switch {
		case derr != nil:
			entry.Result, entry.Reason = "refused", derr.Error()
			failed = append(failed, fmt.Errorf("%s: %w", id, derr))
		case !crlLoaded || s.hookPending.Load():
			// Kicked, but the broker may not hold the CRL listing the
			// device yet: it could reconnect (to a session that may do
			// nothing). Again once the hook succeeded.
			entry.Reason = "disconnected; again once the CRL hook succeeds"
			failed = append(failed, fmt.Errorf("%s: disconnected, but the CRL hook has not succeeded yet", id))
		default:
			entry.Reason = "disconnected at " + cfg.MosquittoDynsec
			done = append(done, id)
		}
		if aerr := s.audit.write(entry); aerr != nil {
			failed = append(failed, aerr)
		}
	}
	if dc != nil {
		dc.close()
	}
	if werr := s.forgetPendingSessions(done); werr != nil {
		failed = append(failed, werr)
	}
	if len(failed) > 0 {
		return fmt.Errorf("its live MQTT sessions may not have ended (serve retries): %w", errors.Join(failed...))
	}
	return nil
}

// forgetPendingSessions takes devices ids out of the queue, which
// endSessions may have added to since the flush read it.
func (s *Station) forgetPendingSessions(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	s.hookMu.Lock()
	defer s.hookMu.Unlock()
	p, err := s.readPendingSessions()
	if err != nil {
		return err
	}
	for _, id := range ids {
		delete(p, id)
	}
	return s.writePendingSessions(p)
}

// RunSessionEnds retries the queued session ends (a broker that was down,
// a CRL hook that had not succeeded, a revocation made while serve was
// stopped) until ctx ends, and returns nil then. Its first attempt waits
// Config.CRLHookRetry (default 10 s), so that serve's first CRL hook run
// comes first; then it retries with internal/backoff like the CRL hook
// (that bound doubling up to 10 minutes), and looks for newly queued
// devices at that first interval while none is queued.
func (s *Station) RunSessionEnds(ctx context.Context) error {
	bo := backoff.New(backoff.Config{Base: s.hookRetry, Cap: hookRetryMax})
	for wait := s.hookRetry; ; {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = s.hookRetry
		if err := s.flushSessionEnds(ctx); err != nil {
			wait = bo.Fail()
			s.log.Error("ending revoked devices' sessions", "err", err, "retry_in", wait)
		} else {
			bo.Reset()
		}
	}
}

// dynsecClient is one connection to a mosquitto broker's dynamic-security
// plugin. Not safe for concurrent use; close disconnects.
type dynsecClient struct {
	c       paho.Client
	answers chan []byte
}

// dialDynsec connects to the broker cfg names as SessionsClientName and
// subscribes to the plugin's answers. s.sessionsCert.mu held.
func (s *Station) dialDynsec(ctx context.Context, cfg SessionsConfig) (*dynsecClient, error) {
	c, timeout, err := s.dialMQTT(ctx, "end_sessions", cfg.MosquittoDynsec, cfg.CAFile, SessionsClientName, &s.sessionsCert)
	if err != nil {
		return nil, err
	}
	dc := &dynsecClient{c: c, answers: make(chan []byte, 16)}
	err = wait(dc.c.Subscribe(dynsecTopic+"/response", 1, func(_ paho.Client, m paho.Message) {
		select {
		case dc.answers <- m.Payload():
		default: // answers to another admin's commands, unread
		}
	}), timeout)
	if err != nil {
		dc.close()
		return nil, fmt.Errorf("subscribing to the dynamic-security plugin's answers at %s: %w", cfg.MosquittoDynsec, err)
	}
	return dc, nil
}

// dialMQTT connects to the broker at brokerURL (mqtts://HOST:PORT, the
// setting what of station.json) as the station's service name, with the
// certificate cache holds (cache.mu held), verifying the broker with
// caFile's certificates (default: the station's CA certificates). It
// returns the client and the timeout to wait on its tokens with.
func (s *Station) dialMQTT(ctx context.Context, what, brokerURL, caFile, name string, cache *serviceCertCache) (paho.Client, time.Duration, error) {
	u, err := url.Parse(brokerURL)
	if err != nil || u.Scheme != "mqtts" || u.Host == "" {
		return nil, 0, fmt.Errorf("%s broker %q: want mqtts://HOST:PORT", what, brokerURL)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "8883")
	}
	roots := certpem.Pool(s.CACerts())
	if caFile != "" {
		certs, err := certpem.ReadFile(caFile)
		if err != nil {
			return nil, 0, fmt.Errorf("%s ca_file: %w", what, err)
		}
		roots = certpem.Pool(certs)
	}
	cert, err := s.serviceCertificate(ctx, cache, name)
	if err != nil {
		return nil, 0, err
	}
	// The paho token API has no context: a deadline from ctx, if sooner,
	// bounds the waits instead.
	timeout := sessionsTimeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < timeout {
		timeout = max(time.Until(d), time.Millisecond)
	}
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + host).SetClientID(name).
		SetTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, MinVersion: tls.VersionTLS12}).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(timeout).SetWriteTimeout(timeout))
	if err := wait(c.Connect(), timeout); err != nil {
		return nil, 0, fmt.Errorf("connecting to %s: %w", host, err)
	}
	return c, timeout, nil
}

// serviceCertCache is what a station keeps between its connections to
// a broker as one of its services (SessionsClientName, NudgeClientName):
// the lock held from a connection's start to its end (two connections
// under one client ID would take each other over at the broker), and the
// certificate they connect with, its key in memory only. Retries while
// the broker is down reuse the certificate rather than each issuing one,
// which the registry records and the CRL would list if the service were
// revoked.
type serviceCertCache struct {
	mu   sync.Mutex
	cert *tls.Certificate // its Leaf set; nil until the first connection
}

// serviceCertificate returns the certificate to connect as service name
// with: the one cached, or a new one if it is missing, in the last third
// of its validity, or revoked. c.mu held.
func (s *Station) serviceCertificate(ctx context.Context, c *serviceCertCache, name string) (tls.Certificate, error) {
	if c.cert != nil && s.sessionsCertUsable(c.cert.Leaf) {
		return *c.cert, nil
	}
	sc, err := s.IssueService(ctx, ServiceRequest{Name: name, Lifetime: sessionsCertLifetime})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issuing the %s certificate: %w", name, err)
	}
	cert, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		return tls.Certificate{}, err
	}
	cert.Leaf = sc.Cert
	c.cert = &cert
	return cert, nil
}

// sessionsCertUsable reports whether leaf is good for another connection:
// before the last third of its validity (the issuing CA's end may have
// shortened it), and not revoked (RevokeService makes the next connection
// take a new one).
func (s *Station) sessionsCertUsable(leaf *x509.Certificate) bool {
	now := s.now()
	renewAt := leaf.NotAfter.Add(-leaf.NotAfter.Sub(leaf.NotBefore) / 3)
	if now.Before(leaf.NotBefore) || !now.Before(renewAt) {
		return false
	}
	rec, err := s.reg.certificate(leaf.SerialNumber)
	return err == nil && rec != nil && rec.RevokedAt.IsZero()
}

// wait waits for a paho token.
func wait(tok paho.Token, timeout time.Duration) error {
	if !tok.WaitTimeout(timeout) {
		return fmt.Errorf("no answer within %v", timeout)
	}
	return tok.Error()
}

func (dc *dynsecClient) close() { dc.c.Disconnect(100) }

// dynsecCommand is one command of a dynamic-security request; the
// plugin ignores the fields a command does not take.
type dynsecCommand struct {
	Command         string       `json:"command"`
	Username        string       `json:"username,omitempty"`
	RoleName        string       `json:"rolename,omitempty"`
	TextDescription string       `json:"textdescription,omitempty"`
	ACLs            []dynsecACL  `json:"acls,omitempty"`
	Roles           []dynsecRole `json:"roles,omitempty"`
	CorrelationData string       `json:"correlationData"`
}

type dynsecACL struct {
	Type  string `json:"acltype"`
	Topic string `json:"topic"`
	Allow bool   `json:"allow"`
}

type dynsecRole struct {
	RoleName string `json:"rolename"`
}

// dynsecRefusal: the plugin answered, refusing a command (the broker is
// there; another device may fare better).
type dynsecRefusal struct{ errs string }

func (e *dynsecRefusal) Error() string { return "dynamic-security plugin: " + e.errs }

// endSessions ends device id's sessions: see the top of this file.
func (dc *dynsecClient) endSessions(ctx context.Context, id string) error {
	var nonce [8]byte
	rand.Read(nonce[:])
	corr := hex.EncodeToString(nonce[:])
	var deny []dynsecACL
	for _, t := range []string{"publishClientSend", "publishClientReceive", "subscribePattern"} {
		// "#" does not match topics starting with $.
		deny = append(deny, dynsecACL{Type: t, Topic: "#"}, dynsecACL{Type: t, Topic: "$SYS/#"})
	}
	cmds := []dynsecCommand{
		{Command: "createRole", RoleName: revokedRole, ACLs: deny,
			TextDescription: "devices revoked by iotstation: nothing allowed"},
		{Command: "createClient", Username: id, Roles: []dynsecRole{{revokedRole}},
			TextDescription: "revoked by iotstation"},
		{Command: "disableClient", Username: id},
	}
	// A command's answer is known by its correlation data.
	allowed := map[string]string{"createRole": "Role already exists", "createClient": "Client already exists", "disableClient": ""}
	for i := range cmds {
		cmds[i].CorrelationData = fmt.Sprintf("%s-%d", corr, i)
	}
	req, err := json.Marshal(map[string]any{"commands": cmds})
	if err != nil {
		return err
	}
	timeout := sessionsTimeout
	if err := wait(dc.c.Publish(dynsecTopic, 1, false, req), timeout); err != nil {
		return fmt.Errorf("sending to the dynamic-security plugin: %w", err)
	}
	deadline := time.After(timeout)
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline:
			return fmt.Errorf("no answer from the dynamic-security plugin within %v: is it loaded, and does the ACL let %s write %s and read %s/response?",
				timeout, SessionsClientName, dynsecTopic, dynsecTopic)
		case b := <-dc.answers:
			var ans struct {
				Responses []struct {
					Command         string `json:"command"`
					Error           string `json:"error"`
					CorrelationData string `json:"correlationData"`
				} `json:"responses"`
			}
			if json.Unmarshal(b, &ans) != nil {
				continue
			}
			var errs []string
			ours := false
			for _, r := range ans.Responses {
				if !strings.HasPrefix(r.CorrelationData, corr+"-") {
					continue
				}
				ours = true
				if r.Error != "" && r.Error != allowed[r.Command] {
					errs = append(errs, r.Command+": "+r.Error)
				}
			}
			if !ours {
				continue
			}
			if len(errs) > 0 {
				return &dynsecRefusal{strings.Join(errs, "; ")}
			}
			return nil
		}
	}
}
