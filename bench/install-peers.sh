#!/usr/bin/env bash
# Installs the peer MTAs of the benchmark side by side with the machine's Postfix, each under
# ~/.cache/mailroute-bench/peers/<name>-<version>/ (reused when that version is already there),
# and writes a manifest that bench-run reads (--peers-manifest):
#   <name>\tok\t<version>\t<program>        or        <name>\tfailed\t<version>\t<reason>
# Usage: bench/install-peers.sh [MANIFEST] [exim,opensmtpd,haraka,maddy]
# Exim and OpenSMTPD are Debian packages that conflict with Postfix as MTAs: their .debs are
# extracted (dpkg-deb -x), never installed, so the system's Postfix stays as it is. Haraka comes
# from npm, maddy is built from its Go module's source. Heavy steps run under `nice -n 10`.
set -uo pipefail

CACHE="${MAILROUTE_PEERS_CACHE:-$HOME/.cache/mailroute-bench/peers}"
MANIFEST="${1:-$CACHE/manifest.tsv}"
WANT="${2:-exim,opensmtpd,haraka,maddy}"
HARAKA_VERSION="${HARAKA_VERSION:-3.3.4}"
MADDY_VERSION="${MADDY_VERSION:-v0.8.1}"
mkdir -p "$CACHE"
: >"$MANIFEST"

ok() { printf '%s\tok\t%s\t%s\n' "$1" "$2" "$3" >>"$MANIFEST"; echo "peer $1 $2: $3"; }
failed() { # failed NAME VERSION REASON
  printf '%s\tfailed\t%s\t%s\n' "$1" "$2" "$(echo "$3" | tr '\t\n' '  ' | cut -c1-300)" >>"$MANIFEST"
  echo "peer $1 $2 not installed: $3" >&2
}
wanted() { case ",$WANT," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

apt_updated=""
apt_update_once() { if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null 2>&1 || true; apt_updated=1; fi; }

# deb_extract NAME PACKAGE... : downloads each package's .deb of the candidate version and
# extracts it into $CACHE/NAME-<version of the first package>/root; prints that root.
deb_version() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
deb_extract() {
  local name="$1" first="$2"; shift
  local version dir
  version="$(deb_version "$first")"
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt_update_once
    version="$(deb_version "$first")"
  fi
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "no Debian package $first" >&2
    return 1
  fi
  dir="$CACHE/$name-$version"
  if [ ! -f "$dir/.done" ]; then
    rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root" || return 1
    (cd "$dir/debs" && apt-get download -qq "$@" >/dev/null 2>&1) || {
      apt_update_once
      (cd "$dir/debs" && apt-get download -qq "$@") || { echo "apt-get download $* failed" >&2; return 1; }
    }
    for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root" || return 1; done
    touch "$dir/.done"
  fi
  echo "$version"
}
# missing_libs PROGRAM: shared libraries the program needs that the machine lacks.
missing_libs() { ldd "$1" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' '; }

if wanted exim; then
  if v="$(deb_extract exim exim4-daemon-light)"; then
    prog="$CACHE/exim-$v/root/usr/sbin/exim4"
    # Exim re-executes itself with a cleaned environment, so LD_LIBRARY_PATH cannot carry
    # its libraries: the few it lacks are installed (plain libraries, no MTA among them).
    id Debian-exim >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin Debian-exim 2>/dev/null
    if [ -n "$(missing_libs "$prog")" ]; then
      apt_update_once
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libidn12 >/dev/null 2>&1 || true
    fi
    libs="$(missing_libs "$prog")"
    if [ ! -x "$prog" ]; then failed exim "$v" "no $prog in the package"
    elif [ -n "$libs" ]; then failed exim "$v" "missing shared libraries: $libs"
    elif ! id Debian-exim >/dev/null 2>&1; then failed exim "$v" "user Debian-exim could not be created (needs root)"
    else ok exim "$v" "$prog"; fi
  else
    failed exim "-" "Debian package exim4-daemon-light could not be downloaded"
  fi
fi

if wanted opensmtpd; then
  if v="$(deb_extract opensmtpd opensmtpd)"; then
    prog="$CACHE/opensmtpd-$v/root/usr/sbin/smtpd"
    libs="$(missing_libs "$prog")"
    if [ ! -x "$prog" ]; then failed opensmtpd "$v" "no $prog in the package"
    elif [ -n "$libs" ]; then failed opensmtpd "$v" "missing shared libraries: $libs"
    else
      # smtpd's privilege separation needs the users its Debian build names, chrooting into
      # their home, as the package's postinst creates them; its spool /var/spool/smtpd is
      # compiled in.
      mkdir -p /var/lib/opensmtpd/empty
      for u in opensmtpd opensmtpq; do
        getent group "$u" >/dev/null 2>&1 || groupadd --system "$u" 2>/dev/null
        if id "$u" >/dev/null 2>&1; then usermod --home /var/lib/opensmtpd/empty "$u" >/dev/null 2>&1
        else useradd --system --gid "$u" --no-create-home --home-dir /var/lib/opensmtpd/empty --shell /usr/sbin/nologin "$u" 2>/dev/null; fi
      done
      if id opensmtpd >/dev/null 2>&1 && id opensmtpq >/dev/null 2>&1; then ok opensmtpd "$v" "$prog"
      else failed opensmtpd "$v" "users opensmtpd/opensmtpq could not be created (needs root)"; fi
    fi
  else
    failed opensmtpd "-" "Debian package opensmtpd could not be downloaded"
  fi
fi

if wanted haraka; then
  dir="$CACHE/haraka-$HARAKA_VERSION"
  if ! command -v npm >/dev/null 2>&1; then
    failed haraka "$HARAKA_VERSION" "npm is not installed"
  else
    if [ ! -f "$dir/.done" ]; then
      rm -rf "$dir" && mkdir -p "$dir"
      if (cd "$dir" && nice -n 10 npm install --no-audit --no-fund --omit=dev --loglevel=error "Haraka@$HARAKA_VERSION" >"$dir/npm.log" 2>&1); then
        touch "$dir/.done"
      fi
    fi
    if [ -x "$dir/node_modules/.bin/haraka" ]; then ok haraka "$HARAKA_VERSION" "$dir/node_modules/.bin/haraka"
    else failed haraka "$HARAKA_VERSION" "npm install Haraka@$HARAKA_VERSION failed: $(tail -n 3 "$dir/npm.log" 2>/dev/null)"; fi
  fi
fi

if wanted maddy; then
  dir="$CACHE/maddy-$MADDY_VERSION"
  if ! command -v go >/dev/null 2>&1; then
    failed maddy "$MADDY_VERSION" "Go is not installed"
  else
    if [ ! -f "$dir/.done" ]; then
      rm -rf "$dir" && mkdir -p "$dir/bin"
      # Built as the main module from its own source: maddy's go.mod replaces go-smtp, go-imap
      # and libdns-gandi with its forks, and a dependency's replace directives are ignored, so
      # `go install github.com/foxcpp/maddy/cmd/maddy@VERSION` does not compile.
      if (set -e
          src="$(go mod download -json "github.com/foxcpp/maddy@$MADDY_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
          [ -n "$src" ] || { echo "go mod download github.com/foxcpp/maddy@$MADDY_VERSION found no source"; exit 1; }
          cp -r "$src" "$dir/src" && chmod -R u+w "$dir/src"
          cd "$dir/src" && nice -n 10 go build -trimpath -o "$dir/bin/maddy" ./cmd/maddy) >"$dir/build.log" 2>&1; then
        touch "$dir/.done"
      fi
    fi
    if [ -x "$dir/bin/maddy" ]; then ok maddy "$MADDY_VERSION" "$dir/bin/maddy"
    else failed maddy "$MADDY_VERSION" "go build of github.com/foxcpp/maddy@$MADDY_VERSION failed: $(tail -n 3 "$dir/build.log" 2>/dev/null)"; fi
  fi
fi
