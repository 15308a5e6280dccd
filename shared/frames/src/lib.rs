//! Change detection for live frame streams.
//!
//! The gateway keeps the previous frame of each stream and asks this crate whether the next one
//! differs enough to be worth sending through the model again. Everything here is plain image
//! processing on 8-bit RGB pixels: no model math and no networking, so the gateway stays
//! model-free (see DESIGN.md, "Frame streams").
//!
//! - [`decode`] turns PNG/JPEG/WebP bytes into a [`Frame`], refusing oversized frames from their
//!   header before any pixel buffer is allocated ([`FrameLimits`]).
//! - [`compare`] measures, block by block, how a frame differs from a reference frame
//!   ([`Change`]), in one pass with memory proportional to one row of blocks.
//! - [`relative_box`] turns a changed region into the 0–1000 coordinates GUI agents use.
//! - [`synthetic`] draws a deterministic clip (a shape moving between still stretches) that the
//!   bundled demo model understands, for benchmarks, tests and the demo.

mod change;
mod decode;
pub mod synthetic;

pub use change::{compare, relative_box, Change, PixelBox};
pub use decode::{decode, header, Frame, FrameError, FrameHeader, FrameLimits};
