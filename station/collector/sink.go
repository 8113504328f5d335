package collector

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"iotagent.dev/iotagent/telemetry/senml"
)

// Sink receives the records a collector accepted. The pack is resolved
// (every record has its name, unit and absolute time), sorted by time, and
// holds only records that were not written before; their Seq is kept.
//
// Write returns only once the records are stored: the collector
// acknowledges them to the device after it returns nil, and answers 5.03
// (the device sends them again) after an error. Write is called from many
// goroutines at once, and must not keep p after it returns.
type Sink interface {
	Write(ctx context.Context, deviceID string, p senml.Pack) error
}

// SinkFunc adapts a function to a Sink.
type SinkFunc func(ctx context.Context, deviceID string, p senml.Pack) error

// Write calls f.
func (f SinkFunc) Write(ctx context.Context, deviceID string, p senml.Pack) error {
	return f(ctx, deviceID, p)
}

// ErrSinkClosed is returned by JSONLinesSink.Write after Close.
var ErrSinkClosed = errors.New("collector: sink closed")

// JSONLinesSink appends records to a file, one JSON object per line:
//
//	{"device":"gw-1","seq":42,"n":"urn:dev:gw-1:temp","u":"Cel","v":21.5,"t":1700000000,"received":"2026-01-02T03:04:05.123456789Z"}
//
// with "seq" (absent for unsequenced records), "n", "u", "v", "vs", "vb",
// "vd" (base64url, as in SenML JSON), "s", "t" (seconds since the epoch),
// "ut" and "bver" as the record has them, and "received", when the sink
// wrote it (RFC 3339, UTC). Every Write is one write and one fsync; a
// failed write is cut off again, so the file holds whole lines only.
// Safe for concurrent use; Close it when done.
type JSONLinesSink struct {
	mu sync.Mutex
	f  *os.File // nil once closed
}

// NewJSONLinesSink opens path for appending, creating it with mode 0640.
func NewJSONLinesSink(path string) (*JSONLinesSink, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening sink: %w", err)
	}
	return &JSONLinesSink{f: f}, nil
}

// jsonRecord is a line of the file.
type jsonRecord struct {
	Device      string   `json:"device"`
	Seq         uint64   `json:"seq,omitempty"`
	Name        string   `json:"n"`
	Unit        string   `json:"u,omitempty"`
	Value       *float64 `json:"v,omitempty"`
	StringValue *string  `json:"vs,omitempty"`
	BoolValue   *bool    `json:"vb,omitempty"`
	DataValue   *string  `json:"vd,omitempty"`
	Sum         *float64 `json:"s,omitempty"`
	Time        *float64 `json:"t,omitempty"`
	UpdateTime  *float64 `json:"ut,omitempty"`
	Version     *int     `json:"bver,omitempty"`
	Received    string   `json:"received"`
}

// Write appends p's records and syncs the file.
func (s *JSONLinesSink) Write(ctx context.Context, deviceID string, p senml.Pack) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	received := time.Now().UTC().Format(time.RFC3339Nano)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	for i := range p {
		r := &p[i]
		line := jsonRecord{
			Device: deviceID, Seq: r.Seq, Name: r.Name, Unit: r.Unit,
			Value: r.Value, StringValue: r.StringValue, BoolValue: r.BoolValue,
			Sum: r.Sum, Time: r.Time, UpdateTime: r.UpdateTime, Version: r.BaseVersion,
			Received: received,
		}
		if r.DataValue != nil {
			line.DataValue = new(base64.RawURLEncoding.EncodeToString(r.DataValue))
		}
		if err := enc.Encode(line); err != nil {
			return fmt.Errorf("encoding record %d: %w", i, err)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return ErrSinkClosed
	}
	fi, err := s.f.Stat()
	if err != nil {
		return fmt.Errorf("writing sink: %w", err)
	}
	if _, err := s.f.Write(buf.Bytes()); err != nil {
		return errors.Join(fmt.Errorf("writing sink: %w", err), s.cut(fi.Size()))
	}
	if err := s.f.Sync(); err != nil {
		return errors.Join(fmt.Errorf("syncing sink: %w", err), s.cut(fi.Size()))
	}
	return nil
}

// cut truncates the file to size, dropping a partly written batch: the
// device sends it again, and readers never see half a line.
func (s *JSONLinesSink) cut(size int64) error {
	if err := s.f.Truncate(size); err != nil {
		return fmt.Errorf("cutting off a failed write: %w", err)
	}
	return nil
}

// Close syncs and closes the file. Later Writes fail with ErrSinkClosed.
func (s *JSONLinesSink) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	f := s.f
	s.f = nil
	return errors.Join(f.Sync(), f.Close())
}
