//! proxy-wasm contexts: the root context validates the configuration once per
//! `on_configure`; each HTTP context runs `apitokens_core::gate` through
//! [`ProxyHost`].

use crate::abi::{self, Level};
use apitokens_core::decision::{Counter, Denial};
use apitokens_core::gate::{self, Host, HostError, LogLevel, Verdict};
use apitokens_core::reply::Reply;
use apitokens_core::{Config, Timestamp};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::fmt::{self, Write as _};
use std::rc::Rc;
use std::sync::OnceLock;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        // Reached only through a bug; the location says where. The message
        // comes from our own code, which never formats a secret.
        let _ = abi::log(Level::Critical, &format!("apitokens: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| Box::new(Root { active: Rc::new(Active::new(Config::deny_all())) }));
}}

/// A configuration ready for requests: the validated rules and tokens plus
/// the local replies already serialized for the host.
struct Active {
    config: Config,
    reply_headers: Vec<Vec<u8>>,
}

impl Active {
    fn new(config: Config) -> Self {
        let reply_headers = Denial::ALL
            .iter()
            .map(|d| match config.replies().get(*d) {
                Some(reply) => {
                    let pairs: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, &**v)).collect();
                    abi::serialize_headers(&pairs)
                }
                None => abi::serialize_headers(&[]),
            })
            .collect();
        Self { config, reply_headers }
    }
}

/// Counter ids, defined once per VM.
static METRICS: OnceLock<Vec<u32>> = OnceLock::new();

fn metrics() -> &'static [u32] {
    METRICS.get_or_init(|| {
        Counter::ALL
            .iter()
            .map(|c| abi::define_counter(c.name()).unwrap_or(u32::MAX))
            .collect()
    })
}

fn log(level: Level, args: fmt::Arguments<'_>) {
    if abi::log_level().is_ok_and(|enabled| level >= enabled) {
        let mut line = String::with_capacity(128);
        if line.write_fmt(args).is_ok() {
            let _ = abi::log(level, &line);
        }
    }
}

struct Root {
    active: Rc<Active>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        metrics();
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let json = match abi::plugin_configuration(plugin_configuration_size) {
            Ok(json) => json,
            Err(abi::Failed(status)) => {
                log(
                    Level::Error,
                    format_args!("cannot read the plugin configuration (status {status})"),
                );
                return false;
            }
        };
        match Config::from_plugin_configuration(json) {
            Ok(config) => {
                if config.token_count() == 0 {
                    log(
                        Level::Warn,
                        format_args!("configuration has no tokens: every request is refused"),
                    );
                }
                log(
                    Level::Info,
                    format_args!(
                        "configuration accepted: {} tokens, {} rules",
                        config.token_count(),
                        config.rules().len()
                    ),
                );
                self.active = Rc::new(Active::new(config));
                true
            }
            Err(e) => {
                // Names the field, never a value: see ConfigError.
                log(Level::Error, format_args!("configuration rejected: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            active: Rc::clone(&self.active),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    active: Rc<Active>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let active = Rc::clone(&self.active);
        let mut host = ProxyHost { active: &active };
        match gate::on_request_headers(&mut host, &active.config) {
            Verdict::Continue => Action::Continue,
            Verdict::Stop => Action::Pause,
        }
    }
}

struct ProxyHost<'a> {
    active: &'a Active,
}

impl Host for ProxyHost<'_> {
    fn request_header(&mut self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        abi::request_header(name).map_err(|_| HostError)
    }

    fn now(&mut self) -> Option<Timestamp> {
        let nanos = abi::now_nanos().ok()?;
        let secs = i64::try_from(nanos / 1_000_000_000).ok()?;
        Some(Timestamp::from_unix(secs, (nanos % 1_000_000_000) as u32))
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::replace_request_header(name, value).map_err(|_| HostError)
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        abi::remove_request_header(name).map_err(|_| HostError)
    }

    fn send_reply(&mut self, denial: Denial, reply: &Reply) -> Result<(), HostError> {
        let headers = self.active.reply_headers.get(denial.index()).ok_or(HostError)?;
        abi::send_local_response(reply.status, reply.details, headers, &reply.body).map_err(|_| HostError)
    }

    fn count(&mut self, counter: Counter) {
        if let Some(id) = metrics().get(counter.index()) {
            let _ = abi::increment(*id);
        }
    }

    fn log(&mut self, level: LogLevel, message: fmt::Arguments<'_>) {
        let level = match level {
            LogLevel::Debug => Level::Debug,
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Error => Level::Error,
        };
        log(level, message);
    }
}
