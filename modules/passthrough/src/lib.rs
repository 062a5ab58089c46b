//! `passthrough`: the smallest useful handler, for benchmarks and tests. Every event becomes
//! one output with the event's topic and payload unchanged, in batch order, so what it costs
//! is the runtime's own overhead: instantiation, copying the batch in and the outputs out.
//! It is not an example of a handler (it does nothing a route without a handler does not).

use outpost_handler::{Event, Output};

outpost_handler::handler!(passthrough);

fn passthrough(batch: Vec<Event>) -> Result<Vec<Output>, String> {
    Ok(batch
        .into_iter()
        .map(|event| Output::new(event.topic, event.payload))
        .collect())
}
