//! The pruner: deletes finished jobs older than their retention (`retention` for succeeded
//! and cancelled ones, `failed_retention` for failed ones), one short batch a round, on
//! a task of its own. Rounds follow each other a heartbeat apart while there is a backlog,
//! ten minutes apart otherwise; several workers pruning at once only share the work.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::FleetTimings;
use crate::store::{Finished, FleetStore, Timestamp};

/// How often old finished jobs are pruned, when there is no backlog.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Finished jobs deleted per pruning round: one short statement, never a long loop.
const PRUNE_BATCH: i64 = 5000;

pub(super) struct Pruner {
    pub(super) store: Arc<dyn FleetStore>,
    pub(super) timings: FleetTimings,
}

impl Pruner {
    pub(super) async fn run(self) {
        loop {
            let backlog = self.prune_round().await;
            let pause = if backlog {
                self.timings.heartbeat_interval
            } else {
                PRUNE_EVERY
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Deletes one batch of each kind of finished job older than its retention; true when a
    /// full batch went (more may be waiting: the next round comes at the next tick).
    async fn prune_round(&self) -> bool {
        let mut backlog = false;
        for (kind, retention) in [
            (Finished::Done, self.timings.retention),
            (Finished::Failed, self.timings.failed_retention),
        ] {
            if let Some(retention) = retention {
                backlog |= self.prune_kind(kind, retention).await;
            }
        }
        backlog
    }

    async fn prune_kind(&self, kind: Finished, retention: Duration) -> bool {
        let before = Timestamp::now().minus(retention);
        match self.store.prune_batch(kind, before, PRUNE_BATCH).await {
            Ok(0) => false,
            Ok(pruned) => {
                info!(
                    "pruned {pruned} {} job(s) older than their retention",
                    kind.describe()
                );
                pruned >= PRUNE_BATCH as u64
            }
            Err(error) => {
                warn!("could not prune finished jobs: {error}");
                false
            }
        }
    }
}
