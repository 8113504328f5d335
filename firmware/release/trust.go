package release

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"
)

// Errors of the trust checks.
var (
	// ErrRollback: a key list whose version is below the current one, or
	// the same version with other contents.
	ErrRollback = errors.New("release: version goes down")
	// ErrExpired: the key list or the manifest expired (a freeze attack
	// replays old, validly signed metadata).
	ErrExpired = errors.New("release: expired")
	// ErrNoKeyList: no key list has been accepted yet, so no signing key
	// is trusted.
	ErrNoKeyList = errors.New("release: no key list accepted yet")
)

// Trust is what a device trusts: its root keys, and the latest key list
// they (and their successors) signed. Not safe for concurrent use.
type Trust struct {
	cur *KeyList
	raw []byte // the current key list's envelope, as accepted
}

// NewTrust starts from root keys the device was given (its configuration,
// or built in): a first key list must carry threshold signatures of them.
func NewTrust(roots []ed25519.PublicKey, threshold int) (*Trust, error) {
	l := &KeyList{RootThreshold: threshold}
	for _, r := range roots {
		l.RootKeys = append(l.RootKeys, PublicKey(r))
	}
	if len(l.RootKeys) == 0 || len(l.RootKeys) > MaxKeys || threshold < 1 || threshold > len(roots) {
		return nil, fmt.Errorf("release: %d root keys with a threshold of %d", len(roots), threshold)
	}
	for _, r := range roots {
		if len(r) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("release: a root key of %d bytes, want %d", len(r), ed25519.PublicKeySize)
		}
	}
	return &Trust{cur: l}, nil
}

// KeyList returns the current key list, or nil before the first.
func (t *Trust) KeyList() *KeyList {
	if t.raw == nil {
		return nil
	}
	return t.cur
}

// Raw returns the current key list's envelope as accepted (to keep it
// across restarts: Restore), or nil.
func (t *Trust) Raw() []byte { return t.raw }

// Update accepts a new key list: signed by the threshold of the current
// root keys and by the threshold of its own, a version above the
// current one (the same version is accepted only with the same bytes,
// and changes nothing). Its expiry is not checked here, as TUF checks
// only the last root's: a device that missed rotations walks the chain
// of lists, some of them expired by now; Manifest refuses while the
// current list is expired at its clock floor.
func (t *Trust) Update(raw []byte) (*KeyList, error) {
	return t.accept(raw, true)
}

// Restore takes back a key list the device accepted before and kept in
// its own state (as TUF clients keep their trusted root): it is trusted
// as kept, since its root keys may have rotated away from the ones the
// device was given, and only needs the signatures of its own root keys.
// An expired one still holds the version floor; manifests are refused
// until a fresh one comes.
func (t *Trust) Restore(raw []byte) (*KeyList, error) {
	return t.accept(raw, false)
}

// accept checks raw as a successor of the current key list (update), or
// as one kept before (restore: !update).
func (t *Trust) accept(raw []byte, update bool) (*KeyList, error) {
	var payload []byte
	var err error
	if update {
		payload, err = open(raw, TypeKeyList, MaxKeyListSize, t.cur.roots(), t.cur.RootThreshold, t.notRoot)
	} else {
		payload, err = peek(raw, TypeKeyList, MaxKeyListSize)
	}
	if err != nil {
		return nil, fmt.Errorf("key list: %w", err)
	}
	var l KeyList
	if err := strictUnmarshal(payload, &l); err != nil {
		return nil, fmt.Errorf("key list: %w", err)
	}
	if err := l.validate(); err != nil {
		return nil, err
	}
	// A new root set proves it holds its keys too.
	if _, err := open(raw, TypeKeyList, MaxKeyListSize, l.roots(), l.RootThreshold, func(string) string { return "not one of its own root keys" }); err != nil {
		return nil, fmt.Errorf("key list version %d: its own root keys: %w", l.Version, err)
	}
	if t.raw != nil {
		switch {
		case l.Version < t.cur.Version:
			return nil, fmt.Errorf("%w: key list version %d, the current one is %d", ErrRollback, l.Version, t.cur.Version)
		case l.Version == t.cur.Version:
			cur, _ := open(t.raw, TypeKeyList, MaxKeyListSize, t.cur.roots(), t.cur.RootThreshold, nil)
			if !bytes.Equal(cur, payload) {
				return nil, fmt.Errorf("%w: key list version %d again, with other contents", ErrRollback, l.Version)
			}
			return t.cur, nil
		}
	}
	t.cur, t.raw = &l, bytes.Clone(raw)
	return &l, nil
}

// Manifest opens a release manifest: signed by the current key list's
// threshold of signing keys valid at now, the key list and the manifest
// not expired at now, well-formed. What the device must check besides
// (the version going up, the TPM counter, its hardware, releases it
// marked bad) is the firmware package's.
func (t *Trust) Manifest(raw []byte, now time.Time) (*Manifest, error) {
	if t.raw == nil {
		return nil, ErrNoKeyList
	}
	if !now.Before(t.cur.Expires) {
		return nil, fmt.Errorf("%w: key list version %d expired at %s; a new one is needed", ErrExpired, t.cur.Version, t.cur.Expires.UTC().Format(time.RFC3339))
	}
	payload, err := open(raw, TypeManifest, MaxManifestSize, t.cur.signers(now), t.cur.Threshold, func(id string) string { return t.notSigner(id, now) })
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	var m Manifest
	if err := strictUnmarshal(payload, &m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	if !now.Before(m.Expires) {
		return nil, fmt.Errorf("%w: manifest %s %s expired at %s", ErrExpired, m.Name, m.Version, m.Expires.UTC().Format(time.RFC3339))
	}
	return &m, nil
}

// notRoot says why key id does not sign the next key list.
func (t *Trust) notRoot(id string) string {
	if t.raw == nil {
		return "not one of the configured root keys"
	}
	for _, k := range t.cur.SigningKeys {
		if KeyID(ed25519.PublicKey(k.Key)) == id {
			return fmt.Sprintf("a signing key of key list version %d, not a root key", t.cur.Version)
		}
	}
	return fmt.Sprintf("not a root key of key list version %d", t.cur.Version)
}

// notSigner says why key id does not sign manifests at now.
func (t *Trust) notSigner(id string, now time.Time) string {
	for _, k := range t.cur.SigningKeys {
		if KeyID(ed25519.PublicKey(k.Key)) == id {
			return fmt.Sprintf("a signing key of key list version %d that expired at %s", t.cur.Version, k.Expires.UTC().Format(time.RFC3339))
		}
	}
	if _, ok := t.cur.roots()[id]; ok {
		return fmt.Sprintf("a root key of key list version %d, which signs key lists, not releases", t.cur.Version)
	}
	return fmt.Sprintf("not a signing key of key list version %d (revoked, or never listed)", t.cur.Version)
}
