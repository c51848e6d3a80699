//! The native job store's roles, written once for the three SQL backends.
//!
//! [`native_roles!`] implements [`super::QueueStore`], [`super::FleetStore`] and
//! [`super::AdminStore`] for a backend from the statements of its [`Dialect`]
//! (`super::statements`). A backend module keeps only what its database does differently,
//! as inherent methods the macro calls:
//!
//! - `run_turn(&Turn) -> StoreResult<Poll>`: a worker's turn (one statement on PostgreSQL,
//!   an immediate transaction on SQLite, a read and a locking transaction on MariaDB);
//! - `insert_one(&NewJob) -> StoreResult<JobId>` and `insert_many(&[NewJob]) -> StoreResult<u64>`
//!   (how a new id comes back, how a push wakes listeners);
//! - `open_listener()`: PostgreSQL's LISTEN, `None` elsewhere; `announce_resume()`: its
//!   NOTIFY when a paused queue is resumed, nothing elsewhere;
//! - `own_statements()`: the statements only it has, for [`SchemaStore::check_statements`];
//! - `begin_write()`: a transaction that reads, then writes (SQLite's `BEGIN IMMEDIATE`,
//!   MariaDB's READ COMMITTED); `insert_in(conn, &NewJob)`: an insert inside one, returning
//!   the id (`RETURNING`, or MariaDB's last insert id).
//!
//! It needs `pool`, `error(sqlx::Error) -> StoreError`, a `DIALECT` and a `Db` type (the
//! sqlx database) in the backend's module. A macro rather than generic code because sqlx's pools, rows and results share no
//! trait that reaches `rows_affected` or `fetch_optional` on all three.
//!
//! [`Dialect`]: super::statements::Dialect
//! [`SchemaStore::check_statements`]: super::SchemaStore::check_statements

macro_rules! native_roles {
    ($store:ty) => {
        impl $store {
            /// Turns "no row changed" into the reason, for operator commands.
            async fn change_outcome(
                &self,
                id: $crate::store::JobId,
                rows: u64,
            ) -> $crate::store::StoreResult<$crate::store::ChangeOutcome> {
                use $crate::store::{ChangeOutcome, JobStatus};
                if rows > 0 {
                    return Ok(ChangeOutcome::Changed);
                }
                let status: Option<String> = sqlx::query_scalar(&DIALECT.status_of())
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(match status.and_then(|s| JobStatus::parse(&s)) {
                    Some(status) => ChangeOutcome::WrongState(status),
                    None => ChangeOutcome::NotFound,
                })
            }

            /// Requeues (attempts left) or fails a running job whose lease is still
            /// `lease` and whose holder is as `holder` says; returns which, or `None` when
            /// the guard did not hold. A rescue (a lost holder) is counted in the same
            /// transaction.
            async fn take_back(
                &self,
                id: $crate::store::JobId,
                lease: i64,
                holder: $crate::store::statements::Holder<'_>,
                reason: &str,
                now: $crate::store::Timestamp,
            ) -> $crate::store::StoreResult<Option<bool>> {
                use $crate::store::statements::Holder;
                let statement = DIALECT.take_back(holder);
                let requeued = format!("{reason} (requeued)");
                let mut query = sqlx::query(&statement)
                    .bind(now.0)
                    .bind(requeued.as_str())
                    .bind(reason)
                    .bind(id)
                    .bind(lease);
                if let Holder::Token(token) = holder {
                    query = query.bind(token);
                }
                let mut tx = self.begin_write().await.map_err(|e| self.error(e))?;
                let status: Option<String> = if DIALECT.returning {
                    let row = query
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                    row.map(|row| sqlx::Row::try_get(&row, 0))
                        .transpose()
                        .map_err(|e| self.error(e))?
                } else {
                    let result = query.execute(&mut *tx).await.map_err(|e| self.error(e))?;
                    if result.rows_affected() == 1 {
                        let status = sqlx::query_scalar(&DIALECT.status_of())
                            .bind(id)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(|e| self.error(e))?;
                        Some(status)
                    } else {
                        None
                    }
                };
                let Some(status) = status else {
                    tx.rollback().await.map_err(|e| self.error(e))?;
                    return Ok(None);
                };
                if matches!(holder, Holder::Lost { .. }) {
                    sqlx::query(&DIALECT.count_rescue())
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                }
                tx.commit().await.map_err(|e| self.error(e))?;
                Ok(Some(status == "waiting"))
            }

            /// [`Self::fold_then_change`] for the jobs `candidates` picks (a read that
            /// locks nothing).
            async fn pick_fold_then_change<'q>(
                &self,
                candidates: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>,
                still: $crate::store::statements::Still,
                change: impl Fn(usize) -> String + Send,
            ) -> $crate::store::StoreResult<u64> {
                let picked = candidates
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                let picked =
                    self.decode_all(&picked, |row| sqlx::Row::try_get::<i64, _>(row, 0))?;
                self.fold_then_change(&picked, still, change).await
            }

            /// Of the jobs `picked`, locks by primary key those still as `still` says,
            /// counts the finished ones into the tallies, then applies `change` (a statement
            /// over a list of ids) to them, in one transaction: whatever takes a finished
            /// job out of the table or out of its final state (prune, delete, retry) counts
            /// it first, exactly once, so the finished counters never go down. Returns the
            /// rows `change` changed.
            async fn fold_then_change(
                &self,
                picked: &[i64],
                still: $crate::store::statements::Still,
                change: impl Fn(usize) -> String + Send,
            ) -> $crate::store::StoreResult<u64> {
                // Ids per statement: well under every server's limit on bound values.
                const CHUNK: usize = 500;
                if picked.is_empty() {
                    return Ok(0);
                }
                fn by_id<'s>(
                    statement: &'s str,
                    ids: &[i64],
                ) -> sqlx::query::Query<'s, Db, <Db as sqlx::Database>::Arguments<'s>> {
                    ids.iter()
                        .fold(sqlx::query(statement), |query, id| query.bind(*id))
                }
                let mut tx = self.begin_write().await.map_err(|e| self.error(e))?;
                let mut changed = 0;
                for chunk in picked.chunks(CHUNK) {
                    let lock = DIALECT.locked_ids(chunk.len(), still);
                    let locked = by_id(&lock, chunk)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                    let ids =
                        self.decode_all(&locked, |row| sqlx::Row::try_get::<i64, _>(row, 0))?;
                    if ids.is_empty() {
                        continue;
                    }
                    by_id(&DIALECT.fold_tallies(ids.len()), &ids)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                    let result = by_id(&change(ids.len()), &ids)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                    changed += result.rows_affected();
                }
                tx.commit().await.map_err(|e| self.error(e))?;
                Ok(changed)
            }

            /// Decodes every row with `decode`, sorting a decoding error like any other.
            fn decode_all<'r, R, T>(
                &self,
                found: &'r [R],
                decode: impl Fn(&'r R) -> Result<T, sqlx::Error>,
            ) -> $crate::store::StoreResult<Vec<T>> {
                found
                    .iter()
                    .map(decode)
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.error(e))
            }

            /// Prepares every statement the store uses on its server, in the schema it
            /// finds: a statement the server refuses is named in the error.
            async fn prepare_every_statement(&self) -> $crate::store::StoreResult<usize> {
                let mut statements = DIALECT.every_statement();
                statements.extend(Self::own_statements());
                let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
                // A cached statement would be answered from the cache, not the schema; and
                // SQLite prepares against the schema its connection last read, which a
                // statement run first brings up to date.
                sqlx::Connection::clear_cached_statements(&mut *conn)
                    .await
                    .map_err(|e| self.error(e))?;
                let _generation: i64 = sqlx::query_scalar(&DIALECT.stop_generation())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| self.error(e))?;
                for (name, statement) in &statements {
                    sqlx::Executor::prepare(&mut *conn, statement.as_str())
                        .await
                        .map_err(|e| match self.error(e) {
                            $crate::store::StoreError::Database(detail) => {
                                let text = format!("statement `{name}`: {detail}");
                                $crate::store::StoreError::Database(detail.worded(text))
                            }
                            other => other,
                        })?;
                }
                Ok(statements.len())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::QueueStore for $store {
            async fn next_job(
                &self,
                turn: &$crate::store::Turn<'_>,
            ) -> $crate::store::StoreResult<$crate::store::Poll> {
                self.run_turn(turn).await
            }

            async fn put_back_unrun(
                &self,
                lease: &$crate::store::Lease,
                reason: &str,
            ) -> $crate::store::StoreResult<bool> {
                let result = sqlx::query(&DIALECT.put_back_unrun())
                    .bind(reason)
                    .bind(lease.job_id)
                    .bind(&lease.token)
                    .bind(lease.lease)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(result.rows_affected() == 1)
            }

            async fn put_back_unanswered_claims(
                &self,
                worker: &$crate::store::WorkerIdentity,
                keep: &[$crate::store::JobId],
            ) -> $crate::store::StoreResult<u64> {
                let statement = DIALECT.put_back_unanswered(keep.len());
                let mut query = sqlx::query(&statement).bind(&worker.token);
                for id in keep {
                    query = query.bind(id);
                }
                let result = query.execute(&self.pool).await.map_err(|e| self.error(e))?;
                Ok(result.rows_affected())
            }

            async fn complete(
                &self,
                lease: &$crate::store::Lease,
                completion: &$crate::store::Completion,
            ) -> $crate::store::StoreResult<bool> {
                let complete = DIALECT.complete_job(1);
                let result = rows::bind_completion(sqlx::query(&complete), lease, completion)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(result.rows_affected() == 1)
            }

            async fn retry_later(
                &self,
                lease: &$crate::store::Lease,
                completion: &$crate::store::Completion,
                delay: std::time::Duration,
                entry: &str,
            ) -> $crate::store::StoreResult<Option<bool>> {
                let (_, exit_code, signal, reason) =
                    $crate::store::completion_columns(&completion.result);
                let retried = sqlx::query(&DIALECT.retry_later())
                    .bind(rows::delay_micros(delay))
                    .bind(entry)
                    .bind(exit_code)
                    .bind(signal)
                    .bind(reason)
                    .bind(completion.output.join("\n"))
                    .bind(lease.job_id)
                    .bind(lease.token.as_str())
                    .bind(lease.lease)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                if retried.rows_affected() == 1 {
                    return Ok(Some(true));
                }
                let held: Option<i64> = sqlx::query_scalar(&DIALECT.held())
                    .bind(lease.job_id)
                    .bind(lease.token.as_str())
                    .bind(lease.lease)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(held.map(|_| false))
            }

            async fn release(
                &self,
                lease: &$crate::store::Lease,
                reason: &str,
                now: $crate::store::Timestamp,
            ) -> $crate::store::StoreResult<$crate::store::Release> {
                let holder = $crate::store::statements::Holder::Token(&lease.token);
                let outcome = self
                    .take_back(lease.job_id, lease.lease, holder, reason, now)
                    .await?;
                Ok($crate::store::release_of(outcome))
            }

            async fn listen(
                &self,
            ) -> $crate::store::StoreResult<Option<Box<dyn $crate::store::PushListener>>> {
                self.open_listener().await
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::FleetStore for $store {
            async fn database_time(&self) -> $crate::store::StoreResult<$crate::store::Timestamp> {
                let now: i64 = sqlx::query_scalar(&DIALECT.database_time())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok($crate::store::Timestamp(now))
            }

            async fn stop_generation(&self) -> $crate::store::StoreResult<i64> {
                sqlx::query_scalar(&DIALECT.stop_generation())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| self.error(e))
            }

            async fn request_stop(&self) -> $crate::store::StoreResult<i64> {
                let bump = DIALECT.bump_stop_generation();
                if DIALECT.returning {
                    return sqlx::query_scalar(&bump)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| self.error(e));
                }
                let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
                sqlx::query(&bump)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
                let value = sqlx::query_scalar(&DIALECT.stop_generation())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
                tx.commit().await.map_err(|e| self.error(e))?;
                Ok(value)
            }

            async fn queue_counts(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::QueueCounts>> {
                let found = sqlx::query(&DIALECT.queue_counts())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                let mut counts = Vec::new();
                for row in &found {
                    let count = || -> Result<_, sqlx::Error> {
                        let status: String = sqlx::Row::try_get(row, "status")?;
                        Ok((
                            sqlx::Row::try_get(row, "queue")?,
                            status,
                            sqlx::Row::try_get(row, "n")?,
                            sqlx::Row::try_get(row, "later")?,
                        ))
                    };
                    let (queue, status, n, later) = count().map_err(|e| self.error(e))?;
                    $crate::store::add_count(&mut counts, queue, &status, n, later);
                }
                Ok(counts)
            }

            async fn register_worker(
                &self,
                worker: &$crate::store::WorkerIdentity,
                queues: &[String],
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(&DIALECT.register_worker())
                    .bind(&worker.token)
                    .bind(&worker.host)
                    .bind(&worker.instance)
                    .bind(worker.pid as i64)
                    .bind(queues.join(","))
                    .bind($crate::store::Timestamp::now().0)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(())
            }

            async fn heartbeat(
                &self,
                worker: &$crate::store::WorkerIdentity,
                current_job: Option<$crate::store::JobId>,
            ) -> $crate::store::StoreResult<bool> {
                let result = sqlx::query(&DIALECT.heartbeat())
                    .bind(current_job)
                    .bind(&worker.token)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(result.rows_affected() == 1)
            }

            async fn unregister_worker(
                &self,
                worker: &$crate::store::WorkerIdentity,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(&DIALECT.unregister_worker())
                    .bind(&worker.token)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(())
            }

            async fn list_workers(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::WorkerRecord>> {
                let found = sqlx::query(&DIALECT.list_workers())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::worker_record)
            }

            async fn rescue_scan(
                &self,
                rescue_after: std::time::Duration,
            ) -> $crate::store::StoreResult<$crate::store::RescueScan> {
                let found = sqlx::query(&DIALECT.rescue_scan(rescue_after))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                rows::rescue_scan_rows(&found).map_err(|e| self.error(e))
            }

            async fn take_back_orphan(
                &self,
                job: &$crate::store::OrphanedJob,
                rescue_after: std::time::Duration,
                now: $crate::store::Timestamp,
            ) -> $crate::store::StoreResult<Option<bool>> {
                let lost = $crate::store::statements::Holder::Lost { rescue_after };
                self.take_back(job.id, job.lease, lost, $crate::store::WORKER_LOST, now)
                    .await
            }

            async fn forget_lost_workers(
                &self,
                rescue_after: std::time::Duration,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(&DIALECT.forget_lost_workers(rescue_after))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(())
            }

            async fn pause(
                &self,
                queues: &[String],
                reason: &str,
                by: &str,
            ) -> $crate::store::StoreResult<()> {
                let statement = DIALECT.pause();
                let now = $crate::store::Timestamp::now();
                let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
                for queue in queues {
                    sqlx::query(&statement)
                        .bind(queue)
                        .bind(reason)
                        .bind(now.0)
                        .bind(by)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                }
                tx.commit().await.map_err(|e| self.error(e))
            }

            async fn resume(&self, queues: &[String]) -> $crate::store::StoreResult<u64> {
                let statement = DIALECT.resume();
                let mut resumed = 0;
                for queue in queues {
                    let result = sqlx::query(&statement)
                        .bind(queue)
                        .execute(&self.pool)
                        .await
                        .map_err(|e| self.error(e))?;
                    resumed += result.rows_affected();
                }
                self.announce_resume().await?;
                Ok(resumed)
            }

            async fn paused_queues(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::PausedQueue>> {
                let found = sqlx::query(&DIALECT.paused_queues())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::paused_queue)
            }

            async fn queue_latencies(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::QueueLatency>> {
                let found = sqlx::query(&DIALECT.queue_latencies())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, |row| rows::queue_latency(row, "queue"))
            }

            async fn failed_since(
                &self,
                window: std::time::Duration,
            ) -> $crate::store::StoreResult<u64> {
                let failed: i64 = sqlx::query_scalar(&DIALECT.failed_since())
                    .bind($crate::store::saturating_micros(window))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(failed.max(0) as u64)
            }

            async fn prune_batch(
                &self,
                kind: $crate::store::Finished,
                before: $crate::store::Timestamp,
                limit: i64,
            ) -> $crate::store::StoreResult<u64> {
                use $crate::store::statements::Still;
                let picked = DIALECT.prunable_ids(kind);
                let picked = sqlx::query(&picked).bind(before.0).bind(limit);
                self.pick_fold_then_change(picked, Still::Finished(kind), |n| DIALECT.delete_ids(n))
                    .await
            }

            async fn enqueue_slot(
                &self,
                schedule: &str,
                slot: $crate::store::Timestamp,
                job: &$crate::store::NewJob,
            ) -> $crate::store::StoreResult<Option<$crate::store::JobId>> {
                let mut tx = self.begin_write().await.map_err(|e| self.error(e))?;
                let claimed = sqlx::query(&DIALECT.claim_slot())
                    .bind(schedule)
                    .bind(slot.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
                if claimed.rows_affected() == 0 {
                    tx.rollback().await.map_err(|e| self.error(e))?;
                    return Ok(None);
                }
                let id = Self::insert_in(&mut tx, job)
                    .await
                    .map_err(|e| self.error(e))?;
                sqlx::query(&DIALECT.set_slot_job())
                    .bind(id)
                    .bind(schedule)
                    .bind(slot.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
                tx.commit().await.map_err(|e| self.error(e))?;
                Ok(Some(id))
            }

            async fn schedule_runs(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::ScheduleRun>> {
                let found = sqlx::query(&DIALECT.schedule_runs())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::schedule_run)
            }

            async fn running_per_cap(&self) -> $crate::store::StoreResult<Vec<(String, i64)>> {
                sqlx::query_as(&DIALECT.running_per_cap())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))
            }

            async fn cancel_request(
                &self,
                job: $crate::store::JobId,
                worker: &$crate::store::WorkerIdentity,
            ) -> $crate::store::StoreResult<Option<String>> {
                let request: Option<Option<String>> = sqlx::query_scalar(&DIALECT.cancel_request())
                    .bind(job)
                    .bind(worker.token.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(request.flatten())
            }

            async fn finished_tallies(
                &self,
            ) -> $crate::store::StoreResult<Option<Vec<$crate::store::Tally>>> {
                let found = sqlx::query(&DIALECT.finished_tallies())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::tally).map(Some)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::AdminStore for $store {
            async fn push(
                &self,
                job: &$crate::store::NewJob,
            ) -> $crate::store::StoreResult<$crate::store::JobId> {
                self.insert_one(job).await
            }

            async fn push_unique(
                &self,
                job: &$crate::store::NewJob,
            ) -> $crate::store::StoreResult<$crate::store::Pushed> {
                use $crate::store::Pushed;
                let Some(key) = job.unique_key.as_deref() else {
                    return self.insert_one(job).await.map(Pushed::Created);
                };
                // The holder of the key may finish between the refused insert and the
                // lookup: then the insert is tried again.
                for _ in 0..5 {
                    match self.insert_one(job).await {
                        Ok(id) => return Ok(Pushed::Created(id)),
                        Err(error) if $crate::store::is_unique_violation(&error) => {}
                        Err(error) => return Err(error),
                    }
                    let holder: Option<i64> = sqlx::query_scalar(&DIALECT.active_with_key())
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| self.error(e))?;
                    if let Some(id) = holder {
                        return Ok(Pushed::Existing(id));
                    }
                }
                Err($crate::store::StoreError::Unavailable(
                    format!("the jobs with unique key {key:?} kept ending as this one was pushed")
                        .into(),
                ))
            }

            async fn push_batch(
                &self,
                jobs: &[$crate::store::NewJob],
            ) -> $crate::store::StoreResult<u64> {
                self.insert_many(jobs).await
            }

            async fn list_jobs(
                &self,
                filter: &$crate::store::JobFilter,
            ) -> $crate::store::StoreResult<Vec<$crate::store::JobRecord>> {
                let found = rows::bind_job_filter(sqlx::query(&DIALECT.list_jobs()), filter)
                    .bind(filter.limit as i64)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::job_record)
            }

            async fn job_stats(
                &self,
                filter: &$crate::store::JobFilter,
            ) -> $crate::store::StoreResult<Vec<$crate::store::JobStats>> {
                let found = rows::bind_job_filter(sqlx::query(&DIALECT.job_stats()), filter)
                    .bind(filter.limit as i64)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                self.decode_all(&found, rows::job_stats)
            }

            async fn get_job(
                &self,
                id: $crate::store::JobId,
            ) -> $crate::store::StoreResult<Option<$crate::store::JobRecord>> {
                let row = sqlx::query(&DIALECT.get_job())
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                row.as_ref()
                    .map(rows::job_record)
                    .transpose()
                    .map_err(|e| self.error(e))
            }

            async fn retry(
                &self,
                id: $crate::store::JobId,
            ) -> $crate::store::StoreResult<$crate::store::ChangeOutcome> {
                use $crate::store::statements::Still;
                let retried = self
                    .fold_then_change(&[id], Still::Retryable, |n| DIALECT.retry_ids(n))
                    .await?;
                self.change_outcome(id, retried).await
            }

            async fn retry_matching(
                &self,
                filter: &$crate::store::JobFilter,
            ) -> $crate::store::StoreResult<u64> {
                use $crate::store::statements::Still;
                let picked = DIALECT.retryable_ids_matching();
                let picked = rows::bind_job_filter(sqlx::query(&picked), filter);
                self.pick_fold_then_change(picked, Still::Retryable, |n| DIALECT.retry_ids(n))
                    .await
            }

            async fn delete(
                &self,
                id: $crate::store::JobId,
            ) -> $crate::store::StoreResult<$crate::store::ChangeOutcome> {
                use $crate::store::statements::Still;
                let deleted = self
                    .fold_then_change(&[id], Still::NotRunning, |n| DIALECT.delete_ids(n))
                    .await?;
                self.change_outcome(id, deleted).await
            }

            async fn delete_older(
                &self,
                status: $crate::store::JobStatus,
                age: std::time::Duration,
            ) -> $crate::store::StoreResult<u64> {
                use $crate::store::statements::Still;
                let picked = DIALECT.old_ids();
                let picked = sqlx::query(&picked)
                    .bind(status.as_str())
                    .bind($crate::store::saturating_micros(age));
                self.pick_fold_then_change(picked, Still::In(status), |n| DIALECT.delete_ids(n))
                    .await
            }

            async fn cancel(
                &self,
                id: $crate::store::JobId,
                reason: &str,
                now: $crate::store::Timestamp,
            ) -> $crate::store::StoreResult<$crate::store::ChangeOutcome> {
                let cancelled = sqlx::query(&DIALECT.cancel())
                    .bind(now.0)
                    .bind(reason)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                if cancelled.rows_affected() == 0 {
                    let requested = sqlx::query(&DIALECT.request_cancel())
                        .bind(reason)
                        .bind(id)
                        .execute(&self.pool)
                        .await
                        .map_err(|e| self.error(e))?;
                    if requested.rows_affected() > 0 {
                        return Ok($crate::store::ChangeOutcome::Requested);
                    }
                }
                self.change_outcome(id, cancelled.rows_affected()).await
            }
        }
    };
}
pub(super) use native_roles;
