//! Symfony's `messenger:stop-workers` signal, which Akeneo documents as the way to stop its
//! daemons (upgrade runbooks run it after a deploy).
//!
//! The command stores the time of the request as the cache item
//! `workers.restart_requested_timestamp` in the `cache.messenger.restart_workers_signal`
//! pool, a child of `cache.app`: a `FilesystemAdapter` under `var/cache/<env>/pools/app/`
//! (`pools/` on older layouts), in a subdirectory named by a hash of the application's
//! seed that cannot be computed from outside. The item's file name, though, is a hash of
//! the adapter class and the key (`FilesystemCommonTrait::getFile`), so each pool directory
//! needs only one `stat` to find it. The file holds the expiry (0: never), the key, and the
//! value serialized by PHP (`d:1733230000.123456;`).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};

const KEY: &str = "workers.restart_requested_timestamp";
const ADAPTER: &str = "Symfony\\Component\\Cache\\Adapter\\FilesystemAdapter";
/// The signal file is a few dozen bytes; anything much larger is not it.
const MAX_ITEM_BYTES: u64 = 4096;

/// Reads the restart signal of one PIM environment.
#[derive(Debug)]
pub struct RestartSignal {
    pool_parents: Vec<PathBuf>,
    item: PathBuf,
    found: Option<PathBuf>,
}

impl RestartSignal {
    /// For the Symfony cache directory `var/cache/<env>`.
    pub fn new(cache_dir: &Path) -> RestartSignal {
        RestartSignal {
            pool_parents: vec![cache_dir.join("pools/app"), cache_dir.join("pools")],
            item: item_path(),
            found: None,
        }
    }

    /// When workers were last asked to stop, in seconds since the epoch; `None` if never
    /// (or the request expired).
    pub fn requested_at(&mut self) -> Option<f64> {
        if let Some(path) = &self.found {
            match read_item(path) {
                Some(value) => return Some(value),
                // `cache:clear` removed it, or the pool moved: look again.
                None => self.found = None,
            }
        }
        for parent in &self.pool_parents {
            let Ok(pools) = std::fs::read_dir(parent) else {
                continue;
            };
            for pool in pools.flatten() {
                let candidate = pool.path().join(&self.item);
                if let Some(value) = read_item(&candidate) {
                    self.found = Some(candidate);
                    return Some(value);
                }
            }
        }
        None
    }
}

/// `X/Y/rest` as `FilesystemCommonTrait::getFile` names the item's file.
fn item_path() -> PathBuf {
    let digest = Md5::digest(format!("{ADAPTER}{KEY}").as_bytes());
    let hash = base64(&digest).replace('/', "-");
    let upper = |c: char| c.to_ascii_uppercase().to_string();
    let mut chars = hash.chars();
    let first = upper(chars.next().expect("24 characters"));
    let second = upper(chars.next().expect("24 characters"));
    PathBuf::from(first).join(second).join(&hash[2..22])
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// The value of the item file at `path`, if it is the signal and has not expired.
fn read_item(path: &Path) -> Option<f64> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() || metadata.len() > MAX_ITEM_BYTES {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    parse_item(&text, SystemTime::now())
}

fn parse_item(text: &str, now: SystemTime) -> Option<f64> {
    let mut lines = text.splitn(3, '\n');
    let expires_at: u64 = lines.next()?.trim().parse().ok()?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    if expires_at != 0 && now >= expires_at {
        return None;
    }
    if lines.next()?.trim_end() != KEY {
        return None;
    }
    php_number(lines.next()?)
}

/// A float or an integer as PHP's `serialize()` writes it.
fn php_number(serialized: &str) -> Option<f64> {
    let body = serialized.trim_end().strip_suffix(';')?;
    let number = body
        .strip_prefix("d:")
        .or_else(|| body.strip_prefix("i:"))?;
    number.parse().ok().filter(|n: &f64| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn base64_matches_php() {
        // php -r 'echo base64_encode("pim-job-queue!");'
        assert_eq!(base64(b"pim-job-queue!"), "cGltLWpvYi1xdWV1ZSE=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn items_parse_and_expire() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let item = format!("0\n{KEY}\nd:1733230000.25;");
        assert_eq!(parse_item(&item, now), Some(1_733_230_000.25));
        assert_eq!(parse_item(&format!("0\n{KEY}\ni:17;"), now), Some(17.0));
        assert_eq!(parse_item(&format!("1700000000\n{KEY}\nd:1.5;"), now), None);
        assert_eq!(parse_item("0\nother.key\nd:1.5;", now), None);
        assert_eq!(parse_item(&format!("0\n{KEY}\ns:3:\"abc\";"), now), None);
        assert_eq!(parse_item("", now), None);
    }

    #[test]
    fn the_item_path_has_symfonys_shape() {
        let path = item_path();
        let parts: Vec<_> = path
            .iter()
            .map(|p| p.to_string_lossy().to_string())
            .collect();
        // php -r '$h = str_replace("/", "-", base64_encode(hash("md5",
        //   "Symfony\\Component\\Cache\\Adapter\\FilesystemAdapter".
        //   "workers.restart_requested_timestamp", true)));
        //   echo strtoupper($h[0]."/".$h[1]."/"), substr($h, 2, 20);'
        assert_eq!(parts, ["E", "A", "30cvnUWHXZIa5VxTuJ5w"]);
    }
}
