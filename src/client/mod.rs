//! The operator's side of the control plane: what `outpost deadletters` and `outpost module`
//! use to talk to a gateway over MQTT.
//!
//! - [`exchange`]: one short-lived MQTT connection (TCP or TLS, with or without a login) that
//!   subscribes where the answers come, publishes a request and reads the answers.
//! - [`modules`]: the module requests (signed deploys and commands, list) and their statuses.

pub mod exchange;
pub mod modules;
