//! Who this worker is, as recorded on every job it claims, and what it costs the host.

use crate::store::WorkerIdentity;

impl WorkerIdentity {
    /// Identifies this process: `host_id` overrides the host name so tests can play several
    /// hosts on one machine.
    pub fn for_this_process(instance: Option<String>, host_id: Option<String>) -> WorkerIdentity {
        WorkerIdentity {
            token: uuid::Uuid::new_v4().simple().to_string(),
            host: host_id.unwrap_or_else(host_name),
            instance,
            pid: std::process::id(),
        }
    }

    /// `host/instance/pid`, as shown in logs and `status`.
    pub fn describe(&self) -> String {
        format!(
            "{}/{}/{}",
            self.host,
            self.instance.as_deref().unwrap_or("-"),
            self.pid
        )
    }
}

pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// This process's resident set size in bytes, as `--memory-limit` measures it.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()? as u64;
    Some(resident_pages * page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_between_identities() {
        let a = WorkerIdentity::for_this_process(None, None);
        let b = WorkerIdentity::for_this_process(Some("2".into()), Some("h2".into()));
        assert_ne!(a.token, b.token);
        assert_eq!(b.describe(), format!("h2/2/{}", std::process::id()));
    }

    #[test]
    fn resident_memory_is_measured() {
        let rss = resident_memory_bytes().unwrap();
        assert!(rss > 100_000, "{rss}");
    }
}
