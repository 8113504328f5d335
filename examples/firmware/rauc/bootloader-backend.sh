#!/bin/sh
# RAUC custom bootloader backend (system.conf: bootloader=custom,
# [handlers] bootloader-custom-backend=THIS FILE) for a board whose
# bootloader RAUC does not drive. It keeps the boot choice in files that
# the board's boot script (in the initramfs, or the boot firmware's
# config) reads to pick the root file system:
#
#   $RAUC_BOOT_STATE/primary     the slot to boot: A or B
#   $RAUC_BOOT_STATE/state.A     good or bad (likewise state.B)
#
# and boots the primary slot unless it is bad, else the other one,
# passing rauc.slot=A or rauc.slot=B on the kernel command line. A slot
# marked bad while primary hands primary to the other slot, as RAUC's
# U-Boot backend drops it from BOOT_ORDER.
#
# RAUC calls it as:
#   get-primary                 print the primary slot's bootname
#   set-primary SLOT            make SLOT primary (and bootable)
#   get-state SLOT              print good or bad
#   set-state SLOT good|bad
#   get-current                 print the booted slot's bootname
set -eu

dir=${RAUC_BOOT_STATE:-/boot/rauc}
slots="A B"

other() {
	for s in $slots; do
		if [ "$s" != "$1" ]; then echo "$s"; return; fi
	done
}

check() {
	for s in $slots; do
		if [ "$s" = "$1" ]; then return; fi
	done
	echo "unknown slot $1" >&2
	exit 1
}

# put NAME VALUE writes one file so that a power cut leaves the old
# value or the new one.
put() {
	mkdir -p "$dir"
	printf '%s\n' "$2" > "$dir/$1.tmp"
	sync "$dir/$1.tmp"
	mv "$dir/$1.tmp" "$dir/$1"
	sync "$dir"
}

get() {
	if [ -e "$dir/$1" ]; then cat "$dir/$1"; else echo "$2"; fi
}

case "${1:-}" in
get-primary)
	get primary A ;;
set-primary)
	check "$2"
	put "state.$2" good
	put primary "$2" ;;
get-state)
	check "$2"
	get "state.$2" good ;;
set-state)
	check "$2"
	case "$3" in good|bad) ;; *) echo "state $3: want good or bad" >&2; exit 1 ;; esac
	put "state.$2" "$3"
	if [ "$3" = bad ] && [ "$(get primary A)" = "$2" ]; then put primary "$(other "$2")"; fi ;;
get-current)
	sed -n 's/.*rauc\.slot=\([^ ]*\).*/\1/p' /proc/cmdline ;;
*)
	echo "usage: $0 get-primary | set-primary SLOT | get-state SLOT | set-state SLOT good|bad | get-current" >&2
	exit 1 ;;
esac
