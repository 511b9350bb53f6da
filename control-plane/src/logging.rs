//! A small stderr logger: `<RFC 3339 time> <LEVEL> <message>`. Messages from
//! this crate at the chosen level; from libraries, warnings and errors only.
//! Nothing in this program logs a secret or an Authorization header.

use crate::clock;
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct Logger {
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let ours = metadata.target().starts_with("apitokens");
        metadata.level() <= if ours { self.level } else { LevelFilter::Warn }
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let line = format!("{} {level} {}\n", clock::now().to_rfc3339(), record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

pub fn init(level: LevelFilter) {
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level.max(LevelFilter::Warn));
    }
}
