# Shared by the cross/ scripts and scripts/test (sourced, from the
# repository root).

# The workspace version, as packages are named.
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"

# The Debian architecture of a Rust target.
arch_of() {
    case "$1" in
        aarch64-*) echo arm64 ;;
        armv7-*|arm-*) echo armhf ;;
        x86_64-*) echo amd64 ;;
        *) return 1 ;;
    esac
}

# The targets in dist/ that are packaged (of flavour $1 only, when
# given): the static build per Debian architecture, and the native (glibc)
# builds for amd64 and arm64. Left out: the ARMv6 build (cross/build
# --all), which would clash with the armhf package's name, and a glibc
# armv7 build when the static one is there.
packaged_targets() {
    local t
    (cd dist && ls -d */ | tr -d / | grep -v -e '^arm-unknown-linux-musleabihf$' \
        | if [[ -d armv7-unknown-linux-musleabihf ]]; then grep -v '^armv7-unknown-linux-gnueabihf$'; else cat; fi) \
        | while read -r t; do
            if [[ -z "${1:-}" || "$(flavour_of "$t")" == "$1" ]]; then echo "$t"; fi
        done
}

# The flavour of a Rust target: native for the glibc builds of amd64 and
# arm64 (with ONNX Runtime and LiteRT), static otherwise.
flavour_of() {
    case "$1" in
        x86_64-unknown-linux-gnu|aarch64-unknown-linux-gnu) echo native ;;
        *) echo static ;;
    esac
}

# The Debian package a target's build goes into.
package_of() {
    if [[ "$(flavour_of "$1")" == native ]]; then echo edgefleet-agent-native; else echo edgefleet-agent; fi
}

# The .deb file of a target's build.
deb_of() { echo "dist/$(package_of "$1")_${version}_$(arch_of "$1").deb"; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Starts a fleet server (host debug build in $host, embedded broker with
# device authentication) with its data under $1; sets server_pid and
# exports FLEETCTL_SERVER and EDGEFLEET_TOKEN for fleetctl. The caller
# stops it (kill "$server_pid").
start_fleet_server() {
    local dir="$1" http_port mqtt_port
    http_port="$(free_port)"
    mqtt_port="$(free_port)"
    "$host/fleetctl" keys init --dir "$dir/keys" >/dev/null
    EDGEFLEET_LOG=warn "$host/fleet-server" serve --data-dir "$dir/server" --keys-dir "$dir/keys" \
        --http "127.0.0.1:$http_port" --mqtt-listen "127.0.0.1:$mqtt_port" --device-auth \
        >"$dir/server.log" 2>&1 &
    server_pid=$!
    export FLEETCTL_SERVER="http://127.0.0.1:$http_port"
    for _ in $(seq 100); do
        curl -fsS "$FLEETCTL_SERVER/api/v1/health" >/dev/null 2>&1 && break
        sleep 0.2
    done
    EDGEFLEET_TOKEN="$(cat "$dir/server/admin.token")"
    export EDGEFLEET_TOKEN
}

# The board profile (devices/) a target's device is enrolled with.
profile_of() {
    case "$1" in
        aarch64-*) echo devices/raspberry-pi-64/agent.toml ;;
        armv7-*|arm-*) echo devices/raspberry-pi-32/agent.toml ;;
        *) echo devices/agent.toml ;;
    esac
}

# Enrolls device $2 with target $3's board profile (host fleetctl in
# $host), its bundle in $1/bundle, and writes $1/agent.toml: the bundle's
# config with the data dir, root document and socket moved under $1, so
# the agent runs here as it would on the board.
enroll_local() {
    local dir="$1" id="$2" target="$3"
    "$host/fleetctl" devices enroll --id "$id" --hardware smoke --out "$dir/bundle" \
        --profile "$(profile_of "$target")" >/dev/null
    sed -e "s#/var/lib/edgefleet#$dir/data#" -e "s#/etc/edgefleet/root.json#$dir/bundle/root.json#" \
        -e "s#/run/edgefleet/agent.sock#$dir/agent.sock#" "$dir/bundle/agent.toml" > "$dir/agent.toml"
}

# Installs Debian packages (with sudo unless root).
apt_install() {
    local sudo=""
    [[ "$(id -u)" != 0 ]] && sudo=sudo
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Prints the mirror this machine's own apt sources use for the Debian
# suite $1 (deb822 `.sources` files and one-line `.list` files, in apt's
# order), so debootstrap fetches from the same place apt-get does. Fails
# when no enabled `deb` source carries that suite.
apt_mirror() {
    python3 - "$1" <<'PY'
import glob, sys

suite = sys.argv[1]
files = ["/etc/apt/sources.list"] + sorted(
    glob.glob("/etc/apt/sources.list.d/*.list") + glob.glob("/etc/apt/sources.list.d/*.sources")
)

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""

def one_line(text):
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=... signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], [words[1]]

def deb822(text):
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()

for path in files:
    text = read(path)
    for uri, suites in (deb822(text) if path.endswith(".sources") else one_line(text)):
        if suite in suites and not uri.startswith("cdrom:"):
            print(uri)
            sys.exit(0)
sys.exit(1)
PY
}
