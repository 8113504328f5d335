// Package release is the signed release metadata of firmware updates,
// shared by the station that signs it and the agent that checks it:
//
//   - an offline root key (or several, with a threshold) signs a key
//     list: the release-signing keys with their expiry, the number of
//     signatures a manifest needs, a version that only goes up, and an
//     expiry;
//   - signing keys sign release manifests: what a payload is, for which
//     hardware, its length and SHA-256, its version and security version.
//
// Both are JSON payloads in a signed envelope (the DSSE layout: the
// signature covers the payload type and the exact payload bytes). A
// signature is checked over the bytes as received, before the payload is
// parsed into any struct; payloads with unknown fields are refused, and
// every size is capped. Keys are ed25519.
//
// Trust starts from root public keys the agent is given (its
// configuration, or built in) and moves only forward: a new key list is
// accepted only when a threshold of the current list's root keys signed
// it, and a threshold of its own, and its version is higher.
package release

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Payload types: a signature binds its payload to one, so that a
// manifest can never pass as a key list or the other way round.
const (
	TypeKeyList  = "application/vnd.iotagent.keylist+json"
	TypeManifest = "application/vnd.iotagent.manifest+json"
)

// Size caps, checked before anything is decoded.
const (
	MaxKeyListSize  = 64 << 10 // a key list's whole envelope
	MaxManifestSize = 16 << 10 // a manifest's whole envelope
	MaxSignatures   = 16       // per envelope
)

// envelope is the signed document as it travels.
type envelope struct {
	PayloadType string      `json:"payloadType"`
	Payload     string      `json:"payload"` // base64 (standard) of the payload bytes
	Signatures  []signature `json:"signatures"`
}

type signature struct {
	KeyID string `json:"keyid"`
	Sig   string `json:"sig"` // base64 (standard)
}

// pae is DSSE's pre-authentication encoding: what is signed.
func pae(payloadType string, payload []byte) []byte {
	var b bytes.Buffer
	b.WriteString("DSSEv1 ")
	b.WriteString(strconv.Itoa(len(payloadType)))
	b.WriteByte(' ')
	b.WriteString(payloadType)
	b.WriteByte(' ')
	b.WriteString(strconv.Itoa(len(payload)))
	b.WriteByte(' ')
	b.Write(payload)
	return b.Bytes()
}

// KeyID names a public key: the hex SHA-256 of its 32 bytes.
func KeyID(pub ed25519.PublicKey) string {
	h := sha256.Sum256(pub)
	return hex.EncodeToString(h[:])
}

// Sign wraps payload, of payloadType, in an envelope signed by each of
// keys.
func Sign(payloadType string, payload []byte, keys ...ed25519.PrivateKey) ([]byte, error) {
	if len(keys) == 0 || len(keys) > MaxSignatures {
		return nil, fmt.Errorf("release: want 1 to %d signing keys, got %d", MaxSignatures, len(keys))
	}
	env := envelope{PayloadType: payloadType, Payload: base64.StdEncoding.EncodeToString(payload)}
	msg := pae(payloadType, payload)
	for _, k := range keys {
		env.Signatures = append(env.Signatures, signature{
			KeyID: KeyID(k.Public().(ed25519.PublicKey)),
			Sig:   base64.StdEncoding.EncodeToString(ed25519.Sign(k, msg)),
		})
	}
	return json.Marshal(env)
}

// Errors of opening an envelope.
var (
	// ErrTooLarge: the document is over its size cap.
	ErrTooLarge = errors.New("release: document too large")
	// ErrSignature: not enough valid signatures by the keys it must
	// carry.
	ErrSignature = errors.New("release: signature check failed")
)

// open checks that raw is an envelope of payloadType, at most max bytes,
// signed by at least threshold distinct keys of trusted (by key ID), and
// returns the payload bytes exactly as signed. Nothing else of raw is
// trusted. When the signatures fall short, the error says why each does
// not count; why, if not nil, says it of a key ID not in trusted.
func open(raw []byte, payloadType string, max int, trusted map[string]ed25519.PublicKey, threshold int, why func(keyID string) string) ([]byte, error) {
	if threshold < 1 {
		return nil, fmt.Errorf("%w: a threshold of %d", ErrSignature, threshold)
	}
	env, payload, err := decode(raw, payloadType, max)
	if err != nil {
		return nil, err
	}
	msg := pae(payloadType, payload)
	good := map[string]bool{}
	for _, s := range env.Signatures {
		pub, ok := trusted[s.KeyID]
		if !ok || good[s.KeyID] {
			continue
		}
		sig, err := base64.StdEncoding.DecodeString(s.Sig)
		if err != nil || len(sig) != ed25519.SignatureSize {
			continue
		}
		if ed25519.Verify(pub, msg, sig) {
			good[s.KeyID] = true
		}
	}
	if len(good) < threshold {
		return nil, fmt.Errorf("%w: %d valid signatures by trusted keys, %d needed%s", ErrSignature, len(good), threshold, signatureNotes(env, trusted, good, why))
	}
	return payload, nil
}

// signatureNotes says, for a refusal's one-line reason, why env's
// signatures that do not count do not (at most 3 of them); "" when there
// are none.
func signatureNotes(env *envelope, trusted map[string]ed25519.PublicKey, good map[string]bool, why func(string) string) string {
	var notes []string
	seen := map[string]bool{}
	for _, s := range env.Signatures {
		if good[s.KeyID] || seen[s.KeyID] {
			continue
		}
		seen[s.KeyID] = true
		if !validHex64(s.KeyID) { // the sender's text: never echoed
			notes = append(notes, "a signature with a malformed key ID")
			continue
		}
		note := "not trusted"
		if _, ok := trusted[s.KeyID]; ok {
			note = "the signature does not verify"
		} else if why != nil {
			note = why(s.KeyID)
		}
		notes = append(notes, "key "+s.KeyID[:16]+": "+note)
	}
	if len(notes) == 0 {
		return ""
	}
	if len(notes) > 3 {
		notes = append(notes[:3], fmt.Sprintf("%d more", len(notes)-3))
	}
	return " (" + strings.Join(notes, "; ") + ")"
}

// checkKeys walks the JSON in b and refuses a key that is not lower case
// (but payloadType) or that repeats in its object, whatever its case.
func checkKeys(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	type frame struct {
		object bool
		keys   map[string]bool
		expect bool // the next string token is a key
	}
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if key, ok := tok.(string); ok && top != nil && top.object && top.expect {
			lower := strings.ToLower(key)
			if key != lower && key != "payloadType" {
				return fmt.Errorf("key %q is not lower case", key)
			}
			if top.keys[lower] {
				return fmt.Errorf("key %q repeats", key)
			}
			top.keys[lower] = true
			top.expect = false
			continue
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &frame{object: true, keys: map[string]bool{}, expect: true})
			continue
		case json.Delim('['):
			stack = append(stack, &frame{})
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
		// A value ended: in an object, a key comes next.
		if len(stack) > 0 && stack[len(stack)-1].object {
			stack[len(stack)-1].expect = true
		}
	}
}

// peek returns the payload of an envelope of payloadType without
// checking its signatures: only for a document whose signatures the
// caller checks next (Trust.Restore checks them against the keys the
// payload names).
func peek(raw []byte, payloadType string, max int) ([]byte, error) {
	_, payload, err := decode(raw, payloadType, max)
	return payload, err
}

// decode parses an envelope of payloadType of at most max bytes.
func decode(raw []byte, payloadType string, max int) (*envelope, []byte, error) {
	if len(raw) > max {
		return nil, nil, fmt.Errorf("%w: %d bytes, the cap is %d", ErrTooLarge, len(raw), max)
	}
	var env envelope
	if err := strictUnmarshal(raw, &env); err != nil {
		return nil, nil, fmt.Errorf("release: envelope: %w", err)
	}
	if env.PayloadType != payloadType {
		return nil, nil, fmt.Errorf("release: a %q document where a %q was expected", env.PayloadType, payloadType)
	}
	if len(env.Signatures) > MaxSignatures {
		return nil, nil, fmt.Errorf("%w: %d signatures, at most %d", ErrTooLarge, len(env.Signatures), MaxSignatures)
	}
	payload, err := base64.StdEncoding.DecodeString(env.Payload)
	if err != nil {
		return nil, nil, fmt.Errorf("release: payload: %w", err)
	}
	return &env, payload, nil
}

// strictUnmarshal decodes one JSON value into v, refusing unknown fields
// and trailing data, and keys that encoding/json would match to a field
// another parser reads otherwise: it matches names without regard to
// case and lets the last of duplicates win, so {"svn":3,"SVN":0} would
// be svn 0 here and 3 elsewhere. Every key must be unique in its object
// and lower case (the envelope's payloadType aside).
func strictUnmarshal(b []byte, v any) error {
	if err := checkKeys(b); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON value")
	}
	return nil
}
