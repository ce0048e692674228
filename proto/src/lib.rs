//! Baton's event schema: the protobuf messages of package `baton.v1` (DESIGN.md §3).
//!
//! The code is generated at build time from `baton/v1/events.proto`. `fixtures/` holds golden
//! encodings of every message; the `golden` test decodes them so that a schema change which would
//! break events already in the stream fails the build.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/baton.v1.rs"));
}

pub use prost::Message;
pub use prost_types::Timestamp;
