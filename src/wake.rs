//! Same-host wake-ups: `push` sends a datagram to every idle worker of the same database on
//! this host, so a job starts at once instead of at the next poll, whatever the backend.
//!
//! Each worker binds a Unix datagram socket in `<wake dir>/<database hash>/`; `push` sends
//! one byte to every socket there. A lost or refused datagram costs nothing but the poll
//! interval: polling stays the safety net, and pushes from other hosts are found that way.

use std::hash::Hasher;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;

/// The system-wide directory, when it exists or can be made (root; the package ships it).
const SYSTEM_WAKE_DIR: &str = "/run/pim_job_queue";

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

    /// Binds this worker's socket. Directories are made sticky and world-writable, like
    /// /tmp, so that pushers running as other users (the PIM's PHP user) can wake workers;
    /// a wake-up carries no data, so that is all they can do.
    pub fn bind(&self, name: &str) -> io::Result<WakeSocket> {
        for dir in [self.dir.parent(), Some(self.dir.as_path())]
            .into_iter()
            .flatten()
        {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
            }
        }
        let path = self.dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(WakeSocket { socket, path })
    }

    /// Wakes every worker listening here; failures are ignored (polling covers them).
    pub fn wake_all(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else {
            return;
        };
        let _ = sender.set_nonblocking(true);
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sock") {
                let _ = sender.send_to(b"!", &path);
            }
        }
    }
}

impl WakeSocket {
    /// Resolves when a push arrives; drains any others that queued up meanwhile.
    pub async fn woken(&self) {
        let mut buffer = [0u8; 16];
        if self.socket.recv(&mut buffer).await.is_ok() {
            while self.socket.try_recv(&mut buffer).is_ok() {}
        }
    }
}

impl Drop for WakeSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
    use super::*;

    #[test]
    fn the_hash_is_stable_and_separates_databases() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(stable_hash("sqlite:///a"), stable_hash("sqlite:///b"));
    }

    #[tokio::test]
    async fn a_push_wakes_a_bound_socket() {
        let base = tempfile::tempdir().unwrap();
        let dir = WakeDir::for_store(Some(base.path()), "postgres://db/pim");
        let socket = dir.bind("w-1").unwrap();
        dir.wake_all();
        dir.wake_all();
        tokio::time::timeout(std::time::Duration::from_secs(2), socket.woken())
            .await
            .expect("woken");
        let path = socket.path.clone();
        drop(socket);
        assert!(!path.exists(), "the socket file is removed on drop");
    }
}
