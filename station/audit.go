package station

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// AuditEntry is one line of the audit log: every enrollment decision,
// accepted or refused, and every administrative action.
type AuditEntry struct {
	Time   time.Time `json:"time"`
	Event  string    `json:"event"`  // tpmenroll, simpleenroll, simplereenroll, revoke, token
	Result string    `json:"result"` // accepted, refused
	Reason string    `json:"reason,omitempty"`
	Device string    `json:"device,omitempty"`
	EK     string    `json:"ek_sha256,omitempty"`
	Serial string    `json:"serial,omitempty"`
	Remote string    `json:"remote,omitempty"`
}

// auditLog appends JSON lines to a file, fsynced per line: an auditor must
// find every decision even after a crash.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
}

func openAudit(path string) (*auditLog, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening audit log: %w", err)
	}
	return &auditLog{f: f}, nil
}

func (a *auditLog) write(e AuditEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("writing audit log: %w", err)
	}
	return a.f.Sync()
}

func (a *auditLog) close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.f.Close()
}
