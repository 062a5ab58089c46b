//! The operator's side of the control plane: what `outpost deadletters` and `outpost module`
//! use to talk to a gateway over MQTT.
//!
//! - [`exchange`]: one short-lived MQTT connection (TCP or TLS, with or without a login) that
//!   subscribes where the answers come, publishes a request and reads the answers.
//! - [`dead_letters`]: the dead-letter requests (list, show, replay, purge), which reply to
//!   believe, and how to print it.
//! - [`modules`]: the module requests (signed deploys and commands, list) and their statuses.
//!
//! The topics' contracts are the gateway's ([`crate::control`]); this side only speaks them.

pub mod dead_letters;
pub mod exchange;
pub mod modules;
