//! A journald layer that never blocks the thread that logs.
//!
//! The worker runs on one thread: the loop that watches a job, pings the watchdog and
//! applies the fence is the thread that logs. A journald that stops reading (overloaded,
//! restarting, its socket queue full) blocks a datagram `send` for as long as it likes,
//! and with it all of those duties: systemd's watchdog would restart the worker mid-job.
//! So entries are encoded where they are logged (cheap, no I/O) and handed over a bounded
//! queue to a writer thread that does the blocking sends. When the queue is full an entry
//! is dropped and counted, never waited for; the count is logged once the journal takes
//! entries again.
//!
//! The entries are those `tracing-journald` writes (journald's native protocol, field
//! names upper-cased, span fields such as `JOB_ID` on every entry inside the span, no field
//! prefix), which has no mode that does not block.

use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where journald listens for native-protocol datagrams.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Entries waiting for the writer: about a megabyte at most, enough for a burst of job
/// output, few enough that a stalled journal costs little memory.
const QUEUE_LENGTH: usize = 4096;

/// What the logging threads hand to the writer.
enum Work {
    Entry(Vec<u8>),
    /// Answer once every entry queued before this one has been sent (or given up).
    Flush(SyncSender<()>),
}

/// The queue into the writer thread, for [`flush`].
static WRITER: OnceLock<SyncSender<Work>> = OnceLock::new();

/// Encodes events as journal entries and queues them for the writer thread.
pub struct JournalLayer {
    syslog_identifier: String,
    /// Fields every entry carries (`WORKER_INSTANCE`), already encoded.
    common_fields: Vec<u8>,
    queue: SyncSender<Work>,
    dropped: Arc<AtomicU64>,
}

impl JournalLayer {
    /// A layer writing to the system's journald, with its writer thread started. Fails when
    /// the journal's socket cannot be reached now.
    pub fn new(syslog_identifier: &str, common_fields: &[(&str, &str)]) -> io::Result<Self> {
        let (layer, receiver) = Self::unstarted(syslog_identifier, common_fields);
        let writer = Writer::connect(
            Path::new(JOURNALD_SOCKET),
            layer.dropped.clone(),
            syslog_identifier,
        )?;
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(receiver))?;
        let _ = WRITER.set(layer.queue.clone());
        Ok(layer)
    }

    /// A layer whose entries wait in the returned queue; [`Writer`] sends them.
    fn unstarted(
        syslog_identifier: &str,
        common_fields: &[(&str, &str)],
    ) -> (Self, Receiver<Work>) {
        let (queue, receiver) = sync_channel(QUEUE_LENGTH);
        let mut encoded = Vec::new();
        for (name, value) in common_fields {
            put_field(&mut encoded, name, value.as_bytes());
        }
        let layer = JournalLayer {
            syslog_identifier: syslog_identifier.to_string(),
            common_fields: encoded,
            queue,
            dropped: Arc::default(),
        };
        (layer, receiver)
    }

    /// Queues an entry; never waits. A full queue drops it and counts it.
    fn enqueue(&self, entry: Vec<u8>) {
        if self.queue.try_send(Work::Entry(entry)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits, at most `limit`, until every entry logged so far has reached the journal (or
/// been given up): the last words of an exiting process must not die in the queue.
pub fn flush(limit: Duration) {
    let Some(queue) = WRITER.get() else {
        return;
    };
    let deadline = Instant::now() + limit;
    let (done, finished) = sync_channel(1);
    let mut request = Work::Flush(done);
    loop {
        match queue.try_send(request) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                request = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = finished.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// The thread that talks to journald, and may block doing so.
struct Writer {
    socket: UnixDatagram,
    path: PathBuf,
    dropped: Arc<AtomicU64>,
    syslog_identifier: String,
}

impl Writer {
    /// Checks that journald answers, with the empty datagram it discards.
    fn connect(
        path: &Path,
        dropped: Arc<AtomicU64>,
        syslog_identifier: &str,
    ) -> io::Result<Writer> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(Writer {
            socket,
            path: path.to_path_buf(),
            dropped,
            syslog_identifier: syslog_identifier.to_string(),
        })
    }

    /// Sends until every sender is gone; a second without entries still reports drops.
    fn run(self, receiver: Receiver<Work>) {
        loop {
            match receiver.recv_timeout(Duration::from_secs(1)) {
                Ok(Work::Entry(entry)) => {
                    self.report_dropped();
                    let _ = self.send(&entry);
                }
                Ok(Work::Flush(done)) => {
                    self.report_dropped();
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => self.report_dropped(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Says how many entries the queue dropped since the last report, as a warning.
    fn report_dropped(&self) {
        let count = self.dropped.swap(0, Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let mut entry = Vec::new();
        put_field(&mut entry, "PRIORITY", b"4");
        put_field(
            &mut entry,
            "SYSLOG_IDENTIFIER",
            self.syslog_identifier.as_bytes(),
        );
        let message =
            format!("{count} log entries were dropped: the journal did not take them in time");
        put_field(&mut entry, "MESSAGE", message.as_bytes());
        let _ = self.send(&entry);
    }

    /// One datagram; an entry too large for one goes in a sealed memory file, as journald's
    /// protocol asks.
    fn send(&self, entry: &[u8]) -> io::Result<()> {
        match self.socket.send_to(entry, &self.path) {
            Ok(_) => Ok(()),
            Err(error) if error.raw_os_error() == Some(nix::libc::EMSGSIZE) => {
                self.send_in_memfd(entry)
            }
            Err(error) => Err(error),
        }
    }

    fn send_in_memfd(&self, entry: &[u8]) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
        let flags = MemFdCreateFlag::MFD_ALLOW_SEALING | MemFdCreateFlag::MFD_CLOEXEC;
        let memfd = memfd_create(c"pim-job-queue-journal", flags)?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(entry)?;
        let seals = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        let address = UnixAddr::new(&self.path)?;
        let fds = [file.as_raw_fd()];
        let no_data: [IoSlice<'_>; 0] = [];
        sendmsg(
            self.socket.as_raw_fd(),
            &no_data,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            Some(&address),
        )?;
        Ok(())
    }
}

/// The span's own fields, encoded once when it is created.
struct SpanFields(Vec<u8>);

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut buffer = Vec::with_capacity(256);
        put_field(&mut buffer, "SPAN_NAME", span.name().as_bytes());
        put_metadata(&mut buffer, span.metadata(), "SPAN_");
        attrs.record(&mut FieldEncoder(&mut buffer));
        span.extensions_mut().insert(SpanFields(buffer));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut FieldEncoder(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut entry = Vec::with_capacity(512);
        let spans = ctx
            .event_scope(event)
            .into_iter()
            .flat_map(|scope| scope.from_root());
        for span in spans {
            if let Some(fields) = span.extensions().get::<SpanFields>() {
                entry.extend_from_slice(&fields.0);
            }
        }
        put_field(&mut entry, "PRIORITY", priority(event.metadata().level()));
        put_metadata(&mut entry, event.metadata(), "");
        put_field(
            &mut entry,
            "SYSLOG_IDENTIFIER",
            self.syslog_identifier.as_bytes(),
        );
        entry.extend_from_slice(&self.common_fields);
        event.record(&mut FieldEncoder(&mut entry));
        self.enqueue(entry);
    }
}

/// syslog priorities; INFO is "informational", not journald's default "notice" (which
/// journalctl shows in bold).
fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"6",
        Level::DEBUG | Level::TRACE => b"7",
    }
}

/// `TARGET`, `CODE_FILE` and `CODE_LINE`, each name after `prefix` (`SPAN_` for a span's).
fn put_metadata(entry: &mut Vec<u8>, metadata: &Metadata<'_>, prefix: &str) {
    let mut put = |name: &str, value: &[u8]| {
        entry.extend_from_slice(prefix.as_bytes());
        put_field(entry, name, value);
    };
    put("TARGET", metadata.target().as_bytes());
    if let Some(file) = metadata.file() {
        put("CODE_FILE", file.as_bytes());
    }
    if let Some(line) = metadata.line() {
        put("CODE_LINE", line.to_string().as_bytes());
    }
}

/// Encodes tracing fields as journal fields: `message` becomes `MESSAGE`, `job_id` `JOB_ID`.
struct FieldEncoder<'a>(&'a mut Vec<u8>);

impl Visit for FieldEncoder<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        put_field(self.0, field.name(), value.as_bytes());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        put_field(self.0, field.name(), format!("{value:?}").as_bytes());
    }
}

/// One field in the length-prefixed form of journald's native protocol, which takes any
/// value (newlines, NUL bytes); the name is made a valid journal field name.
fn put_field(entry: &mut Vec<u8>, name: &str, value: &[u8]) {
    entry.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|&c| c == b'_')
            .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    entry.push(b'\n');
    entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tracing_subscriber::prelude::*;

    /// Decodes one entry of length-prefixed fields.
    fn decode(mut entry: &[u8]) -> HashMap<String, String> {
        let mut fields = HashMap::new();
        while let Some(newline) = entry.iter().position(|&b| b == b'\n') {
            let name = String::from_utf8_lossy(&entry[..newline]).into_owned();
            let rest = &entry[newline + 1..];
            let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&rest[8..8 + length]).into_owned();
            fields.insert(name, value);
            entry = &rest[8 + length + 1..];
        }
        fields
    }

    fn drain(receiver: &Receiver<Work>) -> Vec<HashMap<String, String>> {
        receiver
            .try_iter()
            .filter_map(|work| match work {
                Work::Entry(entry) => Some(decode(&entry)),
                Work::Flush(_) => None,
            })
            .collect()
    }

    #[test]
    fn entries_carry_span_event_and_common_fields() {
        let (layer, receiver) =
            JournalLayer::unstarted("pim-job-queue", &[("WORKER_INSTANCE", "7")]);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job_id = 42, job_queue = "ui_job");
            let _inside = span.enter();
            tracing::warn!(stream = "stderr", "line one\nline two");
        });
        let entries = drain(&receiver);
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        for (name, value) in [
            ("MESSAGE", "line one\nline two"),
            ("PRIORITY", "4"),
            ("JOB_ID", "42"),
            ("JOB_QUEUE", "ui_job"),
            ("STREAM", "stderr"),
            ("SYSLOG_IDENTIFIER", "pim-job-queue"),
            ("WORKER_INSTANCE", "7"),
            ("SPAN_NAME", "job"),
        ] {
            assert_eq!(
                entry.get(name).map(String::as_str),
                Some(value),
                "{name}: {entry:?}"
            );
        }
        assert!(entry.contains_key("CODE_LINE"), "{entry:?}");
    }

    /// A journal that takes nothing: logging goes on at full speed, the surplus is counted,
    /// and nothing waits.
    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (layer, receiver) = JournalLayer::unstarted("pim-job-queue", &[]);
        let dropped = layer.dropped.clone();
        let subscriber = tracing_subscriber::registry().with(layer);
        let started = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..QUEUE_LENGTH + 100 {
                tracing::info!("entry {n}");
            }
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 100);
        assert_eq!(drain(&receiver).len(), QUEUE_LENGTH);
    }

    /// The writer against a datagram socket of our own: an entry too large for a datagram
    /// arrives as a memory file, and a drop count is reported before the next entry.
    #[test]
    fn the_writer_sends_large_entries_and_reports_drops() {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{FromRawFd, OwnedFd};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        let dropped = Arc::new(AtomicU64::new(3));
        let writer = Writer::connect(&path, dropped, "pim-job-queue").unwrap();
        let mut small = Vec::new();
        put_field(&mut small, "SYSLOG_IDENTIFIER", b"pim-job-queue");
        put_field(&mut small, "MESSAGE", b"small");
        let mut large = Vec::new();
        put_field(&mut large, "MESSAGE", &vec![b'x'; 4 << 20]);
        let (queue, receiver) = sync_channel(4);
        queue.send(Work::Entry(small)).unwrap();
        queue.send(Work::Entry(large)).unwrap();
        drop(queue);
        writer.run(receiver);

        let mut buffer = vec![0u8; 1 << 16];
        let empty = journal.recv(&mut buffer).unwrap();
        assert_eq!(empty, 0, "the connection check");
        let n = journal.recv(&mut buffer).unwrap();
        let report = decode(&buffer[..n]);
        assert_eq!(
            report["MESSAGE"],
            "3 log entries were dropped: the journal did not take them in time"
        );
        assert_eq!(report["SYSLOG_IDENTIFIER"], "pim-job-queue");
        let n = journal.recv(&mut buffer).unwrap();
        assert_eq!(decode(&buffer[..n])["MESSAGE"], "small");
        let mut control = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut data = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut data)];
        let message = recvmsg::<()>(
            journal.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::empty(),
        )
        .unwrap();
        let Some(ControlMessageOwned::ScmRights(fds)) = message.cmsgs().unwrap().next() else {
            panic!("no memory file came with the large entry");
        };
        // SAFETY: the descriptor was just received and is owned by nobody else.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        // The sender's writes left the shared offset at the end; journald maps the file.
        std::io::Seek::rewind(&mut file).unwrap();
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut received).unwrap();
        assert_eq!(decode(&received)["MESSAGE"].len(), 4 << 20);
    }
}
