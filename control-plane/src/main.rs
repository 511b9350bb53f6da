//! `apitokens`: the control plane of the apitokens Envoy filter.

use apitokens_control_plane::ecds::{self, FilterParams};
use apitokens_control_plane::engine::{Engine, EngineOptions};
use apitokens_control_plane::render::{self, WasmPluginOptions};
use apitokens_control_plane::store::{SqliteStore, Store, StoreError, TokenRecord};
use apitokens_control_plane::{api, clock, file_ecds, logging, secret::Secret, xds_grpc};
use apitokens_core::config::{Config, PluginConfig};
use apitokens_core::name::{is_dns_label, TokenName};
use apitokens_core::role::Role;
use apitokens_core::timestamp::Timestamp;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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
    Serve(ServeArgs),
    /// Create an owner token directly in the store and print its secret once (the way in for a namespace's first owner)
    Bootstrap(BootstrapArgs),
    /// Print the current plugin configuration (JSON, as the filter reads it) or an Istio WasmPlugin
    Render(RenderArgs),
    /// Import tokens by digest from a plugin configuration file (migrating existing secrets, e.g. UUIDs)
    Import(ImportArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// SQLite database file (created by `serve`, `bootstrap` and `import` if missing)
    #[arg(long, env = "APITOKENS_DB", default_value = "apitokens.db", value_name = "PATH")]
    db: PathBuf,
}

#[derive(Args)]
struct ConfigArgs {
    /// Base plugin configuration (JSON: realm, rules, identityHeaders, forwardAuthorization; no tokens)
    #[arg(long, value_name = "FILE")]
    plugin_config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: ConfigArgs,
    /// Address of the REST API, /healthz and /status
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: SocketAddr,
    /// Address of the ECDS gRPC server
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    xds_listen: SocketAddr,
    /// Do not serve ECDS over gRPC (use with --ecds-file)
    #[arg(long)]
    no_xds: bool,
    /// Also write the ECDS resource to this file (binary DiscoveryResponse, must end in .pb), replaced by atomic rename
    #[arg(long, value_name = "PATH")]
    ecds_file: Option<PathBuf>,
    /// Name of the ECDS resource: the name of the HTTP filter in Envoy's config_discovery
    #[arg(long, default_value = ecds::DEFAULT_RESOURCE_NAME, value_name = "NAME")]
    resource_name: String,
    /// Path of the filter module as Envoy sees it (relative to Envoy's working directory)
    #[arg(long, default_value = ecds::DEFAULT_MODULE, value_name = "PATH")]
    wasm_module: String,
    /// How often to look for changes made by other processes (e.g. bootstrap), in milliseconds
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    poll_interval_ms: u64,
    /// Largest gRPC message sent or accepted, in bytes (tonic's default is 4 MiB)
    #[arg(long, default_value_t = 256 * 1024 * 1024, value_name = "BYTES")]
    max_message_bytes: usize,
    /// Log level: error, warn, info, debug
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: log::LevelFilter,
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
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Plugin configuration file whose `tokens` (name, role, secretSha256, expireTime) are imported; all or none
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match &cli.command {
        Command::Serve(a) => a.log_level,
        _ => log::LevelFilter::Warn,
    };
    logging::init(level);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bootstrap(args) => bootstrap(args),
        Command::Render(args) => render_cmd(args),
        Command::Import(args) => import(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apitokens: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_base(args: &ConfigArgs) -> Result<PluginConfig, String> {
    let Some(path) = &args.plugin_config else {
        return Ok(PluginConfig::default());
    };
    let bytes = std::fs::read(path).map_err(|e| format!("--plugin-config {}: {e}", path.display()))?;
    ecds::base_config(&bytes).map_err(|e| format!("--plugin-config {}: {e}", path.display()))
}

fn open_store(path: &Path) -> Result<Arc<dyn Store>, String> {
    Ok(Arc::new(SqliteStore::open(path).map_err(|e| e.to_string())?))
}

// ---------------------------------------------------------------------------

fn serve(args: ServeArgs) -> Result<(), String> {
    if args.no_xds && args.ecds_file.is_none() {
        return Err("--no-xds needs --ecds-file: otherwise no Envoy can get the configuration".into());
    }
    if let Some(path) = &args.ecds_file {
        file_ecds::check_path(path)?;
    }
    let base = load_base(&args.config)?;
    let store = open_store(&args.store.db)?;
    let opts = EngineOptions {
        base,
        filter: FilterParams {
            resource_name: args.resource_name.clone(),
            module: args.wasm_module.clone(),
            ..FilterParams::default()
        },
    };
    let engine = Engine::open(store, opts)?;
    if let Some(path) = &args.ecds_file {
        file_ecds::write_current(&engine, path)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run_server(engine, args))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn warn_if_exposed(what: &str, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        log::warn!("{what} listens on {addr}, beyond loopback: put TLS and network policy in front of it");
    }
}

async fn run_server(engine: Arc<Engine>, args: ServeArgs) -> Result<(), String> {
    let api_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let api_addr = api_listener.local_addr().map_err(|e| e.to_string())?;
    warn_if_exposed("the API", api_addr);
    let xds_listener = if args.no_xds {
        None
    } else {
        let l = tokio::net::TcpListener::bind(args.xds_listen)
            .await
            .map_err(|e| format!("--xds-listen {}: {e}", args.xds_listen))?;
        warn_if_exposed("the xDS server", l.local_addr().map_err(|e| e.to_string())?);
        Some(l)
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        Arc::clone(&engine).run_background(Duration::from_millis(args.poll_interval_ms.max(10)), stop_rx.clone()),
    );
    if let Some(path) = args.ecds_file.clone() {
        tasks.spawn(file_ecds::run(Arc::clone(&engine), path, stop_rx.clone()));
    }
    let app = api::app(Arc::clone(&engine));
    let api_stop = wait_true(stop_rx.clone());
    tasks.spawn(async move {
        // No Nagle: a small answer must not wait for the peer's delayed ACK.
        let api_listener = axum::serve::ListenerExt::tap_io(api_listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(api_listener, app).with_graceful_shutdown(api_stop).await {
            log::error!("API server failed: {e}");
        }
    });
    if let Some(listener) = xds_listener {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let service = xds_grpc::server(Arc::clone(&engine), stop_rx.clone(), args.max_message_bytes);
        let xds_stop = wait_true(stop_rx.clone());
        tasks.spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(service)
                .serve_with_incoming_shutdown(
                    nodelay(tokio_stream::wrappers::TcpListenerStream::new(listener)),
                    xds_stop,
                )
                .await;
            if let Err(e) = result {
                log::error!("xDS server failed: {e}");
            }
        });
        log::info!(
            "xDS (ECDS, gRPC) on {addr}, resource {:?}",
            engine.filter_params().resource_name
        );
    }
    log::info!(
        "API on http://{api_addr}/apitokens/v1/namespaces/{{namespace}}/apitokens, health http://{api_addr}/healthz, status http://{api_addr}/status"
    );

    tokio::select! {
        () = shutdown_signal() => log::info!("shutting down"),
        Some(_) = tasks.join_next() => log::error!("a server task stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        log::warn!("some connections did not close within 5 s");
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn bootstrap(args: BootstrapArgs) -> Result<(), String> {
    if !is_dns_label(args.namespace.as_bytes()) {
        return Err(
            "--namespace must be a DNS label (lower-case letters, digits and '-', at most 63 characters)".into(),
        );
    }
    if !is_dns_label(args.name.as_bytes()) {
        return Err("--name must be a DNS label (lower-case letters, digits and '-', at most 63 characters)".into());
    }
    let now = clock::now_seconds();
    let expire_time = match args.expire_time.as_deref() {
        None => None,
        Some(text) => {
            let t = Timestamp::parse_rfc3339(text).map_err(|e| format!("--expire-time {e}"))?;
            if t <= now {
                return Err("--expire-time must be in the future".into());
            }
            Some(t)
        }
    };
    let name = TokenName {
        namespace: &args.namespace,
        token: &args.name,
    }
    .to_string();
    let store = open_store(&args.store.db)?;
    let secret = Secret::generate().map_err(|e| format!("the OS random source failed: {e}"))?;
    let record = TokenRecord {
        name: name.clone(),
        role: Role::Owner,
        secret_sha256: secret.sha256_hex(),
        create_time: now,
        expire_time,
    };
    match store.insert(&record) {
        Ok(()) => {}
        Err(StoreError::NameTaken) => {
            return Err(format!(
                "{name} already exists; choose another --name (or delete it through the API first)"
            ))
        }
        Err(e) => return Err(e.to_string()),
    }
    eprintln!(
        "Created owner token {name} in {}.\nIts secret follows on stdout; it is shown only this once, so store it now.\nA running `apitokens serve` on this database picks it up within its poll interval.",
        args.store.db.display()
    );
    println!("{}", secret.expose());
    Ok(())
}

fn render_cmd(args: RenderArgs) -> Result<(), String> {
    let base = load_base(&args.config)?;
    let store = SqliteStore::open_existing(&args.store.db).map_err(|e| e.to_string())?;
    let (_, records) = store.all().map_err(|e| e.to_string())?;
    let (spec, _) = ecds::plugin_config(&base, &records, clock::now());
    Config::from_spec(&spec).map_err(|e| format!("the configuration is invalid: {e}"))?;
    let text = match args.format {
        RenderFormat::Json => render::json(&spec) + "\n",
        RenderFormat::Wasmplugin => render::wasm_plugin(
            &spec,
            &WasmPluginOptions {
                url: args.wasm_url,
                namespace: args.istio_namespace,
                ..WasmPluginOptions::default()
            },
        ),
    };
    print!("{text}");
    Ok(())
}

fn import(args: ImportArgs) -> Result<(), String> {
    let bytes = std::fs::read(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let spec = PluginConfig::from_json(&bytes).map_err(|e| format!("{}: {e}", args.file.display()))?;
    // The filter's own validation: names, roles, digests, duplicates, times.
    Config::from_spec(&spec).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let now = clock::now_seconds();
    let mut records = Vec::with_capacity(spec.tokens.len());
    for t in &spec.tokens {
        records.push(TokenRecord {
            name: t.name.clone(),
            role: Role::parse(&t.role).ok_or_else(|| format!("{}: unknown role", t.name))?,
            secret_sha256: t.secret_sha256.clone(),
            create_time: now,
            expire_time: t
                .expire_time
                .as_deref()
                .map(Timestamp::parse_rfc3339)
                .transpose()
                .map_err(|e| format!("{}: expireTime {e}", t.name))?,
        });
    }
    let store = open_store(&args.store.db)?;
    store.insert_many(&records).map_err(|e| match e {
        StoreError::NameTaken => "a token with one of these names already exists; nothing was imported".to_owned(),
        StoreError::DigestTaken => "a token with one of these digests already exists; nothing was imported".to_owned(),
        other => other.to_string(),
    })?;
    eprintln!("Imported {} tokens into {}.", records.len(), args.store.db.display());
    Ok(())
}

/// Accepted connections without Nagle's algorithm: otherwise a small push (a
/// revocation) can wait for Envoy's delayed ACK, about 40 ms (measured).
fn nodelay(
    incoming: tokio_stream::wrappers::TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    incoming.map(|stream| {
        if let Ok(tcp) = &stream {
            let _ = tcp.set_nodelay(true);
        }
        stream
    })
}
