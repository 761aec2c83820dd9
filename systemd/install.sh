#!/bin/sh
# Install, upgrade or uninstall Grace as a system service, from a checkout (run as root).
#
#   systemd/install.sh                      install, or upgrade in place (config and state kept)
#   systemd/install.sh --uninstall          remove programs, units and rules; keep config and state
#   systemd/install.sh --uninstall --purge  ... and delete /etc/graced, /var/lib/graced, the user
#
# Why a venv under /opt/grace: Debian refuses `pip install` into the system Python (PEP 668),
# and a package of our own would need a build per distribution. Each install is a fresh
# venv (/opt/grace/venv-VERSION-TIME) and /opt/grace/current points at the one in use, so an
# upgrade that fails to build, or whose graced refuses the existing config, changes nothing.
# The unit runs /opt/grace/current/bin/graced; /usr/local/bin has links for your shell.
set -eu

PREFIX=/opt/grace
ETC=/etc/graced
SRC=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'grace-install: %s\n' "$*"; }
die() { printf 'grace-install: %s\n' "$*" >&2; exit 1; }

uninstall=no purge=no
for arg in "$@"; do
    case $arg in
        --uninstall) uninstall=yes ;;
        --purge) purge=yes ;;
        -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $arg (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root"
[ "$purge" = no ] || [ "$uninstall" = yes ] || die "--purge goes with --uninstall"

if [ "$uninstall" = yes ]; then
    systemctl disable --now graced.service 2>/dev/null || true
    rm -f /etc/systemd/system/graced.service /etc/systemd/system/grace-action@.service \
        /etc/sysusers.d/graced.conf \
        /etc/tmpfiles.d/graced.conf /etc/polkit-1/rules.d/50-graced.rules \
        /usr/local/bin/graced /usr/local/bin/gracectl \
        /usr/local/share/man/man1/gracectl.1 /usr/local/share/man/man5/graced.toml.5 \
        /usr/local/share/man/man8/graced.8
    rm -rf "$PREFIX"
    systemctl daemon-reload
    if [ "$purge" = yes ]; then
        rm -rf "$ETC" /var/lib/graced /var/lib/private/graced
        userdel graced 2>/dev/null || true
        groupdel graced 2>/dev/null || true
        say "removed Grace, its config, its state and the graced user"
    else
        say "removed Grace; kept $ETC and /var/lib/graced (--uninstall --purge deletes them)"
    fi
    exit 0
fi

python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || die "needs Python 3.11 or newer as python3"
python3 -c 'import ensurepip, venv' 2>/dev/null || die "needs python3-venv (apt install python3-venv)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/pyproject.toml")
venv="$PREFIX/venv-$version-$(date +%Y%m%d%H%M%S)"
say "building $venv from $SRC"
mkdir -p "$PREFIX"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$SRC" \
    || { rm -rf "$venv"; die "pip install failed; nothing changed"; }

# The graced user and group, and /etc/graced readable by the service (root:graced 0750).
install -D -m 0644 "$SRC/systemd/graced.sysusers" /etc/sysusers.d/graced.conf
install -D -m 0644 "$SRC/systemd/graced.tmpfiles" /etc/tmpfiles.d/graced.conf
systemd-sysusers /etc/sysusers.d/graced.conf
if [ ! -e "$ETC/graced.toml" ]; then
    mkdir -p "$ETC"
    "$venv/bin/graced" config default > "$ETC/graced.toml.new"
    mv "$ETC/graced.toml.new" "$ETC/graced.toml"
    say "wrote the default config $ETC/graced.toml"
fi
systemd-tmpfiles --create /etc/tmpfiles.d/graced.conf
"$venv/bin/graced" config check "$ETC/graced.toml" \
    || { rm -rf "$venv"; die "the new graced refuses $ETC/graced.toml; nothing changed"; }

# polkit may let graced restart exactly the units its playbooks name, and start exactly
# the privileged actions (grace-action@NAME.service) their start_action steps name. The
# new graced writes the rule (its lists as JSON, so no name can escape its string) into
# a temporary file first: if that fails, nothing has changed yet.
mkdir -p /etc/polkit-1/rules.d
rule=/etc/polkit-1/rules.d/50-graced.rules
"$venv/bin/graced" config polkit-rule "$SRC/systemd/graced.polkit.rules" \
        --config "$ETC/graced.toml" > "$rule.new" \
    || { rm -f "$rule.new"; rm -rf "$venv"; die "could not write the polkit rule; nothing changed"; }
chmod 0644 "$rule.new"

# Switch to the new venv (atomically), then drop all but it and the one before.
old=$(readlink "$PREFIX/current" 2>/dev/null || true)
ln -sfn "$venv" "$PREFIX/current.new" && mv -T "$PREFIX/current.new" "$PREFIX/current"
for dir in "$PREFIX"/venv-*; do
    [ "$dir" = "$venv" ] || [ "$dir" = "$old" ] || rm -rf "$dir"
done
mv -f "$rule.new" "$rule"
ln -sfn "$PREFIX/current/bin/graced" /usr/local/bin/graced
ln -sfn "$PREFIX/current/bin/gracectl" /usr/local/bin/gracectl
for page in gracectl.1 graced.toml.5 graced.8; do
    section=${page##*.}
    install -D -m 0644 "$SRC/man/$page" "/usr/local/share/man/man$section/$page"
done

install -m 0644 "$SRC/systemd/graced.service" /etc/systemd/system/graced.service
# The template of privileged actions; each action is the administrator's own drop-in
# (graced(8), PRIVILEGED ACTIONS): without one, an instance cannot start.
install -m 0644 "$SRC/systemd/grace-action@.service" /etc/systemd/system/grace-action@.service
systemctl daemon-reload
if systemctl is-active --quiet graced.service; then
    systemctl restart graced.service
    say "upgraded to $version and restarted graced (config and state kept)"
else
    say "installed $version; start it with: systemctl enable --now graced"
fi
