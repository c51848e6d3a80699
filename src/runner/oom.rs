//! How many processes the kernel's OOM killer has killed in this worker's cgroup (under
//! systemd: its unit's), read before and after a job: a job runs alone in its worker, so a
//! kill in between was one of the job's processes.

use std::path::{Path, PathBuf};

/// The OOM kill count of this process's cgroup, where the kernel exposes one: cgroup v2's
/// `memory.events`, else cgroup v1's `memory.oom_control` (both `oom_kill N`, kernel 4.13+).
/// One file read a call: which file it is, is found once per worker.
pub fn kills_so_far() -> Option<u64> {
    static COUNTER: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let file = COUNTER.get_or_init(|| {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        counter_files(&membership)
            .into_iter()
            .find(|file| std::fs::read_to_string(file).is_ok_and(|t| oom_kill_count(&t).is_some()))
    });
    let text = std::fs::read_to_string(file.as_ref()?).ok()?;
    oom_kill_count(&text)
}

/// Where the counter may be, for the cgroups `/proc/self/cgroup` lists.
fn counter_files(membership: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut files = Vec::new();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if controllers.is_empty() {
            files.push(root.join(relative).join("memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(
                root.join("memory")
                    .join(relative)
                    .join("memory.oom_control"),
            );
        }
    }
    files
}

fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cgroup_versions_are_read() {
        let v2 = "0::/system.slice/pim_job_queue@1.service\n";
        assert_eq!(
            counter_files(v2),
            [PathBuf::from(
                "/sys/fs/cgroup/system.slice/pim_job_queue@1.service/memory.events"
            )]
        );
        let v1 = "4:memory:/system.slice/x.service\n0::/system.slice/x.service\n";
        assert_eq!(
            counter_files(v1)[0],
            PathBuf::from("/sys/fs/cgroup/memory/system.slice/x.service/memory.oom_control")
        );
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(events), Some(2));
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(oom_kill_count(control), Some(5));
        assert_eq!(oom_kill_count("oom 3\n"), None);
    }
}
