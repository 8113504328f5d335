// Command iotstation is the provisioning station and fleet side of
// iotagent: certificate authority, EST enrollment with TPM attestation,
// device registry, CRL and audit log.
//
// Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/rungroup"
	"iotagent.dev/iotagent/station"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

type env struct {
	stdout, stderr io.Writer
	// ready, when set, receives the serving address (tests use it).
	ready func(addr string)
}

type command struct {
	name, usage string
	run         func(ctx context.Context, e *env, args []string) error
}

func commands() []command {
	return []command{
		{"init", "create a station directory: CA, TLS certificate, policy", cmdInit},
		{"serve", "serve EST enrollment, the CRL and metrics", cmdServe},
		{"fingerprint", "print the root CA fingerprint agents pin", cmdFingerprint},
		{"devices", "list enrolled devices", cmdDevices},
		{"approve", "let a device held for approval enroll", cmdApprove},
		{"revoke", "revoke a device, a service (--service NAME) or one certificate (--serial HEX)", cmdRevoke},
		{"token", "bootstrap tokens: token create --device ID [--ttl 24h]", cmdToken},
		{"issue", "certificate for a broker, collector (--server) or backend client", cmdIssue},
		{"watch", "subscribe to every device's telemetry and report delivery per device", cmdWatch},
		{"firmware", "release keys, the firmware repository and rollouts: root init, key new, keys sign, keys install, publish, rollout create|status|pause|resume|abort", cmdFirmware},
		{"demo-broker", "an embedded MQTT broker, for the demo only", cmdDemoBroker},
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return runWith(ctx, &env{stdout: stdout, stderr: stderr}, args)
}

func runWith(ctx context.Context, e *env, args []string) int {
	err := dispatch(ctx, e, args)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	default:
		fmt.Fprintf(e.stderr, "iotstation: %s\n", strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " "))
		var ue usageError
		if errors.As(err, &ue) {
			return 2
		}
		return 1
	}
}

func dispatch(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		w := e.stdout
		if len(args) == 0 {
			w = e.stderr
		}
		fmt.Fprintln(w, "usage: iotstation COMMAND --dir DIR [flags]\n\ncommands:")
		for _, c := range commands() {
			fmt.Fprintf(w, "  %-12s %s\n", c.name, c.usage)
		}
		if len(args) == 0 {
			return usagef("no command given")
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	return usagef("unknown command %q (see iotstation help)", args[0])
}

// listFlag collects a repeatable flag; commas also separate values.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// newFlagSet returns a flag set whose output, where -h prints the usage,
// is stdout.
func newFlagSet(e *env, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stdout)
	return fs
}

// parseFlags parses flags without printing: an error is one usage line
// (not the whole usage after it); -h prints the flags on the flag set's
// output.
func parseFlags(fs *flag.FlagSet, args []string) error {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(out)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(out, "usage: iotstation %s [flags]\n", fs.Name())
		fs.PrintDefaults()
		return err
	case err != nil:
		return usagef("%s: %v (see iotstation %s -h)", fs.Name(), err, fs.Name())
	}
	return nil
}

func splitHost(addr string) (string, string, error) { return net.SplitHostPort(addr) }

func newFlags(e *env, name string) (*flag.FlagSet, *string) {
	fs := newFlagSet(e, name)
	dir := fs.String("dir", "", "station `DIR`ectory (required)")
	return fs, dir
}

// parse parses flags and requires --dir; it returns the positional
// arguments, at most maxArgs of them.
func parse(fs *flag.FlagSet, dir *string, args []string, maxArgs int) ([]string, error) {
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if *dir == "" {
		return nil, usagef("%s: --dir is required", fs.Name())
	}
	if fs.NArg() > maxArgs {
		return nil, usagef("%s: unexpected argument %q", fs.Name(), fs.Arg(maxArgs))
	}
	return fs.Args(), nil
}

func cmdInit(_ context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "init")
	var roots, sans listFlag
	fs.Var(&roots, "tpm-roots", "PEM `FILE` of TPM manufacturer CA certificates (repeatable)")
	fs.Var(&sans, "san", "DNS name or IP the station is reached at (repeatable; default localhost,127.0.0.1,::1)")
	lifetime := fs.Duration("cert-lifetime", 168*time.Hour, "device certificate `lifetime`")
	manifest := fs.String("manifest", "", "`FILE` of 'EK_SHA256 DEVICE_ID' lines")
	autoApprove := fs.Bool("auto-approve", false, "admit any device whose EK chains to a trusted TPM root")
	crlHook := fs.String("crl-hook", "", "shell `COMMAND` run after every change of crl.pem (revocation, 12-hourly reissue), e.g. 'systemctl reload mosquitto'")
	dynsec := fs.String("end-sessions-dynsec", "", "mqtts://`HOST:PORT` of a mosquitto broker with the dynamic-security plugin: a revocation ends the device's live sessions there (station.json end_sessions)")
	dynsecCA := fs.String("end-sessions-ca", "", "PEM `FILE` verifying that broker's certificate (default: the station's CA)")
	nudge := fs.String("nudge-broker", "", "mqtts://`HOST:PORT` of the fleet's broker: when a wave of a firmware rollout opens, its devices are told to check at once (devices/ID/cmd, as client "+station.NudgeClientName+"; station.json firmware_nudge; default: the --end-sessions-dynsec broker)")
	nudgeCA := fs.String("nudge-ca", "", "PEM `FILE` verifying that broker's certificate (default: the station's CA)")
	hold := fs.Bool("hold-unknown", false, "hold devices not in the manifest for approval (202 + Retry-After) instead of refusing them")
	name := fs.String("name", "iotagent", "`NAME` for the CA certificates")
	caTPM := fs.String("ca-tpm", "", "create the issuing CA key in the TPM at `SPEC` (/dev/tpmrm0, unix:PATH, tcp:HOST:PORT) instead of ca.key")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	if *lifetime < 10*time.Second {
		return usagef("--cert-lifetime %v is too short (minimum 10s)", *lifetime)
	}
	err := station.Init(station.InitOptions{
		Dir: *dir, Name: *name, SANs: sans, TPMRoots: roots, Manifest: *manifest,
		CertLifetime: *lifetime, AutoApprove: *autoApprove, HoldUnknown: *hold, CRLHook: *crlHook,
		EndSessions:   station.SessionsConfig{MosquittoDynsec: *dynsec, CAFile: *dynsecCA},
		FirmwareNudge: station.NudgeConfig{Broker: *nudge, CAFile: *nudgeCA},
		CATPM:         *caTPM,
	})
	if err != nil {
		return err
	}
	if *caTPM != "" && *caTPM != "/dev/tpmrm0" {
		// Without the kernel's resource manager the loaded key is a global
		// handle: anyone who can reach this TPM can sign with it.
		fmt.Fprintf(e.stderr, "warning: --ca-tpm %s has no resource manager: while serve runs, whoever can reach that TPM can sign with the CA key; use /dev/tpmrm0 in production\n", *caTPM)
	}
	fp, err := station.RootFingerprint(*dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "station initialized in %s\nroot fingerprint: %s\n", *dir, fp)
	return nil
}

func cmdFingerprint(_ context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "fingerprint")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	fp, err := station.RootFingerprint(*dir)
	if err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, fp)
	return nil
}

func cmdServe(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "serve")
	listen := fs.String("listen", ":8443", "HTTPS `ADDR`ess")
	autoApprove := fs.Bool("auto-approve", false, "admit any device whose EK chains to a trusted TPM root")
	crlHook := fs.String("crl-hook", "", "shell `COMMAND` run after every change of crl.pem (revocation, 12-hourly reissue), e.g. 'systemctl reload mosquitto'")
	hold := fs.Bool("hold-unknown", false, "hold devices not in the manifest for approval")
	coapListen := fs.String("coap-listen", "", "also collect telemetry over CoAP/DTLS on this UDP `ADDR`ess (e.g. :5684)")
	coapSink := fs.String("coap-sink", "", "JSON-lines `FILE` for collected records (default DIR/telemetry.jsonl)")
	coapMQTT := fs.String("coap-mqtt", "", "also republish collected records to this broker `URL` (mqtts://HOST:PORT) as client coap-collector")
	coapMQTTCA := fs.String("coap-mqtt-ca", "", "CA `FILE` that verifies that broker (default: the station's CA certificates)")
	coapSAN := fs.String("coap-san", "", "name or IP devices reach the collector at, for its certificate (default: the station's names)")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(e.stderr, nil))
	s, err := station.Open(station.Config{Dir: *dir, AutoApprove: *autoApprove, HoldUnknown: *hold, CRLHook: *crlHook, Logger: log})
	if err != nil {
		return err
	}
	defer s.Close()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	parts := []rungroup.Part{{Run: func(ctx context.Context) error { return s.Serve(ctx, l) }}}
	var coapAddr string
	if *coapListen != "" {
		c, closeSinks, renewals, err := newCollector(s, *dir, *coapListen, *coapSink, *coapMQTT, *coapMQTTCA, *coapSAN, log)
		if err != nil {
			l.Close()
			return err
		}
		defer closeSinks()
		// Bound before anything serves: a taken port is one clear error.
		if err := c.Listen(); err != nil {
			l.Close()
			return err
		}
		s.AddMetrics(c.Metrics)
		parts = append(parts, rungroup.Part{Run: c.Run})
		parts = append(parts, renewals...)
		coapAddr = c.Addr().String()
	}
	log.Info("station serving", "addr", l.Addr().String(), "dir", *dir, "root", station.Fingerprint(s.Root()), "coap", coapAddr)
	if e.ready != nil {
		e.ready(l.Addr().String())
	}
	return rungroup.Run(ctx, parts...)
}

func cmdDevices(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "devices")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	devs, err := a.Devices(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		if devs == nil {
			devs = []station.Device{}
		}
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(devs)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATUS\tAGENT\tCERT SERIAL\tNOT AFTER\tENROLLED\tLAST SEEN\tEK SHA256")
	for _, d := range devs {
		ek := d.EKSHA256
		if ek == "" {
			ek = "(token)"
		} else {
			ek = ek[:16] + "…"
		}
		agent := "-" // it never said (an agent without firmware updates)
		if d.Firmware != nil && d.Firmware.Agent.Version != "" {
			agent = d.Firmware.Agent.Version
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.Status, agent, d.CertSerial, d.NotAfter.UTC().Format(time.RFC3339),
			d.EnrolledAt.UTC().Format(time.RFC3339), d.LastSeen.UTC().Format(time.RFC3339), ek)
	}
	return tw.Flush()
}

func cmdRevoke(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "revoke")
	service := fs.String("service", "", "revoke every certificate of the station service `NAME` (iotstation issue) instead of a device")
	serial := fs.String("serial", "", "revoke the one certificate with serial `HEX`, whoever holds it")
	pos, err := parse(fs, dir, args, 1)
	if err != nil {
		return err
	}
	chosen := len(pos)
	for _, f := range []string{*service, *serial} {
		if f != "" {
			chosen++
		}
	}
	if chosen != 1 {
		return usagef("revoke: want one of a device ID, --service NAME or --serial HEX")
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	if *serial != "" {
		if err := a.RevokeSerial(ctx, *serial); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "revoked certificate %s; the CRL lists it\n", *serial)
		return nil
	}
	if *service != "" {
		if err := a.RevokeService(ctx, *service); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "revoked service %s; the CRL lists its certificates\n", *service)
		return nil
	}
	if err := a.Revoke(ctx, pos[0]); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "revoked %s; the CRL lists its certificates\n", pos[0])
	return nil
}

func cmdApprove(ctx context.Context, e *env, args []string) error {
	return deviceAction(ctx, e, "approve", args, station.Admin.Approve, "approved %s; it enrolls at its next attempt\n")
}

// deviceAction runs an admin operation on the device named by the one
// positional argument.
func deviceAction(ctx context.Context, e *env, name string, args []string, op func(station.Admin, context.Context, string) error, done string) error {
	return adminAction(ctx, e, name, "the device ID", args, op, done)
}

// adminAction runs an admin operation on what the one positional
// argument names (want says what it is).
func adminAction(ctx context.Context, e *env, name, want string, args []string, op func(station.Admin, context.Context, string) error, done string) error {
	fs, dir := newFlags(e, name)
	pos, err := parse(fs, dir, args, 1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("%s: want %s", name, want)
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := op(a, ctx, pos[0]); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, done, pos[0])
	return nil
}

func cmdToken(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] != "create" {
		return usagef("token: want 'token create --device ID [--ttl 24h]'")
	}
	fs, dir := newFlags(e, "token create")
	device := fs.String("device", "", "device `ID` the token enrolls")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token is valid")
	if _, err := parse(fs, dir, args[1:], 0); err != nil {
		return err
	}
	if *device == "" {
		return usagef("token create: --device is required")
	}
	if err := station.ValidDeviceID(*device); err != nil {
		return usageError{err}
	}
	if *ttl <= 0 || *ttl > station.MaxTokenTTL {
		return usagef("token create: --ttl %v: want more than 0 and at most %v", *ttl, station.MaxTokenTTL)
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	t, err := a.CreateToken(ctx, *device, *ttl)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "one-time token for %s, valid until %s; enroll with: iotagent enroll --token <below>\n%s\n",
		t.Device, t.Expires.Format(time.RFC3339), t.Credential())
	return nil
}

func cmdIssue(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "issue")
	name := fs.String("name", "", "service `NAME` (the certificate's CN; for a backend client, its MQTT user name)")
	server := fs.Bool("server", false, "a TLS server certificate (broker, collector) for the --san names")
	var sans listFlag
	fs.Var(&sans, "san", "DNS name or IP of the server (repeatable)")
	out := fs.String("out", "", "write `PREFIX`.crt (certificate and issuing CA), PREFIX.key (0600) and PREFIX-ca.pem (the station's CA certificates)")
	lifetime := fs.Duration("lifetime", 365*24*time.Hour, "certificate lifetime")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	switch {
	case *name == "":
		return usagef("issue: --name is required")
	case *out == "":
		return usagef("issue: --out is required")
	case *server && len(sans) == 0:
		return usagef("issue: a --server certificate needs at least one --san")
	case !*server && len(sans) > 0:
		return usagef("issue: --san only applies with --server")
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	c, err := a.IssueService(ctx, station.ServiceRequest{Name: *name, SANs: sans, Server: *server, Lifetime: *lifetime})
	if err != nil {
		return err
	}
	trust, err := a.TrustPEM(ctx)
	if err != nil {
		return err
	}
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{*out + ".key", c.Key, 0o600}, {*out + ".crt", c.Chain, 0o644}, {*out + "-ca.pem", trust, 0o644}} {
		if err := atomicfile.Write(f.path, f.data, f.mode); err != nil {
			return err
		}
	}
	fmt.Fprintf(e.stdout, "issued %s (serial %s, valid until %s): %s.crt %s.key %s-ca.pem\n",
		*name, c.Cert.SerialNumber.Text(16), c.Cert.NotAfter.UTC().Format(time.RFC3339), *out, *out, *out)
	return nil
}
