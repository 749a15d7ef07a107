//! SoulBox's end-to-end tests: real wasmtime, real language packs from the registries, real
//! HTTP over sockets. The packs are installed once into a shared data directory (see
//! `soulbox_tests::wasm_backend`); the first run on a machine takes a few minutes for that.

mod admission;
mod auth;
mod build;
mod cells;
mod e2b_control;
mod e2b_sdk;
mod envd;
mod escape;
mod http;
mod isolation;
mod layers;
mod limits;
mod manager;
mod native;
mod native_escape;
mod packs;
mod plugin;
mod registry;
mod templates;
mod terminal;
mod warm;
mod workers;
