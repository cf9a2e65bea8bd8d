#!/usr/bin/env bash
# Create and manage the TLS credentials and the ACL of a dawnchorus broker.
#
# Every client (the base station and each recorder) gets its own certificate,
# signed by a private CA kept in DIR/ca. Mosquitto, with
# deploy/mosquitto/dawnchorus-tls.conf, takes the certificate's common name
# (CN) as the MQTT user name, and the generated ACL gives each user only its
# own topics. See docs/deployment.md ("TLS and access control").
#
# Usage:
#   make-credentials.sh init [--base-station ID] [--days N] DIR BROKER_HOST...
#       Create the CA, a broker certificate for the host names or IP addresses
#       given, the base station's certificate, an empty CRL and the ACL.
#   make-credentials.sh recorder [--days N] DIR SITE DEVICE...
#       Issue a certificate to each recorder DEVICE of SITE. A recorder that
#       already has one gets a new key and certificate, and the old
#       certificate is revoked (rotation, or a move to another site).
#   make-credentials.sh renew [--days N] DIR broker BROKER_HOST...
#   make-credentials.sh renew [--days N] DIR base-station
#       Issue a new certificate to the broker, or to the base station (and
#       revoke its old one), before the current one expires.
#   make-credentials.sh revoke DIR DEVICE...
#       Revoke the recorders' (or Home Assistant's) certificates and remove
#       them from the ACL.
#   make-credentials.sh home-assistant [--prefix PREFIX] [--days N] DIR [USER]
#       Issue a certificate to Home Assistant's MQTT integration (user name
#       USER, default home-assistant) and let it read every recorder's status
#       and last detection. Each recorder may then publish its discovery
#       configs under PREFIX (default homeassistant), given to recorders as
#       --home-assistant PREFIX. Run it again to renew the certificate or
#       change the prefix.
#
# What it writes:
#   DIR/ca/                    the CA's key, database and serial numbers (keep it offline)
#   DIR/broker/                ca.crt, broker.crt, broker.key, crl.pem, dawnchorus.acl:
#                              copy these to /etc/mosquitto/dawnchorus/ on the broker host
#   DIR/clients/ID/            ca.crt, client.crt, client.key for the base station or recorder ID
#   DIR/recorders.tsv          site and device of every recorder with a valid certificate
#   DIR/home-assistant         Home Assistant's user name and discovery prefix, once set up
#
# It asks no questions, so tests and provisioning scripts can run it. Needs
# openssl (1.1.1 or 3.x) and bash 4.

set -o errexit -o pipefail -o nounset
umask 077

# The root of every dawnchorus topic and the reserved topic level of a site's
# heads (protocol/topics.py).
readonly TOPIC_ROOT="dawnchorus/v1"
readonly MODEL_SEGMENT="model"
# The topic level of base-station processes' stats (protocol/topics.py).
readonly STATION_SEGMENT="_station"
readonly DEVICE_KINDS=(embeddings detections status ack)
# What the base station publishes to one recorder: receipts of committed embeddings.
readonly RECEIPT_KIND="receipt"
# Retained topics a recorder writes for Home Assistant; the base station does not read them.
readonly RECORDER_STATE_KINDS=(last_detection)
# Home Assistant's default MQTT discovery prefix, and the start of each
# recorder's node id in its discovery topics (protocol/home_assistant.py).
readonly DEFAULT_HA_PREFIX="homeassistant"
readonly HA_NODE_PREFIX="dawnchorus_"

# Certificates of unattended devices: long enough to outlast a field season
# (820 days, about 27 months), short enough that a lost recorder's key expires.
DAYS=820

die() {
    echo "make-credentials.sh: error: $*" >&2
    exit 2
}

usage() {
    sed -n '/^# Usage:/,/^# What it writes:/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Site and device ids follow protocol/topics.py: they become topic levels and
# ACL user names, so no wildcards, separators or spaces.
check_id() {
    local value=$1 what=$2
    if [[ ! $value =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ || $value == "$MODEL_SEGMENT" ]]; then
        die "invalid $what '$value': use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit (and not '$MODEL_SEGMENT')"
    fi
}

check_days() {
    [[ $1 =~ ^[1-9][0-9]*$ ]] || die "invalid --days '$1': expected a whole number of days, e.g. 820"
}

check_initialised() {
    local dir=$1
    [[ -f $dir/ca/ca.crt && -f $dir/ca/openssl.cnf && -f $dir/base-station ]] ||
        die "$dir contains no CA: create it first with 'make-credentials.sh init $dir BROKER_HOST'"
}

write_ca_config() {
    local ca_dir=$1
    cat >"$ca_dir/openssl.cnf" <<EOF
[ ca ]
default_ca = dawnchorus_ca

[ dawnchorus_ca ]
dir = $ca_dir
database = \$dir/index.txt
serial = \$dir/serial
crlnumber = \$dir/crlnumber
new_certs_dir = \$dir/issued
certificate = \$dir/ca.crt
private_key = \$dir/ca.key
default_md = sha256
default_crl_days = $DAYS
policy = common_name_only
# Several certificates with one CN may coexist while a rotation is under way.
unique_subject = no

[ common_name_only ]
commonName = supplied

[ client_cert ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
}

# Issue DIR/clients/ID (a client certificate with CN=ID), revoking the one it replaces.
issue_client() {
    local dir=$1 id=$2
    local client_dir=$dir/clients/$id
    local staging=$dir/clients/.$id.new
    rm -rf "$staging"
    mkdir -p "$staging"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$staging/client.key" -subj "/CN=$id" -out "$staging/client.csr" 2>/dev/null
    openssl ca -batch -notext -config "$dir/ca/openssl.cnf" -extensions client_cert -days "$DAYS" \
        -in "$staging/client.csr" -out "$staging/client.crt" 2>/dev/null
    rm "$staging/client.csr"
    cp "$dir/ca/ca.crt" "$staging/ca.crt"

    if [[ -f $client_dir/client.crt ]]; then
        openssl ca -config "$dir/ca/openssl.cnf" -revoke "$client_dir/client.crt" -crl_reason superseded 2>/dev/null
        echo "revoked the previous certificate of $id" >&2
    fi
    rm -rf "$client_dir"
    mv "$staging" "$client_dir"
    echo "issued $client_dir/client.crt (CN=$id, serial $(openssl x509 -noout -serial -in "$client_dir/client.crt" | cut -d= -f2))" >&2
}

write_crl() {
    local dir=$1
    openssl ca -gencrl -config "$dir/ca/openssl.cnf" -out "$dir/broker/crl.pem.new" 2>/dev/null
    mv "$dir/broker/crl.pem.new" "$dir/broker/crl.pem"
}

# Rewrite the ACL from DIR/base-station and DIR/recorders.tsv. Mosquitto denies
# everything that no line allows.
write_acl() {
    local dir=$1 base_station site device kind ha_user="" ha_prefix=""
    base_station=$(<"$dir/base-station")
    if [[ -f $dir/home-assistant ]]; then
        read -r ha_user ha_prefix <"$dir/home-assistant"
    fi
    {
        echo "# Written by deploy/make-credentials.sh from $dir/recorders.tsv; rerun it instead of editing."
        echo "# User names are the CN of each client certificate (use_identity_as_username)."
        echo
        echo "# The base station reads every recorder's topics, alone writes heads and manifests,"
        echo "# and alone writes the receipts that let recorders delete what it has committed."
        echo "user $base_station"
        for kind in "${DEVICE_KINDS[@]}"; do
            echo "topic read $TOPIC_ROOT/+/+/$kind"
        done
        echo "topic write $TOPIC_ROOT/+/+/$RECEIPT_KIND"
        echo "topic readwrite $TOPIC_ROOT/+/$MODEL_SEGMENT/#"
        echo "# Each base-station process's counters, retained under its MQTT client id."
        echo "topic readwrite $TOPIC_ROOT/$STATION_SEGMENT/+/stats"
        while read -r site device; do
            echo
            echo "# Recorder $device of site $site: writes only its own topics, reads only its site's heads"
            echo "# and its own receipts."
            echo "user $device"
            for kind in "${DEVICE_KINDS[@]}" "${RECORDER_STATE_KINDS[@]}"; do
                echo "topic write $TOPIC_ROOT/$site/$device/$kind"
            done
            echo "topic read $TOPIC_ROOT/$site/$device/$RECEIPT_KIND"
            echo "topic read $TOPIC_ROOT/$site/$MODEL_SEGMENT/manifest"
            echo "topic read $TOPIC_ROOT/$site/$MODEL_SEGMENT/blob/+"
            if [[ -n $ha_user ]]; then
                # Discovery topics allow only [A-Za-z0-9_-] in a node id, so '.' becomes '_'.
                echo "topic write $ha_prefix/+/$HA_NODE_PREFIX${device//./_}/+/config"
            fi
        done <"$dir/recorders.tsv"
        if [[ -n $ha_user ]]; then
            echo
            echo "# Home Assistant reads recorders' status and last detections, and its discovery prefix."
            echo "user $ha_user"
            echo "topic read $TOPIC_ROOT/+/+/status"
            for kind in "${RECORDER_STATE_KINDS[@]}"; do
                echo "topic read $TOPIC_ROOT/+/+/$kind"
            done
            echo "topic readwrite $ha_prefix/#"
        fi
    } >"$dir/broker/dawnchorus.acl.new"
    chmod 644 "$dir/broker/dawnchorus.acl.new"
    mv "$dir/broker/dawnchorus.acl.new" "$dir/broker/dawnchorus.acl"
}

# Remove DEVICE from recorders.tsv, whatever its site.
forget_recorder() {
    local dir=$1 device=$2
    awk -v device="$device" '$2 != device' "$dir/recorders.tsv" >"$dir/recorders.tsv.new"
    mv "$dir/recorders.tsv.new" "$dir/recorders.tsv"
}

is_ip_address() {
    [[ $1 =~ ^[0-9]+(\.[0-9]+){3}$ || $1 == *:* ]]
}

check_hosts() {
    local host
    for host in "$@"; do
        if ! is_ip_address "$host" && [[ ! $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
            die "invalid broker host '$host': give the host name or IP address that clients connect to"
        fi
    done
}

# Issue DIR/broker/broker.crt for the host names and addresses given. Clients
# check that the host they connect to is in its subjectAltName.
issue_broker() {
    local dir=$1
    shift
    local alt_names=() host joined
    for host in "$@"; do
        if is_ip_address "$host"; then
            alt_names+=("IP:$host")
        else
            alt_names+=("DNS:$host")
        fi
    done

    joined=$(IFS=,; echo "${alt_names[*]}")
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/broker/broker.key" -subj "/CN=$1" -out "$dir/ca/broker.csr" 2>/dev/null
    cat >"$dir/ca/broker.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $joined
EOF
    openssl ca -batch -notext -config "$dir/ca/openssl.cnf" -extfile "$dir/ca/broker.ext" -days "$DAYS" \
        -in "$dir/ca/broker.csr" -out "$dir/broker/broker.crt" 2>/dev/null
    rm "$dir/ca/broker.csr"
    chmod 644 "$dir/broker/broker.crt"
    echo "issued $dir/broker/broker.crt for $joined" >&2
}

command_init() {
    local base_station=base-station
    while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in
            --base-station) [[ $# -ge 2 ]] || usage; base_station=$2; shift 2 ;;
            --days) [[ $# -ge 2 ]] || usage; check_days "$2"; DAYS=$2; shift 2 ;;
            *) die "unknown option '$1' for init" ;;
        esac
    done
    [[ $# -ge 2 ]] || usage
    local dir=$1
    shift
    check_id "$base_station" "base station id"
    check_hosts "$@"
    [[ ! -e $dir/ca/ca.key ]] || die "$dir already contains a CA: use another folder, or 'recorder' to add recorders"

    mkdir -p "$dir/ca/issued" "$dir/broker" "$dir/clients"
    dir=$(cd "$dir" && pwd)
    : >"$dir/ca/index.txt"
    echo 1000 >"$dir/ca/crlnumber"
    openssl rand -hex 16 >"$dir/ca/serial"
    write_ca_config "$dir/ca"

    # The CA. Its key signs every certificate and the CRL, and never leaves DIR/ca.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$DAYS" \
        -keyout "$dir/ca/ca.key" -out "$dir/ca/ca.crt" -subj "/CN=dawnchorus CA $(date -u +%Y-%m-%d)" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    cp "$dir/ca/ca.crt" "$dir/broker/ca.crt"

    issue_broker "$dir" "$@"

    echo "$base_station" >"$dir/base-station"
    : >"$dir/recorders.tsv"
    issue_client "$dir" "$base_station"
    write_crl "$dir"
    write_acl "$dir"
    chmod 644 "$dir/broker/ca.crt" "$dir/broker/broker.crt" "$dir/broker/crl.pem"
    echo "copy $dir/broker/* to /etc/mosquitto/dawnchorus/ on the broker host" >&2
}

command_recorder() {
    while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in
            --days) [[ $# -ge 2 ]] || usage; check_days "$2"; DAYS=$2; shift 2 ;;
            *) die "unknown option '$1' for recorder" ;;
        esac
    done
    [[ $# -ge 3 ]] || usage
    local dir=$1 site=$2
    shift 2
    check_initialised "$dir"
    dir=$(cd "$dir" && pwd)
    check_id "$site" "site id"

    local base_station device ha_user=""
    base_station=$(<"$dir/base-station")
    [[ ! -f $dir/home-assistant ]] || read -r ha_user _ <"$dir/home-assistant"
    for device in "$@"; do
        check_id "$device" "device id"
        [[ $device != "$base_station" ]] || die "device id '$device' is the base station's user name; choose another"
        [[ $device != "$ha_user" ]] || die "device id '$device' is Home Assistant's user name; choose another"
    done
    for device in "$@"; do
        issue_client "$dir" "$device"
        forget_recorder "$dir" "$device"
        printf '%s\t%s\n' "$site" "$device" >>"$dir/recorders.tsv"
    done
    write_crl "$dir"
    write_acl "$dir"
    chmod 644 "$dir/broker/crl.pem"
    echo "copy $dir/broker/dawnchorus.acl and crl.pem to the broker host and send Mosquitto SIGHUP" >&2
}

# Renew the broker's or the base station's certificate, e.g. before it expires.
command_renew() {
    while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in
            --days) [[ $# -ge 2 ]] || usage; check_days "$2"; DAYS=$2; shift 2 ;;
            *) die "unknown option '$1' for renew" ;;
        esac
    done
    [[ $# -ge 2 ]] || usage
    local dir=$1 what=$2
    shift 2
    check_initialised "$dir"
    dir=$(cd "$dir" && pwd)
    case $what in
        broker)
            [[ $# -ge 1 ]] || die "renew broker needs the broker's host names and IP addresses, as init did"
            check_hosts "$@"
            issue_broker "$dir" "$@"
            echo "copy $dir/broker/broker.crt and broker.key to the broker host and send Mosquitto SIGHUP" >&2
            ;;
        base-station)
            [[ $# -eq 0 ]] || usage
            issue_client "$dir" "$(<"$dir/base-station")"
            write_crl "$dir"
            chmod 644 "$dir/broker/crl.pem"
            echo "install $dir/clients/$(<"$dir/base-station")/ on the base station, then copy" \
                "$dir/broker/crl.pem to the broker host and send Mosquitto SIGHUP" >&2
            ;;
        *) die "unknown certificate '$what' to renew: expected broker or base-station" ;;
    esac
}

command_revoke() {
    [[ $# -ge 2 ]] || usage
    local dir=$1
    shift
    check_initialised "$dir"
    dir=$(cd "$dir" && pwd)

    local device
    for device in "$@"; do
        check_id "$device" "device id"
        [[ -f $dir/clients/$device/client.crt ]] || die "no certificate for '$device' in $dir/clients"
        [[ $device != "$(<"$dir/base-station")" ]] ||
            die "'$device' is the base station: give it a new certificate with 'make-credentials.sh renew $dir base-station'"
    done
    for device in "$@"; do
        openssl ca -config "$dir/ca/openssl.cnf" -revoke "$dir/clients/$device/client.crt" \
            -crl_reason keyCompromise 2>/dev/null
        rm -rf "$dir/clients/$device"
        forget_recorder "$dir" "$device"
        # Revoking Home Assistant's certificate also removes its ACL lines and the recorders' discovery topics.
        if [[ -f $dir/home-assistant && $(cut -d' ' -f1 "$dir/home-assistant") == "$device" ]]; then
            rm "$dir/home-assistant"
        fi
        echo "revoked $device" >&2
    done
    write_crl "$dir"
    write_acl "$dir"
    chmod 644 "$dir/broker/crl.pem"
    echo "copy $dir/broker/dawnchorus.acl and crl.pem to the broker host and send Mosquitto SIGHUP" >&2
}

# Check that PREFIX can be a discovery prefix: topic levels without wildcards.
check_prefix() {
    local prefix=$1
    if [[ -z $prefix || $prefix == /* || $prefix == */ || $prefix == *//* || $prefix == *[+#[:space:]]* ]]; then
        die "invalid discovery prefix '$prefix': give the prefix set in Home Assistant's MQTT integration ('$DEFAULT_HA_PREFIX' unless it was changed), without wildcards, spaces or a leading or trailing '/'"
    fi
}

command_home_assistant() {
    local prefix=$DEFAULT_HA_PREFIX
    while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in
            --prefix) [[ $# -ge 2 ]] || usage; prefix=$2; shift 2 ;;
            --days) [[ $# -ge 2 ]] || usage; check_days "$2"; DAYS=$2; shift 2 ;;
            *) die "unknown option '$1' for home-assistant" ;;
        esac
    done
    [[ $# -ge 1 && $# -le 2 ]] || usage
    local dir=$1 user=${2:-home-assistant}
    check_initialised "$dir"
    dir=$(cd "$dir" && pwd)
    check_id "$user" "Home Assistant user name"
    check_prefix "$prefix"
    [[ $user != "$(<"$dir/base-station")" ]] || die "'$user' is the base station's user name; choose another"
    ! cut -f2 "$dir/recorders.tsv" | grep -qxF -- "$user" || die "'$user' is a recorder's user name; choose another"

    issue_client "$dir" "$user"
    printf '%s %s\n' "$user" "$prefix" >"$dir/home-assistant"
    write_crl "$dir"
    write_acl "$dir"
    chmod 644 "$dir/broker/crl.pem"
    echo "give Home Assistant's MQTT integration $dir/clients/$user/ (CA, client certificate and key) and the" \
        "discovery prefix '$prefix'; copy $dir/broker/dawnchorus.acl and crl.pem to the broker host and send" \
        "Mosquitto SIGHUP" >&2
}

main() {
    [[ $# -ge 1 ]] || usage
    local command=$1
    shift
    command -v openssl >/dev/null || die "openssl is not installed: apt install openssl"
    case $command in
        init) command_init "$@" ;;
        recorder) command_recorder "$@" ;;
        renew) command_renew "$@" ;;
        revoke) command_revoke "$@" ;;
        home-assistant) command_home_assistant "$@" ;;
        -h | --help | help) usage ;;
        *) die "unknown command '$command': expected init, recorder, renew, revoke or home-assistant" ;;
    esac
}

main "$@"
