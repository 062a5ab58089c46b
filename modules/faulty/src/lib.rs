//! `faulty`: a test fixture that misbehaves on request, so the runtime's limits can be tested
//! against a real component. It is not an example of a handler.
//!
//! The payload of each event selects what happens:
//!
//! | payload | behaviour |
//! | --- | --- |
//! | `trap` | panics, which traps the instance |
//! | `error` | fails the batch with `Err("requested error")` |
//! | `loop` | spins forever; only the invocation deadline stops it |
//! | `grow` | allocates without bound; only the memory cap stops it |
//! | anything else | echoed as one output with the same topic and payload |

use outpost_handler::{Event, Output};
use std::hint::black_box;

outpost_handler::handler!(faulty);

fn faulty(batch: Vec<Event>) -> Result<Vec<Output>, String> {
    let mut outputs = Vec::new();
    for event in batch {
        match event.payload.as_slice() {
            b"trap" => panic!("requested trap"),
            b"error" => return Err("requested error".to_string()),
            b"loop" => spin(),
            b"grow" => hoard(),
            _ => outputs.push(Output::new(event.topic, event.payload)),
        }
    }
    Ok(outputs)
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
