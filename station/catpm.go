package station

import (
	"crypto"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"

	"iotagent.dev/iotagent/tpm"
)

// tpmCAKey is the issuing CA's key held in the station's TPM (init
// --ca-tpm). The TPM is opened at the first signature, not when the
// station directory is opened: commands that only read the registry work
// without it, and a second process does not take a TPM slot before it
// finds the registry locked. serve signs a CRL as it starts, so a missing
// or wrong TPM stops it at once.
type tpmCAKey struct {
	spec, path string
	pub        crypto.PublicKey // from ca.crt

	mu  sync.Mutex
	tp  *tpm.TPM
	key *tpm.Key
}

func (c *tpmCAKey) Public() crypto.PublicKey { return c.pub }

// Sign signs with the TPM-held key. Safe for concurrent use: the TPM
// serializes signatures.
func (c *tpmCAKey) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k, err := c.load()
	if err != nil {
		return nil, err
	}
	return k.Sign(r, digest, opts)
}

func (c *tpmCAKey) load() (*tpm.Key, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key != nil {
		return c.key, nil
	}
	kf, err := tpm.ReadKeyFile(c.path)
	if err != nil {
		return nil, fmt.Errorf("issuing CA key: %w", err)
	}
	tp, err := tpm.Open(c.spec)
	if err != nil {
		return nil, fmt.Errorf("issuing CA key: %s ca_tpm: %w", fileConfig, err)
	}
	k, err := tp.LoadKey(kf)
	if err != nil {
		tp.Close()
		return nil, fmt.Errorf("issuing CA key in %s: %w", c.spec, err)
	}
	if pub, ok := k.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(c.pub) {
		k.Close()
		tp.Close()
		return nil, fmt.Errorf("issuing CA key in %s (%s) is not the key of %s", c.spec, filepath.Base(c.path), fileCACert)
	}
	c.tp, c.key = tp, k
	return k, nil
}

// Close flushes the key and releases the TPM. Idempotent.
func (c *tpmCAKey) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var err error
	if c.key != nil {
		err = errors.Join(c.key.Close(), c.tp.Close())
	}
	c.tp, c.key = nil, nil
	return err
}
