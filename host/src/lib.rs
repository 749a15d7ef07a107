//! The `soulbox` binary's library half: the composition root ([`app`]), the HTTP API
//! ([`server`]) and the command-line interface ([`cli`]). `main.rs` only calls [`cli::main`].

pub mod app;
pub mod cli;
pub mod server;
