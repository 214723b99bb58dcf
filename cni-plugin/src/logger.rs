//! A minimal append-only file logger.
//!
//! stdout belongs to the CNI protocol, so logs go to the configured file. Each
//! line is written with one `write(2)` on an `O_APPEND` descriptor, so parallel
//! invocations never interleave within a line. If the file cannot be opened the
//! lines go to stderr, which runtimes capture alongside the error.
//!
//! The file is bounded: an invocation that finds it over [`MAX_LOG_BYTES`] moves it to
//! `<file>.1` (replacing the previous one) and starts a new one, so the plugin's logs
//! take at most about twice that on the node, however many pods come and go. Two
//! invocations rotating at once may lose the older generation, never a current line.

use std::fmt::Arguments;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Level::Off,
            "error" => Level::Error,
            "warn" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Off => "OFF",
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

enum Sink {
    File(File),
    Stderr,
    /// Before the config (and so the log file) is known, and in tests.
    Discard,
}

/// Size over which the log file is rotated (see the module documentation).
pub const MAX_LOG_BYTES: u64 = 4 << 20;

pub struct Logger {
    sink: Sink,
    level: Level,
}

impl Logger {
    pub fn discard() -> Self {
        Logger {
            sink: Sink::Discard,
            level: Level::Off,
        }
    }

    pub fn open(path: &Path, level: Level) -> Self {
        if level == Level::Off {
            return Self::discard();
        }
        rotate_if_full(path, MAX_LOG_BYTES);
        let sink = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_or(Sink::Stderr, Sink::File);
        Logger { sink, level }
    }

    pub fn enabled(&self, level: Level) -> bool {
        level != Level::Off && level <= self.level
    }

    pub fn log(&mut self, level: Level, args: Arguments<'_>) {
        if !self.enabled(level) {
            return;
        }
        let line = format!(
            "{} {} twill-cni[{}] {}\n",
            utc_now(),
            level.as_str(),
            std::process::id(),
            args
        );
        // A failed log write must not fail the CNI operation.
        let _ = match &mut self.sink {
            Sink::File(f) => f.write_all(line.as_bytes()),
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Sink::Discard => Ok(()),
        };
    }
}

/// Moves `path` to `<path>.1` when it holds more than `max` bytes. Best effort: a
/// failure leaves the file to grow until the next invocation tries again.
fn rotate_if_full(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, old);
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date crate
/// (days-to-civil from Howard Hinnant's `chrono`-compatible algorithms).
fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_rotated_when_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let line = "x".repeat(999) + "\n";
        for round in 0..3 {
            // Over the bound: the next open rotates.
            std::fs::write(&p, line.repeat(11)).unwrap();
            rotate_if_full(&p, 10_000);
            assert!(!p.exists(), "round {round}: rotated away");
            let rotated = dir.path().join("log.1");
            assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 11_000);
            // Under the bound: left alone.
            std::fs::write(&p, &line).unwrap();
            rotate_if_full(&p, 10_000);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 1000);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "one generation kept: {names:?}");

        // Through Logger::open with the real bound.
        std::fs::write(&p, vec![b'y'; usize::try_from(MAX_LOG_BYTES).unwrap() + 1]).unwrap();
        let mut l = Logger::open(&p, Level::Info);
        l.log(Level::Info, format_args!("fresh"));
        let s = std::fs::read_to_string(&p).unwrap();
        assert_eq!(s.lines().count(), 1, "a new file after rotation");
    }

    #[test]
    fn writes_lines_at_or_above_level() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut l = Logger::open(&p, Level::Info);
        l.log(Level::Info, format_args!("hello {}", 1));
        l.log(Level::Debug, format_args!("hidden"));
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("INFO twill-cni[") && s.contains("hello 1"));
        assert!(!s.contains("hidden"));
        assert_eq!(s.lines().count(), 1);
        let ts = s.split(' ').next().unwrap();
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000Z".len(), "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'));
    }
}
