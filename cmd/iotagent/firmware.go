package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"iotagent.dev/iotagent/agent"
)

// cmdFirmware: the agent's updates.
//
//	firmware status [--json]
//	firmware check
//	firmware apply FILE --manifest M [--keylist K]
//	firmware commit
//	firmware rollback
func cmdFirmware(ctx context.Context, e *env, args []string) error {
	const subs = "status, check, apply, commit, rollback"
	if len(args) == 0 {
		return usagef("firmware: want a subcommand: %s", subs)
	}
	switch args[0] {
	case "status":
		return report(e, "firmware status", args[1:], (*agent.Agent).FirmwareStatus, func(out *agent.FirmwareStatus) { out.WriteText(e.stdout) })
	case "check":
		if err := parse(e.flagSet("firmware check"), args[1:]); err != nil {
			return err
		}
		a, err := e.agent(nil)
		if err != nil {
			return err
		}
		pid, err := a.FirmwareCheck()
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "asked the running agent (pid %d) to check with the station; see iotagent firmware status\n", pid)
		return nil
	case "apply":
		return cmdFirmwareApply(ctx, e, args[1:])
	case "commit", "rollback":
		if err := parse(e.flagSet("firmware "+args[0]), args[1:]); err != nil {
			return err
		}
		a, err := e.agent(nil)
		if err != nil {
			return err
		}
		op := a.FirmwareCommit
		if args[0] == "rollback" {
			op = a.FirmwareRollback
		}
		res, err := op(ctx)
		if err != nil {
			return err
		}
		printFirmwareResult(e, res)
		return nil
	case "-h", "--help", "help":
		fmt.Fprintln(e.stdout, "usage: iotagent firmware status [--json]\n       iotagent firmware check\n       iotagent firmware apply FILE --manifest FILE [--keylist FILE]\n       iotagent firmware commit\n       iotagent firmware rollback")
		return flag.ErrHelp
	}
	return usagef("firmware: unknown subcommand %q (want %s)", args[0], subs)
}

func cmdFirmwareApply(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("firmware apply")
	manifest := fs.String("manifest", "", "the release's signed manifest `FILE` (iotstation firmware publish writes it)")
	keyList := fs.String("keylist", "", "a signed key list `FILE` to trust first (the rotation rules apply)")
	var file string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		file, args = args[0], args[1:] // FILE before the flags, as the usage shows
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if file == "" && fs.NArg() == 1 {
		file = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return usagef("firmware apply: unexpected argument %q", fs.Arg(0))
	}
	if file == "" || *manifest == "" {
		return usagef("firmware apply: want FILE --manifest FILE")
	}
	m, err := os.ReadFile(*manifest)
	if err != nil {
		return err
	}
	var kl []byte
	if *keyList != "" {
		if kl, err = os.ReadFile(*keyList); err != nil {
			return err
		}
	}
	a, err := e.agent(nil)
	if err != nil {
		return err
	}
	res, err := a.FirmwareApply(ctx, file, m, kl)
	if err != nil {
		return err
	}
	printFirmwareResult(e, res)
	return nil
}

func printFirmwareResult(e *env, res *agent.FirmwareResult) {
	if res.DaemonPID != 0 {
		fmt.Fprintf(e.stdout, "%s (by the running agent, pid %d)\n", res.Result, res.DaemonPID)
		return
	}
	fmt.Fprintln(e.stdout, res.Result)
}
