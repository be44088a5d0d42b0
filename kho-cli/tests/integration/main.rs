//! End-to-end tests of the `kho` binary against `fixtures/`.

mod commands;
mod common;
mod demo;
mod diff;
mod fixtures;
mod golden;
mod terminal;
