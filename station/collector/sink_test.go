package collector_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/telemetry/senml"
)

func TestJSONLinesSink(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.jsonl")
	s, err := collector.NewJSONLinesSink(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p := senml.Pack{
		{Name: "urn:dev:gw-1:temp", Unit: "Cel", Value: new(21.5), Time: new(1.7e9), Seq: 7},
		{Name: "urn:dev:gw-1:state", StringValue: new("on <ok> & \"fine\""), Time: new(1.7e9 + 0.25), Seq: 8},
		{Name: "urn:dev:gw-1:door", BoolValue: new(false), Time: new(1.7e9), UpdateTime: new(60.0)},
		{Name: "urn:dev:gw-1:blob", DataValue: []byte{0xfb, 0xff}, Time: new(1.7e9), Seq: 9},
		{Name: "urn:dev:gw-1:energy", Unit: "J", Sum: new(1e6), Value: new(0.0), Time: new(1.7e9), Seq: 10},
	}
	before := time.Now()
	if err := s.Write(ctx, "gw-1", p); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Appends after reopening.
	if s, err = collector.NewJSONLinesSink(path); err != nil {
		t.Fatal(err)
	}
	if err := s.Write(ctx, "gw-2", senml.Pack{{Name: "x", Value: new(1.0), Time: new(1.7e9), Seq: 1}}); err != nil {
		t.Fatal(err)
	}

	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	wantPrefixes := []string{
		`{"device":"gw-1","seq":7,"n":"urn:dev:gw-1:temp","u":"Cel","v":21.5,"t":1700000000,"received":"`,
		`{"device":"gw-1","seq":8,"n":"urn:dev:gw-1:state","vs":"on <ok> & \"fine\"","t":1700000000.25,"received":"`,
		`{"device":"gw-1","n":"urn:dev:gw-1:door","vb":false,"t":1700000000,"ut":60,"received":"`,
		`{"device":"gw-1","seq":9,"n":"urn:dev:gw-1:blob","vd":"-_8","t":1700000000,"received":"`,
		`{"device":"gw-1","seq":10,"n":"urn:dev:gw-1:energy","u":"J","v":0,"s":1000000,"t":1700000000,"received":"`,
		`{"device":"gw-2","seq":1,"n":"x","v":1,"t":1700000000,"received":"`,
	}
	if len(lines) != len(wantPrefixes) {
		t.Fatalf("file has %d lines, want %d:\n%s", len(lines), len(wantPrefixes), b)
	}
	for i, l := range lines {
		if !strings.HasPrefix(l, wantPrefixes[i]) {
			t.Errorf("line %d = %s\nwant prefix   %s", i, l, wantPrefixes[i])
		}
		var x struct{ Received string }
		if err := json.Unmarshal([]byte(l), &x); err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		at, err := time.Parse(time.RFC3339Nano, x.Received)
		if err != nil || at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) || at.Location() != time.UTC {
			t.Errorf("line %d: received %q (%v), want the time of writing in UTC", i, x.Received, err)
		}
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got&^0o640 != 0 || got&0o600 != 0o600 {
		t.Errorf("mode = %v, want 0640 (less the umask)", got)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	if err := s.Write(ctx, "gw-1", p); !errors.Is(err, collector.ErrSinkClosed) {
		t.Errorf("Write after Close = %v, want ErrSinkClosed", err)
	}
}

func TestJSONLinesSinkCanceled(t *testing.T) {
	s, err := collector.NewJSONLinesSink(filepath.Join(t.TempDir(), "t.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Write(ctx, "gw-1", senml.Pack{{Name: "x", Value: new(1.0), Time: new(1.7e9)}}); !errors.Is(err, context.Canceled) {
		t.Errorf("Write with a canceled context = %v, want context.Canceled", err)
	}
}

func TestJSONLinesSinkUnwritable(t *testing.T) {
	if _, err := collector.NewJSONLinesSink(filepath.Join(t.TempDir(), "missing", "t.jsonl")); err == nil {
		t.Error("NewJSONLinesSink in a missing directory = nil error")
	}
}
