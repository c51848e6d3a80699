//! The error tables of the three backends, fed real errors provoked on real servers: on
//! MySQL/MariaDB a deadlock, a lock wait timeout, a killed connection, a server that went
//! away (or is not back yet), a restart mid-job; on PostgreSQL a deadlock, `lock_timeout`,
//! `statement_timeout`, a terminated backend; on SQLite a write lock held past the busy
//! timeout. Each must be "try again later" (the worker waits and retries), never a permanent
//! error that gives up on a job's result or exits a daemon started during a restart.

use std::time::Duration;

use sqlx::{Connection, Executor, MySqlConnection};

use pim_job_queue::store::mysql::classify;

use crate::support::*;

fn assert_transient(error: sqlx::Error, what: &str) {
    let sorted = assert_sorted_transient(error, what, |e| classify(e, "test"));
    let number = match sorted.driver_error() {
        Some(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|mysql| mysql.number()),
        _ => None,
    };
    // A connection error has no number; a server error keeps it, for code, not text.
    if let Some(sqlx::Error::Database(_)) = sorted.driver_error() {
        assert!(number.is_some(), "{what}: {sorted:?}");
    }
}

fn assert_sorted_transient(
    error: sqlx::Error,
    what: &str,
    classify: impl FnOnce(sqlx::Error) -> pim_job_queue::store::StoreError,
) -> pim_job_queue::store::StoreError {
    let text = error.to_string();
    let sorted = classify(error);
    assert!(
        sorted.is_transient(),
        "{what}: {text} was sorted as {sorted:?}"
    );
    // Typed, not a string: the driver's error is the source, reachable through the chain.
    let cause = std::error::Error::source(&sorted).and_then(std::error::Error::source);
    assert_eq!(cause.map(ToString::to_string), Some(text), "{what}");
    sorted
}

fn assert_pg_transient(error: sqlx::Error, what: &str, sqlstate: &str) {
    let code = match &error {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some(sqlstate), "{what}: {error}");
    assert_sorted_transient(error, what, |e| {
        pim_job_queue::store::postgres::classify(e, "test")
    });
}

async fn two_rows(url: &str) -> (MySqlConnection, MySqlConnection) {
    let mut setup = MySqlConnection::connect(url).await.unwrap();
    setup
        .execute("CREATE TABLE pjq_t_rows (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        .await
        .unwrap();
    setup
        .execute("INSERT INTO pjq_t_rows VALUES (1, 0), (2, 0)")
        .await
        .unwrap();
    let first = MySqlConnection::connect(url).await.unwrap();
    let second = MySqlConnection::connect(url).await.unwrap();
    (first, second)
}

/// Two sessions each hold one of the two rows of `pjq_t_rows` and want the other's: the
/// server picks one as the victim. Returns both sessions (in their transactions) and the
/// victim's error.
async fn deadlock<C>(mut a: C, mut b: C) -> (C, C, sqlx::Error)
where
    C: Connection + Send + 'static,
    for<'c> &'c mut C: Executor<'c>,
{
    a.execute("BEGIN").await.unwrap();
    b.execute("BEGIN").await.unwrap();
    a.execute("UPDATE pjq_t_rows SET v = 1 WHERE id = 1")
        .await
        .unwrap();
    b.execute("UPDATE pjq_t_rows SET v = 1 WHERE id = 2")
        .await
        .unwrap();
    let from_a = tokio::spawn(async move {
        let result = a
            .execute("UPDATE pjq_t_rows SET v = 2 WHERE id = 2")
            .await
            .map(drop);
        (a, result)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from_b = b
        .execute("UPDATE pjq_t_rows SET v = 2 WHERE id = 1")
        .await
        .map(drop);
    let (a, from_a) = from_a.await.unwrap();
    let victim = from_a
        .err()
        .or(from_b.err())
        .expect("one side is the deadlock victim");
    (a, b, victim)
}

#[test]
fn a_real_deadlock_and_lock_wait_are_retried() {
    if !Backend::Mariadb.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Mariadb);
    block_on(async {
        let (a, b) = two_rows(&scratch.url).await;
        // InnoDB picks one as the deadlock victim (1213).
        let (mut a, mut b, victim) = deadlock(a, b).await;
        assert!(victim.to_string().contains("1213"), "{victim}");
        assert_transient(victim, "a deadlock");
        a.execute("ROLLBACK").await.unwrap();
        b.execute("ROLLBACK").await.unwrap();

        // A lock held longer than the waiter's innodb_lock_wait_timeout (1205).
        a.execute("BEGIN").await.unwrap();
        a.execute("UPDATE pjq_t_rows SET v = 3 WHERE id = 1")
            .await
            .unwrap();
        b.execute("SET SESSION innodb_lock_wait_timeout = 1")
            .await
            .unwrap();
        let waited = b
            .execute("UPDATE pjq_t_rows SET v = 4 WHERE id = 1")
            .await
            .expect_err("the lock wait times out");
        assert!(waited.to_string().contains("1205"), "{waited}");
        assert_transient(waited, "a lock wait timeout");
        a.execute("ROLLBACK").await.unwrap();
    });
}

#[test]
fn a_killed_connection_is_retried() {
    if !Backend::Mariadb.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Mariadb);
    block_on(async {
        let mut victim = MySqlConnection::connect(&scratch.url).await.unwrap();
        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut victim)
            .await
            .unwrap();
        // Killing one's own query from the same session (the user's own thread).
        let mut killer = MySqlConnection::connect(&scratch.url).await.unwrap();
        killer
            .execute(format!("KILL CONNECTION {id}").as_str())
            .await
            .unwrap();
        let error = victim.execute("SELECT 1").await.expect_err("killed");
        assert_transient(error, "a killed connection");
    });
}

#[test]
fn a_server_that_went_away_is_retried() {
    if !Backend::Mariadb.available() {
        return;
    }
    let server = PrivateMariadb::start(&[]);
    let url = server.url("mysql");
    block_on(async {
        let mut open = MySqlConnection::connect(&url).await.unwrap();
        open.execute("SELECT 1").await.unwrap();
        drop(server); // killed under an open connection, as a crash or a restart does
        let gone = open
            .execute("SELECT 1")
            .await
            .expect_err("the server is gone");
        assert_transient(gone, "a server that went away");
        let refused = MySqlConnection::connect(&url)
            .await
            .expect_err("nothing listens");
        assert_transient(refused, "a server not (yet) back");
    });
}

/// The server is killed mid-job and started again (InnoDB recovers on start): the worker
/// keeps its job through the outage, shorter than the fence, and records its result once.
#[test]
fn a_server_restart_mid_job_records_the_result_once() {
    if !Backend::Mariadb.available() {
        return;
    }
    let mut server = PrivateMariadb::start(&[]);
    let scratch = Scratch::on_url(server.database("pjq"));
    let started = scratch.path("started");
    scratch.write_config(&format!(
        "heartbeat_interval = \"500ms\"\nrescue_after = \"30s\"\n[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"touch \\\"$0\\\"; sleep 1; echo finished\", \"{}\"]",
        started.display()
    ));
    let id = scratch.push("ui_job", "slow");
    let mut worker = scratch.spawn_consumer("w", &["--limit", "1"]);
    wait_until(Duration::from_secs(10), "the job to start", || {
        started.exists()
    });
    // Down for several heartbeats, back well before the fence; the job ends (after 1 s)
    // while the server is down, so its result waits for it.
    server.restart_after(Duration::from_secs(3));
    let restarted = std::time::Instant::now();
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(60)), 0);
    let job = scratch.show(id);
    let log = scratch.log_of("w");
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["output"][0], "finished");
    assert_eq!(log.matches("job started").count(), 1, "{log}");
    assert_eq!(log.matches("job finished").count(), 1, "{log}");
    let uptime: String = block_on(async {
        let mut connection = MySqlConnection::connect(&server.url("mysql"))
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
             WHERE VARIABLE_NAME = 'UPTIME'",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap()
    });
    let uptime: u64 = uptime.parse().unwrap();
    assert!(
        uptime <= restarted.elapsed().as_secs() + 1,
        "the server was restarted (up for {uptime} s)"
    );
}

#[test]
fn postgres_deadlocks_lock_and_statement_timeouts_are_retried() {
    use sqlx::PgConnection;
    if !Backend::Postgres.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Postgres);
    block_on(async {
        let mut setup = PgConnection::connect(&scratch.url).await.unwrap();
        setup
            .execute("CREATE TABLE pjq_t_rows (id INT PRIMARY KEY, v INT)")
            .await
            .unwrap();
        setup
            .execute("INSERT INTO pjq_t_rows VALUES (1, 0), (2, 0)")
            .await
            .unwrap();
        let a = PgConnection::connect(&scratch.url).await.unwrap();
        let b = PgConnection::connect(&scratch.url).await.unwrap();
        // After deadlock_timeout one is chosen (40P01).
        let (mut a, mut b, victim) = deadlock(a, b).await;
        assert_pg_transient(victim, "a deadlock", "40P01");
        a.execute("ROLLBACK").await.unwrap();
        b.execute("ROLLBACK").await.unwrap();

        // A row lock held past the waiter's lock_timeout (55P03), as the store sets it.
        a.execute("BEGIN").await.unwrap();
        a.execute("UPDATE pjq_t_rows SET v = 3 WHERE id = 1")
            .await
            .unwrap();
        b.execute("SET lock_timeout = '200ms'").await.unwrap();
        let waited = b
            .execute("UPDATE pjq_t_rows SET v = 4 WHERE id = 1")
            .await
            .expect_err("the lock wait times out");
        assert_pg_transient(waited, "a lock timeout", "55P03");
        a.execute("ROLLBACK").await.unwrap();

        // A statement past statement_timeout (57014), as the store sets it.
        b.execute("SET statement_timeout = '200ms'").await.unwrap();
        let slow = b
            .execute("SELECT pg_sleep(2)")
            .await
            .expect_err("the statement times out");
        assert_pg_transient(slow, "a statement timeout", "57014");
    });
}

#[test]
fn a_terminated_postgres_backend_is_retried() {
    use sqlx::PgConnection;
    if !Backend::Postgres.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Postgres);
    block_on(async {
        let mut victim = PgConnection::connect(&scratch.url).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut victim)
            .await
            .unwrap();
        // A role may end its own sessions: what an operator's pg_terminate_backend or a
        // failover does to the worker's connection.
        let mut killer = PgConnection::connect(&scratch.url).await.unwrap();
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut killer)
            .await
            .unwrap();
        assert!(ended);
        let error = victim.execute("SELECT 1").await.expect_err("terminated");
        assert_sorted_transient(error, "a terminated backend", |e| {
            pim_job_queue::store::postgres::classify(e, "test")
        });
    });
}

#[test]
fn a_sqlite_write_lock_held_past_the_busy_timeout_is_retried() {
    use sqlx::ConnectOptions;
    use sqlx::SqliteConnection;
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    let scratch = Scratch::new(Backend::Sqlite);
    block_on(async {
        drop(scratch.store().await); // creates the file and its tables
        let mut holder = SqliteConnection::connect(&scratch.url).await.unwrap();
        holder.execute("BEGIN IMMEDIATE").await.unwrap();
        let options = SqliteConnectOptions::from_str(&scratch.url)
            .unwrap()
            .busy_timeout(Duration::from_millis(200));
        let mut waiter = options.connect().await.unwrap();
        let busy = waiter
            .execute("UPDATE pjq_control SET value = value + 1")
            .await
            .expect_err("the write lock is held");
        assert!(busy.to_string().contains("locked"), "{busy}");
        let path = scratch.url.trim_start_matches("sqlite://").to_string();
        assert_sorted_transient(busy, "a busy database", |e| {
            pim_job_queue::store::sqlite::classify(e, &path)
        });
        holder.execute("ROLLBACK").await.unwrap();
    });
}

/// A failover's read-only server (1290) and a full one (1040), provoked on a private MariaDB
/// that checks privileges (a SUPER session, as every session is without them, bypasses
/// both): each is "try again later".
#[test]
fn a_read_only_or_full_server_is_retried() {
    if !Backend::Mariadb.available() {
        return;
    }
    let server = PrivateMariadb::start_with_grants(&[]);
    let url = server.user("worker", "not-super", "pjq");
    block_on(async {
        let mut first = MySqlConnection::connect(&url).await.unwrap();
        first.execute("CREATE TABLE t (id INT)").await.unwrap();
        server.admin("SET GLOBAL read_only = 1").await;
        let refused = first
            .execute("INSERT INTO t VALUES (1)")
            .await
            .expect_err("the server is read-only");
        assert!(refused.to_string().contains("1290"), "{refused}");
        assert_transient(refused, "a read-only server");
        server.admin("SET GLOBAL read_only = 0").await;
        // MariaDB's smallest max_connections is 10.
        server.admin("SET GLOBAL max_connections = 10").await;
        // Up to max_connections (counted by the server, which may still be closing the
        // admin's sessions), then the refusal.
        let mut open = Vec::new();
        let full = loop {
            match MySqlConnection::connect(&url).await {
                Ok(connection) if open.len() < 12 => open.push(connection),
                Ok(_) => panic!("max_connections = 10 let {} sessions in", open.len() + 2),
                Err(error) => break error,
            }
        };
        assert!(full.to_string().contains("1040"), "{full}");
        assert_transient(full, "too many connections");
    });
}
