package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/tpm"
)

// deviceKeyFile is the device key's file in the state dir.
const deviceKeyFile = "device-key.json"

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
		return errHelp
	}
	return usagef("tpm: unknown subcommand %q (want info, keygen)", args[0])
}

// openTPM opens the TPM of --tpm. A malformed spec is a usage error.
func (e *env) openTPM() (*tpm.TPM, error) {
	if _, err := tpm.ParseSpec(e.tpmSpec); err != nil {
		return nil, usageError{fmt.Errorf("--tpm: %w", err)}
	}
	return tpm.Open(e.tpmSpec)
}

type ekCertJSON struct {
	NVIndex   string    `json:"nv_index"`
	KeyType   string    `json:"key_type"`
	Subject   string    `json:"subject"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// EKSHA256 names the EK in a station manifest.
	EKSHA256 string `json:"ek_sha256,omitempty"`
	Error    string `json:"error,omitempty"`
}

type deviceKeyJSON struct {
	PublicSHA256 string   `json:"public_sha256"`
	Attributes   []string `json:"attributes"`
	BlobPath     string   `json:"blob_path"`
	Handle       string   `json:"handle,omitempty"`
	Created      string   `json:"created"`
	// Usable says whether this TPM loads the key; Error says why not.
	Usable bool   `json:"usable"`
	Error  string `json:"error,omitempty"`
}

type tpmInfoJSON struct {
	TPM            string         `json:"tpm"`
	Manufacturer   string         `json:"manufacturer"`
	Model          string         `json:"model"`
	Firmware       string         `json:"firmware"`
	Spec           string         `json:"spec"`
	EKCertificates []ekCertJSON   `json:"ek_certificates"`
	DeviceKey      *deviceKeyJSON `json:"device_key"`
}

func cmdTPMInfo(_ context.Context, e *env, args []string) error {
	fs := e.flagSet("tpm info")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	t, err := e.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	info, err := t.Info()
	if err != nil {
		return err
	}
	out := tpmInfoJSON{
		TPM: t.Spec().String(), Manufacturer: info.Manufacturer, Model: info.Model,
		Firmware: info.Firmware, Spec: info.Spec, EKCertificates: []ekCertJSON{},
	}
	certs, err := t.EKCertificates()
	if err != nil {
		return err
	}
	for _, c := range certs {
		j := ekCertJSON{NVIndex: fmt.Sprintf("0x%08x", c.NVIndex), KeyType: c.KeyType}
		if c.Cert != nil {
			j.Subject, j.Issuer = c.Cert.Subject.String(), c.Cert.Issuer.String()
			j.NotBefore, j.NotAfter = c.Cert.NotBefore.UTC(), c.Cert.NotAfter.UTC()
			j.EKSHA256 = est.EKHash(c.Cert)
		} else {
			j.Error = c.ParseErr.Error()
		}
		out.EKCertificates = append(out.EKCertificates, j)
	}
	out.DeviceKey, err = describeKey(t, filepath.Join(e.stateDir, deviceKeyFile))
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(e, out)
	}
	w := e.stdout
	fmt.Fprintf(w, "TPM:           %s\nManufacturer:  %s\nModel:         %s\nFirmware:      %s\nSpecification: %s\n",
		out.TPM, out.Manufacturer, out.Model, out.Firmware, out.Spec)
	if len(out.EKCertificates) == 0 {
		fmt.Fprintln(w, "EK certificates: none (enroll with a one-time token)")
	}
	for _, c := range out.EKCertificates {
		if c.Error != "" {
			fmt.Fprintf(w, "EK certificate %s (%s): unparsable: %s\n", c.NVIndex, c.KeyType, c.Error)
			continue
		}
		fmt.Fprintf(w, "EK certificate %s (%s): issuer %q, valid until %s\n  ek_sha256 (for a station manifest): %s\n", c.NVIndex, c.KeyType, c.Issuer, c.NotAfter.Format(time.DateOnly), c.EKSHA256)
	}
	if dk := out.DeviceKey; dk == nil {
		fmt.Fprintln(w, "Device key:    none (create one with: iotagent tpm keygen)")
	} else {
		where := dk.BlobPath
		if dk.Handle != "" {
			where = "persistent handle " + dk.Handle + ", blobs " + dk.BlobPath
		}
		fmt.Fprintf(w, "Device key:    ECC P-256 in %s\n  public key sha256: %s\n  attributes: %v\n", where, dk.PublicSHA256, dk.Attributes)
		if !dk.Usable {
			fmt.Fprintf(w, "  NOT USABLE: %s\n", dk.Error)
		}
	}
	return nil
}

// describeKey reports the key file at path; nil if there is none. A key
// file this TPM cannot use is reported, not an error: info is how an
// operator finds out why.
func describeKey(t *tpm.TPM, path string) (*deviceKeyJSON, error) {
	kf, err := tpm.ReadKeyFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if errors.Is(err, tpm.ErrCorruptKey) {
		return &deviceKeyJSON{BlobPath: path, Attributes: []string{}, Error: err.Error()}, nil
	}
	if err != nil {
		return nil, err
	}
	pubArea, err := kf.PublicArea()
	if err != nil {
		return nil, err
	}
	sum, err := kf.PublicKeySHA256()
	if err != nil {
		return nil, err
	}
	dk := &deviceKeyJSON{
		PublicSHA256: sum,
		Attributes:   tpm.AttributeNames(pubArea.ObjectAttributes),
		BlobPath:     path,
		Handle:       kf.PersistentHandle,
		Created:      kf.Created.UTC().Format(time.RFC3339),
	}
	k, err := t.LoadKey(kf)
	if err != nil {
		dk.Error = err.Error()
		return dk, nil
	}
	dk.Usable = true
	return dk, k.Close()
}

func cmdTPMKeygen(_ context.Context, e *env, args []string) error {
	fs := e.flagSet("tpm keygen")
	persist := fs.String("persist", "", "also make the key persistent at `HANDLE` (e.g. 0x81000010)")
	force := fs.Bool("force", false, "replace an existing (or damaged) device key with a new one")
	if err := parse(fs, args); err != nil {
		return err
	}
	var opts tpm.KeyOptions
	if *persist != "" {
		h, err := tpm.ParseHandle(*persist)
		if err != nil {
			return usageError{fmt.Errorf("--persist: %w", err)}
		}
		opts.PersistHandle = h
	}
	opts.Force = *force
	t, err := e.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	if err := atomicfile.MkdirPrivate(e.stateDir); err != nil {
		return fmt.Errorf("state dir %s: %w", e.stateDir, unwrapPath(err))
	}
	path := filepath.Join(e.stateDir, deviceKeyFile)
	kf, created, err := t.EnsureKey(path, opts)
	if errors.Is(err, tpm.ErrCorruptKey) {
		return fmt.Errorf("%w (iotagent tpm keygen --force replaces it with a new key)", err)
	}
	if err != nil {
		return err
	}
	sum, err := kf.PublicKeySHA256()
	if err != nil {
		return err
	}
	verb := "device key exists"
	if created {
		verb = "created device key"
	}
	where := path
	if kf.PersistentHandle != "" {
		where += " and persistent handle " + kf.PersistentHandle
	}
	fmt.Fprintf(e.stdout, "%s: ECC P-256 in %s\npublic key sha256: %s\n", verb, where, sum)
	return nil
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func writeJSON(e *env, v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
