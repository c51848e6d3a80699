//! The MySQL/MariaDB error table, fed real errors provoked on real servers: a deadlock, a
//! lock wait timeout, a killed connection, a server that went away (or is not back yet).
//! Each must be "try again later" (the worker waits and retries), never a permanent error
//! that gives up on a job's result or exits a daemon started during a restart.

use std::time::Duration;

use sqlx::{Connection, Executor, MySqlConnection};

use pim_job_queue::store::mysql::classify;

use crate::support::*;

fn assert_transient(error: sqlx::Error, what: &str) {
    let text = error.to_string();
    let sorted = classify(error, "test");
    assert!(
        sorted.is_transient(),
        "{what}: {text} was sorted as {sorted:?}"
    );
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

#[test]
fn a_real_deadlock_and_lock_wait_are_retried() {
    if !Backend::Mariadb.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Mariadb);
    block_on(async {
        let (mut a, mut b) = two_rows(&scratch.url).await;
        a.execute("BEGIN").await.unwrap();
        b.execute("BEGIN").await.unwrap();
        a.execute("UPDATE pjq_t_rows SET v = 1 WHERE id = 1")
            .await
            .unwrap();
        b.execute("UPDATE pjq_t_rows SET v = 1 WHERE id = 2")
            .await
            .unwrap();
        // Each now wants the other's row: InnoDB picks one as the deadlock victim (1213).
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
        let (mut a, from_a) = from_a.await.unwrap();
        let victim = from_a
            .err()
            .or(from_b.err())
            .expect("one side is the deadlock victim");
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
