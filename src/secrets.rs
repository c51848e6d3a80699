//! The database URL carries a password: where the URL comes from, and how it is shown.
//!
//! Every place that prints a URL (status, logs, errors, `migrate`, `stop-workers`) goes
//! through [`redact_url`], and configuration errors go through [`scrub`], so that operators
//! who may read the journal (`pim-job-queue-ops`) never read a password.

use std::path::{Path, PathBuf};

/// What a secret is replaced with.
pub const REDACTED: &str = "***";

/// The credential file a unit's `LoadCredential=database_url:...` provides.
pub const CREDENTIAL_NAME: &str = "database_url";

/// The variable the unit's `EnvironmentFile=` (or a shell) sets.
pub const URL_VARIABLE: &str = "PIM_JOB_QUEUE_DATABASE_URL";

/// Where the package's unit reads its secrets, for one-shot commands run outside systemd.
pub const SYSTEM_ENVIRONMENT_FILE: &str = "/etc/pim_job_queue/environment";

/// Where the README's `LoadCredential=` drop-in reads the URL from.
pub const SYSTEM_CREDENTIAL_FILE: &str = "/etc/pim_job_queue/database_url";

/// A URL with every credential replaced: the userinfo password, query parameters that carry
/// secrets (`password`, `sslpassword`, ...), and anything a password written without
/// percent-encoding could have spilled into (`/`, `?`, `#` or `@` in it).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once(':') else {
        return plain_or_redacted(url);
    };
    if !is_scheme(scheme) {
        return REDACTED.into();
    }
    match url::Url::parse(url) {
        Ok(parsed) if parsed_structure_is_trustworthy(&parsed, rest) => {
            redact_parsed(parsed).unwrap_or_else(|| url.to_string())
        }
        _ => format!("{scheme}:{}", redact_unparsed(rest)),
    }
}

/// The parse can be trusted when every `@` of the text sits in the authority: otherwise a
/// password with a raw `/`, `?` or `#` was cut there, and part of it went to the host,
/// port, path or query.
fn parsed_structure_is_trustworthy(parsed: &url::Url, rest: &str) -> bool {
    let outside_authority = parsed.path().contains('@')
        || parsed.query().is_some_and(|q| q.contains('@'))
        || parsed.fragment().is_some();
    let authority_has_at = rest
        .strip_prefix("//")
        .map(|r| r.split(['/', '?', '#']).next().unwrap_or(""))
        .is_some_and(|authority| authority.contains('@'));
    let at_count = rest.matches('@').count();
    !outside_authority && (at_count == 0 || authority_has_at)
}

/// The URL with its password and secret parameters replaced; `None` when it has neither
/// (then it is shown as written, not as the parser would normalize it).
fn redact_parsed(mut parsed: url::Url) -> Option<String> {
    let has_password = parsed.password().is_some();
    let query = parsed.query().map(str::to_owned);
    let secret_query = query.as_deref().is_some_and(query_has_secret);
    if !has_password && !secret_query {
        return None;
    }
    if has_password {
        let _ = parsed.set_password(Some(REDACTED));
    }
    if let Some(query) = query {
        parsed.set_query(Some(&redact_query(&query)));
    }
    Some(parsed.to_string())
}

fn query_has_secret(query: &str) -> bool {
    url::form_urlencoded::parse(query.as_bytes()).any(|(key, _)| is_secret_key(&key))
}

/// A URL the parser could not make sense of: the scheme stays, everything up to the last `@`
/// goes (it may all be userinfo), a query keeps only its non-secret parameters.
fn redact_unparsed(rest: &str) -> String {
    let (slashes, body) = match rest.strip_prefix("//") {
        Some(body) => ("//", body),
        None => ("", rest),
    };
    let after_userinfo = match body.rfind('@') {
        Some(at) => {
            let user = body[..at].split(':').next().unwrap_or("");
            let user = if is_plain_user(user) { user } else { REDACTED };
            let shown = if user.len() == at {
                user.to_string()
            } else {
                format!("{user}:{REDACTED}")
            };
            return format!("{slashes}{shown}@{}", redact_tail(&body[at + 1..]));
        }
        None => body,
    };
    format!("{slashes}{}", redact_tail(after_userinfo))
}

/// Host, path and query of an unparsed URL: the fragment never shows, nor secret parameters.
fn redact_tail(tail: &str) -> String {
    let tail = match tail.split_once('#') {
        Some((before, _)) => format!("{before}#{REDACTED}"),
        None => tail.to_string(),
    };
    match tail.split_once('?') {
        Some((before, query)) => format!("{before}?{}", redact_query(query)),
        None => tail,
    }
}

/// A query string with the values of secret-bearing parameters replaced.
fn redact_query(query: &str) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if is_secret_key(&key) || key.contains('@') || value.contains('@') {
            out.append_pair(&key, REDACTED);
        } else {
            out.append_pair(&key, &value);
        }
    }
    out.finish()
}

/// Parameter names that carry a credential in some driver's URL syntax (libpq's
/// `password`, `sslpassword`; anything a site adds that names a key, token or secret).
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
    ]
    .iter()
    .any(|marker| key.contains(marker))
}

fn is_scheme(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

fn is_plain_user(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-%".contains(c))
}

/// Text that is not a URL at all: shown unless it holds what could be userinfo.
fn plain_or_redacted(text: &str) -> String {
    if text.contains('@') {
        REDACTED.into()
    } else {
        text.to_string()
    }
}

/// Configuration error text with secrets removed: every URL in it redacted, and every value
/// the config text assigns to a secret-bearing key (`database_url`, `*password*`, ...)
/// replaced, wherever a parser's message quoted it.
pub fn scrub(message: &str, config_text: &str) -> String {
    without(message, secret_values(config_text))
}

/// Redacts every `scheme://...` token (up to whitespace or a quote) in free text.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let start = rest[..found]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .map_or(0, |i| i + 1);
        let end = rest[found..]
            .find(|c: char| c.is_whitespace() || "\"'`".contains(c))
            .map_or(rest.len(), |i| found + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Secrets shorter than this are not searched for in free text: replacing every `ab` in a
/// message would garble it, and such a password is no secret anyway.
const MIN_SCRUBBED_LEN: usize = 4;

/// The values a TOML text assigns to secret-bearing keys, or that look like URLs with
/// credentials, and the secret parts of those URLs; read leniently, since the text may not
/// parse.
fn secret_values(config_text: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in config_text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"').to_ascii_lowercase();
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        let url_like = value.contains("://") || value.contains('@');
        if key.contains("url") || is_secret_key(&key) || url_like {
            values.push(value.to_string());
            values.extend(url_secrets(value));
        }
    }
    long_enough_longest_first(values)
}

/// The parts of `url` that are secret, as written and percent-decoded: the password (or, when
/// the URL cannot be parsed with confidence, everything between the user name and the last
/// `@`) and the values of secret-bearing query parameters.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = url.split_once(':').map_or(url, |(_, rest)| rest);
    let body = rest.strip_prefix("//").unwrap_or(rest);
    if let Some(at) = body.rfind('@') {
        let userinfo = &body[..at];
        let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
        secrets.push(password.to_string());
        secrets.push(decoded(password));
    }
    if let Some((_, query)) = url.split_once('?') {
        let query = query.split('#').next().unwrap_or("");
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if is_secret_key(&key) {
                secrets.push(value.to_string());
            }
        }
        for raw in query.split('&') {
            if let Some((key, value)) = raw.split_once('=')
                && is_secret_key(&decoded(key))
            {
                secrets.push(value.to_string());
            }
        }
    }
    if let Some((_, fragment)) = url.split_once('#') {
        secrets.push(fragment.to_string());
    }
    long_enough_longest_first(secrets)
}

/// Message text (a driver's error, which may quote what it parsed) with the secrets of
/// `url` replaced, and any URL in it redacted.
pub fn scrub_url_secrets(message: &str, url: &str) -> String {
    without(message, url_secrets(url))
}

/// `message` with each of `secrets` (longest first) replaced, then every URL in it
/// redacted: secrets first, since redacting a URL could split a password it contains.
fn without(message: &str, secrets: Vec<String>) -> String {
    let mut scrubbed = message.to_string();
    for secret in secrets {
        scrubbed = scrubbed.replace(&secret, REDACTED);
    }
    redact_urls_in(&scrubbed)
}

fn decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn long_enough_longest_first(mut values: Vec<String>) -> Vec<String> {
    values.retain(|value| value.chars().count() >= MIN_SCRUBBED_LEN);
    values.sort_by_key(|value| std::cmp::Reverse(value.len()));
    values.dedup();
    values
}

/// Where the database URL was found, for `status` and the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    Option,
    Credential(PathBuf),
    Environment,
    File(PathBuf),
    Config,
    Default,
}

impl std::fmt::Display for UrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlSource::Option => f.write_str("--database-url"),
            UrlSource::Credential(path) => write!(f, "the systemd credential {}", path.display()),
            UrlSource::Environment => write!(f, "${URL_VARIABLE}"),
            UrlSource::File(path) => write!(f, "{}", path.display()),
            UrlSource::Config => f.write_str("database_url in the config"),
            UrlSource::Default => f.write_str("the default SQLite store"),
        }
    }
}

/// The database URL a unit is given outside the config: its systemd credential first (the
/// unit's `LoadCredential=database_url:...`), then the environment variable. Outside
/// systemd, one-shot commands look where the service's unit reads them, when they may:
/// the credential's source file and the unit's `EnvironmentFile=` (only with the packaged
/// config, `with_system_files`: another config file means another installation).
pub fn url_from_outside_config(
    with_system_files: bool,
) -> Result<Option<(String, UrlSource)>, String> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(CREDENTIAL_NAME);
        if let Some(url) = read_url_file(&path)? {
            return Ok(Some((url, UrlSource::Credential(path))));
        }
    }
    if let Some(url) = std::env::var(URL_VARIABLE)
        .ok()
        .filter(|url| !url.trim().is_empty())
    {
        return Ok(Some((url, UrlSource::Environment)));
    }
    if !with_system_files || std::env::var_os("INVOCATION_ID").is_some() {
        return Ok(None); // under systemd: only what the unit passes
    }
    let credential = Path::new(SYSTEM_CREDENTIAL_FILE);
    if let Some(url) = read_url_file(credential)? {
        return Ok(Some((url, UrlSource::File(credential.to_path_buf()))));
    }
    let environment = Path::new(SYSTEM_ENVIRONMENT_FILE);
    Ok(read_environment_file(environment)?
        .map(|url| (url, UrlSource::File(environment.to_path_buf()))))
}

/// A file holding just the URL (trailing newline allowed); `None` when there is none.
fn read_url_file(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string()).filter(|url| !url.is_empty())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!(
            "cannot read {} ({error}), which holds the service's database URL: run this \
             command as root or as the service user, or pass --database-url",
            path.display()
        )),
    }
}

/// `PIM_JOB_QUEUE_DATABASE_URL=...` from a systemd environment file.
fn read_environment_file(path: &Path) -> Result<Option<String>, String> {
    let Some(text) = read_url_file(path)? else {
        return Ok(None);
    };
    Ok(text.lines().find_map(|line| {
        let line = line.trim();
        let value = line
            .strip_prefix("export ")
            .unwrap_or(line)
            .strip_prefix(URL_VARIABLE)?
            .trim_start()
            .strip_prefix('=')?
            .trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        Some(value.to_string()).filter(|v| !v.is_empty())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shows_no(secret: &str, url: &str) {
        let shown = redact_url(url);
        assert!(!shown.contains(secret), "{url} shown as {shown}");
    }

    #[test]
    fn userinfo_passwords_never_show() {
        assert_eq!(
            redact_url("mysql://akeneo:s3cret@db:3306/pim"),
            "mysql://akeneo:***@db:3306/pim"
        );
        assert_eq!(
            redact_url("sqlite:///var/x.sqlite"),
            "sqlite:///var/x.sqlite"
        );
        assert_eq!(redact_url("postgres://db/pim"), "postgres://db/pim");
        assert_eq!(redact_url("postgres://pim@db/pim"), "postgres://pim@db/pim");
    }

    #[test]
    fn the_forms_the_audit_found() {
        shows_no("s3cretpw", "postgres://db/pim?password=s3cretpw");
        shows_no(
            "s3cretpw",
            "postgres://db/pim?sslmode=require&sslpassword=s3cretpw",
        );
        shows_no("s3cretpw", "postgres://db/pim?PassWord=s3cretpw");
        shows_no("pa/ss", "mysql://u:pa/ss@db/pim");
        shows_no("ss@h", "mysql://u:pa/ss@h@db/pim");
        shows_no("p@ss", "mysql://u:p@ss@db/pim");
        shows_no("pass", "mysql:u:pass@db/pim");
        shows_no("12#ss", "mysql://u:12#ss@db/pim");
        shows_no("12", "mysql://u:12#ss@db/pim");
        shows_no("12?ss", "mysql://u:12?ss@db/pim");
        shows_no("12/ss", "mysql://u:12/ss@db/pim");
        assert_eq!(redact_url("mysql:u:pass@db/pim"), "mysql:u:***@db/pim");
    }

    #[test]
    fn config_errors_do_not_quote_secrets() {
        let text = "database_url = \"mysql://u:hunter22@db/pim\npoll_interval = 1\n";
        let message = "invalid string \"mysql://u:hunter22@db/pim\" and hunter22";
        let scrubbed = scrub(message, text);
        assert!(!scrubbed.contains("hunter22"), "{scrubbed}");
    }

    #[test]
    fn environment_files_as_systemd_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("environment");
        std::fs::write(
            &path,
            "# c\nOTHER=1\nPIM_JOB_QUEUE_DATABASE_URL=\"mysql://u:p@h/d\"\n",
        )
        .unwrap();
        assert_eq!(
            read_environment_file(&path).unwrap().as_deref(),
            Some("mysql://u:p@h/d")
        );
        assert_eq!(
            read_environment_file(&dir.path().join("none")).unwrap(),
            None
        );
    }
}

/// Random passwords in every URL form an operator may write, with a fixed seed so a failure
/// reproduces: the password never shows, whole or in pieces.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    use super::*;

    fn encoded(text: &str) -> String {
        url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
    }

    fn forms(password: &str) -> Vec<String> {
        let enc = encoded(password);
        vec![
            format!("mysql://akeneo:{enc}@db.example:3306/pim"),
            format!("postgres://akeneo:{password}@db.example/pim"),
            format!("postgresql://db.example/pim?password={enc}"),
            format!("postgres://db.example/pim?sslmode=require&sslpassword={enc}"),
            format!("mysql:akeneo:{password}@db.example/pim"),
            format!("mariadb://akeneo:{password}@db.example/pim?charset=utf8mb4"),
        ]
    }

    /// Some 5-character piece of `password` shows, that the URL around it does not explain.
    fn leaked_piece(shown: &str, password: &str, url: &str) -> Option<String> {
        let around = url.replace(password, "").replace(&encoded(password), "");
        let chars: Vec<char> = password.chars().collect();
        chars
            .windows(5)
            .map(|w| w.iter().collect::<String>())
            .find(|piece| shown.contains(piece.as_str()) && !around.contains(piece.as_str()))
    }

    proptest! {
        #![proptest_config(Config {
            cases: 3000,
            rng_seed: RngSeed::Fixed(20261203),
            failure_persistence: None,
            ..Config::default()
        })]

        #[test]
        fn no_url_form_shows_the_password(password in "[\\x21-\\x7e äé€]{8,24}") {
            for url in forms(&password) {
                let shown = redact_url(&url);
                prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
                prop_assert!(!shown.contains(&encoded(&password)), "{} -> {}", url, shown);
                let piece = leaked_piece(&shown, &password, &url);
                prop_assert!(piece.is_none(), "{} -> {} leaks {:?}", url, shown, piece);
                let scrubbed = scrub_url_secrets(&format!("error at {url}: bad"), &url);
                prop_assert!(!scrubbed.contains(&password), "{} -> {}", url, scrubbed);
            }
        }
    }
}
