package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/station"
)

// cmdFirmware: the release keys and the firmware repository.
//
//	firmware key new --out FILE
//	firmware keys sign --root FILE... --signing PUB... --version N --out FILE
//	firmware keys install --dir D FILE
//	firmware publish --dir D --file F --name N --type T --version V --svn S --hw H... --key FILE
func cmdFirmware(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("firmware: want 'key new', 'keys sign', 'keys install' or 'publish'")
	}
	switch sub := args[0]; {
	case sub == "publish":
		return cmdFirmwarePublish(ctx, e, args[1:])
	case len(args) > 1 && sub == "key" && args[1] == "new":
		return cmdFirmwareKeyNew(e, args[2:])
	case len(args) > 1 && sub == "keys" && args[1] == "sign":
		return cmdFirmwareKeysSign(e, args[2:])
	case len(args) > 1 && sub == "keys" && args[1] == "install":
		return cmdFirmwareKeysInstall(ctx, e, args[2:])
	}
	return usagef("firmware: unknown command %q (want 'key new', 'keys sign', 'keys install' or 'publish')", args[0])
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
	if _, err := os.Lstat(*out); err == nil {
		return fmt.Errorf("firmware key new: %s exists; a key is never overwritten", *out)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	pem, err := release.MarshalPrivateKey(priv)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(*out, pem, 0o600); err != nil {
		return err
	}
	text, _ := release.PublicKey(pub).MarshalText()
	fmt.Fprintf(e.stdout, "%s\n", text)
	return nil
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
	return nil
}
