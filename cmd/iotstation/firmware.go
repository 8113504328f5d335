package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/station"
)

// cmdFirmware: the release keys, the firmware repository and rollouts.
//
//	firmware root init --out DIR
//	firmware key new --out FILE
//	firmware keys sign --root FILE... --signing PUB... --version N --out FILE
//	firmware keys install --dir D FILE
//	firmware publish --dir D --file F --name N --type T --version V --svn S --hw H... --key FILE [--manifest-out FILE]
//	firmware rollout create --dir D --release NAME@VERSION (--devices ID... | --all) [--waves 1%,10%,50%,100%] [--wave-wait 10m] [--max-failures 5%]
//	firmware rollout status --dir D [ID] [--json] [--devices]
//	firmware rollout pause|resume|abort --dir D ID
func cmdFirmware(ctx context.Context, e *env, args []string) error {
	const want = "want 'root init', 'key new', 'keys sign', 'keys install', 'publish' or 'rollout create|status|pause|resume|abort'"
	if len(args) == 0 {
		return usagef("firmware: %s", want)
	}
	switch sub := args[0]; {
	case sub == "publish":
		return cmdFirmwarePublish(ctx, e, args[1:])
	case len(args) > 1 && sub == "root" && args[1] == "init":
		return cmdFirmwareRootInit(e, args[2:])
	case len(args) > 1 && sub == "key" && args[1] == "new":
		return cmdFirmwareKeyNew(e, args[2:])
	case len(args) > 1 && sub == "keys" && args[1] == "sign":
		return cmdFirmwareKeysSign(e, args[2:])
	case len(args) > 1 && sub == "keys" && args[1] == "install":
		return cmdFirmwareKeysInstall(ctx, e, args[2:])
	case len(args) > 1 && sub == "rollout" && args[1] == "create":
		return cmdRolloutCreate(ctx, e, args[2:])
	case len(args) > 1 && sub == "rollout" && args[1] == "status":
		return cmdRolloutStatus(ctx, e, args[2:])
	case len(args) > 1 && sub == "rollout":
		switch args[1] {
		case "pause":
			return rolloutAction(ctx, e, args[1:], station.Admin.PauseRollout, "paused rollout %s: it assigns nothing until resumed\n")
		case "resume":
			return rolloutAction(ctx, e, args[1:], station.Admin.ResumeRollout, "resumed rollout %s\n")
		case "abort":
			return rolloutAction(ctx, e, args[1:], station.Admin.AbortRollout, "aborted rollout %s: it assigns nothing more\n")
		}
	}
	return usagef("firmware: unknown command %q (%s)", strings.Join(args[:min(len(args), 2)], " "), want)
}

// cmdFirmwareKeyNew makes a root or signing key (kept offline) and prints
// its public key.
func cmdFirmwareKeyNew(e *env, args []string) error {
	fs := newFlagSet(e, "firmware key new")
	out := fs.String("out", "", "write the private key to `FILE` (0600; refused if it exists)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() > 0 {
		return usagef("firmware key new: want --out FILE")
	}
	pub, err := newKeyFile(*out)
	if err != nil {
		return fmt.Errorf("firmware key new: %w", err)
	}
	fmt.Fprintln(e.stdout, pub)
	return nil
}

// cmdFirmwareRootInit makes the offline root key, DIR/root.key, in a
// directory only its owner may enter, and prints its public key.
func cmdFirmwareRootInit(e *env, args []string) error {
	fs := newFlagSet(e, "firmware root init")
	out := fs.String("out", "", "`DIR`ectory for root.key (created 0700; keep it offline)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() > 0 {
		return usagef("firmware root init: want --out DIR")
	}
	if fi, err := os.Stat(*out); err == nil && fi.IsDir() && fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("firmware root init: %s has mode %04o: it will hold the root key, so only its owner may use it (chmod 700 %s)", *out, fi.Mode().Perm(), *out)
	}
	if err := atomicfile.MkdirPrivate(*out); err != nil {
		return fmt.Errorf("firmware root init: %w", err)
	}
	path := filepath.Join(*out, "root.key")
	pub, err := newKeyFile(path)
	if err != nil {
		return fmt.Errorf("firmware root init: %w", err)
	}
	fmt.Fprintln(e.stdout, pub)
	fmt.Fprintf(e.stderr, "root key in %s: keep it offline; its public key above goes into the agents' [firmware] root_keys, and the key file signs key lists (firmware keys sign --root %s)\n", path, path)
	return nil
}

// newKeyFile writes a new ed25519 key to path (0600), never over a file
// there, and returns its public key as key lists print it.
func newKeyFile(path string) (string, error) {
	if _, err := os.Lstat(path); err == nil {
		return "", fmt.Errorf("%s exists; a key is never overwritten", path)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", err
	}
	pem, err := release.MarshalPrivateKey(priv)
	if err != nil {
		return "", err
	}
	if err := atomicfile.Write(path, pem, 0o600); err != nil {
		return "", err
	}
	text, err := release.PublicKey(pub).MarshalText()
	return string(text), err
}

func readKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := release.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// cmdFirmwareKeysSign writes a key list signed by the root key files.
func cmdFirmwareKeysSign(e *env, args []string) error {
	fs := newFlagSet(e, "firmware keys sign")
	var roots, newRoots, signing listFlag
	fs.Var(&roots, "root", "root key `FILE` that signs (repeatable; for a rotation, the current roots' and the new ones')")
	fs.Var(&newRoots, "roots", "the new list's root public `KEY`s (default: those of the --root files)")
	rootThreshold := fs.Int("root-threshold", 1, "root signatures the next key list needs")
	fs.Var(&signing, "signing", "release-signing public `KEY` (repeatable; a key left out is revoked)")
	threshold := fs.Int("threshold", 1, "signing-key signatures a manifest needs")
	version := fs.Uint64("version", 0, "key list `VERSION`, above the current one's")
	expires := fs.Duration("expires", 365*24*time.Hour, "how long the key list is valid")
	signingExpires := fs.Duration("signing-expires", 365*24*time.Hour, "how long the signing keys are valid")
	out := fs.String("out", "", "write the signed key list to `FILE`")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if len(roots) == 0 || len(signing) == 0 || *version == 0 || *out == "" || fs.NArg() > 0 {
		return usagef("firmware keys sign: want --root FILE..., --signing KEY..., --version N and --out FILE")
	}
	now := time.Now().UTC().Truncate(time.Second)
	l := release.KeyList{Version: *version, Expires: now.Add(*expires), RootThreshold: *rootThreshold, Threshold: *threshold}
	var signers []ed25519.PrivateKey
	for _, f := range roots {
		k, err := readKey(f)
		if err != nil {
			return err
		}
		signers = append(signers, k)
		if len(newRoots) == 0 {
			l.RootKeys = append(l.RootKeys, release.PublicKey(k.Public().(ed25519.PublicKey)))
		}
	}
	for _, s := range newRoots {
		k, err := release.ParsePublicKey(s)
		if err != nil {
			return usagef("firmware keys sign: --roots %q: %v", s, err)
		}
		l.RootKeys = append(l.RootKeys, release.PublicKey(k))
	}
	for _, s := range signing {
		k, err := release.ParsePublicKey(s)
		if err != nil {
			return usagef("firmware keys sign: --signing %q: %v", s, err)
		}
		l.SigningKeys = append(l.SigningKeys, release.SigningKey{Key: release.PublicKey(k), Expires: now.Add(*signingExpires)})
	}
	payload, err := json.Marshal(l)
	if err != nil {
		return err
	}
	env, err := release.Sign(release.TypeKeyList, payload, signers...)
	if err != nil {
		return err
	}
	// Checked as the station and devices will: a list they would refuse
	// is not written.
	if _, err := release.TrustKeyList(env); err != nil {
		return fmt.Errorf("firmware keys sign: %w", err)
	}
	return atomicfile.Write(*out, env, 0o644)
}

func cmdFirmwareKeysInstall(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "firmware keys install")
	pos, err := parse(fs, dir, args, 1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("firmware keys install: want the key list FILE")
	}
	raw, err := os.ReadFile(pos[0])
	if err != nil {
		return err
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := a.InstallKeyList(ctx, raw); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, "key list installed; devices fetch it at /firmware/keylist")
	return nil
}

// cmdFirmwarePublish signs a manifest for a payload with a signing key
// and has the station store both.
func cmdFirmwarePublish(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "firmware publish")
	file := fs.String("file", "", "the payload `FILE`")
	name := fs.String("name", "", "release `NAME`")
	typ := fs.String("type", "", "release `TYPE`: agent (the agent binary) or image (for the installer)")
	version := fs.String("version", "", "semver `VERSION`, above what devices run")
	svn := fs.Uint("svn", 0, "security version (devices refuse a release below their TPM counter)")
	var hw listFlag
	fs.Var(&hw, "hw", "target `OS/ARCH` the payload runs on, e.g. linux/armv7 (repeatable)")
	board := fs.String("board", "", "the board string a device's configuration must name, if any")
	minFrom := fs.String("min-from", "", "the lowest `VERSION` a device must run to take it")
	expires := fs.Duration("expires", 30*24*time.Hour, "how long the manifest is valid")
	key := fs.String("key", "", "signing key `FILE`")
	manifestOut := fs.String("manifest-out", "", "also write the signed manifest to `FILE` (for iotagent firmware apply on a device offline)")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	if *file == "" || *name == "" || *typ == "" || *version == "" || len(hw) == 0 || *key == "" {
		return usagef("firmware publish: want --file, --name, --type, --version, --hw and --key")
	}
	if *svn > 1<<32-1 {
		return usagef("firmware publish: --svn %d is above 2^32-1", *svn)
	}
	signer, err := readKey(*key)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(*file) // the station's process reads it
	if err != nil {
		return err
	}
	f, err := os.Open(abs)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	f.Close()
	if err != nil {
		return err
	}
	m := release.Manifest{Name: *name, Type: *typ, Version: *version, SVN: uint32(*svn), HW: hw, Board: *board,
		Length: n, SHA256: hex.EncodeToString(h.Sum(nil)), Expires: time.Now().UTC().Truncate(time.Second).Add(*expires), MinFrom: *minFrom}
	payload, err := json.Marshal(m)
	if err != nil {
		return err
	}
	raw, err := release.Sign(release.TypeManifest, payload, signer)
	if err != nil {
		return err
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	pm, err := a.PublishRelease(ctx, abs, raw)
	if err != nil {
		return err
	}
	if pm == nil {
		return errors.New("firmware publish: the station returned no manifest")
	}
	fmt.Fprintf(e.stdout, "published %s %s (%d bytes, sha256 %s) for %v\n", pm.Name, pm.Version, pm.Length, pm.SHA256, pm.HW)
	if *manifestOut != "" {
		if err := atomicfile.Write(*manifestOut, raw, 0o644); err != nil {
			return fmt.Errorf("firmware publish: published, but writing %s: %w", *manifestOut, err)
		}
	}
	return nil
}

// parsePercent reads "5%" (or "5") as 5.
func parsePercent(flagName, s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(s), "%"))
	if err != nil || n < 0 || n > 100 {
		return 0, usagef("%s %q: want a percentage such as 5%%", flagName, s)
	}
	return n, nil
}

// parseAnyOrder is parse for commands whose positional arguments may
// come between flags (firmware rollout create --devices gw-1 gw-2 --all):
// it requires --dir and returns the positional arguments.
func parseAnyOrder(fs *flag.FlagSet, dir *string, args []string) ([]string, error) {
	var pos []string
	for {
		if err := parseFlags(fs, args); err != nil {
			return nil, err
		}
		if args = fs.Args(); len(args) == 0 {
			break
		}
		pos, args = append(pos, args[0]), args[1:]
	}
	if *dir == "" {
		return nil, usagef("%s: --dir is required", fs.Name())
	}
	return pos, nil
}

func cmdRolloutCreate(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "firmware rollout create")
	rel := fs.String("release", "", "the published release, `NAME@VERSION`")
	var devices listFlag
	fs.Var(&devices, "devices", "device `ID`s to roll out to (repeatable, comma-separated, or the arguments after it)")
	all := fs.Bool("all", false, "roll out to every enrolled device")
	waves := fs.String("waves", "1%,10%,50%,100%", "the waves, cumulative `PERCENT`ages of the devices, the last 100%")
	wait := fs.Duration("wave-wait", station.DefaultWaveWait, "open the next wave this long after the current one, if its devices have not all finished")
	maxFailures := fs.String("max-failures", "5%", "halt the rollout when more than this `PERCENT` of the devices of the opened waves failed")
	pos, err := parseAnyOrder(fs, dir, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 && len(devices) == 0 {
		return usagef("firmware rollout create: unexpected argument %q (device IDs follow --devices)", pos[0])
	}
	devices = append(devices, pos...)
	switch {
	case *rel == "":
		return usagef("firmware rollout create: --release NAME@VERSION is required")
	case *all == (len(devices) > 0):
		return usagef("firmware rollout create: want --devices ID... or --all")
	case *wait <= 0:
		return usagef("firmware rollout create: --wave-wait %v: want a positive duration", *wait)
	}
	req := station.RolloutRequest{Release: *rel, Devices: devices, All: *all, WaveWait: *wait}
	for _, w := range strings.Split(*waves, ",") {
		p, err := parsePercent("--waves", w)
		if err != nil {
			return err
		}
		req.Waves = append(req.Waves, p)
	}
	mf, err := parsePercent("--max-failures", *maxFailures)
	if err != nil {
		return err
	}
	req.MaxFailures = &mf
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	st, err := a.CreateRollout(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "rollout %s: %s to %d devices; wave 1 is open\n", st.ID, st.Release(), st.Devices)
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WAVE\tPERCENT\tDEVICES")
	for _, w := range st.Progress {
		fmt.Fprintf(tw, "%d\t%d%%\t%d\n", w.Wave, w.Percent, w.Devices)
	}
	return tw.Flush()
}

func cmdRolloutStatus(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "firmware rollout status")
	asJSON := fs.Bool("json", false, "print JSON (with an ID: each device's step too)")
	perDevice := fs.Bool("devices", false, "also list each device's step (with an ID)")
	pos, err := parseAnyOrder(fs, dir, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return usagef("firmware rollout status: want at most one rollout ID")
	}
	id := ""
	if len(pos) == 1 {
		id = pos[0]
	}
	if *perDevice && id == "" {
		return usagef("firmware rollout status: --devices needs a rollout ID")
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	all, err := a.Rollouts(ctx, id)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if id != "" && len(all) == 1 {
			return enc.Encode(all[0])
		}
		if all == nil {
			all = []station.RolloutStatus{}
		}
		return enc.Encode(all)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	if id == "" {
		fmt.Fprintln(tw, "ID\tRELEASE\tSTATE\tWAVE\tDEVICES\tFINISHED\tFAILED\tCREATED")
		for _, st := range all {
			finished, failed := 0, 0
			for _, w := range st.Progress {
				finished += w.Devices - w.Pending - unfinished(w.Steps)
				failed += w.Failed
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%s\n", st.ID, st.Release(), st.State, st.Wave, len(st.Waves),
				st.Devices, finished, failed, st.Created.UTC().Format(time.RFC3339))
		}
		return tw.Flush()
	}
	st := all[0]
	next := ""
	if st.State == station.RolloutRunning && st.Wave < len(st.Waves) {
		next = "; the next opens by " + st.WaveStarted.Add(st.WaveWait).UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(e.stdout, "rollout %s: %s, %s, wave %d of %d (opened %s%s)\n", st.ID, st.Release(), st.State, st.Wave, len(st.Waves),
		st.WaveStarted.UTC().Format(time.RFC3339), next)
	fmt.Fprintf(e.stdout, "%d devices, max failures %d%%, wave wait %v\n", st.Devices, st.MaxFailures, st.WaveWait)
	if st.HaltReason != "" {
		fmt.Fprintf(e.stdout, "halted: %s\n", st.HaltReason)
	}
	fmt.Fprintln(tw, "WAVE\tPERCENT\tDEVICES\tOPEN\tPENDING\tSTEPS\tFAILED")
	for _, w := range st.Progress {
		var steps []string
		for _, step := range []string{release.StepDownloading, release.StepDownloaded, release.StepInstalling, release.StepTrial,
			release.StepCommitted, release.StepRolledBack, release.StepRefused} {
			if n := w.Steps[step]; n > 0 {
				steps = append(steps, fmt.Sprintf("%s=%d", step, n))
			}
		}
		if len(steps) == 0 {
			steps = []string{"-"}
		}
		fmt.Fprintf(tw, "%d\t%d%%\t%d\t%s\t%d\t%s\t%d\n", w.Wave, w.Percent, w.Devices, yesNo(w.Open), w.Pending, strings.Join(steps, " "), w.Failed)
	}
	if err := tw.Flush(); err != nil || !*perDevice {
		return err
	}
	fmt.Fprintln(e.stdout)
	fmt.Fprintln(tw, "DEVICE\tWAVE\tSTEP\tAT\tREASON")
	for _, d := range st.DeviceSteps {
		step, at := "-", "-"
		if d.Step != "" {
			step, at = d.Step, d.At.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", d.ID, d.Wave, step, at, d.Reason)
	}
	return tw.Flush()
}

// unfinished counts the devices whose last step does not end an update.
func unfinished(steps map[string]int) int {
	n := 0
	for step, c := range steps {
		if !release.Final(step) {
			n += c
		}
	}
	return n
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// rolloutAction runs an admin operation on the rollout named by the one
// positional argument; args[0] is the action's name.
func rolloutAction(ctx context.Context, e *env, args []string, op func(station.Admin, context.Context, string) error, done string) error {
	return adminAction(ctx, e, "firmware rollout "+args[0], "the rollout ID", args[1:], op, done)
}
