//! Faults injected into a real store, for tests of what the daemon does when the database
//! misbehaves in ways a proxy cannot stage: a call that answers late, one that fails with a
//! chosen error, and one whose work is done but whose reply is lost (the commit went
//! through, the connection died before the answer came back).

use std::sync::Mutex;
use std::time::Duration;

use super::wrap::{Call, CallHook, Wrapped};
use super::{Detail, StoreError};

/// What happens to a call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The call runs after this delay.
    Delay(Duration),
    /// The call does not run; it fails with this error.
    Fail(StoreError),
    /// The call runs; its result is replaced by "database unavailable".
    LoseReply,
}

/// Faults armed for calls by name (`claim`, `complete`, ..., as [`Wrapped`] names them),
/// each for a number of calls.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<(&'static str, Fault, u32)>>,
}

impl Faults {
    /// Applies `fault` to the next `times` calls named `what`.
    pub fn arm(&self, what: &'static str, fault: Fault, times: u32) {
        self.armed
            .lock()
            .expect("faults lock")
            .push((what, fault, times));
    }

    fn take(&self, what: &str) -> Option<Fault> {
        let mut armed = self.armed.lock().expect("faults lock");
        let index = armed
            .iter()
            .position(|(name, _, left)| *name == what && *left > 0)?;
        armed[index].2 -= 1;
        Some(armed[index].1.clone())
    }
}

impl CallHook for std::sync::Arc<Faults> {
    fn around<'a, T: Send + 'a>(&'a self, what: &'static str, call: Call<'a, T>) -> Call<'a, T> {
        let Some(fault) = self.take(what) else {
            return call;
        };
        Box::pin(async move {
            match fault {
                Fault::Delay(by) => {
                    tokio::time::sleep(by).await;
                    call.await
                }
                Fault::Fail(error) => Err(error),
                Fault::LoseReply => {
                    let _done = call.await;
                    Err(StoreError::Unavailable(Detail::from(format!(
                        "injected: the reply to `{what}` was lost"
                    ))))
                }
            }
        })
    }
}

/// A store with faults: arm them through the returned handle.
pub type Faulty<S> = Wrapped<S, std::sync::Arc<Faults>>;
