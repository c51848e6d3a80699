//! Integration tests: the real `pim-job-queue` binary against real database files and
//! servers. One test binary, so the suite builds and links once.

mod support;

mod akeneo;
mod akeneo_launch;
mod caps;
mod check;
mod cli;
mod conformance;
mod consume;
mod errors;
mod faults;
mod fleet;
mod hostile;
mod instance;
mod metrics;
mod pause;
mod properties;
mod schedule;
mod secrets;
mod systemd;
mod wake;
