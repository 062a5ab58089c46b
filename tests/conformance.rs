//! Conformance of the local broker (issue 13, items 4-11): each scenario checks one
//! behaviour the MQTT specifications require (the section is named in its doc comment) and
//! runs, unchanged, against outpost and against Debian's Mosquitto 2 (`/usr/sbin/mosquitto`,
//! started by the test on a free port with a configuration written by the test), so the
//! suite itself is checked against a real broker. A scenario is a `fn(&Target)`; `both!`
//! makes it two tests, `<scenario>::outpost` and `<scenario>::mosquitto`, so a failure names
//! the broker. Where Mosquitto 2.0.11 does not conform, or answers differently where the spec
//! leaves no choice, the scenario runs against outpost only (`outpost_only!`) and a comment
//! says what Mosquitto does instead; where the spec leaves a choice, outpost does what
//! Mosquitto does and the scenario checks it on both.
//!
//! The client (`common/mqtt.rs`) is a raw MQTT 3.1.1 / 5 client over a socket, so the
//! tests see DUP flags, packet ids, properties and reason codes as sent, and can misbehave.
//! Checks that something does not happen use a sentinel (a later message on the same path
//! that must arrive first) rather than a sleep wherever the protocol allows one.
//!
//! Related checks elsewhere: `tests/broker_guards.rs` (forbidden packets, wildcard publish
//! topics and invalid filters such as `a/#/b`, CONNECT rules; also against Mosquitto),
//! `tests/local_broker.rs` (the same features through `mosquitto_sub`/`mosquitto_pub`, and
//! durability across `kill -9`).

#[macro_use]
mod common;

/// The tests `scenario::outpost` and `scenario::mosquitto`, running `scenario` against each:
/// `both!(scenario)` with both brokers' defaults, `both!(scenario, SETUP)` with a
/// [`target::Setup`] constant of the scenario's module.
macro_rules! both {
    ($scenario:ident) => {
        both!(@tests $scenario, $crate::target::DEFAULTS,);
    };
    ($scenario:ident, $setup:ident) => {
        both!(@tests $scenario, super::$setup,);
    };
    (@tests $scenario:ident, $setup:expr,) => {
        mod $scenario {
            #[test]
            fn outpost() {
                $crate::target::run($crate::target::Kind::Outpost, &$setup, super::$scenario);
            }

            #[test]
            fn mosquitto() {
                $crate::target::run($crate::target::Kind::Mosquitto, &$setup, super::$scenario);
            }
        }
    };
}

/// The test `scenario::outpost` only, for where Mosquitto 2.0.11 does not conform (the call
/// site says what it does instead): `outpost_only!(scenario)`, `outpost_only!(scenario,
/// SETUP)`.
macro_rules! outpost_only {
    ($scenario:ident) => {
        outpost_only!(@tests $scenario, $crate::target::DEFAULTS);
    };
    ($scenario:ident, $setup:ident) => {
        outpost_only!(@tests $scenario, super::$setup);
    };
    (@tests $scenario:ident, $setup:expr) => {
        mod $scenario {
            #[test]
            fn outpost() {
                $crate::target::run($crate::target::Kind::Outpost, &$setup, super::$scenario);
            }
        }
    };
}

#[path = "conformance/target.rs"]
mod target;

#[path = "conformance/flow.rs"]
mod flow;
#[path = "conformance/properties.rs"]
mod properties;
#[path = "conformance/qos.rs"]
mod qos;
#[path = "conformance/retained.rs"]
mod retained;
#[path = "conformance/sessions.rs"]
mod sessions;
#[path = "conformance/subscriptions.rs"]
mod subscriptions;
#[path = "conformance/wills.rs"]
mod wills;
