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
	fwChecks    map[string]uint64    // result
	fwReports   map[[2]string]uint64 // result, step
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

// firmwareCheck counts a POST /firmware/check: assigned, none, refused.
func (m *metrics) firmwareCheck(result string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fwChecks == nil {
		m.fwChecks = map[string]uint64{}
	}
	m.fwChecks[result]++
}

// firmwareReport counts a POST /firmware/report by result and step ("" if
// it did not parse).
func (m *metrics) firmwareReport(result, step string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fwReports == nil {
		m.fwReports = map[[2]string]uint64{}
	}
	m.fwReports[[2]string{result, step}]++
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
	b.WriteString("# HELP iotstation_firmware_checks_total Firmware checks from devices by result (assigned: a rollout assigned a release).\n# TYPE iotstation_firmware_checks_total counter\n")
	for _, result := range []string{"assigned", "none", "refused"} {
		fmt.Fprintf(&b, "iotstation_firmware_checks_total{result=%q} %d\n", result, s.metrics.fwChecks[result])
	}
	reports := make([][2]string, 0, len(s.metrics.fwReports))
	for k := range s.metrics.fwReports {
		reports = append(reports, k)
	}
	sort.Slice(reports, func(i, j int) bool { return reports[i][0]+","+reports[i][1] < reports[j][0]+","+reports[j][1] })
	b.WriteString("# HELP iotstation_firmware_reports_total Update steps reported by devices, by result and step.\n# TYPE iotstation_firmware_reports_total counter\n")
	for _, k := range reports {
		fmt.Fprintf(&b, "iotstation_firmware_reports_total{result=%q,step=%q} %d\n", k[0], k[1], s.metrics.fwReports[k])
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
	if states, err := s.rolloutStates(); err == nil {
		b.WriteString("# HELP iotstation_rollouts Firmware rollouts by state.\n# TYPE iotstation_rollouts gauge\n")
		for _, st := range []string{RolloutRunning, RolloutPaused, RolloutHalted, RolloutAborted, RolloutDone} {
			fmt.Fprintf(&b, "iotstation_rollouts{state=%q} %d\n", st, states[st])
		}
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	w.Write([]byte(b.String()))
}
