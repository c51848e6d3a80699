//! Hostile or careless input: a payload that tries to become an option, durations that
//! overflow, payloads too big for the environment, output that is not text. Each ends in a
//! clear error with a documented exit code, never a panic, a stuck job or a changed command.

use std::time::Duration;

use crate::backend_tests;
use crate::support::*;

backend_tests!(output_that_is_not_text_is_recorded);

/// NUL bytes (PostgreSQL's text refused them: the result could not be written and the job
/// stayed `running`), terminal escapes, a 20 MB line without a newline, `\r` progress.
fn output_that_is_not_text_is_recorded(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        r#"[jobs.noisy]
command = ["/bin/sh", "-c", '''printf 'a\000b\n'; printf '\033]0;pwned\007\033[2J\n'; head -c 20000000 /dev/zero | tr '\000' x; printf '\n1%%\r2%%\r3%%\n'''']
"#,
    );
    let id = scratch.push("ui_job", "noisy");
    let output = scratch.run(&["consume", "--limit", "1"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded", "{job}");
    let lines: Vec<&str> = job["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line.as_str().unwrap())
        .collect();
    assert_eq!(lines[0], "a\u{fffd}b");
    assert!(
        lines[2].len() < 5000 && lines[2].ends_with(" […]"),
        "capped"
    );
    assert_eq!(lines[3], "3%", "a carriage return starts the line over");
    let shown = scratch.ok(&["show", &id.to_string()]);
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "raw escapes in show"
    );
    assert!(shown.contains("\\u{1b}]0;pwned"), "{shown}");
}

/// The audit's case: `find {payload.dir}` with `-delete` deleted the working directory.
#[test]
fn a_payload_value_cannot_become_an_option() {
    let scratch = Scratch::new(Backend::Sqlite);
    let victim = scratch.path("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me").unwrap();
    scratch.write_config(&format!(
        "[jobs.find]\ncommand = [\"/usr/bin/find\", \"{{payload.dir}}\"]\nworking_directory = \"{}\"\n\
         [jobs.named]\ncommand = [\"/bin/echo\", \"--dir={{payload.dir}}\"]\n\
         [jobs.opted]\ncommand = [\"/bin/echo\", \"{{payload.dir}}\"]\nallow_option_values = true\n",
        victim.display()
    ));
    let hostile = scratch.push_with(&["ui_job", "find", "--payload", r#"{"dir": "-delete"}"#]);
    let named = scratch.push_with(&["ui_job", "named", "--payload", r#"{"dir": "-x"}"#]);
    let opted = scratch.push_with(&["ui_job", "opted", "--payload", r#"{"dir": "-n"}"#]);
    let output = scratch.run(&["consume", "--limit", "3"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let failed = scratch.show(hostile);
    assert_eq!(failed["status"], "failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("{payload.dir}") && reason.contains("option"),
        "{reason}"
    );
    assert!(victim.join("precious").exists(), "find -delete ran");
    assert_eq!(scratch.show(named)["status"], "succeeded");
    assert_eq!(scratch.show(opted)["status"], "succeeded");
}

#[test]
fn the_program_cannot_come_from_a_placeholder() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("[jobs.x]\ncommand = [\"{payload.program}\"]");
    let output = scratch.run(&["status"]);
    assert_eq!(exit_code(&output), 78);
    assert!(
        stderr(&output).contains("jobs.x.command[0]"),
        "{}",
        stderr(&output)
    );
}

fn exit_and_stderr(output: &std::process::Output) -> (i32, String) {
    (exit_code(output), stderr(output))
}

/// Durations that overflowed (a wrapped `--delay` ran the job at once) or panicked (exit
/// 101, once mid-job) are refused where they are written, naming the option or the key.
#[test]
fn overflowing_durations_are_refused_where_written() {
    let scratch = Scratch::new(Backend::Sqlite);
    for delay in ["300000y", "10000y", "1e20", "18446744073709551616"] {
        let (code, text) =
            exit_and_stderr(&scratch.run(&["push", "ui_job", "x", "--delay", delay]));
        assert_eq!(code, 64, "--delay {delay}: {text}");
        assert!(
            text.contains("--delay") && text.contains("too long"),
            "{text}"
        );
    }
    for (option, value) in [
        ("--sleep", "1e20"),
        ("--time-limit", "300000y"),
        ("--sleep", "0"),
    ] {
        let (code, text) = exit_and_stderr(&scratch.run(&["consume", option, value]));
        assert_eq!(code, 64, "{option} {value}: {text}");
        assert!(text.contains(option), "{text}");
    }
    for (key, line) in [
        (
            "timeout",
            "[job]\ncommand = [\"/bin/true\"]\ntimeout = \"300000y\"",
        ),
        ("stop_grace", "stop_grace = 1e20"),
        (
            "heartbeat_interval",
            "heartbeat_interval = 18446744073709551615",
        ),
        ("poll_interval", "poll_interval = 0"),
        (
            "kill_grace",
            "[job]\ncommand = [\"/bin/true\"]\nkill_grace = \"10000y\"",
        ),
    ] {
        scratch.write_raw_config(line);
        let (code, text) = exit_and_stderr(&scratch.run(&["status"]));
        assert_eq!(code, 78, "{line}: {text}");
        assert!(text.contains(key), "{line}: {text}");
    }
}

/// A job row whose due time lies beyond year 9999 (written by other means) is shown, not a
/// panic.
#[test]
fn a_far_future_job_can_be_shown() {
    let scratch = Scratch::new(Backend::Sqlite);
    let id = block_on(async {
        let store = scratch.store().await;
        let id = store.push(&new_job("ui_job", "x", "{}")).await.unwrap();
        // Beyond anything `push` writes (it caps a delay at a thousand years): a row
        // written by other means.
        use sqlx::Connection;
        let mut connection = sqlx::SqliteConnection::connect(&scratch.url).await.unwrap();
        sqlx::query("UPDATE pjq_jobs SET available_at = ? WHERE id = ?")
            .bind(i64::MAX)
            .bind(id)
            .execute(&mut connection)
            .await
            .unwrap();
        id
    });
    let output = scratch.run(&["show", &id.to_string()]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let output = scratch.run(&["jobs"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    assert_eq!(exit_code(&scratch.run(&["status"])), 0);
}

/// Payloads: a documented limit on `push` (65), `--payload-file FILE|-` for large ones, and
/// every payload on `PIM_JOB_PAYLOAD_FILE` (fd 3), since one over 128 KiB cannot be in the
/// environment (E2BIG: the job could never start).
#[test]
fn large_payloads_reach_the_job_on_a_descriptor() {
    let scratch = Scratch::new(Backend::Sqlite);
    let seen = scratch.path("seen");
    scratch.write_config(&format!(
        "[jobs.size]\ncommand = [\"/bin/sh\", \"-c\", \"wc -c < \\\"$PIM_JOB_PAYLOAD_FILE\\\" > {seen}; echo ${{{{#PIM_JOB_PAYLOAD}}}} >> {seen}\"]",
        seen = seen.display()
    ));
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(300 * 1024));
    let file = scratch.path("payload.json");
    std::fs::write(&file, &big).unwrap();
    let id = scratch.push_with(&["ui_job", "size", "--payload-file", file.to_str().unwrap()]);
    let output = scratch.run(&["consume", "--limit", "1"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        scratch.show(id)["status"],
        "succeeded",
        "{}",
        scratch.show(id)
    );
    let text = std::fs::read_to_string(&seen).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let stored = serde_json::from_str::<serde_json::Value>(&big)
        .unwrap()
        .to_string();
    assert_eq!(
        lines[0].trim(),
        stored.len().to_string(),
        "the whole payload on fd 3"
    );
    assert_eq!(lines[1].trim(), "0", "too large for the environment");

    // From standard input, and small: in both places.
    let mut push = scratch
        .command(&["push", "ui_job", "size", "--payload-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    push.stdin.take().unwrap().write_all(b"{\"a\": 1}").unwrap();
    let pushed = push.wait_with_output().unwrap();
    assert_eq!(exit_code(&pushed), 0);
    scratch.ok(&["consume", "--limit", "1"]);
    let text = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(text.lines().map(str::trim).collect::<Vec<_>>(), ["7", "7"]);

    let huge = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 << 20));
    std::fs::write(&file, &huge).unwrap();
    let (code, text) = exit_and_stderr(&scratch.run(&[
        "push",
        "ui_job",
        "size",
        "--payload-file",
        file.to_str().unwrap(),
    ]));
    assert_eq!(code, 65, "{text}");
    assert!(text.contains("1 MiB"), "{text}");
    let (code, _) = exit_and_stderr(&scratch.run(&[
        "push",
        "ui_job",
        "size",
        "--payload-file",
        "/nonexistent/payload.json",
    ]));
    assert_eq!(code, 66);
}

/// A one-shot command run by root on a store that does not exist yet creates it for the
/// user whose directory it is in (the service's state directory), readable by that user
/// only; a store another user owns is a clear permanent error (77), not a retry loop.
#[test]
fn a_store_root_creates_belongs_to_the_service_user() {
    if !running_as_root("the store ownership test") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let scratch = Scratch::new(Backend::Sqlite);
    let state = scratch.path("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let store = state.join("jobs.sqlite");
    let url = format!("sqlite://{}", store.display());
    // The scratch directory is root's 0700: let the service user through to its own.
    std::fs::set_permissions(
        scratch.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let config = scratch.path("worker.toml");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let id = scratch.push_with(&["ui_job", "x", "--database-url", &url]);
    let meta = std::fs::metadata(&store).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (65534, 0o600),
        "owner and mode"
    );
    let output = scratch
        .command(&["consume", "--limit", "1", "--database-url", &url])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let shown = scratch.ok(&["show", &id.to_string(), "--json", "--database-url", &url]);
    assert!(
        shown.contains("\"failed\"") || shown.contains("\"succeeded\""),
        "{shown}"
    );

    // As an older release left it: root's file in the service user's directory.
    let other = state.join("root-owned.sqlite");
    let other_url = format!("sqlite://{}", other.display());
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    scratch.ok(&["migrate", "--database-url", &other_url]);
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let started = std::time::Instant::now();
    let output = scratch
        .command(&["consume", "--database-url", &other_url])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 77, "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(20), "no retry loop");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    assert!(text.contains("not writable by this user"), "{text}");
}

/// Outside systemd a new store is private: 0600 in 0700 directories.
#[test]
fn a_new_store_is_private() {
    use std::os::unix::fs::MetadataExt;
    let scratch = Scratch::new(Backend::Sqlite);
    let store = scratch.path("fresh/sub/jobs.sqlite");
    let url = format!("sqlite://{}", store.display());
    scratch.ok(&["status", "--database-url", &url]);
    assert_eq!(std::fs::metadata(&store).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(scratch.path("fresh")).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(scratch.path("fresh/sub")).unwrap().mode() & 0o777,
        0o700
    );
}
