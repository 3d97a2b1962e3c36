#!/usr/bin/env bash
# Install the chiffon-worker systemd units for a worker installed in the virtualenv VENV_PATH.
#
#   systemd/install.sh VENV_PATH          e.g. systemd/install.sh /opt/chiffon-worker/venv
#   DESTDIR=/tmp/root systemd/install.sh VENV_PATH
#
# It creates the system user "chiffon", installs chiffon-worker.service and
# chiffon-worker@.service into /etc/systemd/system with ExecStart= pointing at
# VENV_PATH/bin/chiffon-worker, creates /etc/chiffon-worker (root:chiffon 0750) with an env file
# from the example unless one exists, and reloads systemd. It enables and starts nothing.
#
# With DESTDIR set, everything is written below DESTDIR instead, and the steps that change the
# running system (user creation, group ownership, daemon-reload) are skipped: a dry install
# for packaging and tests. Running it again is safe: units are replaced, env files kept.
set -euo pipefail

readonly SERVICE_USER=chiffon
readonly SERVICE_GROUP=chiffon
readonly PLACEHOLDER_EXEC=/opt/chiffon-worker/venv/bin/chiffon-worker
readonly UNITS=(chiffon-worker.service chiffon-worker@.service)

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly here

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    printf 'usage: %s VENV_PATH   (absolute path of the virtualenv holding chiffon-worker)\n' \
        "$0" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
venv=${1%/}
[[ $venv == /* ]] || die "VENV_PATH must be an absolute path, got '$1'"
# The path goes into ExecStart= unquoted: no whitespace, and nothing systemd would read as a
# specifier (%), an escape (\) or a quote.
[[ $venv =~ ^[A-Za-z0-9/._+@:-]+$ ]] ||
    die "VENV_PATH may only hold letters, digits and / . _ + @ : -, got '$1'"
readonly venv
readonly exec_path=$venv/bin/chiffon-worker

destdir=${DESTDIR:-}
destdir=${destdir%/}
if [[ -n $destdir ]]; then
    [[ $destdir == /* ]] || die "DESTDIR must be an absolute path, got '$destdir'"
    dry_run=1
else
    dry_run=0
    [[ $(id -u) -eq 0 ]] || die "must run as root (or set DESTDIR= for a dry install)"
fi
readonly destdir dry_run

unit_dir=$destdir/etc/systemd/system
conf_dir=$destdir/etc/chiffon-worker
readonly unit_dir conf_dir

for unit in "${UNITS[@]}" chiffon-worker.env.example; do
    [[ -f $here/$unit ]] || die "missing $here/$unit"
done

if [[ ! -x $exec_path ]]; then
    if ((dry_run)); then
        printf 'install.sh: note: %s does not exist (yet); the units point at it\n' \
            "$exec_path" >&2
    else
        die "$exec_path is not an executable; install the worker into $venv first"
    fi
fi

# --- the service account --------------------------------------------------------------------
if ((!dry_run)); then
    if ! getent group "$SERVICE_GROUP" >/dev/null; then
        groupadd --system "$SERVICE_GROUP"
        printf 'created group %s\n' "$SERVICE_GROUP"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_GROUP" --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "Chiffon worker" "$SERVICE_USER"
        printf 'created user %s\n' "$SERVICE_USER"
    fi
fi

# --- the units ------------------------------------------------------------------------------
workdir=$(mktemp -d)
trap 'rm -rf -- "$workdir"' EXIT

install -d -m 0755 "$unit_dir"
for unit in "${UNITS[@]}"; do
    staged=$workdir/$unit
    sed "s|^ExecStart=$PLACEHOLDER_EXEC |ExecStart=$exec_path |" "$here/$unit" >"$staged"
    if [[ $(grep -c '^ExecStart=' "$staged") -ne 1 ]] ||
        ! grep -qxF "ExecStart=$exec_path run" "$staged"; then
        die "could not rewrite ExecStart= in $unit"
    fi
    install -m 0644 "$staged" "$unit_dir/$unit"
    printf 'installed %s\n' "$unit_dir/$unit"
done

# --- the settings ---------------------------------------------------------------------------
# Group chiffon, so the worker can read files placed here (a password file); systemd itself
# reads the env files as root. In a dry install the group may not exist: files stay the caller's.
group_opt=()
if ((!dry_run)); then
    group_opt=(-g "$SERVICE_GROUP")
fi
install -d -m 0750 "${group_opt[@]}" "$conf_dir"
install -m 0644 "$here/chiffon-worker.env.example" "$conf_dir/chiffon-worker.env.example"
env_file=$conf_dir/chiffon-worker.env
if [[ -e $env_file ]]; then
    printf 'kept existing %s\n' "$env_file"
else
    install -m 0640 "${group_opt[@]}" "$here/chiffon-worker.env.example" "$env_file"
    printf 'created %s from the example\n' "$env_file"
fi

# --- tell systemd ---------------------------------------------------------------------------
# /run/systemd/system exists only when systemd is PID 1 (the sd_booted(3) test); in a chroot or
# a container without systemd there is nothing to reload.
if ((!dry_run)) && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    printf 'reloaded systemd\n'
fi

cat <<EOF

Next steps:
  1. Edit $env_file (at least CHIFFON_AMQP_URL and CHIFFON_AGENT_TYPE).
  2. Start the worker now and at every boot:
       systemctl enable --now chiffon-worker
     or, for several workers on this host, one env file per instance:
       cp $conf_dir/chiffon-worker.env.example $conf_dir/NAME.env
       chmod 0640 $conf_dir/NAME.env && chgrp $SERVICE_GROUP $conf_dir/NAME.env
       systemctl enable --now chiffon-worker@NAME
  3. Follow it: systemctl status chiffon-worker; journalctl -u chiffon-worker -f
EOF
