//! Images as the data plane sees them: the manifest (block digests that
//! merge into the image's BLAKE3, zero blocks, each block's wire
//! encoding), prepared (compressed) blocks, FEC block encoding and
//! assembly (RaptorQ), and the BLAKE3 lanes that tag datagrams.
//!
//! Owns: the manifest file format, block digests, symbol encoding and
//! decoding. Must not: know about waves, sockets or receivers.

pub mod fec;
pub mod lanes;
pub mod manifest;
pub mod packed;
