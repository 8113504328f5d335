package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/tpm"
)

// TPMInfo is what iotagent tpm info reports; its JSON keys are a contract.
type TPMInfo struct {
	TPM            string         `json:"tpm"`
	Manufacturer   string         `json:"manufacturer"`
	Model          string         `json:"model"`
	Firmware       string         `json:"firmware"`
	Spec           string         `json:"spec"`
	EKCertificates []EKCert       `json:"ek_certificates"`
	DeviceKey      *DeviceKeyInfo `json:"device_key"`
}

// EKCert is one EK certificate found in the TPM's NV.
type EKCert struct {
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

// DeviceKeyInfo describes the device key file of the state directory.
type DeviceKeyInfo struct {
	PublicSHA256 string   `json:"public_sha256"`
	Attributes   []string `json:"attributes"`
	BlobPath     string   `json:"blob_path"`
	Handle       string   `json:"handle,omitempty"`
	Created      string   `json:"created"`
	// Usable says whether this TPM loads the key; Error says why not.
	Usable bool   `json:"usable"`
	Error  string `json:"error,omitempty"`
}

// TPMInfo reads the TPM's identity, its EK certificates and the state of
// the device key. A key file this TPM cannot use is reported, not an
// error: this is how an operator finds out why.
func (a *Agent) TPMInfo() (*TPMInfo, error) {
	t, err := a.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	info, err := t.Info()
	if err != nil {
		return nil, err
	}
	out := &TPMInfo{
		TPM: t.Spec().String(), Manufacturer: info.Manufacturer, Model: info.Model,
		Firmware: info.Firmware, Spec: info.Spec, EKCertificates: []EKCert{},
	}
	certs, err := t.EKCertificates()
	if err != nil {
		return nil, err
	}
	for _, c := range certs {
		j := EKCert{NVIndex: fmt.Sprintf("0x%08x", c.NVIndex), KeyType: c.KeyType}
		if c.Cert != nil {
			j.Subject, j.Issuer = c.Cert.Subject.String(), c.Cert.Issuer.String()
			j.NotBefore, j.NotAfter = c.Cert.NotBefore.UTC(), c.Cert.NotAfter.UTC()
			j.EKSHA256 = est.EKHash(c.Cert)
		} else {
			j.Error = c.ParseErr.Error()
		}
		out.EKCertificates = append(out.EKCertificates, j)
	}
	out.DeviceKey, err = describeKey(t, a.s.dir.DeviceKey())
	return out, err
}

// describeKey reports the key file at path; nil if there is none.
func describeKey(t *tpm.TPM, path string) (*DeviceKeyInfo, error) {
	kf, err := tpm.ReadKeyFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if errors.Is(err, tpm.ErrCorruptKey) {
		return &DeviceKeyInfo{BlobPath: path, Attributes: []string{}, Error: err.Error()}, nil
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
	dk := &DeviceKeyInfo{
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

// KeygenResult says what Keygen did.
type KeygenResult struct {
	Created      bool // false: the key existed and was kept
	Path         string
	Handle       string // the persistent handle, if any
	PublicSHA256 string
}

// Keygen creates the device key in the TPM if the state directory has
// none (opts.Force: replaces it), and optionally makes it persistent.
func (a *Agent) Keygen(opts tpm.KeyOptions) (*KeygenResult, error) {
	t, err := a.openTPMForKeys()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	path := a.s.dir.DeviceKey()
	kf, created, err := t.EnsureKey(path, opts)
	if errors.Is(err, tpm.ErrCorruptKey) {
		return nil, fmt.Errorf("%w (iotagent tpm keygen --force replaces it with a new key)", err)
	}
	if err != nil {
		return nil, err
	}
	sum, err := kf.PublicKeySHA256()
	if err != nil {
		return nil, err
	}
	return &KeygenResult{Created: created, Path: path, Handle: kf.PersistentHandle, PublicSHA256: sum}, nil
}

// WriteText writes the report as iotagent prints it without --json.
func (out *TPMInfo) WriteText(w io.Writer) {
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
}
