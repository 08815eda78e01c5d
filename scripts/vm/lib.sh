# shellcheck shell=bash
# Shared helpers for the rio VM test scripts. Sourced, not executed.
#
# Everything here runs on the HOST. Nothing in these scripts ever touches the
# host's own PCI devices or disks: all driver binding happens inside the guest.

RIO_VM_CACHE="${RIO_VM_CACHE:-/var/cache/rio-vm}"

# depmod, modprobe and ldconfig live in /usr/sbin; some CI environments run
# with a PATH that lacks the sbin dirs.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
case ":$PATH:" in *:/sbin:*) ;; *) PATH="$PATH:/sbin" ;; esac
export PATH

die()  { echo "vm: error: $*" >&2; exit 2; }
info() { echo "vm: $*" >&2; }

# apt-get update is slow-ish and needs the network; do it at most once per
# script run and only when an install is actually required.
_RIO_APT_UPDATED=0
apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to apt-get install $*"
    if [ "$_RIO_APT_UPDATED" = 0 ]; then
        info "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        _RIO_APT_UPDATED=1
    fi
    info "apt-get install $*"
    # Keep dpkg's chatter out of the console log unless something goes wrong.
    local log
    log="$(mktemp)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        die "apt-get install $* failed"
    fi
    rm -f "$log"
}

# need_cmd CMD PACKAGE: make sure CMD is on PATH, installing PACKAGE if not.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install "$2"
    command -v "$1" >/dev/null 2>&1 || die "'$1' still missing after installing $2"
}

# need_qemu_system: qemu-system-x86_64 from the distribution. A machine image may carry a
# qemu-utils from another release (a backport: 10.0 beside bookworm's 7.2) whose Breaks: keep
# the distribution's qemu-system-x86 from installing beside it; then qemu-utils is taken at
# qemu-system-x86's version too (a downgrade, asked for explicitly). The VM scripts are written
# for the distribution's QEMU (7.2).
need_qemu_system() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "need root to install qemu-system-x86"
    if [ "$_RIO_APT_UPDATED" = 0 ]; then
        info "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        _RIO_APT_UPDATED=1
    fi
    local want have
    want="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
    have="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    if [ -n "$want" ] && [ "$want" != "(none)" ] && [ -n "$have" ] && [ "$have" != "$want" ]; then
        info "qemu-utils $have is from another release than qemu-system-x86 $want: taking qemu-utils $want"
        apt_install --allow-downgrades qemu-system-x86 "qemu-utils=$want"
    else
        apt_install qemu-system-x86
    fi
    command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 still missing after installing qemu-system-x86"
}

# Make sure apt-get can see package lists (a fresh container has none; then
# `apt-get download` fails with "Unable to locate package").
apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}
ensure_apt_lists() {
    if ! apt_lists_present && [ "$_RIO_APT_UPDATED" = 0 ]; then
        info "apt-get update (no package lists yet)"
        apt-get update -qq >&2 || die "apt-get update failed"
        _RIO_APT_UPDATED=1
    fi
}

# need_pkg PACKAGE...: make sure Debian packages (libraries, headers) are installed.
need_pkg() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" = 0 ] || apt_install "${missing[@]}"
}

# The libraries rio links against: hwloc (NUMA topology and memory binding, through the
# hwlocality crate; it links libudev) and pkg-config to find them.
need_build_deps() {
    need_pkg pkg-config libhwloc-dev libudev-dev
}

# Path of rotel-agent (the OpenTelemetry collector shipped in the `rotel` PyPI package), or
# nothing when rotel is not installed.
rotel_agent_path() {
    python3 -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))' 2>/dev/null
}

# need_rotel: make sure rotel is installed (pip; --break-system-packages where the system pip
# is externally managed). cli/tests/otel.rs and scripts/otel-check use it.
need_rotel() {
    local a
    a="$(rotel_agent_path)" && [ -x "$a" ] && return 0
    need_cmd python3 python3
    python3 -m pip --version >/dev/null 2>&1 || need_pkg python3-pip
    info "pip install rotel"
    python3 -m pip install --quiet rotel >&2 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages rotel >&2 ||
        die "pip install rotel failed"
    a="$(rotel_agent_path)" && [ -x "$a" ] || die "rotel-agent missing after pip install rotel"
}
