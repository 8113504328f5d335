package collector

import (
	"net/netip"
	"testing"
)

// MaxHandshakesPerSource counts an IPv4 address, or an IPv6 /64.
func TestSourceOf(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1", "192.0.2.1/32"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{"2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"},
		{"2001:db8:1:3::1", "2001:db8:1:3::/64"},
	} {
		if got := sourceOf(netip.MustParseAddr(tc.a)); got != netip.MustParsePrefix(tc.b) {
			t.Errorf("sourceOf(%s) = %v, want %s", tc.a, got, tc.b)
		}
	}
}
