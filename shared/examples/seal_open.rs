//! What signing costs per MQTT message: times sealing one realistic
//! telemetry message (the agent's side: domain tag, topic and bytes signed
//! with the device key, wrapped in the envelope), opening it (the server's
//! side: parse the envelope, check the key is trusted, verify the ed25519
//! signature) and, for scale, parsing the same bytes as a
//! `TelemetryMessage`. Prints microseconds per operation and open/parse.
//!
//! Natively:
//!
//! ```text
//! cargo run --release --locked -p edgefleet-shared --example seal_open [N]
//! ```
//!
//! On aarch64 under qemu user-mode emulation (a pessimistic stand-in for a
//! Raspberry Pi, not a measurement of one; the static musl build, as the
//! agent ships), with zig from the venv `cross/build` sets up
//! (`~/.cache/edgefleet/zig-venv/bin` on `PATH`):
//!
//! ```text
//! cargo zigbuild --release --locked -p edgefleet-shared --example seal_open \
//!     --target aarch64-unknown-linux-musl
//! qemu-aarch64-static target/aarch64-unknown-linux-musl/release/examples/seal_open 2000
//! ```
//!
//! (`target/` or wherever `CARGO_TARGET_DIR` points.)
//!
//! `N` is the number of timed operations of each kind (default 2000),
//! after a warm-up of N/10.

#![allow(clippy::unwrap_used)] // a measurement run: a failed unwrap ends it

use std::hint::black_box;
use std::time::Instant;

use edgefleet_shared::signed_message::seal;
use edgefleet_shared::{
    DeviceId, SecretKey, SignedMessage, TelemetryMessage, TopicKind, TopicPrefix,
};

/// One telemetry message as the agent publishes it, serialised the way
/// the agent does.
fn telemetry() -> Vec<u8> {
    let device = DeviceId::new("pi-00042").expect("a valid device id");
    serde_json::to_vec(&TelemetryMessage::example(device, 1_234)).expect("telemetry serialises")
}

/// Microseconds per call of `f`, over `n` calls after `warm` untimed ones.
fn per_op_us(n: u32, warm: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let n: u32 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().unwrap_or_else(|_| {
            eprintln!("usage: seal_open [N]  (N: operations of each kind, default 2000)");
            std::process::exit(2)
        }),
        None => 2_000,
    };
    let n = n.max(1);
    let warm = (n / 10).max(1);

    let key = SecretKey::from_seed([7; 32]);
    let trusted = [key.public()];
    let device = DeviceId::new("pi-00042".to_string()).expect("a valid device id");
    let topic = TopicPrefix::default()
        .device(&device, TopicKind::Telemetry)
        .to_string();
    let body = telemetry();
    let sealed = seal(&topic, &body, &key);
    // The envelope must open to the very bytes that were sealed.
    assert_eq!(
        SignedMessage::open(&sealed, &topic, trusted.iter()).expect("opens"),
        body.as_slice()
    );

    let seal_us = per_op_us(n, warm, || {
        black_box(seal(black_box(&topic), black_box(&body), &key));
    });
    let open_us = per_op_us(n, warm, || {
        black_box(SignedMessage::open(black_box(&sealed), &topic, trusted.iter()).unwrap());
    });
    let parse_us = per_op_us(n, warm, || {
        black_box(serde_json::from_slice::<TelemetryMessage>(black_box(&body)).unwrap());
    });

    println!(
        "one {}-byte telemetry message ({}-byte envelope), {n} ops each, {} {}",
        body.len(),
        sealed.len(),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    println!("seal  {seal_us:8.1} µs/op");
    println!("open  {open_us:8.1} µs/op");
    println!("parse {parse_us:8.1} µs/op");
    println!("open/parse {:.1}x", open_us / parse_us);
}
