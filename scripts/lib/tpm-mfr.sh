# Sourced by scripts that need TPMs as a device maker ships them: swtpm
# instances with an EK certificate and a platform certificate issued by
# a local "TPM manufacturer" CA (swtpm_localca).
#
#   mfr_init DIR             the manufacturer: config in DIR/cfg, CA in DIR/ca
#                            (the roots a station trusts: DIR/ca/swtpm-localca-rootca-cert.pem
#                            and DIR/ca/issuercert.pem, once a TPM was made)
#   mfr_tpm DIR STATE LOG    manufacture one TPM into STATE (swtpm_setup's output in LOG);
#                            non-zero on failure

mfr_init() {
	local d=$1
	mkdir -p "$d/cfg" "$d/ca"
	cat >"$d/cfg/swtpm_setup.conf" <<MFR
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $d/cfg/swtpm-localca.conf
create_certs_tool_options = $d/cfg/swtpm-localca.options
active_pcr_banks = sha256
MFR
	cat >"$d/cfg/swtpm-localca.conf" <<MFR
statedir = $d/ca
signingkey = $d/ca/signkey.pem
issuercert = $d/ca/issuercert.pem
certserial = $d/ca/certserial
MFR
	printf -- '--platform-manufacturer ExampleCorp\n--platform-version 1.0\n--platform-model IoTGateway\n' >"$d/cfg/swtpm-localca.options"
}

mfr_tpm() {
	local d=$1 state=$2 log=$3
	mkdir -p "$state"
	XDG_CONFIG_HOME="$d/cfg" swtpm_setup --tpm2 --tpmstate "$state" --config "$d/cfg/swtpm_setup.conf" \
		--create-ek-cert --create-platform-cert --lock-nvram --overwrite >"$log" 2>&1
}
