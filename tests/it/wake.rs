//! Same-host wake-ups under attack by another local user: a directory made by someone else,
//! a symlink planted as `*.sock`, a socket of another user, a flood of datagrams. The real
//! binary on a SQLite store (wake-ups do not depend on the backend). Changing owners needs
//! root: CI runs as root; elsewhere these tests are skipped, loudly.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

/// The uid of `nobody` on Debian: a user other than the worker's.
const OTHER_UID: u32 = 65534;

/// The base wake directory of a scratch installation (`wake_dir` in its config).
fn wake_base(scratch: &Scratch) -> PathBuf {
    scratch.path("wake")
}

/// Starts a consumer, waits until it idles, and returns it with its database's wake dir.
fn idle_consumer(scratch: &Scratch, name: &str, args: &[&str]) -> (Child, PathBuf) {
    let consumer = scratch.spawn_consumer(name, args);
    wait_until(Duration::from_secs(10), "the consumer to idle", || {
        scratch.log_of(name).contains("consuming queues")
    });
    (consumer, database_wake_dir(scratch))
}

fn database_wake_dir(scratch: &Scratch) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(wake_base(scratch))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert_eq!(dirs.len(), 1, "one database directory: {dirs:?}");
    dirs[0].clone()
}

fn sockets_in(dir: &PathBuf) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "sock"))
        .collect()
}

fn stop(mut consumer: Child) {
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
}

/// The takeover: another user created the database's directory first (it was predictable,
/// and the base used to be world-writable). The worker must not bind in it, and must still
/// run jobs by polling.
#[test]
fn a_directory_another_user_made_is_not_used() {
    if !running_as_root("the wake-up attack tests") {
        return;
    }
    let scratch = Scratch::new(Backend::Sqlite);
    let (consumer, dir) = idle_consumer(&scratch, "first", &[]);
    stop(consumer);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).unwrap();

    let (consumer, _) = idle_consumer(&scratch, "second", &[]);
    let log = scratch.log_of("second");
    assert!(
        log.contains("is owned by uid 65534") && log.contains("not used for wake-ups"),
        "the worker says why it runs without wake-ups:\n{log}"
    );
    assert!(
        sockets_in(&dir).is_empty(),
        "nothing bound in the intruder's directory"
    );
    let id = scratch.push("ui_job", "u");
    wait_until(Duration::from_secs(10), "the job to run by polling", || {
        scratch.show(id)["status"] == "succeeded"
    });
    stop(consumer);
}

/// A base directory others can write (the old 1777 one) is refused unless it is the
/// worker's own, which it tightens: nobody else can have planted the database's directory.
#[test]
fn a_world_writable_base_of_another_user_is_refused() {
    if !running_as_root("the wake-up attack tests") {
        return;
    }
    let scratch = Scratch::new(Backend::Sqlite);
    let base = wake_base(&scratch);
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::chown(&base, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let consumer = scratch.spawn_consumer("c", &[]);
    wait_until(Duration::from_secs(10), "the consumer to idle", || {
        scratch.log_of("c").contains("consuming queues")
    });
    assert!(
        scratch.log_of("c").contains("not used for wake-ups"),
        "{}",
        scratch.log_of("c")
    );
    assert_eq!(
        std::fs::read_dir(&base).unwrap().count(),
        0,
        "nothing made in it"
    );
    stop(consumer);

    std::os::unix::fs::chown(&base, Some(0), Some(0)).unwrap();
    let (consumer, dir) = idle_consumer(&scratch, "own", &[]);
    assert_eq!(std::fs::metadata(&base).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(sockets_in(&dir).len(), 1);
    stop(consumer);
}

/// `push` (run here as root, as an operator would) must not send through a symlink planted
/// as `*.sock`, nor to a socket of another user.
#[test]
fn push_sends_only_to_the_workers_own_sockets() {
    if !running_as_root("the wake-up attack tests") {
        return;
    }
    let scratch = Scratch::new(Backend::Sqlite);
    let (consumer, dir) = idle_consumer(&scratch, "c", &["--sleep", "30"]);
    let elsewhere = tempfile::tempdir().unwrap();
    let target = UnixDatagram::bind(elsewhere.path().join("root-only.sock")).unwrap();
    target.set_nonblocking(true).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path().join("root-only.sock"),
        dir.join("evil.sock"),
    )
    .unwrap();
    let foreign = UnixDatagram::bind(dir.join("foreign.sock")).unwrap();
    foreign.set_nonblocking(true).unwrap();
    std::os::unix::fs::lchown(dir.join("foreign.sock"), Some(OTHER_UID), None).unwrap();

    let pushed = Instant::now();
    let id = scratch.push("ui_job", "u");
    wait_until(Duration::from_secs(10), "the pushed job to run", || {
        scratch.show(id)["status"] == "succeeded"
    });
    assert!(
        pushed.elapsed() < Duration::from_secs(5),
        "the worker's own socket was woken (it polls every 30 s): {:?}",
        pushed.elapsed()
    );
    let mut buffer = [0u8; 8];
    assert!(
        target.recv(&mut buffer).is_err(),
        "sent through the symlink"
    );
    assert!(
        foreign.recv(&mut buffer).is_err(),
        "sent to another user's socket"
    );
    stop(consumer);
}

/// Any local user may send datagrams to a worker's socket. A flood must cost at most one
/// claim attempt per poll interval (besides the polls themselves), not one per datagram.
#[test]
fn a_flood_of_wake_ups_costs_one_claim_per_poll_interval() {
    let scratch = Scratch::new(Backend::Sqlite);
    let mut consumer = scratch.spawn_debug_consumer("c", &["--sleep", "1"]);
    wait_until(Duration::from_secs(10), "the consumer to idle", || {
        scratch.log_of("c").contains("consuming queues")
    });
    let socket = sockets_in(&database_wake_dir(&scratch)).remove(0);
    let attempts_before = empty_claims(&scratch);
    let flood = Duration::from_secs(3);
    let sent = flood_socket(&socket, flood);
    let attempts = empty_claims(&scratch) - attempts_before;
    eprintln!("{sent} datagrams in {flood:?}: {attempts} empty claim attempts");
    assert!(sent > 0, "the flood reached the socket");
    // One poll and one wake-up per second: 6, with room for a late timer; the code before
    // the fix made one attempt per datagram.
    assert!(
        attempts <= 10,
        "{attempts} claim attempts during a {flood:?} flood"
    );
    let id = scratch.push("ui_job", "u");
    wait_until(Duration::from_secs(10), "a real job still runs", || {
        scratch.show(id)["status"] == "succeeded"
    });
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
}

fn empty_claims(scratch: &Scratch) -> usize {
    scratch.log_of("c").matches("no job due").count()
}

/// Sends datagrams to `socket` as fast as it takes them for `duration`; returns how many.
fn flood_socket(socket: &PathBuf, duration: Duration) -> usize {
    let sender = UnixDatagram::unbound().unwrap();
    sender.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + duration;
    let mut sent = 0;
    while Instant::now() < deadline {
        match sender.send_to(b"!", socket) {
            Ok(_) => sent += 1,
            Err(_) => std::thread::yield_now(),
        }
    }
    sent
}
