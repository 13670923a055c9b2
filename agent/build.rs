//! Passes the target triple to the agent's code: a device reports it, and
//! takes the build of an agent release made for it.
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=EDGEFLEET_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
