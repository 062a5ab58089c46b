//! The real geographic data of `tests/data/` (see its README), for the geography tests and
//! benchmarks, which include this file by its path: where the files are, and the EU's member
//! states as Natural Earth 1:110m names them.

#![allow(dead_code)]

use std::path::PathBuf;

/// The EU's member states as named in Natural Earth 1:110m (Malta is too small to be in it).
pub const EU: [&str; 26] = [
    "Austria",
    "Belgium",
    "Bulgaria",
    "Croatia",
    "Cyprus",
    "Czechia",
    "Denmark",
    "Estonia",
    "Finland",
    "France",
    "Germany",
    "Greece",
    "Hungary",
    "Ireland",
    "Italy",
    "Latvia",
    "Lithuania",
    "Luxembourg",
    "Netherlands",
    "Poland",
    "Portugal",
    "Romania",
    "Slovakia",
    "Slovenia",
    "Spain",
    "Sweden",
];

/// The path of `file` in `tests/data/`.
pub fn data(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file)
}
