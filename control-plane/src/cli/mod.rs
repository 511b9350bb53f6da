//! The command line: `apitokens serve | bootstrap | render | import |
//! new-epoch`, thin adapters over the token service and the publisher.

mod error;
mod health;
mod http;
mod serve;

pub use error::Error;
use error::Result;

use crate::clock;
use crate::render::{self, WasmPluginOptions};
use crate::store::{Location, OpenStore};
use crate::tokens::{self, Service, ServiceOptions};
use apitokens_core::config::Config;
use apitokens_core::error::ConfigError;
use apitokens_core::spec::PluginConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "apitokens",
    version,
    about = "Control plane for the apitokens Envoy filter: issues namespace-scoped API tokens and pushes the filter configuration to Envoy",
    long_about = "Control plane for the apitokens Envoy filter.\n\n\
        `serve` runs the token REST API and pushes the filter configuration to every \
        Envoy over ECDS (gRPC) or a watched file. `bootstrap` creates the first owner \
        token of a namespace. `render` prints the configuration for static Envoy or \
        Istio setups. Secrets are shown once; only their SHA-256 digests are stored."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the token API, the ECDS server (gRPC and/or file), /healthz and /status
    Serve(Box<serve::ServeArgs>),
    /// Create an owner token directly in the store and print its secret once (the way in for a namespace's first owner)
    Bootstrap(BootstrapArgs),
    /// Print the current plugin configuration (JSON, as the filter reads it) or an Istio WasmPlugin
    Render(RenderArgs),
    /// Import tokens by digest from a plugin configuration file (migrating existing secrets, e.g. UUIDs)
    Import(ImportArgs),
    /// Accept the store as it is after restoring it from a backup or a failover that lost writes: start a new epoch, so that the Envoys take its content (tokens revoked after the copy work again: revoke them again)
    NewEpoch(NewEpochArgs),
    /// Exit 0 if a running `serve` answers GET /healthz with 200 (the container image's health check: no shell or curl needed)
    Health(HealthArgs),
}

#[derive(Args)]
struct HealthArgs {
    /// The health endpoint (plain HTTP): the --status-listen address, or --listen without one
    #[arg(long, default_value = "http://127.0.0.1:8081/healthz", value_name = "URL")]
    url: String,
    /// The longest the check waits, in milliseconds
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    timeout_ms: u64,
}

#[derive(Args)]
struct StoreArgs {
    /// Where the tokens are: postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=verify-full&sslrootcert=CA.pem]
    /// for several replicas, or a SQLite file (a path, or sqlite:PATH); instead of --db
    #[arg(
        long,
        env = "APITOKENS_STORE",
        value_name = "URL|PATH",
        conflicts_with = "db",
        hide_env_values = true
    )]
    store: Option<String>,
    /// A file holding the --store URL, such as a mounted Secret: keeps a database password out of the process list, where every local user reads it; instead of --store and --db
    #[arg(
        long,
        env = "APITOKENS_STORE_FILE",
        value_name = "PATH",
        conflicts_with_all = ["store", "db"]
    )]
    store_file: Option<PathBuf>,
    /// SQLite database file (created by `serve`, `bootstrap` and `import` if missing)
    #[arg(long, env = "APITOKENS_DB", default_value = "apitokens.db", value_name = "PATH")]
    db: PathBuf,
}

impl StoreArgs {
    fn location(&self) -> Result<Location> {
        if let Some(path) = &self.store_file {
            let flag = || format!("--store-file {}", path.display());
            let text = std::fs::read_to_string(path).map_err(|e| Error::input(flag(), e))?;
            let url = text.trim();
            if url.is_empty() {
                return Err(Error::input(flag(), "the file is empty"));
            }
            return Ok(Location::parse(url));
        }
        Ok(match &self.store {
            Some(text) => Location::parse(text),
            None => Location::Sqlite(self.db.clone()),
        })
    }

    /// `--store` was given on the command line with a database password in
    /// it (not through `APITOKENS_STORE` or `--store-file`).
    fn password_on_command_line(&self) -> bool {
        let Some(url) = &self.store else {
            return false;
        };
        let given = std::env::args().any(|a| a == *url || a.strip_prefix("--store=") == Some(url.as_str()));
        given && has_password(url)
    }
}

/// A PostgreSQL URL with a password (`user:password@` or `password=`).
fn has_password(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(user_info, _)| user_info.contains(':'))
        || rest.contains("password=")
}

#[derive(Args)]
struct ConfigArgs {
    /// Base plugin configuration (JSON: everything but tokens: realm, rules, identityHeaders, forwardAuthorization, forwardAuthorizationPaths, forwardAuthorizationClusters, urlOverrideHeaders, usageReport). `serve` defaults to envoy/ecds-plugin-base.json as shipped; `render` to none
    #[arg(long, value_name = "FILE")]
    plugin_config: Option<PathBuf>,
}

#[derive(Args)]
struct BootstrapArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Namespace of the owner token (a DNS label)
    #[arg(long, value_name = "NS")]
    namespace: String,
    /// Token id (a DNS label); the token is namespaces/NS/apitokens/NAME
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Optional expiry (RFC 3339, e.g. 2030-01-01T00:00:00Z)
    #[arg(long, value_name = "TIME")]
    expire_time: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RenderFormat {
    /// The plugin configuration as the filter reads it
    Json,
    /// An Istio WasmPlugin resource (YAML)
    Wasmplugin,
}

#[derive(Args)]
struct RenderArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: ConfigArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "json")]
    format: RenderFormat,
    /// WasmPlugin: where Istio fetches the module (oci://, https:// or file://)
    #[arg(long, default_value_t = WasmPluginOptions::default().url, value_name = "URL")]
    wasm_url: String,
    /// WasmPlugin: its Kubernetes namespace
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    istio_namespace: String,
    /// WasmPlugin: the module file Istio will fetch, to pin its SHA-256 (`sha256`: Istio refuses any other module). For an oci:// image, pin the image by digest in --wasm-url instead
    #[arg(long, value_name = "PATH")]
    wasm_module: Option<PathBuf>,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Plugin configuration file whose `tokens` (name, role, secretSha256, expireTime) are imported; all or none
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(Args)]
struct NewEpochArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Start the new epoch even if no Envoy or replica has reported that the store is behind
    #[arg(long)]
    force: bool,
}

/// Runs the command line; errors go to stderr as `apitokens: error: ...`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (level, format) = match &cli.command {
        Command::Serve(a) => (a.log_level, a.log_format),
        _ => (tracing::Level::WARN, serve::LogFormat::Text),
    };
    init_logging(level, format);
    let result = match cli.command {
        Command::Serve(args) => serve::serve(*args),
        Command::Bootstrap(args) => run(bootstrap(args)),
        Command::Render(args) => run(render_cmd(args)),
        Command::Import(args) => run(import(args)),
        Command::NewEpoch(args) => run(new_epoch(args)),
        Command::Health(args) => health::check(&args.url, std::time::Duration::from_millis(args.timeout_ms.max(1))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apitokens: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr: this crate's messages at `level`, libraries' warnings and
/// errors only (nothing here logs a secret or an Authorization header, and
/// the libraries' debug output could).
fn init_logging(level: tracing::Level, format: serve::LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::WARN)
        .with_target("apitokens_control_plane", level);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(level.max(tracing::Level::WARN));
    let _ = match format {
        serve::LogFormat::Text => tracing::subscriber::set_global_default(builder.finish().with(filter)),
        // One object per line: the event's fields at the top level next to
        // `message`, the request's span (method, path, caller) under `span`.
        serve::LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish()
                .with(filter),
        ),
    };
}

/// Runs a one-shot command on a small runtime.
fn run(job: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?
        .block_on(job)
}

/// The base configuration of the shipped ECDS setup: the token API gets the
/// caller's bearer (it checks it itself), usage reports go to the xDS cluster.
const ECDS_BASE: &[u8] = include_bytes!("../../../envoy/ecds-plugin-base.json");

/// `--plugin-config`, or `default` without it.
fn load_base(args: &ConfigArgs, default: &[u8]) -> Result<PluginConfig> {
    let Some(path) = &args.plugin_config else {
        return base_config(default).map_err(|e| Error::config("the built-in base configuration", e));
    };
    let flag = format!("--plugin-config {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| Error::input(&flag, e))?;
    base_config(&bytes).map_err(|e| Error::config(flag, e))
}

/// Reads a base plugin configuration (everything but the tokens) and checks
/// it with the filter's own validation.
pub fn base_config(json: &[u8]) -> Result<PluginConfig, ConfigError> {
    let base = PluginConfig::from_json(json)?;
    if !base.tokens.is_empty() {
        return Err(ConfigError::new(
            "tokens",
            "must be empty in the base configuration: the control plane manages tokens (use `apitokens import` to migrate existing ones)",
        ));
    }
    Config::from_spec(&base)?;
    Ok(base)
}

/// Opens the store `--store` (or `--store-file`, or `--db`) names, and how
/// to name it to people; neither errors nor the name ever show a database
/// URL (it may carry a password).
async fn open_store(args: &StoreArgs, must_exist: bool) -> Result<(OpenStore, String)> {
    if args.password_on_command_line() {
        tracing::warn!(
            "--store carries a database password on the command line, where every local user reads it (ps, \
             /proc): give the URL in APITOKENS_STORE or a file (--store-file) instead"
        );
    }
    let location = args.location()?;
    let opened = location.open(must_exist).await.map_err(|e| match e {
        crate::store::StoreError::Unavailable(cause) => Error::input("--store", cause),
        other => Error::Store(other),
    })?;
    let name = opened.describe_for(&location);
    Ok((opened, name))
}

/// A service error in the words of the command line: flags, not JSON fields.
fn cli_error(e: tokens::Error) -> Error {
    match e {
        tokens::Error::Invalid { field, problem } => {
            let flag = match field.as_str() {
                "namespace" => "--namespace".to_owned(),
                "token" => "--name".to_owned(),
                "expireTime" => "--expire-time".to_owned(),
                other => other.to_owned(),
            };
            Error::Refused(format!("{flag} {problem}"))
        }
        other => Error::Refused(other.to_string()),
    }
}

async fn bootstrap(args: BootstrapArgs) -> Result<()> {
    let (opened, store_name) = open_store(&args.store, false).await?;
    let service = Service::new(opened.store(), ServiceOptions::default());
    let issued = service
        .bootstrap(&args.namespace, &args.name, args.expire_time.as_deref())
        .await
        .map_err(|e| match e {
            tokens::Error::AlreadyExists(name) => Error::Refused(format!(
                "{name} already exists; choose another --name (or delete it through the API first)"
            )),
            other => cli_error(other),
        })?;
    eprintln!(
        "Created owner token {} in {}.\nIts secret follows on stdout; it is shown only this once, so store it now.\nA running `apitokens serve` on this database picks it up within its poll interval.",
        issued.token.name,
        store_name
    );
    println!("{}", issued.secret.expose());
    Ok(())
}

async fn render_cmd(args: RenderArgs) -> Result<()> {
    let mut base = load_base(&args.config, b"")?;
    // Usage reports name a cluster of the ECDS setup; a static configuration
    // has no control plane to report to.
    base.usage_report = None;
    let store = open_store(&args.store, true).await?.0.store();
    let (_, records) = store.load().await?;
    let spec = render::plugin_config(&base, &records, clock::now());
    Config::from_spec(&spec).map_err(|e| Error::config("the configuration is invalid", e))?;
    let text = match args.format {
        RenderFormat::Json => render::json(&spec) + "\n",
        RenderFormat::Wasmplugin => render::wasm_plugin(
            &spec,
            &WasmPluginOptions {
                url: args.wasm_url,
                namespace: args.istio_namespace,
                sha256: args.wasm_module.as_deref().map(module_sha256).transpose()?,
                ..WasmPluginOptions::default()
            },
        ),
    };
    print!("{text}");
    Ok(())
}

/// The SHA-256 (hex) of the module file at `path`, as Istio checks it.
fn module_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::input(format!("--wasm-module {}", path.display()), e))?;
    Ok(apitokens_core::table::Digest::of(&bytes).to_hex())
}

async fn import(args: ImportArgs) -> Result<()> {
    let shown = args.file.display().to_string();
    let bytes = std::fs::read(&args.file).map_err(|e| Error::input(&shown, e))?;
    let spec = PluginConfig::from_json(&bytes).map_err(|e| Error::config(&shown, e))?;
    let (opened, store_name) = open_store(&args.store, false).await?;
    let service = Service::new(opened.store(), ServiceOptions::default());
    let count = service.import(&spec).await.map_err(|e| match e {
        tokens::Error::AlreadyExists(_) => {
            Error::Refused("a token with one of these names already exists; nothing was imported".to_owned())
        }
        tokens::Error::DigestTaken => {
            Error::Refused("a token with one of these digests already exists; nothing was imported".to_owned())
        }
        other => Error::Refused(format!("{shown}: {other}; nothing was imported")),
    })?;
    eprintln!("Imported {count} tokens into {}.", store_name);
    Ok(())
}

async fn new_epoch(args: NewEpochArgs) -> Result<()> {
    let (opened, store_name) = open_store(&args.store, true).await?;
    let store = opened.store();
    let before = store.head().await?;
    let Some(seen) = before.behind.or(args.force.then_some(before.at)) else {
        return Err(Error::Refused(format!(
            "the store is at version {} of epoch {} and nothing enforces a newer one: there is no need for a new epoch \
             (--force starts one anyway)",
            before.at.revision, before.at.epoch
        )));
    };
    let after = store.new_epoch().await?;
    eprintln!(
        "The store ({}) was at version {} of epoch {}; the gateways had seen version {} of epoch {}.\n\
         Started epoch {} at version {}: every Envoy takes the store's content now, and writes are allowed again.\n\
         Whatever was changed after the store's copy was taken is lost: tokens created since are unknown, and tokens \
         revoked or regenerated since work again with their old secrets. Check the audit trail and revoke them again.",
        store_name, before.at.revision, before.at.epoch, seen.revision, seen.epoch, after.at.epoch, after.at.revision
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::has_password;

    #[test]
    fn a_password_in_a_store_url_is_recognised() {
        assert!(has_password("postgres://app:s3cret@db:5432/apitokens"));
        assert!(has_password("postgresql://app:s3cret@db/apitokens?sslmode=require"));
        assert!(has_password("postgres://app@db/apitokens?password=s3cret"));
        assert!(!has_password("postgres://app@db:5432/apitokens?sslmode=verify-full"));
        assert!(!has_password("postgres://db/apitokens"));
        assert!(!has_password("/var/lib/apitokens/apitokens.db"));
    }
}
