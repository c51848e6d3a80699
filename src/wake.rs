//! Same-host wake-ups: `push` sends a datagram to every idle worker of the same database on
//! this host, so a job starts at once instead of at the next poll, whatever the backend.
//!
//! Each worker binds a Unix datagram socket in `<wake dir>/<database hash>/`; `push` sends
//! one byte to every socket there. A lost or refused datagram costs nothing but the poll
//! interval: polling stays the safety net, and pushes from other hosts are found that way.
//!
//! Other local users must not be able to take this over: the directories are used only when
//! they are real directories (never symlinks) owned by the worker's user (or root) that no
//! one else can write, so no other user can plant, swap or delete an entry in them. A worker
//! that finds one it cannot trust runs without wake-ups and says so. `push` only sends to
//! real sockets owned by the directory's owner and tries a bounded number of them. The
//! sockets themselves are world-writable (a wake-up carries no data, so any user may send
//! one): the consumer makes a flood cost at most one claim attempt per poll interval.

use std::hash::Hasher;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tokio::net::UnixDatagram;

/// The system-wide directory, when it exists or can be made (root; the package ships it).
const SYSTEM_WAKE_DIR: &str = "/run/pim_job_queue";

/// At most this many sockets are sent to by one push: far more than the workers one host
/// runs, and a bound on what a directory full of entries can cost a pusher.
pub const MAX_WAKE_TARGETS: usize = 256;

/// At most this many directory entries are looked at by one push.
const MAX_ENTRIES_READ: usize = 1024;

/// At most this many queued datagrams are drained per wake-up, so that a sender faster than
/// the drain cannot keep a worker in the loop.
const MAX_DRAINED: usize = 1024;

/// Mode of the directories: others may enter (to reach the sockets), only the owner writes.
const DIR_MODE: u32 = 0o755;

/// Group or others may write: such a directory is not trusted.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// The wake-up directory of one database on this host.
#[derive(Debug, Clone)]
pub struct WakeDir {
    dir: PathBuf,
}

/// A worker's wake-up socket; removed when dropped.
pub struct WakeSocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl WakeDir {
    /// The directory for the store at `location` under `base` (or the default base).
    pub fn for_store(base: Option<&Path>, location: &str) -> WakeDir {
        let base = base.map_or_else(default_base, Path::to_path_buf);
        WakeDir {
            dir: base.join(format!("{:016x}", stable_hash(location))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes or checks the base and the database's directory, then binds this worker's
    /// socket in it. An error (an untrusted directory among them) means: no wake-ups.
    pub fn bind(&self, name: &str) -> io::Result<WakeSocket> {
        if let Some(base) = self.dir.parent() {
            make_trusted_dir(base)?;
        }
        make_trusted_dir(&self.dir)?;
        self.remove_stale_sockets();
        let path = self.dir.join(format!("{name}.sock"));
        let socket = bind_world_writable(&path)?;
        socket.set_nonblocking(true)?;
        Ok(WakeSocket {
            socket: UnixDatagram::from_std(socket)?,
            path,
        })
    }

    /// Wakes the workers listening here; returns how many sockets were sent to. Failures
    /// are ignored (polling covers them), and nothing is sent through a directory another
    /// user could have arranged.
    pub fn wake_all(&self) -> usize {
        let (Ok(owner), Some(sender)) = (trusted_owner(&self.dir), sender()) else {
            return 0;
        };
        self.sockets_owned_by(owner)
            .filter(|path| sender.send_to(b"!", path).is_ok())
            .count()
    }

    /// Removes the sockets of this user's workers that died without cleaning up (killed by
    /// the watchdog, `kill -9`): nobody listens on them any more, so a send is refused. The
    /// probe is an empty datagram: a live worker takes it as one wake-up (one claim).
    fn remove_stale_sockets(&self) {
        let Some(sender) = sender() else {
            return;
        };
        let me = nix::unistd::geteuid().as_raw();
        for path in self.sockets_owned_by(me) {
            let refused = sender
                .send_to(b"", &path)
                .is_err_and(|error| error.kind() == io::ErrorKind::ConnectionRefused);
            if refused {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// The real sockets (no symlinks) named `*.sock` here that `owner` owns, boundedly.
    fn sockets_owned_by(&self, owner: u32) -> impl Iterator<Item = PathBuf> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .take(MAX_ENTRIES_READ)
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "sock"))
            .filter(move |entry| {
                // `DirEntry::metadata` is an lstat: a symlink is never followed.
                entry
                    .metadata()
                    .is_ok_and(|meta| meta.file_type().is_socket() && meta.uid() == owner)
            })
            .map(|entry| entry.path())
            .take(MAX_WAKE_TARGETS)
    }
}

impl WakeSocket {
    /// Resolves when a push arrives; drains (a bounded number of) others queued meanwhile.
    pub async fn woken(&self) {
        let mut buffer = [0u8; 16];
        if self.socket.recv(&mut buffer).await.is_ok() {
            for _ in 0..MAX_DRAINED {
                if self.socket.try_recv(&mut buffer).is_err() {
                    break;
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WakeSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An unbound socket to send wake-ups from; it never blocks (a full queue is a skipped
/// wake-up, which polling covers).
fn sender() -> Option<std::os::unix::net::UnixDatagram> {
    let sender = std::os::unix::net::UnixDatagram::unbound().ok()?;
    sender.set_nonblocking(true).ok()?;
    Some(sender)
}

/// Creates `dir` unless it exists, then checks it can be trusted. Its mode is set through
/// its descriptor, never by path: 0755 when this worker made it (whatever the umask, so that
/// pushers of other users reach the sockets), and tightened to 0755 when it is this user's
/// but lets others write (left so by an older release).
fn make_trusted_dir(dir: &Path) -> io::Result<()> {
    let created = match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => true,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => false,
        Err(error) => return Err(error),
    };
    let directory = open_directory(dir)?;
    let meta = directory.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(untrusted(
            dir,
            &format!(
                "is owned by uid {}, not by this worker's user (uid {me})",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if created && meta.uid() == me && mode != DIR_MODE {
        directory.set_permissions(std::fs::Permissions::from_mode(DIR_MODE))?;
        return Ok(());
    }
    if mode & WRITABLE_BY_OTHERS != 0 {
        if meta.uid() != me {
            return Err(untrusted(
                dir,
                &format!("has mode {mode:04o}: other users can write in it"),
            ));
        }
        directory.set_permissions(std::fs::Permissions::from_mode(DIR_MODE))?;
        tracing::info!(
            "{}: mode {mode:04o} let other users write in it, set to {DIR_MODE:04o}",
            dir.display()
        );
    }
    Ok(())
}

/// The owner of `dir` when it is a real directory no one but its owner (or root) can write
/// in, and all its wake-up entries can be trusted to be that owner's.
fn trusted_owner(dir: &Path) -> io::Result<u32> {
    let meta = open_directory(dir)?.metadata()?;
    if meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(untrusted(dir, "can be written by other users"));
    }
    Ok(meta.uid())
}

/// Opens a directory without following a symlink in its last component.
fn open_directory(dir: &Path) -> io::Result<std::fs::File> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(dir)
        .map_err(
            |error| match error.raw_os_error().map(nix::errno::Errno::from_raw) {
                Some(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
                    untrusted(dir, "is not a directory (a symlink?)")
                }
                _ => error,
            },
        )
}

fn untrusted(dir: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {why}: not used for wake-ups", dir.display()),
    )
}

/// Binds a socket that any local user may send to. The mode comes from the umask at bind
/// time, set on a short-lived thread that has its own umask (`unshare(CLONE_FS)`): no chmod
/// by path afterwards, and no other thread of the worker ever sees the permissive umask.
fn bind_world_writable(path: &Path) -> io::Result<std::os::unix::net::UnixDatagram> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(io::Error::from)?;
        nix::sys::stat::umask(Mode::from_bits_truncate(0o111));
        std::os::unix::net::UnixDatagram::bind(&path)
    })
    .join()
    .map_err(|_| io::Error::other("the thread binding the wake-up socket panicked"))?
}

fn default_base() -> PathBuf {
    let system = Path::new(SYSTEM_WAKE_DIR);
    if system.is_dir() || nix::unistd::geteuid().is_root() {
        return system.to_path_buf();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir).join("pim_job_queue"),
        _ => std::env::temp_dir().join(format!("pim_job_queue-{}", nix::unistd::getuid())),
    }
}

/// FNV-1a: stable across processes and releases, unlike std's randomly keyed hasher.
fn stable_hash(text: &str) -> u64 {
    let mut hasher = Fnv1a(0xcbf2_9ce4_8422_2325);
    hasher.write(text.as_bytes());
    hasher.finish()
}

struct Fnv1a(u64);

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Sets the process umask for one test (as the unit's UMask=0027 does), then restores it.
    struct UmaskGuard(Mode);

    impl UmaskGuard {
        fn set(bits: u32) -> UmaskGuard {
            UmaskGuard(nix::sys::stat::umask(Mode::from_bits_truncate(bits)))
        }
    }

    impl Drop for UmaskGuard {
        fn drop(&mut self) {
            nix::sys::stat::umask(self.0);
        }
    }

    #[test]
    fn the_hash_is_stable_and_separates_databases() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(stable_hash("sqlite:///a"), stable_hash("sqlite:///b"));
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[tokio::test]
    async fn a_push_wakes_a_bound_socket() {
        let _umask = UmaskGuard::set(0o027);
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(&base.path().join("wake")), "postgres://db/pim");
        let socket = dir.bind("w-1").unwrap();
        assert_eq!(mode_of(dir.path()), 0o755);
        assert_eq!(mode_of(socket.path()), 0o666, "any user may send a wake-up");
        assert_eq!(dir.wake_all(), 1);
        tokio::time::timeout(Duration::from_secs(2), socket.woken())
            .await
            .expect("woken");
        let path = socket.path.clone();
        drop(socket);
        assert!(!path.exists(), "the socket file is removed on drop");
    }

    #[tokio::test]
    async fn the_umask_of_the_worker_is_left_alone() {
        let base = tempfile::tempdir().unwrap();
        let guard = UmaskGuard::set(0o027);
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        let _socket = dir.bind("w-1").unwrap();
        let during = nix::sys::stat::umask(Mode::from_bits_truncate(0o027));
        assert_eq!(during.bits(), 0o027);
        drop(guard);
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused_or_tightened() {
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        std::fs::create_dir(dir.path()).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(dir.wake_all(), 0, "a pusher never sends through it");
        // Its owner (this user) may fix it: an older release made it 1777.
        let _socket = dir.bind("w-1").unwrap();
        assert_eq!(mode_of(dir.path()), 0o755);
    }

    #[tokio::test]
    async fn a_symlinked_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        std::os::unix::fs::symlink(elsewhere.path(), dir.path()).unwrap();
        let error = dir.bind("w-1").err().expect("refused");
        assert!(error.to_string().contains("not a directory"), "{error}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn push_skips_symlinks_and_other_files() {
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        let _socket = dir.bind("w-1").unwrap();
        let target = tempfile::tempdir().unwrap();
        let other = std::os::unix::net::UnixDatagram::bind(target.path().join("t.sock")).unwrap();
        other.set_nonblocking(true).unwrap();
        std::os::unix::fs::symlink(target.path().join("t.sock"), dir.path().join("evil.sock"))
            .unwrap();
        std::fs::write(dir.path().join("plain.sock"), "").unwrap();
        assert_eq!(dir.wake_all(), 1, "only the real socket");
        let mut buffer = [0u8; 4];
        assert!(
            other.recv(&mut buffer).is_err(),
            "nothing through the symlink"
        );
    }

    #[tokio::test]
    async fn a_dead_workers_socket_is_cleared_away() {
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        let _first = dir.bind("w-first").unwrap();
        // As after SIGKILL: the file stays, nobody listens.
        let dead_path = dir.path().join("w-dead.sock");
        drop(std::os::unix::net::UnixDatagram::bind(&dead_path).unwrap());
        assert!(dead_path.exists());
        let live = dir.bind("w-live").unwrap();
        assert!(!dead_path.exists(), "the stale socket is removed");
        assert!(live.path().exists());
    }

    #[tokio::test]
    async fn push_tries_a_bounded_number_of_sockets() {
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "sqlite:///x");
        let _first = dir.bind("w-first").unwrap();
        let sockets: Vec<_> = (0..MAX_WAKE_TARGETS + 20)
            .map(|n| {
                std::os::unix::net::UnixDatagram::bind(dir.path().join(format!("w-{n}.sock")))
                    .unwrap()
            })
            .collect();
        assert_eq!(dir.wake_all(), MAX_WAKE_TARGETS);
        drop(sockets);
    }
}
