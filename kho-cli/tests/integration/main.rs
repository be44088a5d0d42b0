//! End-to-end tests of the `kho` binary against `fixtures/`.

mod commands;
mod common;
mod fixtures;
mod golden;
