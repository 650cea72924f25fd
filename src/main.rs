//! The `pgveil` binary: parse the command line, start tracing, run the subcommand.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use pgveil::cli::{self, Cli, Command, TokenCommand};
use pgveil::config::Config;
use pgveil::proxy::Proxy;
use pgveil::server;
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc instead of the system allocator: see scripts/bench_memory.py for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    pgveil::logging::init(cli.log_format);
    match cli.command {
        Command::Serve(args) => match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pgveil serve: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Check {
            rules,
            upstream_url,
        } => cli::check(&rules, upstream_url.as_deref()),
        Command::Explain {
            rules,
            role,
            upstream_url,
            sql,
        } => cli::explain(&rules, &role, upstream_url.as_deref(), &sql),
        Command::Audit(command) => cli::audit(command),
        Command::Trash(command) => cli::trash::run(command),
        Command::Token(TokenCommand::Decode { key_env, tokens }) => {
            cli::inspect::token_decode(&key_env, &tokens)
        }
        Command::Health { addr, timeout } => cli::health::run(&addr, timeout),
        Command::Completions { shell } => {
            print!("{}", cli::docs::completions(shell, Cli::command()));
            ExitCode::SUCCESS
        }
        Command::Man => {
            print!("{}", cli::docs::man(Cli::command()));
            ExitCode::SUCCESS
        }
    }
}

fn serve(args: cli::ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_settings(args.settings()?)?;
    let proxy = Arc::new(Proxy::new(config)?);
    let threads = proxy.config.limits.worker_threads;
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .build()
    .context("starting the runtime")?;
    runtime.block_on(async move {
        let config = &proxy.config;
        let (tcp, socket) = match pgveil::config::unix_socket(&config.listen, 6432) {
            Some(path) => (None, Some(path)),
            None => {
                let tcp = tokio::net::TcpListener::bind(&config.listen)
                    .await
                    .with_context(|| format!("listening on {}", config.listen))?;
                let port = tcp.local_addr()?.port();
                let socket = config
                    .unix_socket_dir
                    .as_ref()
                    .map(|d| d.join(format!(".s.PGSQL.{port}")));
                (Some(tcp), socket)
            }
        };
        let unix = match socket {
            Some(path) => Some(
                server::UnixSocket::bind(&path)
                    .with_context(|| format!("listening on {}", path.display()))?,
            ),
            None => None,
        };
        let listeners = server::Listeners { tcp, unix };
        tracing::info!(
            listen = %listeners.tcp.as_ref().map(|l| l.local_addr()).transpose()?.map_or_else(String::new, |a| a.to_string()),
            socket = %listeners.unix.as_ref().map_or_else(String::new, |u| u.path().display().to_string()),
            upstream = %proxy.config.upstream,
            "pgveil ready"
        );
        if let Some(addr) = proxy.config.metrics {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
            tracing::info!(metrics = %metrics.local_addr()?, "metrics at /metrics");
            tokio::spawn(server::serve_metrics(metrics, proxy.clone()));
        }
        if let Some(addr) = &proxy.config.admin {
            let admin = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving the admin console on {addr}"))?;
            tracing::info!(admin = %admin.local_addr()?, "admin console ready");
            tokio::spawn(pgveil::admin::serve(admin, proxy.clone()));
        }
        let mut hangup = signal(SignalKind::hangup())?;
        let reloader = proxy.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = reloader.reload();
            }
        });
        tokio::spawn(server::watch_rules(
            proxy.clone(),
            std::time::Duration::from_secs(2),
        ));
        let mut term = signal(SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            tracing::info!("shutdown requested");
        };
        server::run(listeners, proxy, shutdown).await;
        Ok(())
    })
}
