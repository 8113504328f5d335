package station

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
)

// metrics are the station's counters, exposed in the Prometheus text
// format at /metrics.
type metrics struct {
	mu          sync.Mutex
	enrollments map[[3]string]uint64 // endpoint, result, reason
	crlIssuedAt time.Time
	extra       []func() string
}

// AddMetrics adds a provider of Prometheus text to /metrics (the CoAP
// collector's counters).
func (s *Station) AddMetrics(f func() string) {
	s.metrics.mu.Lock()
	defer s.metrics.mu.Unlock()
	s.metrics.extra = append(s.metrics.extra, f)
}

func (m *metrics) enrollment(endpoint, result, reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.enrollments == nil {
		m.enrollments = map[[3]string]uint64{}
	}
	m.enrollments[[3]string{endpoint, result, reason}]++
}

func (m *metrics) crlIssued(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.crlIssuedAt = t
}

// expiringSoon is how far ahead "certificates expiring soon" looks.
const expiringSoon = 24 * time.Hour

func (s *Station) handleMetrics(w http.ResponseWriter, r *http.Request) {
	var b strings.Builder
	s.metrics.mu.Lock()
	keys := make([][3]string, 0, len(s.metrics.enrollments))
	for k := range s.metrics.enrollments {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return strings.Join(keys[i][:], ",") < strings.Join(keys[j][:], ",") })
	b.WriteString("# HELP iotstation_enrollments_total Enrollment requests by endpoint, result and refusal reason.\n# TYPE iotstation_enrollments_total counter\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "iotstation_enrollments_total{endpoint=%q,result=%q,reason=%q} %d\n", k[0], k[1], k[2], s.metrics.enrollments[k])
	}
	crlAt := s.metrics.crlIssuedAt
	extra := append([]func() string(nil), s.metrics.extra...)
	s.metrics.mu.Unlock()
	defer func() {
		for _, f := range extra {
			w.Write([]byte(f()))
		}
	}()

	now := s.now()
	if !crlAt.IsZero() {
		fmt.Fprintf(&b, "# HELP iotstation_crl_age_seconds Age of the current CRL.\n# TYPE iotstation_crl_age_seconds gauge\niotstation_crl_age_seconds %.0f\n", now.Sub(crlAt).Seconds())
	}
	if s.crlHook != "" {
		failing := 0
		if s.hookPending.Load() {
			failing = 1
		}
		fmt.Fprintf(&b, "# HELP iotstation_crl_hook_failing 1 while the last CRL hook run failed (serve retries it): a broker may hold an old CRL.\n# TYPE iotstation_crl_hook_failing gauge\niotstation_crl_hook_failing %d\n", failing)
	}
	if devs, err := s.reg.devices(); err == nil {
		var enrolled, revoked, soon int
		for _, d := range devs {
			switch d.Status {
			case StatusEnrolled:
				enrolled++
				if d.NotAfter.Sub(now) < expiringSoon {
					soon++
				}
			case StatusRevoked:
				revoked++
			}
		}
		fmt.Fprintf(&b, "# HELP iotstation_devices Devices in the registry by status.\n# TYPE iotstation_devices gauge\niotstation_devices{status=\"enrolled\"} %d\niotstation_devices{status=\"revoked\"} %d\n", enrolled, revoked)
		fmt.Fprintf(&b, "# HELP iotstation_certificates_expiring_soon Enrolled devices whose current certificate expires within 24h (or has expired).\n# TYPE iotstation_certificates_expiring_soon gauge\niotstation_certificates_expiring_soon %d\n", soon)
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	w.Write([]byte(b.String()))
}
