//! What duplex keeps about itself on each node, in its `duplex` schema, and the one
//! way that schema changes: numbered migrations ([`migrations`]), applied in order by
//! `duplex setup` under its lock and recorded in `duplex.schema_version`.
//!
//! [`positions`] is where each direction into the node stands, [`directions`] in
//! what state; [`slots`] what
//! duplex knows of the slots it created (stream id, acknowledged offset, a lost
//! topic); [`streams`] records where each slot stream begins on each topic, so that a
//! direction's first start knows the first offset of the stream it must apply.

pub(crate) mod directions;
pub(crate) mod migrations;
pub(crate) mod positions;
pub(crate) mod slots;
pub(crate) mod streams;
