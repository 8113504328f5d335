package release

import (
	"regexp"
	"testing"
)

// The hand-written syntax checks accept exactly what the regular
// expressions they stand for accept.
func TestSyntaxMatchesPatterns(t *testing.T) {
	for _, c := range []struct {
		name  string
		re    *regexp.Regexp
		check func(string) bool
		seeds []string
	}{
		{"name", regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`), validName, []string{"iotagent", "a", "", ".x", "a.b_c-d", "A", "a b", "0" + string(make([]byte, 63))}},
		{"hw", regexp.MustCompile(`^[a-z0-9]{1,16}/[a-z0-9_]{1,16}$`), validHW, []string{"linux/armv7", "linux/", "/arm", "linux/arm/v7", "linux/x86_64", "Linux/arm", "l/a"}},
		{"hex", regexp.MustCompile(`^[0-9a-f]{64}$`), validHex64, []string{"", "00", "g"}},
	} {
		alphabet := "az09._-/AZ g\x00\xff"
		seen := 0
		// Every seed, and every string of up to 3 bytes of the alphabet
		// around the lengths that matter.
		cases := append([]string(nil), c.seeds...)
		for _, n := range []int{0, 1, 2, 15, 16, 17, 63, 64, 65} {
			for _, ch := range alphabet {
				b := make([]byte, n)
				for i := range b {
					b[i] = 'a'
				}
				if n > 0 {
					cases = append(cases, string(b[:n-1])+string(ch), string(ch)+string(b[min(1, n):]))
				}
				cases = append(cases, string(b)+"/"+string(b), string(ch)+"/a", "a/"+string(ch))
			}
		}
		for _, s := range cases {
			if got, want := c.check(s), c.re.MatchString(s); got != want {
				t.Errorf("%s %q: %v, the pattern says %v", c.name, s, got, want)
			}
			seen++
		}
		t.Logf("%s: %d strings", c.name, seen)
	}
}

func FuzzSyntax(f *testing.F) {
	name := regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	hw := regexp.MustCompile(`^[a-z0-9]{1,16}/[a-z0-9_]{1,16}$`)
	hex := regexp.MustCompile(`^[0-9a-f]{64}$`)
	f.Add("linux/armv7")
	f.Fuzz(func(t *testing.T, s string) {
		if validName(s) != name.MatchString(s) || validHW(s) != hw.MatchString(s) || validHex64(s) != hex.MatchString(s) {
			t.Errorf("%q: name %v/%v hw %v/%v hex %v/%v", s, validName(s), name.MatchString(s), validHW(s), hw.MatchString(s), validHex64(s), hex.MatchString(s))
		}
	})
}
