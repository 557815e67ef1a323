//! Device links: how bytes reach a session. Each link kind frames the byte stream with its
//! codec and hands a `Stream + Sink` of messages to [`crate::session::task::run`].

pub mod serial;
pub mod tcp;
