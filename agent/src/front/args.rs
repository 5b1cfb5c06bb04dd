//! The command line of a `corral front` process: one typed struct that the agent renders into
//! the front's argv ([`FrontArgs::to_argv`]) and that clap parses back in the front (`corral
//! front ...`, flattened into the CLI), so both ends agree by construction. Pure: config builds
//! it for the front app.

use std::net::SocketAddr;
use std::time::Duration;

/// Kernel TLS offload: `[app.NAME.tls] ktls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KtlsMode {
    /// Offload where the kernel takes the negotiated suite, userspace rustls otherwise.
    Auto,
    /// Userspace rustls always.
    Off,
    /// Refuse to start where the kernel takes no suite both ways; offer clients only those.
    Require,
}

impl KtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KtlsMode::Auto => "auto",
            KtlsMode::Off => "off",
            KtlsMode::Require => "require",
        }
    }
}

/// What a front process is told: it gets its sockets, bundle and counters as descriptors
/// ([`super::fds`]), everything else here.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FrontArgs {
    /// The app this front serves (for its logs).
    #[arg(long)]
    pub app: String,
    /// The app's workers' address, where plaintext goes.
    #[arg(long)]
    pub upstream: SocketAddr,
    #[arg(long, value_enum)]
    pub ktls: KtlsMode,
    /// How long a client has to complete its handshake, in milliseconds.
    #[arg(long = "handshake-timeout-ms", value_parser = millis)]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once in this process; more wait in the accept queue.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,
    /// Answer plain HTTP on the redirect listener with a 308 to https on this port.
    #[arg(long)]
    pub redirect_to_port: Option<u16>,
    /// Start each upstream connection with a PROXY protocol v2 header.
    #[arg(long)]
    pub proxy_protocol_v2: bool,
}

fn millis(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("expected whole milliseconds, found {s:?}: {e}"))
}

/// The subcommand the agent runs its own binary with.
pub const SUBCOMMAND: &str = "front";

impl FrontArgs {
    /// The argv after the program: `front --app ... --upstream ...`, as clap parses it back.
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec![
            SUBCOMMAND.to_string(),
            "--app".to_string(),
            self.app.clone(),
            "--upstream".to_string(),
            self.upstream.to_string(),
            "--ktls".to_string(),
            self.ktls.as_str().to_string(),
            "--handshake-timeout-ms".to_string(),
            self.handshake_timeout.as_millis().to_string(),
            "--max-handshakes".to_string(),
            self.max_handshakes.to_string(),
        ];
        if let Some(port) = self.redirect_to_port {
            argv.push("--redirect-to-port".to_string());
            argv.push(port.to_string());
        }
        if self.proxy_protocol_v2 {
            argv.push("--proxy-protocol-v2".to_string());
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand)]
    enum Command {
        Front(FrontArgs),
    }

    fn round_trip(a: &FrontArgs) -> FrontArgs {
        let argv = std::iter::once("corral".to_string()).chain(a.to_argv());
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Front(b) => b,
        }
    }

    #[test]
    fn what_the_agent_renders_the_front_parses_back() {
        let mut a = FrontArgs {
            app: "api".into(),
            upstream: "[::1]:8000".parse().unwrap(),
            ktls: KtlsMode::Require,
            handshake_timeout: Duration::from_millis(10_500),
            max_handshakes: 1024,
            redirect_to_port: None,
            proxy_protocol_v2: false,
        };
        assert_eq!(round_trip(&a), a);
        a.redirect_to_port = Some(8443);
        a.proxy_protocol_v2 = true;
        for k in [KtlsMode::Auto, KtlsMode::Off, KtlsMode::Require] {
            a.ktls = k;
            assert_eq!(round_trip(&a), a);
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "corral",
                "front",
                "--app",
                "a",
                "--upstream",
                "127.0.0.1:1",
                "--ktls",
                "auto",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|_| ())
        };
        assert!(parse(&["--handshake-timeout-ms", "10", "--max-handshakes", "1"]).is_ok());
        assert!(parse(&["--handshake-timeout-ms", "1s", "--max-handshakes", "1"]).is_err());
        assert!(parse(&["--handshake-timeout-ms", "10", "--max-handshakes", "0"]).is_err());
        assert!(parse(&[
            "--handshake-timeout-ms",
            "10",
            "--max-handshakes",
            "1",
            "--ktls",
            "x"
        ])
        .is_err());
    }
}
