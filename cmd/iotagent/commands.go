package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

func cmdEnroll(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("enroll")
	station := fs.String("station", "", "station `URL`, https://HOST:PORT ([station] url)")
	caFile := fs.String("station-ca", "", "PEM `FILE` of the station's CA (root) certificate ([station] ca_file)")
	fingerprint := fs.String("station-fingerprint", "", "pin the station by a certificate fingerprint `sha256:HEX` (iotstation fingerprint; [station] fingerprint)")
	token := fs.String("token", "", "one-time `DEVICE_ID:SECRET` for TPMs without an EK certificate ([station] token); visible to local users in ps and /proc: prefer --token-file")
	tokenFile := fs.String("token-file", "", "read the one-time token from `FILE`, or from stdin with - ([station] token_file)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *caFile != "" && *fingerprint != "" {
		return usagef("enroll: give exactly one of --station-ca and --station-fingerprint")
	}
	if *token != "" && *tokenFile != "" {
		return usagef("enroll: give at most one of --token and --token-file")
	}
	if *tokenFile == "-" {
		tok, err := agent.ReadToken("-", e.stdin)
		if err != nil {
			return usagef("enroll: --token-file -: %w", err)
		}
		*token, *tokenFile = tok, ""
	}
	a, err := e.agent(func(c *agent.Config) {
		st := &c.Station
		if *station != "" {
			st.URL = *station
		}
		if *caFile != "" {
			st.CAFile, st.Fingerprint = *caFile, ""
		}
		if *fingerprint != "" {
			st.CAFile, st.Fingerprint = "", *fingerprint
		}
		if *token != "" {
			st.Token, st.TokenFile = *token, ""
		}
		if *tokenFile != "" {
			st.Token, st.TokenFile = "", *tokenFile
		}
	})
	if err != nil {
		return err
	}
	if !a.HasStation() {
		return usagef("enroll: --station is required (or [station] url in the config)")
	}
	res, err := a.Enroll(ctx)
	if err != nil {
		return err
	}
	leaf := res.State.Leaf()
	if res.Already {
		fmt.Fprintf(e.stdout, "already enrolled as %s (certificate %s, valid until %s)\n",
			res.State.Enrollment.DeviceID, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
		return nil
	}
	fmt.Fprintf(e.stdout, "enrolled as %s by %s (certificate %s, valid until %s)\n",
		res.State.Enrollment.DeviceID, res.State.Enrollment.Method, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// keepKey is the --keep-key flag: [renewal] rotate_key = false.
func keepKey(set bool) func(*agent.Config) {
	return func(c *agent.Config) {
		if set {
			c.Renewal.RotateKey = new(false)
		}
	}
}

// cmdRun runs the agent until SIGTERM or SIGINT. SIGUSR1 renews the
// certificate now; SIGUSR2 checks for a firmware update (and takes a
// command iotagent firmware handed over). With [firmware], the launcher
// runs first: it may exec the committed or trial slot's binary.
func cmdRun(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("run")
	uplinkURL := fs.String("uplink", "", "uplink `URL`: mqtts://HOST:PORT (MQTT over TLS) or coaps://HOST:PORT (CoAP over DTLS) ([uplink] url)")
	uplinkCA := fs.String("uplink-ca", "", "PEM `FILE` to verify the uplink's server ([uplink] ca_file; default: the station's trust bundle)")
	keep := fs.Bool("keep-key", false, "renew without rotating the TPM key ([renewal] rotate_key = false)")
	if err := parse(fs, args); err != nil {
		return err
	}
	a, err := e.agent(func(c *agent.Config) {
		if *uplinkURL != "" {
			c.Uplink.URL = *uplinkURL
		}
		if *uplinkCA != "" {
			c.Uplink.CAFile = *uplinkCA
		}
		keepKey(*keep)(c)
	})
	if err != nil {
		return err
	}
	// Before the launcher takes the lock (and writes its pid into it):
	// iotagent firmware and renew signal whoever holds it, and a signal
	// not asked for would kill the process.
	usr := make(chan os.Signal, 1)
	signal.Notify(usr, syscall.SIGUSR1, syscall.SIGUSR2)
	if err := a.Launch(); err != nil {
		signal.Stop(usr)
		return err
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-usr:
				if s == syscall.SIGUSR1 {
					a.RequestRenewal()
				} else {
					a.RequestFirmwareCheck()
				}
			case <-done:
				return
			}
		}
	}()
	err = a.Run(ctx)
	signal.Stop(usr)
	close(done)
	if errors.Is(err, agent.ErrRelaunch) {
		return agent.Relaunch()
	}
	return err
}

func cmdRenew(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("renew")
	keep := fs.Bool("keep-key", false, "renew the current key's certificate (simplereenroll) instead of rotating the key")
	if err := parse(fs, args); err != nil {
		return err
	}
	a, err := e.agent(keepKey(*keep))
	if err != nil {
		return err
	}
	res, err := a.Renew(ctx)
	if err != nil {
		return err
	}
	if res.DaemonPID != 0 {
		fmt.Fprintf(e.stdout, "renewed by the running agent (pid %d); next renewal %s\n", res.DaemonPID, res.NextRenewal.Format(time.RFC3339))
		return nil
	}
	fmt.Fprintf(e.stdout, "renewed %s: certificate %s, valid until %s\n", res.DeviceID, res.Certificate.SerialNumber.Text(16), res.Certificate.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// report runs a command that prints what get returns: as JSON with
// --json, else as text.
func report[T any](e *env, name string, args []string, get func(*agent.Agent) (T, error), text func(T)) error {
	fs := e.flagSet(name)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	a, err := e.agent(nil)
	if err != nil {
		return err
	}
	out, err := get(a)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(e, out)
	}
	text(out)
	return nil
}

func cmdStatus(_ context.Context, e *env, args []string) error {
	return report(e, "status", args, (*agent.Agent).Status, func(out *agent.Status) { out.WriteText(e.stdout) })
}

// cmdSend writes records to the running agent's ingest socket: one
// measurement from flags, or SenML JSON packs from stdin ("-"), one per
// line, pipelined. Each line is answered once it is on disk.
func cmdSend(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("send")
	fs.Func("socket", "renamed --ingest-socket, the same flag in every command", func(string) error {
		return errors.New("--socket is now --ingest-socket, the same flag in every command")
	})
	name := fs.String("name", "", "measurement `NAME` (SenML n)")
	value := fs.String("value", "", "`VALUE`: a number, true/false, or a string")
	unit := fs.String("unit", "", "`UNIT` (SenML u, e.g. Cel, %RH, W)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	stdin := fs.NArg() == 1 && fs.Arg(0) == "-"
	switch {
	case fs.NArg() > 0 && !stdin:
		return usagef("send: unexpected argument %q (use - to read SenML from stdin)", fs.Arg(0))
	case stdin && *name != "":
		return usagef("send: give --name/--value or -, not both")
	case !stdin && (*name == "" || *value == ""):
		return usagef("send: --name and --value are required (or - to read SenML JSON lines from stdin)")
	}
	socket, err := e.ingestSocket()
	if err != nil {
		return err
	}
	c, err := telemetry.DialIngest(ctx, socket)
	if err != nil {
		return err
	}
	defer c.Close()
	if stdin {
		return c.SendAll(e.stdin, func(_ int, ans string) { fmt.Fprintln(e.stdout, ans) })
	}
	rec := map[string]any{"n": *name}
	if *unit != "" {
		rec["u"] = *unit
	}
	if v, err := strconv.ParseFloat(*value, 64); err == nil {
		rec["v"] = v
	} else if b, err := strconv.ParseBool(*value); err == nil {
		rec["vb"] = b
	} else {
		rec["vs"] = *value
	}
	line, _ := json.Marshal([]any{rec})
	ans, err := c.Send(string(line))
	if err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, ans)
	return nil
}

func cmdVersion(_ context.Context, e *env, args []string) error {
	fs := e.flagSet("version")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	bi := buildinfo.Get()
	if *asJSON {
		return writeJSON(e, bi)
	}
	commit := bi.Commit
	if commit == "" {
		commit = "unknown"
	}
	built := "unknown"
	if !bi.BuildTime.IsZero() {
		built = bi.BuildTime.Format(time.RFC3339)
	}
	fmt.Fprintf(e.stdout, "iotagent %s\ncommit %s (%s)\n%s %s/%s\n", bi.Version, commit, built, bi.GoVersion, bi.GOOS, bi.Arch())
	return nil
}

func cmdTPM(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("tpm: want a subcommand: info, keygen")
	}
	switch args[0] {
	case "info":
		return cmdTPMInfo(ctx, e, args[1:])
	case "keygen":
		return cmdTPMKeygen(ctx, e, args[1:])
	case "-h", "--help", "help":
		fmt.Fprintln(e.stdout, "usage: iotagent tpm info [--json]\n       iotagent tpm keygen [--persist HANDLE] [--force]")
		return flag.ErrHelp
	}
	return usagef("tpm: unknown subcommand %q (want info, keygen)", args[0])
}

func cmdTPMInfo(_ context.Context, e *env, args []string) error {
	return report(e, "tpm info", args, (*agent.Agent).TPMInfo, func(out *agent.TPMInfo) { out.WriteText(e.stdout) })
}

func cmdTPMKeygen(_ context.Context, e *env, args []string) error {
	fs := e.flagSet("tpm keygen")
	persist := fs.String("persist", "", "also make the key persistent at `HANDLE` (e.g. 0x81000010)")
	force := fs.Bool("force", false, "replace an existing (or damaged) device key with a new one")
	if err := parse(fs, args); err != nil {
		return err
	}
	opts := tpm.KeyOptions{Force: *force}
	if *persist != "" {
		h, err := tpm.ParseHandle(*persist)
		if err != nil {
			return usageError{fmt.Errorf("--persist: %w", err)}
		}
		opts.PersistHandle = h
	}
	a, err := e.agent(nil)
	if err != nil {
		return err
	}
	res, err := a.Keygen(opts)
	if err != nil {
		return err
	}
	verb := "device key exists"
	if res.Created {
		verb = "created device key"
	}
	where := res.Path
	if res.Handle != "" {
		where += " and persistent handle " + res.Handle
	}
	fmt.Fprintf(e.stdout, "%s: ECC P-256 in %s\npublic key sha256: %s\n", verb, where, res.PublicSHA256)
	return nil
}

func writeJSON(e *env, v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
