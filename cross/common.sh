# Shared by the cross/ scripts (sourced, from the repository root).

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

# The targets in dist/ that are packaged: the static builds and armv7's
# glibc one; the native aarch64 build (cross/build --all) would clash with
# the static arm64 package's name.
packaged_targets() {
    (cd dist && ls -d */ | tr -d / | grep -v '^aarch64-unknown-linux-gnu$')
}
