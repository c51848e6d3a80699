//! Exit codes and the error type every command returns.
//!
//! Operators and systemd act on exit codes (`RestartPreventExitStatus=78` keeps a bad
//! configuration from looping), so each failure path picks one of the sysexits(3) codes below
//! instead of a generic 1.

use std::fmt;

/// The sysexits(3) codes this program uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The command line was wrong.
    Usage = 64,
    /// The input data (a payload, a job id, a job's state) was wrong.
    DataErr = 65,
    /// The thing asked for (a job id) does not exist.
    NoInput = 66,
    /// The database could not be reached.
    Unavailable = 69,
    /// A bug or an unexpected database answer.
    Software = 70,
    /// An output file could not be written (`metrics --output`).
    CantCreat = 73,
    /// This user may not do it (write the job store).
    NoPerm = 77,
    /// A temporary failure; trying again later may work. The daemon also exits with it when
    /// stop-workers asks it to: the unit restarts it (`RestartForceExitStatus=75`).
    TempFail = 75,
    /// A configuration file, an instance conf or the schema version is wrong.
    Config = 78,
    /// `check` only, as monitoring plugins exit: a threshold's warning level was passed.
    Warning = 1,
    /// `check` only: a threshold's critical level was passed.
    Critical = 2,
    /// `check` only: the state could not be learnt (the database did not answer, a
    /// threshold could not be read).
    Unknown = 3,
}

impl ExitCode {
    /// The daemon's "restart me" exit, after stop-workers.
    #[allow(non_upper_case_globals)]
    pub const Restart: ExitCode = ExitCode::TempFail;

    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A command failed; `message` says why, for the operator, and `exit` says how the process ends.
#[derive(Debug)]
pub struct Failure {
    pub exit: ExitCode,
    pub message: String,
}

impl Failure {
    pub fn new(exit: ExitCode, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ExitCode::Config, message)
    }

    pub fn data(message: impl Into<String>) -> Self {
        Self::new(ExitCode::DataErr, message)
    }

    /// An exit whose reason the command has already printed (`check`'s state line):
    /// nothing more is said.
    pub fn already_said(exit: ExitCode) -> Self {
        Self::new(exit, String::new())
    }

    pub fn is_already_said(&self) -> bool {
        self.message.is_empty()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}
