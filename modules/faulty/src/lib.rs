//! `faulty`: a test fixture that misbehaves on request, so the runtime's limits can be tested
//! against a real component. It is not an example of a handler.
//!
//! The payload of each event selects what happens (sizes in MiB are 2^20 bytes):
//!
//! | payload | behaviour | what stops it (default limits) |
//! | --- | --- | --- |
//! | `trap` | panics, which traps the instance | the trap itself |
//! | `error` | fails the batch with `Err("requested error")` | |
//! | `loop` | spins forever | the invocation deadline |
//! | `grow` | allocates without bound | the memory cap |
//! | `big-output` | returns one output of 10 MiB (bytes `x`) on the event's topic | the output size cap (8 MiB) |
//! | `many-outputs` | returns 5 000 empty outputs on the event's topic | nothing: under the count cap (10 000) |
//! | `many-outputs:N` | returns `N` empty outputs on the event's topic | the count cap when `N` exceeds it |
//! | `huge-log` | logs one 50 MiB line, then echoes the event | the memory cap (the guest cannot hold 50 MiB) |
//! | `huge-log:N` | logs one line of `N` MiB, then echoes the event | nothing: the host cuts the line to 4 KiB |
//! | `huge-key` | `kv-set` with a 10 MiB key | the host's key limit (1 KiB): a trap |
//! | `huge-value` | `kv-set` with a 10 MiB value | the host's value limit (1 MiB): a trap |
//! | `kv-flood` | 16 `kv-set`s of 1 MiB values under distinct keys | the host's limit per invocation (8 MiB): a trap |
//! | anything else | echoed as one output with the same topic and payload | |
//!
//! A malformed `N` fails the batch with an error naming the payload.

use outpost_handler::bindings::outpost::handler::host;
use outpost_handler::{kv, Event, Output};
use std::hint::black_box;

outpost_handler::handler!(faulty);

/// One MiB.
const MIB: usize = 1 << 20;

fn faulty(batch: Vec<Event>) -> Result<Vec<Output>, String> {
    let mut outputs = Vec::new();
    for event in batch {
        let payload = event.payload.as_slice();
        match payload {
            b"trap" => panic!("requested trap"),
            b"error" => return Err("requested error".to_string()),
            b"loop" => spin(),
            b"grow" => hoard(),
            b"big-output" => outputs.push(Output::new(event.topic, vec![b'x'; 10 * MIB])),
            b"many-outputs" => many(&mut outputs, &event.topic, 5_000),
            b"huge-log" => {
                huge_log(50);
                outputs.push(Output::new(event.topic, event.payload));
            }
            b"huge-key" => kv::set(&"k".repeat(10 * MIB), b"v"),
            b"huge-value" => kv::set("huge-value", vec![b'v'; 10 * MIB]),
            b"kv-flood" => {
                let value = vec![b'v'; MIB];
                for n in 0..16 {
                    kv::set(&format!("flood-{n}"), &value);
                }
            }
            _ => {
                if let Some(count) = payload.strip_prefix(b"many-outputs:") {
                    let count = number(count, payload)?;
                    many(&mut outputs, &event.topic, count);
                } else if let Some(mib) = payload.strip_prefix(b"huge-log:") {
                    huge_log(number(mib, payload)?);
                    outputs.push(Output::new(event.topic, event.payload));
                } else {
                    outputs.push(Output::new(event.topic, event.payload));
                }
            }
        }
    }
    Ok(outputs)
}

/// The decimal number in `digits`, or an error naming the whole `payload`.
fn number(digits: &[u8], payload: &[u8]) -> Result<usize, String> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| format!("malformed payload {:?}", String::from_utf8_lossy(payload)))
}

/// Appends `count` empty outputs on `topic`.
fn many(outputs: &mut Vec<Output>, topic: &str, count: usize) {
    outputs.extend((0..count).map(|_| Output::new(topic, Vec::new())));
}

/// Logs one line of `mib` MiB, through the host import directly so the guest holds the text
/// only once.
fn huge_log(mib: usize) {
    let line = "x".repeat(mib * MIB);
    host::log(host::Level::Info, &line);
}

/// Never returns; `black_box` keeps the loop from being optimised into something else.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates (and touches) one MiB after another until allocation fails, which aborts.
fn hoard() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1; 1 << 20]);
        black_box(&hoard);
    }
}
