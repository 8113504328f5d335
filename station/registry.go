package station

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"iotagent.dev/iotagent/firmware/release"
)

// Device statuses.
const (
	// StatusPending: held for an operator's approval; nothing issued.
	StatusPending = "pending"
	// StatusApproved: approved, not yet enrolled.
	StatusApproved = "approved"
	StatusEnrolled = "enrolled"
	StatusRevoked  = "revoked"
)

// Device is one registry entry: the binding of a device ID to its EK and
// the certificates issued to it.
type Device struct {
	ID string `json:"id"`
	// EKSHA256 is the SHA-256 of the EK certificate's SubjectPublicKeyInfo
	// (hex); empty for devices enrolled with a token.
	EKSHA256   string `json:"ek_sha256"`
	Status     string `json:"status"`
	CertSerial string `json:"cert_serial"`
	// KeySHA256 is the SHA-256 (hex) of the current certificate's
	// SubjectPublicKeyInfo: a device that lost the response to a renewal
	// of the same key still holds that key (see currentCert).
	KeySHA256  string    `json:"key_sha256,omitempty"`
	NotAfter   time.Time `json:"not_after"`
	EnrolledAt time.Time `json:"enrolled_at"`
	LastSeen   time.Time `json:"last_seen"`
	// Issued counts the certificates issued to the device; their serials
	// are indexed in the registry for revocation.
	Issued int `json:"certificates_issued"`
	// Firmware is what the device last said of its firmware (POST
	// /firmware/check and /firmware/report); nil until it did.
	Firmware *DeviceFirmware `json:"firmware,omitempty"`
}

// DeviceFirmware is what a device last told the station of the
// releases it runs.
type DeviceFirmware struct {
	// Agent is the running agent: from its last check, its version also
	// from its last report.
	Agent release.Running `json:"agent"`
	// Images are the committed system images of its last check.
	Images    []release.Running `json:"images,omitempty"`
	CheckedAt time.Time         `json:"checked_at,omitzero"`
	// LastReport is its last step of an update, as it sent it;
	// ReportedAt when the station received it.
	LastReport *release.Report `json:"last_report,omitempty"`
	ReportedAt time.Time       `json:"reported_at,omitzero"`
}

// issued is a certificate the station signed, by serial: a device's
// (Device) or a service's (Service). A device certificate from
// /tpmenroll is Unconfirmed until the device first uses it over mutual
// TLS, which proves that the TPM holding the EK recovered it: until then
// it changes nothing about the device (see confirmTx).
type issued struct {
	Device    string    `json:"device,omitempty"`
	Service   string    `json:"service,omitempty"`
	NotAfter  time.Time `json:"not_after"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`

	Unconfirmed bool `json:"unconfirmed,omitempty"`
	// ConfirmBy ends an unconfirmed certificate's window.
	ConfirmBy time.Time `json:"confirm_by,omitzero"`
	EK        string    `json:"ek,omitempty"`
	KeySHA256 string    `json:"key_sha256,omitempty"`
	// From is the certificate the request came with over mutual TLS (a
	// rotation): it must still be current when this one is confirmed.
	From string `json:"from,omitempty"`
}

// certInfo is what the registry records of a new device certificate.
type certInfo struct {
	serial    string
	notAfter  time.Time
	keySHA256 string
}

func infoOf(c *x509.Certificate) certInfo {
	return certInfo{serial: serialHex(c.SerialNumber), notAfter: c.NotAfter, keySHA256: keyHash(c)}
}

// token is a one-time bootstrap credential for simpleenroll.
type token struct {
	SecretSHA256 string    `json:"secret_sha256"`
	Expires      time.Time `json:"expires"`
}

var (
	bucketDevices = []byte("devices")  // id -> Device
	bucketEKs     = []byte("eks")      // ek sha256 -> id
	bucketCerts   = []byte("certs")    // serial hex -> issued
	bucketByDev   = []byte("bydev")    // id NUL serial hex -> nothing: a device's certificates
	bucketTokens  = []byte("tokens")   // id -> token
	bucketMeta    = []byte("meta")     // crl number
	bucketSvc     = []byte("services") // service name -> nothing: names devices may not take
	bucketBySvc   = []byte("bysvc")    // name NUL serial hex -> nothing: a service's certificates
	bucketUnconf  = []byte("unconf")   // ek NUL serial hex -> nothing: unconfirmed certificates by EK
	bucketRollout = []byte("rollouts") // rollout ID -> rolloutRecord
	bucketRollDev = []byte("rolldevs") // rollout ID NUL device ID -> RolloutDevice: a rollout's devices and their progress
	keyCRLNumber  = []byte("crl_number")
	keyRolloutSeq = []byte("rollout_seq") // the number of the last rollout created
)

// Registry errors.
var (
	// ErrUnknownDevice: no device with that ID.
	ErrUnknownDevice = errors.New("unknown device")
	// ErrRegistryLocked: another process (a running station) holds the
	// registry open.
	ErrRegistryLocked = errors.New("registry in use by another process")
)

type registry struct {
	db *bolt.DB
}

func openRegistry(path string) (*registry, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s (is iotstation serve running? its admin socket serves this command)", ErrRegistryLocked, path)
	}
	if err != nil {
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDevices, bucketEKs, bucketCerts, bucketByDev, bucketTokens, bucketMeta, bucketSvc, bucketBySvc, bucketUnconf, bucketRollout, bucketRollDev} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	return &registry{db: db}, nil
}

func (r *registry) close() error { return r.db.Close() }

func getJSON[T any](b *bolt.Bucket, key string) (*T, error) {
	v := b.Get([]byte(key))
	if v == nil {
		return nil, nil
	}
	var out T
	if err := json.Unmarshal(v, &out); err != nil {
		return nil, fmt.Errorf("registry entry %q: %w", key, err)
	}
	return &out, nil
}

func putJSON(b *bolt.Bucket, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), data)
}

func serialHex(s *big.Int) string { return strings.ToLower(s.Text(16)) }

// devCertKey indexes a device's certificate; IDs hold no NUL.
func devCertKey(id, serial string) []byte { return []byte(id + "\x00" + serial) }

// device returns the device with id, or nil.
func (r *registry) device(id string) (*Device, error) {
	var d *Device
	err := r.db.View(func(tx *bolt.Tx) error {
		var err error
		d, err = getJSON[Device](tx.Bucket(bucketDevices), id)
		return err
	})
	return d, err
}

// deviceByEK returns the device bound to an EK hash, or nil.
func (r *registry) deviceByEK(ek string) (*Device, error) {
	var d *Device
	err := r.db.View(func(tx *bolt.Tx) error {
		id := tx.Bucket(bucketEKs).Get([]byte(ek))
		if id == nil {
			return nil
		}
		var err error
		d, err = getJSON[Device](tx.Bucket(bucketDevices), string(id))
		return err
	})
	return d, err
}

// certificate returns what the registry knows of a serial, or nil.
func (r *registry) certificate(serial *big.Int) (*issued, error) {
	var c *issued
	err := r.db.View(func(tx *bolt.Tx) error {
		var err error
		c, err = getJSON[issued](tx.Bucket(bucketCerts), serialHex(serial))
		return err
	})
	return c, err
}

// recordIssue binds id to ek (when non-empty) and records a newly issued
// certificate as the device's current one, in one transaction. check
// runs inside the transaction with the current entry (nil if new) and
// may refuse.
func (r *registry) recordIssue(id, ek string, cert certInfo, now time.Time, check func(*Device) error) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		return recordIssueTx(tx, id, ek, cert, now, check)
	})
}

func recordIssueTx(tx *bolt.Tx, id, ek string, cert certInfo, now time.Time, check func(*Device) error) error {
	if tx.Bucket(bucketSvc).Get([]byte(id)) != nil {
		return errServiceName(id)
	}
	devs := tx.Bucket(bucketDevices)
	d, err := getJSON[Device](devs, id)
	if err != nil {
		return err
	}
	if check != nil {
		if err := check(d); err != nil {
			return err
		}
	}
	if d == nil {
		d = &Device{ID: id, EnrolledAt: now}
	}
	if ek != "" {
		if other := tx.Bucket(bucketEKs).Get([]byte(ek)); other != nil && string(other) != id {
			return refuse(403, "ek_mismatch", "EK already bound to device %s", other)
		}
		d.EKSHA256 = ek
		if err := tx.Bucket(bucketEKs).Put([]byte(ek), []byte(id)); err != nil {
			return err
		}
	}
	d.Status, d.CertSerial, d.NotAfter, d.LastSeen = StatusEnrolled, cert.serial, cert.notAfter, now
	d.KeySHA256 = cert.keySHA256
	d.Issued++
	if err := putJSON(devs, id, d); err != nil {
		return err
	}
	if err := tx.Bucket(bucketByDev).Put(devCertKey(id, cert.serial), nil); err != nil {
		return err
	}
	return putJSON(tx.Bucket(bucketCerts), cert.serial, issued{Device: id, NotAfter: cert.notAfter})
}

// MaxUnconfirmedPerEK bounds the unconfirmed certificates kept per EK:
// a new one beyond it drops the oldest that came without a client
// certificate (one asked for over mutual TLS with the device's current
// certificate goes last). Refusing instead would let whoever holds a
// device's public EK data (anyone: it is readable from NV without
// authorization) lock the device out of attestation by asking first; to
// drop the device's own certificate before it is traded (within a
// second or so), that holder must get this many requests through in that
// time, past the per-source rate limit.
const MaxUnconfirmedPerEK = 64

// UnconfirmedLifetime bounds the lifetime of a certificate from
// /tpmenroll: the device trades it at once (simplereenroll, which
// confirms it) for one of full lifetime. One that is never used expires
// soon by itself and needs no CRL entry: a certificate the station forgot
// (a dropped or expired unconfirmed one) cannot outlive a revocation by
// more than this, and not at all at a broker that ends revoked devices'
// sessions by name (mosquitto's dynamic-security plugin).
const UnconfirmedLifetime = 30 * time.Minute

// recordUnconfirmed records a certificate issued by /tpmenroll for id
// and ek as unconfirmed. check runs inside the transaction with the
// device's entry (nil if new), as for recordIssue; from is the serial of
// the client certificate the request came with, if any. Nothing about
// the device changes.
func (r *registry) recordUnconfirmed(id, ek, from string, cert certInfo, now time.Time, check func(*Device) error) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketSvc).Get([]byte(id)) != nil {
			return errServiceName(id)
		}
		d, err := getJSON[Device](tx.Bucket(bucketDevices), id)
		if err != nil {
			return err
		}
		if err := check(d); err != nil {
			return err
		}
		if other := tx.Bucket(bucketEKs).Get([]byte(ek)); other != nil && string(other) != id {
			return refuse(403, "ek_mismatch", "EK already bound to device %s", other)
		}
		// Expired ones go; beyond the bound, the oldest go, those asked for
		// without a client certificate first.
		type entry struct {
			serial string
			c      *issued
		}
		var live []entry
		prefix := devCertKey(ek, "")
		cur := tx.Bucket(bucketUnconf).Cursor()
		var stale []entry
		for k, _ := cur.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = cur.Next() {
			serial := string(k[len(prefix):])
			c, err := getJSON[issued](tx.Bucket(bucketCerts), serial)
			if err != nil {
				return err
			}
			if c == nil || !c.Unconfirmed || now.After(c.ConfirmBy) {
				stale = append(stale, entry{serial, c})
				continue
			}
			live = append(live, entry{serial, c})
		}
		for _, e := range stale { // not while the cursor walks the bucket
			if err := dropUnconfirmedTx(tx, ek, e.serial, e.c); err != nil {
				return err
			}
		}
		for len(live) >= MaxUnconfirmedPerEK {
			victim := 0
			for i, e := range live {
				v := live[victim].c
				if (e.c.From == "") != (v.From == "") {
					if e.c.From == "" {
						victim = i
					}
					continue
				}
				if e.c.ConfirmBy.Before(v.ConfirmBy) {
					victim = i
				}
			}
			if err := dropUnconfirmedTx(tx, ek, live[victim].serial, live[victim].c); err != nil {
				return err
			}
			live = slices.Delete(live, victim, victim+1)
		}
		if err := tx.Bucket(bucketUnconf).Put(devCertKey(ek, cert.serial), nil); err != nil {
			return err
		}
		// Not indexed by device until confirmed: a revocation lists what the
		// device used, not what anyone with its EK's public data asked for
		// (one it never used expires within UnconfirmedLifetime).
		return putJSON(tx.Bucket(bucketCerts), cert.serial, issued{
			Device: id, NotAfter: cert.notAfter, Unconfirmed: true, ConfirmBy: earliest(cert.notAfter, now.Add(UnconfirmedLifetime)),
			EK: ek, KeySHA256: cert.keySHA256, From: from,
		})
	})
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// dropUnconfirmedTx forgets an unconfirmed certificate, indexed under ek
// (c may be nil: a dangling index entry). Only the index entry goes when
// the record is no longer an unconfirmed one (confirmed meanwhile), and
// a revoked one stays recorded: it is on the CRL.
func dropUnconfirmedTx(tx *bolt.Tx, ek, serial string, c *issued) error {
	if err := tx.Bucket(bucketUnconf).Delete(devCertKey(ek, serial)); err != nil {
		return err
	}
	if c == nil || !c.Unconfirmed || !c.RevokedAt.IsZero() {
		return nil
	}
	return tx.Bucket(bucketCerts).Delete([]byte(serial))
}

// confirm makes an unconfirmed certificate its device's current one: the
// device used it over mutual TLS, so the TPM holding the EK recovered it
// and holds its key. It re-runs the issuing checks (check, with the
// device's entry) as of now: a device revoked or rotated meanwhile is
// not overridden. It returns the certificate's record as it now stands;
// confirming one that is already confirmed changes nothing.
func (r *registry) confirm(serial string, now time.Time, check func(id, ek string) func(*Device) error) (*issued, error) {
	var out *issued
	expired := false
	err := r.db.Update(func(tx *bolt.Tx) error {
		c, err := getJSON[issued](tx.Bucket(bucketCerts), serial)
		if err != nil {
			return err
		}
		if c == nil {
			// Dropped since the caller read it.
			return refuse(403, "cert_unknown", "certificate %s is not in the registry (an unconfirmed certificate dropped or expired); re-attest through tpmenroll", serial)
		}
		if !c.Unconfirmed {
			out = c
			return nil
		}
		if !c.RevokedAt.IsZero() {
			return refuse(403, "cert_revoked", "certificate %s was revoked at %s", serial, c.RevokedAt.UTC().Format(time.RFC3339))
		}
		if now.After(c.ConfirmBy) {
			// Forgotten for good: the drop commits, the refusal follows.
			expired = true
			return dropUnconfirmedTx(tx, c.EK, serial, c)
		}
		base := check(c.Device, c.EK)
		from := func(d *Device) error {
			if err := base(d); err != nil {
				return err
			}
			if c.From != "" && (d == nil || d.CertSerial != c.From) {
				cur := ""
				if d != nil {
					cur = d.CertSerial
				}
				return refuse(403, "cert_superseded", "certificate %s was issued as a rotation from %s, which is no longer current (%s is)", serial, c.From, cur)
			}
			return nil
		}
		if err := tx.Bucket(bucketUnconf).Delete(devCertKey(c.EK, serial)); err != nil {
			return err
		}
		if err := recordIssueTx(tx, c.Device, c.EK, certInfo{serial: serial, notAfter: c.NotAfter, keySHA256: c.KeySHA256}, now, from); err != nil {
			return err
		}
		out, err = getJSON[issued](tx.Bucket(bucketCerts), serial)
		return err
	})
	if err == nil && expired {
		return nil, refuse(403, "cert_unconfirmed", "certificate %s was not used within %v of its issue and is forgotten; re-attest through tpmenroll", serial, UnconfirmedLifetime)
	}
	return out, err
}

// sweepUnconfirmed forgets the unconfirmed certificates whose window
// ended by now (serve runs it every few minutes), and index entries left
// dangling.
func (r *registry) sweepUnconfirmed(now time.Time) (int, error) {
	n := 0
	err := r.db.Update(func(tx *bolt.Tx) error {
		type entry struct {
			ek, serial string
			c          *issued
		}
		var old []entry
		err := tx.Bucket(bucketUnconf).ForEach(func(k, _ []byte) error {
			ek, serial, ok := bytes.Cut(k, []byte{0})
			if !ok {
				return nil
			}
			c, err := getJSON[issued](tx.Bucket(bucketCerts), string(serial))
			if err != nil {
				return err
			}
			if c == nil || !c.Unconfirmed || now.After(c.ConfirmBy) {
				old = append(old, entry{string(ek), string(serial), c})
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, e := range old {
			if err := dropUnconfirmedTx(tx, e.ek, e.serial, e.c); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	return n, err
}

// recordService records a service certificate: revocable by name, and
// known to the station's checks (never as a device).
func (r *registry) recordService(name string, c *x509.Certificate) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		s := serialHex(c.SerialNumber)
		if err := tx.Bucket(bucketBySvc).Put(devCertKey(name, s), nil); err != nil {
			return err
		}
		return putJSON(tx.Bucket(bucketCerts), s, issued{Service: name, NotAfter: c.NotAfter})
	})
}

// revokeService revokes every certificate issued to service name at now.
// It returns how many were not revoked before.
func (r *registry) revokeService(name string, now time.Time) (int, error) {
	n := 0
	err := r.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketSvc).Get([]byte(name)) == nil {
			return fmt.Errorf("unknown service %q: the station never issued a certificate under that name", name)
		}
		var err error
		n, err = revokePrefixTx(tx, tx.Bucket(bucketBySvc), devCertKey(name, ""), now)
		if err == nil && n == 0 && !hasPrefix(tx.Bucket(bucketBySvc), devCertKey(name, "")) {
			return fmt.Errorf("service %q has no recorded certificate (those issued before this version were not recorded): revoke them by serial (iotstation revoke --serial HEX)", name)
		}
		return err
	})
	return n, err
}

func hasPrefix(b *bolt.Bucket, prefix []byte) bool {
	k, _ := b.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix)
}

// revokeSerial revokes one certificate by serial. One the registry never
// recorded (a service certificate from before services were recorded, a
// certificate the CA key signed elsewhere) is recorded revoked until
// notAfter, which the caller gives as the latest it can be (the issuing
// CA's). It returns false if the serial was revoked already.
func (r *registry) revokeSerial(serial string, notAfter, now time.Time) (bool, error) {
	changed := false
	err := r.db.Update(func(tx *bolt.Tx) error {
		certs := tx.Bucket(bucketCerts)
		c, err := getJSON[issued](certs, serial)
		if err != nil {
			return err
		}
		if c == nil {
			c = &issued{NotAfter: notAfter}
		}
		if !c.RevokedAt.IsZero() {
			return nil
		}
		c.RevokedAt, changed = now, true
		return putJSON(certs, serial, c)
	})
	return changed, err
}

// revokePrefixTx marks revoked at now every certificate indexed in idx
// under prefix.
func revokePrefixTx(tx *bolt.Tx, idx *bolt.Bucket, prefix []byte, now time.Time) (int, error) {
	n := 0
	certs := tx.Bucket(bucketCerts)
	cur := idx.Cursor()
	for k, _ := cur.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = cur.Next() {
		s := string(k[len(prefix):])
		c, err := getJSON[issued](certs, s)
		if err != nil {
			return n, err
		}
		if c != nil && c.RevokedAt.IsZero() {
			c.RevokedAt = now
			n++
			if err := putJSON(certs, s, c); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// keyHash is the SHA-256 (hex) of a certificate's SubjectPublicKeyInfo.
func keyHash(c *x509.Certificate) string {
	h := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(h[:])
}

// errServiceName refuses a device ID that names a service: brokers and
// the collector take identity from the certificate's CN, so one name must
// never be both.
func errServiceName(id string) error {
	return refuse(403, "service_name", "device ID %q is the name of a station service", id)
}

// reserveService records name as a service's, refusing a device's name.
func (r *registry) reserveService(name string) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(name)) != nil {
			return fmt.Errorf("%q is a device ID; a service must not share it", name)
		}
		return tx.Bucket(bucketSvc).Put([]byte(name), nil)
	})
}

// isService reports whether name is reserved for a service.
func (r *registry) isService(name string) bool {
	found := false
	r.db.View(func(tx *bolt.Tx) error {
		found = tx.Bucket(bucketSvc).Get([]byte(name)) != nil
		return nil
	})
	return found
}

// hold registers a device whose EK is unknown as pending approval, bound
// to that EK. An existing entry is left alone.
func (r *registry) hold(id, ek string, now time.Time) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketSvc).Get([]byte(id)) != nil {
			return errServiceName(id)
		}
		devs := tx.Bucket(bucketDevices)
		if devs.Get([]byte(id)) != nil {
			return nil
		}
		if other := tx.Bucket(bucketEKs).Get([]byte(ek)); other != nil {
			return fmt.Errorf("EK already bound to device %s", other)
		}
		if err := tx.Bucket(bucketEKs).Put([]byte(ek), []byte(id)); err != nil {
			return err
		}
		return putJSON(devs, id, &Device{ID: id, EKSHA256: ek, Status: StatusPending, LastSeen: now})
	})
}

// approve lets a pending device enroll.
func (r *registry) approve(id string) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		devs := tx.Bucket(bucketDevices)
		d, err := getJSON[Device](devs, id)
		if err != nil {
			return err
		}
		if d == nil {
			return fmt.Errorf("%w %q", ErrUnknownDevice, id)
		}
		if d.Status != StatusPending {
			return fmt.Errorf("device %s is %s, not pending", id, d.Status)
		}
		d.Status = StatusApproved
		return putJSON(devs, id, d)
	})
}

// touch records that a device was seen.
func (r *registry) touch(id string, now time.Time) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		devs := tx.Bucket(bucketDevices)
		d, err := getJSON[Device](devs, id)
		if err != nil || d == nil {
			return err
		}
		d.LastSeen = now
		return putJSON(devs, id, d)
	})
}

// devices lists every device, by ID.
func (r *registry) devices() ([]Device, error) {
	var out []Device
	err := r.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("registry entry %q: %w", k, err)
			}
			out = append(out, d)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// revoke marks a device revoked and every certificate issued to it revoked
// at now. Revoking twice is not an error.
func (r *registry) revoke(id string, now time.Time) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		devs := tx.Bucket(bucketDevices)
		d, err := getJSON[Device](devs, id)
		if err != nil {
			return err
		}
		if d == nil {
			return fmt.Errorf("%w %q", ErrUnknownDevice, id)
		}
		d.Status = StatusRevoked
		if _, err := revokePrefixTx(tx, tx.Bucket(bucketByDev), devCertKey(id, ""), now); err != nil {
			return err
		}
		return putJSON(devs, id, d)
	})
}

// revokedSerial is a CRL entry.
type revokedSerial struct {
	serial    *big.Int
	revokedAt time.Time
}

// revokedSince lists revoked certificates that have not yet expired at
// now: expired ones need no CRL entry (RFC 5280 §3.3).
func (r *registry) revokedUnexpired(now time.Time) ([]revokedSerial, error) {
	var out []revokedSerial
	err := r.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCerts).ForEach(func(k, v []byte) error {
			var c issued
			if err := json.Unmarshal(v, &c); err != nil {
				return err
			}
			if c.RevokedAt.IsZero() || c.NotAfter.Before(now) {
				return nil
			}
			s, ok := new(big.Int).SetString(string(k), 16)
			if !ok {
				return fmt.Errorf("registry: bad serial %q", k)
			}
			out = append(out, revokedSerial{s, c.RevokedAt})
			return nil
		})
	})
	return out, err
}

// nextCRLNumber increments and returns the persisted CRL number.
func (r *registry) nextCRLNumber() (*big.Int, error) {
	n := new(big.Int)
	err := r.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if v := m.Get(keyCRLNumber); v != nil {
			n.SetBytes(v)
		}
		n.Add(n, big.NewInt(1))
		return m.Put(keyCRLNumber, n.Bytes())
	})
	return n, err
}

func hashSecret(secret string) string {
	s := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(s[:])
}

// putToken stores a one-time token for id, replacing any earlier one.
func (r *registry) putToken(id, secret string, expires time.Time) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		return putJSON(tx.Bucket(bucketTokens), id, token{SecretSHA256: hashSecret(secret), Expires: expires})
	})
}

// Token refusal reasons.
var (
	errTokenUnknown = errors.New("no token for this device (never issued, or already used)")
	errTokenExpired = errors.New("token expired")
	errTokenWrong   = errors.New("wrong token secret")
)

// checkToken checks the token of id without using it: the cheap test
// every simpleenroll passes before the station signs anything.
func (r *registry) checkToken(id, secret string, now time.Time) error {
	return r.db.View(func(tx *bolt.Tx) error {
		return checkTokenTx(tx, id, secret, now)
	})
}

func checkTokenTx(tx *bolt.Tx, id, secret string, now time.Time) error {
	t, err := getJSON[token](tx.Bucket(bucketTokens), id)
	if err != nil {
		return err
	}
	if t == nil {
		// Compared anyway: the answer's timing tells nothing either.
		subtle.ConstantTimeCompare([]byte(hashSecret("")), []byte(hashSecret(secret)))
		return errTokenUnknown
	}
	if subtle.ConstantTimeCompare([]byte(t.SecretSHA256), []byte(hashSecret(secret))) != 1 {
		return errTokenWrong
	}
	if now.After(t.Expires) {
		return errTokenExpired
	}
	return nil
}

// consumeToken checks and deletes the token of id, then runs issue in the
// same transaction: a token can never be used twice, even by two requests
// at once.
func (r *registry) consumeToken(id, secret string, now time.Time, issue func(tx *bolt.Tx) error) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		if err := checkTokenTx(tx, id, secret, now); err != nil {
			return err
		}
		if err := tx.Bucket(bucketTokens).Delete([]byte(id)); err != nil {
			return err
		}
		return issue(tx)
	})
}
