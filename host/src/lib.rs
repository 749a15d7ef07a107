//! The `soulbox` binary's library half: the composition root ([`app`]), the HTTP API
//! ([`server`], with E2B's control plane in [`e2b`], envd's data plane in `envd` and the code
//! interpreter in `interpreter`) and the command-line interface ([`cli`]). `main.rs` only
//! calls [`cli::main`].

pub mod admission;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod e2b;
mod envd;
mod interpreter;
pub mod quotas;
mod remote;
pub mod server;
pub mod telemetry;
#[cfg(feature = "native")]
pub mod templates;
pub mod terminal;
pub mod tokens;
