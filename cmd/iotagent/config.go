package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// defaultConfigFile is read by run when --config is not given and it
// exists.
const defaultConfigFile = "/etc/iotagent/config.toml"

// config is the agent's configuration file (TOML). The names are a
// contract with operators' files and scripts: examples/config.toml
// documents every key.
type config struct {
	TPM      string `toml:"tpm"`
	StateDir string `toml:"state_dir"`
	Station  struct {
		URL         string `toml:"url"`
		Fingerprint string `toml:"fingerprint"`
		CAFile      string `toml:"ca_file"`
		Token       string `toml:"token"`
	} `toml:"station"`
	Uplink struct {
		URL        string `toml:"url"`
		CAFile     string `toml:"ca_file"`
		MaxPayload string `toml:"max_payload"`
		Window     int    `toml:"window"`
		KeepAlive  string `toml:"keepalive"`
	} `toml:"uplink"`
	Queue struct {
		MaxBytes string `toml:"max_bytes"`
		OnFull   string `toml:"on_full"`
	} `toml:"queue"`
	Ingest struct {
		Socket     string `toml:"socket"`
		GroupDelay string `toml:"group_delay"`
	} `toml:"ingest"`
	Collectors struct {
		Interval string `toml:"interval"`
		Host     *bool  `toml:"host"`
	} `toml:"collectors"`
	Renewal struct {
		RotateKey *bool `toml:"rotate_key"`
	} `toml:"renewal"`
	Log struct {
		Level string `toml:"level"`
	} `toml:"log"`
}

// loadConfig reads a TOML config file. Unknown keys are errors: a typo must
// not silently fall back to a default.
func loadConfig(path string) (*config, error) {
	var c config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("config %s: %s", path, strings.TrimSpace(pe.Error()))
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("config %s: unknown key %s", path, strings.Join(keys, ", "))
	}
	return &c, nil
}

// parseSize parses "64MiB", "512KiB", "1GB", "1048576".
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"B", 1}}
	mult := int64(1)
	num := s
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional unit (KiB, MiB, GiB, KB, MB, GB)", s)
	}
	return n * mult, nil
}

func parseDuration(what, s string, min time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%s %q: %w", what, s, err)
	}
	if d < min {
		return 0, fmt.Errorf("%s %v is below %v", what, d, min)
	}
	return d, nil
}

// fileExists reports whether path names an existing file.
func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
