//! The control plane: MQTT topics under `outpost/<gateway_id>/` on the gateway's own broker
//! (and, for modules, on an upstream) through which an operator manages a running gateway.
//!
//! - [`dead_letters`]: list, show, replay and purge dead letters.
//! - [`modules`]: deploy, roll back, remove and list handler modules, and the periodic metrics
//!   publication.
//!
//! It sits beside the data path: it reads and changes the store and the handler registry, and
//! wakes the stages it changed work for. The operator's side of these topics is [`crate::client`].

pub mod dead_letters;
pub(crate) mod modules;
