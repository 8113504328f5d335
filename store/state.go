package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"go.etcd.io/bbolt"
)

// Get returns a copy of the state value saved under key, or ErrNotFound.
func (s *Store) Get(key string) ([]byte, error) {
	var val []byte
	err := s.view(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketState).Cursor()
		// A cursor tells an empty value from a missing key; Bucket.Get
		// does not.
		k, v := c.Seek([]byte(key))
		if k == nil || string(k) != key {
			return ErrNotFound
		}
		val = bytes.Clone(v)
		if val == nil {
			val = []byte{}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("getting state %q: %w", key, err)
	}
	return val, nil
}

// Put saves value under key, replacing any previous value, and returns when
// that is committed. Each Put is a commit: see the flash wear caveat.
func (s *Store) Put(key string, value []byte) error {
	switch {
	case key == "":
		return errors.New("putting state: empty key")
	case len(key) > bbolt.MaxKeySize:
		return fmt.Errorf("putting state: key of %d bytes, at most %d", len(key), bbolt.MaxKeySize)
	case len(value) > bbolt.MaxValueSize:
		return fmt.Errorf("putting state %q: value of %d bytes, at most %d", key, len(value), bbolt.MaxValueSize)
	}
	if r := s.submit(context.Background(), &op{kind: opPut, key: []byte(key), value: value}); r.err != nil {
		return fmt.Errorf("putting state %q: %w", key, r.err)
	}
	return nil
}
