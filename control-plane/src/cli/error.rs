//! Why a command stopped: what `apitokens: error: ...` says. Each error
//! names what the user gave (a flag, with its value when that helps, or a
//! URL probed), never a secret or a database URL, and keeps its cause.

use crate::config::PublishError;
use crate::store::StoreError;
use apitokens_core::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What a flag says, or what it names (a file, an address, a URL), cannot
    /// be used: `--listen 0.0.0.0:80: Permission denied (os error 13)`.
    #[error("{what}: {problem}")]
    Input {
        what: String,
        #[source]
        problem: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A plugin configuration the command reads or makes is invalid.
    #[error("{what}: {source}")]
    Config {
        what: String,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The command cannot do what was asked, for the reason it says (a token
    /// that exists, flags that contradict each other, ...).
    #[error("{0}")]
    Refused(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl Error {
    /// `what` (a flag, with its value when that helps) cannot be used because
    /// of `problem` (an error, or words).
    pub fn input(what: impl Into<String>, problem: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Input {
            what: what.into(),
            problem: problem.into(),
        }
    }

    pub fn config(what: impl Into<String>, source: ConfigError) -> Self {
        Self::Config {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
