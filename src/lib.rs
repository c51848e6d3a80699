//! `pim-job-queue`: a job-queue worker for Akeneo PIM and other PHP product-information systems.
//!
//! The crate is cut by role, so the file list is the architecture:
//!
//! * Reading what the operator asked for: [`cli`] (command line), [`config`] (`worker.toml`),
//!   [`instance`] (the per-instance `N.conf` queue list), [`units`] (durations and byte sizes).
//! * Keeping jobs: [`store`] defines one trait per role ([`store::roles`]: schema, queue,
//!   fleet, admin) that the backends implement; all SQL lives below it, the statements the
//!   native backends share written once.
//! * Doing the work: [`consumer`] is the daemon loop (priority claim, limits, stop requests),
//!   [`runner`] starts one job as a child process group and watches it, [`template`] turns a
//!   configured argv template into a job's argv.
//! * Talking to the outside: [`logging`], [`commands`] (the one-shot subcommands) and [`exit`]
//!   (sysexits-style exit codes shared by every failure path).

pub mod akeneo;
pub mod breaker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod exit;
pub mod fleet;
pub mod instance;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod runner;
pub mod schedule;
pub mod secrets;
pub mod signals;
pub mod store;
pub mod template;
pub mod units;
pub mod wake;
pub mod worker;
