#!/usr/bin/env bash
# Install a dawnchorus recorder (or base station) as a systemd service on
# Raspberry Pi OS (arm64), Jetson (JetPack 6) or another Debian-like system.
#
# Usage:
#   sudo deploy/install.sh [--role recorder|base-station] [--runtime auto|litert|tflite-runtime]
#                          [--python PYTHON] [--prefix DIR] [--no-model]
#   deploy/install.sh --no-system --prefix DIR [options]
#
# Options:
#   --role       recorder (default): the edge extra only, never TensorFlow.
#                base-station: the server extra, with TensorFlow.
#   --runtime    the recorder's TFLite runtime. auto (default) takes
#                ai-edge-litert when pip finds a wheel of it for this platform
#                and Python, and tflite-runtime 2.14 otherwise (Python 3.11 at
#                most, numpy < 2, fp32 and fp16 heads only).
#   --python     the interpreter for the virtual environment (default python3).
#   --prefix     where the virtual environment goes (default /opt/dawnchorus,
#                and required with --no-system).
#   --no-model   do not fetch the BirdNET model files into /var/cache/dawnchorus.
#   --no-system  skip every step that needs root or changes the system (apt
#                packages, the service user, /etc, the model cache, systemctl):
#                only the virtual environment and the units, written to
#                PREFIX/systemd with PREFIX's paths, are made. For tests and
#                for trying the installation as an ordinary user.
#   --detect-only  log the platform and exit.
#
# Environment: DAWNCHORUS_DEVICE_TREE_MODEL and DAWNCHORUS_TEGRA_RELEASE
# replace /proc/device-tree/model and /etc/nv_tegra_release, which the
# platform is detected from (for tests).
#
# What it does, in system mode:
#   apt: python3-venv, and libportaudio2 for a recorder's microphone
#   user and group dawnchorus (a recorder's user is also in the audio group)
#   PREFIX/venv with dawnchorus and its extra
#   /etc/dawnchorus/ (root:dawnchorus, 0750) for the configuration files and
#   an empty ROLE.env for the MQTT password
#   /etc/systemd/system/dawnchorus-ROLE.service, not yet enabled
#   the BirdNET model files in /var/cache/dawnchorus, fetched as the service user
#
# Run it again to upgrade: it reinstalls the package into the same virtual
# environment and keeps /etc/dawnchorus and the state directories.

set -o errexit -o pipefail -o nounset

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
ROLE=recorder
RUNTIME=auto
PYTHON=python3
PREFIX=/opt/dawnchorus
PREFIX_GIVEN=0
SYSTEM=1
FETCH_MODEL=1
SERVICE_USER=dawnchorus
CONFIG_DIR=/etc/dawnchorus
UNIT_DIR=/etc/systemd/system
MODEL_CACHE=/var/cache/dawnchorus
# The paths that the units in deploy/systemd name, replaced by this installation's.
UNIT_PREFIX=/opt/dawnchorus
UNIT_CONFIG_DIR=/etc/dawnchorus
DETECT_ONLY=0
DEVICE_TREE_MODEL=${DAWNCHORUS_DEVICE_TREE_MODEL:-/proc/device-tree/model}
TEGRA_RELEASE=${DAWNCHORUS_TEGRA_RELEASE:-/etc/nv_tegra_release}

log() {
    echo "install.sh: $*" >&2
}

die() {
    echo "install.sh: error: $*" >&2
    exit 2
}

usage() {
    sed -n '/^# Usage:/,/^# What it does/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --role) ROLE=${2:?--role needs recorder or base-station}; shift 2 ;;
        --runtime) RUNTIME=${2:?--runtime needs auto, litert or tflite-runtime}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a folder}; PREFIX_GIVEN=1; shift 2 ;;
        --no-model) FETCH_MODEL=0; shift ;;
        --no-system) SYSTEM=0; shift ;;
        --detect-only) DETECT_ONLY=1; shift ;;
        -h|--help) usage ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

# Without root, the default prefix /opt/dawnchorus is the system installation's.
if [ "$SYSTEM" = 0 ] && [ "$PREFIX_GIVEN" = 0 ]; then
    die "--no-system needs --prefix DIR, a folder of your own for the virtual environment and the units (e.g. --prefix ~/dawnchorus)"
fi
case "$ROLE" in
    recorder|base-station) ;;
    *) die "invalid --role $ROLE: use recorder or base-station" ;;
esac
case "$RUNTIME" in
    auto|litert|tflite-runtime) ;;
    *) die "invalid --runtime $RUNTIME: use auto, litert or tflite-runtime" ;;
esac
if [ "$ROLE" = base-station ] && [ "$RUNTIME" = tflite-runtime ]; then
    die "--runtime tflite-runtime is for recorders only: a base station needs TensorFlow, which runs heads itself"
fi

# Platform ------------------------------------------------------------------

detect_platform() {
    local model=""
    if [ -r "$DEVICE_TREE_MODEL" ]; then
        model=$(tr -d '\0' <"$DEVICE_TREE_MODEL")
    fi
    if [ -e "$TEGRA_RELEASE" ] || [[ "$model" == *Jetson* ]]; then
        echo "jetson|${model:-NVIDIA Jetson ($(head -n 1 "$TEGRA_RELEASE" 2>/dev/null))}"
    elif [[ "$model" == *"Raspberry Pi"* ]]; then
        echo "raspberry-pi|$model"
    else
        echo "other|${model:-no device-tree model}"
    fi
}

PLATFORM_LINE=$(detect_platform)
PLATFORM=${PLATFORM_LINE%%|*}
# shellcheck source=/dev/null
OS_NAME=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}" || echo unknown)
log "platform: $PLATFORM (${PLATFORM_LINE#*|}; $(uname -m); $OS_NAME)"
if [ "$DETECT_ONLY" = 1 ]; then
    exit 0
fi
if [ "$PLATFORM" = other ]; then
    log "not a Raspberry Pi or a Jetson: installing as on any Linux machine"
fi

if [ "$SYSTEM" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "the system steps need root: run with sudo, or add --no-system --prefix DIR to install only the virtual environment and the units"
fi
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
VENV="$PREFIX/venv"
if [ "$SYSTEM" = 0 ]; then
    CONFIG_DIR="$PREFIX/etc/dawnchorus"
    UNIT_DIR="$PREFIX/systemd"
fi

# System packages and the service user ------------------------------------------

if [ "$SYSTEM" = 1 ]; then
    packages=(python3-venv)
    [ "$ROLE" = recorder ] && packages+=(libportaudio2)
    log "installing ${packages[*]} with apt"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null

    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        log "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    if [ "$ROLE" = recorder ]; then
        usermod --append --groups audio "$SERVICE_USER"
    fi
else
    log "--no-system: skipping apt packages, the service user, $UNIT_CONFIG_DIR, the model cache and systemctl"
fi

# Virtual environment ---------------------------------------------------------------

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.10 or newer, or pass --python"
PYTHON_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is Python $PYTHON_VERSION: dawnchorus needs 3.10 or newer"

pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT

run_pip() {
    if ! "$VENV/bin/python" -m pip "$@" >"$pip_log" 2>&1; then
        grep -v '^WARNING: Location' "$pip_log" | tail -n 30 >&2
        die "pip $* failed"
    fi
}

if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtual environment $VENV with $PYTHON (Python $PYTHON_VERSION)"
    "$PYTHON" -m venv "$VENV"
fi
run_pip install --quiet --upgrade pip

if [ "$ROLE" = recorder ] && [ "$RUNTIME" = auto ]; then
    # A dry run resolves ai-edge-litert for this venv's Python and platform
    # without installing it; it fails when no wheel matches.
    if "$VENV/bin/python" -m pip install --quiet --dry-run --no-deps --only-binary=:all: \
            'ai-edge-litert>=2.0' >"$pip_log" 2>&1; then
        RUNTIME=litert
    else
        RUNTIME=tflite-runtime
        log "ai-edge-litert has no wheel for Python $PYTHON_VERSION on $(uname -m): using tflite-runtime 2.14"
    fi
fi
if [ "$RUNTIME" = tflite-runtime ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 12))' \
        || die "tflite-runtime 2.14 needs Python 3.11 or older, but $PYTHON is $PYTHON_VERSION: install python3.11 and pass --python python3.11"
fi

case "$ROLE/$RUNTIME" in
    recorder/litert|recorder/auto) EXTRA=edge ;;
    recorder/tflite-runtime) EXTRA=edge-tflite-runtime ;;
    base-station/*) EXTRA=server ;;
esac
log "installing dawnchorus[$EXTRA] from $SOURCE into $VENV"
# Switching to tflite-runtime needs LiteRT gone, because dawnchorus uses LiteRT whenever it imports.
if [ "$EXTRA" = edge-tflite-runtime ]; then
    run_pip uninstall --yes ai-edge-litert
fi
run_pip install --quiet "${SOURCE}[${EXTRA}]"

"$VENV/bin/dawnchorus" --version >/dev/null || die "$VENV/bin/dawnchorus does not run"
runtime_line=$("$VENV/bin/python" -c 'from dawnchorus.models.runtime import describe_runtime; print(describe_runtime())')
log "TFLite runtime: $runtime_line"
if [ "$ROLE" = recorder ] && "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
    die "TensorFlow is installed in $VENV, but a recorder must not carry it: remove the virtual environment and run again"
fi

# Configuration folder and unit ------------------------------------------------------

UNIT="dawnchorus-$ROLE.service"
install -d "$CONFIG_DIR" "$UNIT_DIR"
if [ ! -e "$CONFIG_DIR/$ROLE.env" ]; then
    printf '%s\n' "# Environment of $UNIT. For a broker with passwords:" \
        "# DAWNCHORUS_MQTT_PASSWORD=..." >"$CONFIG_DIR/$ROLE.env"
fi
sed -e "s#$UNIT_PREFIX/venv#$VENV#g" -e "s#$UNIT_CONFIG_DIR#$CONFIG_DIR#g" \
    "$SOURCE/deploy/systemd/$UNIT" >"$UNIT_DIR/$UNIT"
log "unit written to $UNIT_DIR/$UNIT"

if [ "$SYSTEM" = 1 ]; then
    chown root:"$SERVICE_USER" "$CONFIG_DIR" "$CONFIG_DIR/$ROLE.env"
    chmod 0750 "$CONFIG_DIR"
    chmod 0640 "$CONFIG_DIR/$ROLE.env"

    if [ "$FETCH_MODEL" = 1 ]; then
        log "fetching the BirdNET model files into $MODEL_CACHE"
        install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$MODEL_CACHE"
        # The service user has no home, so pip keeps no cache of its own.
        runuser -u "$SERVICE_USER" -- env DAWNCHORUS_CACHE="$MODEL_CACHE" PIP_NO_CACHE_DIR=1 "$VENV/bin/python" -c \
            'from dawnchorus.models.birdnet import locate_birdnet_files; print(locate_birdnet_files().model)' >/dev/null
    fi

    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    config_file="$CONFIG_DIR/$ROLE.toml"
    [ -e "$config_file" ] || log "next: write $config_file, starting from $SOURCE/deploy/$ROLE.toml (docs/deployment.md)"
    log "then: systemctl enable --now $UNIT; journalctl -u $UNIT -f"
fi
log "done: $ROLE with dawnchorus[$EXTRA] in $VENV"
