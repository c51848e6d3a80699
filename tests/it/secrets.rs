//! Passwords never show: random passwords, real servers, every place the binary prints a
//! URL (`status`, `status --json`, `migrate`, `stop-workers`, the daemon's log, connection
//! errors, configuration errors). And a job cannot read the worker's environment.

use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::*;

/// Role the secrets test may give any password (provisioned by scripts/lib/services.sh).
const SECRET_ROLE: &str = "pjq_secret";

/// Passwords from a fixed seed: printable ASCII, every character a URL must encode
/// included, and some non-ASCII. At least 8 characters, so a leak cannot hide as chance.
fn random_passwords(count: usize) -> Vec<String> {
    let alphabet: Vec<char> = (0x21u8..0x7f)
        .map(char::from)
        .chain("äé€漢 ".chars())
        .collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let length = 8 + (next() % 17) as usize;
            (0..length)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect()
        })
        .collect()
}

/// Percent-encodes everything but unreserved characters, as a careful user writes it.
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_hidden(text: &str, password: &str, place: &str) {
    for form in [password.to_string(), encoded(password)] {
        assert!(
            !text.contains(&form),
            "{place} shows the password {password:?}:\n{text}"
        );
    }
}

/// Gives the secret role `password` on PostgreSQL and lets it use the scratch database.
fn set_secret_password(scratch: &Scratch, password: &str) {
    let url = scratch.url.clone();
    let literal = password.replace('\'', "''");
    block_on(async move {
        use sqlx::Connection;
        let mut owner = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(&format!("GRANT ALL ON SCHEMA public TO {SECRET_ROLE}"))
            .execute(&mut owner)
            .await
            .unwrap();
        sqlx::query(&format!("ALTER ROLE {SECRET_ROLE} PASSWORD '{literal}'"))
            .execute(&mut owner)
            .await
            .ok();
    });
}

/// The scratch database's URL as the secret role, with `password` in the userinfo.
fn secret_url(scratch: &Scratch, password: &str) -> String {
    let (_, rest) = scratch.url.rsplit_once('@').unwrap();
    format!("postgres://{SECRET_ROLE}:{}@{rest}", encoded(password))
}

#[test]
fn random_passwords_never_show_on_postgres() {
    if !Backend::Postgres.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Postgres);
    for password in random_passwords(6) {
        set_secret_password(&scratch, &password);
        for url in [
            secret_url(&scratch, &password),
            format!(
                "{}?sslmode=disable&password={}",
                secret_url(&scratch, "").replace(":@", "@"),
                encoded(&password)
            ),
        ] {
            shown_nowhere(&scratch, &url, &password);
        }
    }
}

/// Every command that prints the URL, with it from the option, the variable and the config.
fn shown_nowhere(scratch: &Scratch, url: &str, password: &str) {
    let with_option = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--database-url", url]);
        scratch.run(&all)
    };
    for args in [
        &["migrate"][..],
        &["status"],
        &["status", "--json"],
        &["stop-workers"],
    ] {
        let output = with_option(args);
        assert_eq!(exit_code(&output), 0, "{args:?}: {}", all_output(&output));
        assert_hidden(&all_output(&output), password, &format!("{args:?}"));
    }
    let output = scratch
        .command(&["status"])
        .env("PIM_JOB_QUEUE_DATABASE_URL", url)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 0, "{}", all_output(&output));
    assert_hidden(&all_output(&output), password, "status from the variable");

    let log = std::fs::File::create(scratch.path("daemon.log")).unwrap();
    let mut daemon = scratch
        .command(&["consume", "-v"])
        .env("PIM_JOB_QUEUE_DATABASE_URL", url)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the daemon to idle", || {
        scratch.log_of("daemon").contains("consuming queues")
    });
    send_signal(&daemon, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(10)), 0);
    assert_hidden(&scratch.log_of("daemon"), password, "the daemon's log");
}

#[test]
fn random_passwords_never_show_in_connection_errors() {
    if !Backend::Mariadb.available() {
        return;
    }
    let scratch = Scratch::new(Backend::Mariadb);
    let (_, host_and_db) = scratch.url.rsplit_once('@').unwrap();
    for password in random_passwords(6) {
        let url = format!("mysql://pjq_test:{}@{host_and_db}", encoded(&password));
        let output = scratch.run(&["status", "--database-url", &url]);
        assert_ne!(exit_code(&output), 0, "a wrong password is refused");
        assert_hidden(&all_output(&output), &password, "a refused connection");
        let raw = format!("mysql:pjq_test:{password}@{host_and_db}");
        let output = scratch.run(&["status", "--database-url", &raw]);
        assert_hidden(&all_output(&output), &password, "a URL without //");
    }
}

#[test]
fn config_errors_never_quote_the_password() {
    let scratch = Scratch::new(Backend::Sqlite);
    for password in random_passwords(6) {
        let password = password.replace(['"', '\\'], "x");
        for text in [
            // An unterminated string on the URL line: TOML quotes that line.
            format!("database_url = \"mysql://u:{password}@db/pim\npoll_interval = \"1s\"\n"),
            // The URL where a duration belongs: serde quotes the value.
            format!("poll_interval = \"mysql://u:{password}@db/pim\"\n"),
            format!("database_url = 5\npassword = \"{password}\n"),
        ] {
            scratch.write_raw_config(&text);
            let output = scratch.run(&["status"]);
            assert_eq!(exit_code(&output), 78, "{}", all_output(&output));
            assert!(
                all_output(&output).contains("worker.toml:"),
                "{}",
                all_output(&output)
            );
            assert_hidden(&all_output(&output), &password, "a config error");
        }
    }
}

/// The worker withholds the URL from jobs; a job (the same user) must not read it from the
/// worker's /proc/PID/environ either.
#[test]
fn a_job_cannot_read_the_workers_environment() {
    let scratch = Scratch::new(Backend::Sqlite);
    let out = scratch.path("environ.txt");
    scratch.write_config(&format!(
        "[jobs.peek]\ncommand = [\"/bin/sh\", \"-c\", \"cat /proc/$PPID/environ > {} 2>&1; echo rc=$? >> {}\"]",
        out.display(),
        out.display()
    ));
    scratch.push("ui_job", "peek");
    let mut command = scratch.command(&["consume", "--limit", "1"]);
    command
        .env("PIM_JOB_QUEUE_DATABASE_URL", &scratch.url)
        .env("PJQ_CANARY", "canary-value-1234");
    if nix::unistd::geteuid().is_root() {
        // Root reads every process's environ: worker and job run as an ordinary user, as
        // under the unit.
        use std::os::unix::process::CommandExt;
        let chown = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(scratch.dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        command.uid(65534).gid(65534);
    }
    let output = command.output().unwrap();
    assert_eq!(exit_code(&output), 0, "{}", all_output(&output));
    let seen = std::fs::read_to_string(&out).unwrap();
    assert!(
        !seen.contains("canary-value-1234") && !seen.contains("rc=0"),
        "the job read the worker's environment:\n{seen}"
    );
}
