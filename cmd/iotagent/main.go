// Command iotagent is the gateway agent: a TPM-bound device identity, its
// certificate, and telemetry uplinks. The agent itself is package agent;
// this command reads flags and the configuration file, handles signals and
// prints.
//
// Usage:
//
//	iotagent [--config FILE] [--tpm SPEC] [--state-dir DIR] [--ingest-socket PATH] COMMAND [flags]
//
// Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error
// (a bad flag or configuration).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// usageError marks an error as the caller's: exit status 2.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// env is what every command gets: the global flags and standard streams.
type env struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// now is the wall clock (tests set one that reads 1970).
	now func() time.Time

	// The global flags; a flag given beats the configuration file.
	configFile, tpmSpec, stateDir, socket string
	tpmSet, stateDirSet, socketSet        bool
}

// command is one subcommand.
type command struct {
	name  string
	usage string
	run   func(ctx context.Context, e *env, args []string) error
}

func commands() []command {
	return []command{
		{"enroll", "enroll with the station (TPM attestation, or a one-time token)", cmdEnroll},
		{"run", "run the agent: renewal, ingest, collectors, uplink", cmdRun},
		{"send", "send a measurement (or SenML from stdin) to the running agent", cmdSend},
		{"status", "show the device identity and renewal state", cmdStatus},
		{"renew", "renew the certificate now", cmdRenew},
		{"tpm", "TPM commands: info, keygen", cmdTPM},
		{"firmware", "updates: status, check, apply, commit, rollback", cmdFirmware},
		{"version", "print version, commit, Go version and target", cmdVersion},
	}
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	return runWith(ctx, &env{stdin: stdin, stdout: stdout, stderr: stderr, now: time.Now}, args)
}

func runWith(ctx context.Context, e *env, args []string) int {
	fs := e.flagSet("iotagent")
	err := quietParse(fs, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		topUsage(e.stdout)
	case err != nil:
		err = usagef("%v (see iotagent help)", err)
	default:
		err = dispatch(ctx, e, fs.Args())
	}
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(e.stderr, "iotagent: %s\n", oneLine(err))
	var ue usageError
	var ce *agent.ConfigError
	if errors.As(err, &ue) || errors.As(err, &ce) {
		return 2
	}
	return 1
}

func dispatch(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		topUsage(e.stderr)
		return usagef("no command given")
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	if args[0] == "help" {
		topUsage(e.stdout)
		return nil
	}
	return usagef("unknown command %q (see iotagent help)", args[0])
}

func topUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: iotagent [--config FILE] [--tpm SPEC] [--state-dir DIR] [--ingest-socket PATH] COMMAND [flags]")
	fmt.Fprintln(w, "\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.usage)
	}
	fmt.Fprintln(w, "\nglobal flags (also accepted after the command; each beats its key in the configuration):")
	fmt.Fprintln(w, "  --config FILE         configuration (TOML; default "+agent.DefaultConfigFile+" when it exists)")
	fmt.Fprintln(w, "  --tpm SPEC            TPM: /dev/tpmrm0 (default), unix:PATH (swtpm socket), tcp:HOST:PORT")
	fmt.Fprintln(w, "  --state-dir DIR       agent state (keys, certificates, queue) (default /var/lib/iotagent)")
	fmt.Fprintln(w, "  --ingest-socket PATH  the ingest socket; the status file is beside it (default /run/iotagent/ingest.sock)")
}

// flagSet returns a flag set named name that also takes the global flags,
// so they work before or after the command. Its output, where -h prints
// the usage, is stdout.
func (e *env) flagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stdout)
	fs.Var(&trackedString{p: &e.configFile}, "config", "configuration `FILE` (TOML)")
	fs.Var(&trackedString{&e.tpmSpec, &e.tpmSet}, "tpm", "TPM `SPEC`: /dev/tpmrm0, unix:PATH or tcp:HOST:PORT")
	fs.Var(&trackedString{&e.stateDir, &e.stateDirSet}, "state-dir", "agent state `DIR`")
	fs.Var(&trackedString{&e.socket, &e.socketSet}, "ingest-socket", "ingest socket `PATH`")
	return fs
}

// config is the configuration file (--config, or the default one when it
// exists) with the global flags over it.
func (e *env) config() (*agent.Config, error) {
	c, err := agent.LoadDefaultConfig(e.configFile)
	if err != nil {
		return nil, err
	}
	if e.tpmSet {
		if _, err := tpm.ParseSpec(e.tpmSpec); err != nil {
			return nil, usageError{fmt.Errorf("--tpm: %w", err)}
		}
		c.TPM = e.tpmSpec
	}
	if e.stateDirSet {
		c.StateDir = e.stateDir
	}
	if e.socketSet {
		c.Ingest.Socket = e.socket
	}
	c.LogOutput, c.Now = e.stderr, e.now
	return c, nil
}

// ingestSocket is the ingest socket of --ingest-socket, else of the
// configuration, which send reads for nothing else: producers may not be
// allowed to read the whole file (it can hold a token), so a default file
// it may not read is passed over.
func (e *env) ingestSocket() (string, error) {
	if e.socketSet {
		return e.socket, nil
	}
	c, err := agent.LoadDefaultConfig(e.configFile)
	switch {
	case err != nil && e.configFile == "" && errors.Is(err, fs.ErrPermission):
		return telemetry.DefaultSocket, nil
	case err != nil:
		return "", err
	case c.Ingest.Socket != "":
		return c.Ingest.Socket, nil
	}
	return telemetry.DefaultSocket, nil
}

// agent is the agent of the configuration, after edit applied the
// command's own flags to it.
func (e *env) agent(edit func(*agent.Config)) (*agent.Agent, error) {
	c, err := e.config()
	if err != nil {
		return nil, err
	}
	if edit != nil {
		edit(c)
	}
	return agent.New(*c)
}

// trackedString is a string flag that remembers whether it was set.
type trackedString struct {
	p   *string
	set *bool
}

func (t *trackedString) String() string {
	if t.p == nil {
		return ""
	}
	return *t.p
}

func (t *trackedString) Set(v string) error {
	*t.p = v
	if t.set != nil {
		*t.set = true
	}
	return nil
}

// quietParse parses args without printing: an error is returned for the
// caller's one-line message, not printed with the whole usage after it.
func quietParse(fs *flag.FlagSet, args []string) error {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	defer fs.SetOutput(out)
	return fs.Parse(args)
}

// parse parses a subcommand's flags; stray arguments are a usage error.
func parse(fs *flag.FlagSet, args []string) error {
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("%s: unexpected argument %q", fs.Name(), fs.Arg(0))
	}
	return nil
}

// parseFlags parses a subcommand's flags: an error is one usage line; -h
// prints the subcommand's flags on the flag set's output.
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := quietParse(fs, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(fs.Output(), "usage: iotagent %s [flags]\n", fs.Name())
		fs.PrintDefaults()
		return err
	case err != nil:
		return usagef("%s: %v (see iotagent %s -h)", fs.Name(), err, fs.Name())
	}
	return nil
}

// oneLine keeps an error to one line: operators grep logs.
func oneLine(err error) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
}
