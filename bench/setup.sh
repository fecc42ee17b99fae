#!/bin/sh
# Installs the load tools the bench needs, from Debian's packages: wrk, and Postfix for
# smtp-sink/smtp-source (Postfix itself is installed unconfigured and not started).
set -eu
missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v smtp-sink >/dev/null || missing="$missing postfix"
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
