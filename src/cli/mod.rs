//! The binary's operator tools, outside the library: `outpost bench` (measures a gateway) and
//! `outpost demo` (runs one end to end against a real upstream).

pub mod bench;
pub mod demo;
