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

/// What the front does with a connection's plaintext: `[app.NAME.tls] proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// Parse HTTP/1.1 and HTTP/2 (hyper), add forwarded headers, forward each request over
    /// HTTP/1.1 (see [`UpstreamMode`]).
    Http,
    /// The bytes as they are, one upstream connection per client connection (kTLS + splice,
    /// PROXY v2 when asked).
    Tcp,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Http => "http",
            ProxyMode::Tcp => "tcp",
        }
    }
}

/// How the HTTP proxy reaches the workers: `[app.NAME.tls] upstream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamMode {
    /// Keep-alive connections reused while their worker answers as fast as the others; a
    /// slower one's connection is closed, and a request without a pooled connection gets a
    /// new one, steered (ARCHITECTURE.md: "the HTTP proxy's upstream connections").
    Pool,
    /// A new connection per request: the steering picks the worker of every request.
    Connect,
}

impl UpstreamMode {
    /// The default, from the measurement in BENCHMARKS.md ("http upstream").
    pub const DEFAULT: UpstreamMode = UpstreamMode::Pool;

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Pool => "pool",
            UpstreamMode::Connect => "connect",
        }
    }
}

/// The HTTP proxy's settings (`proxy = "http"`): who may set forwarded headers, the limits and
/// timeouts a client and a worker get.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HttpArgs {
    /// Clients whose X-Forwarded-*/Forwarded headers are kept (and appended to); anyone else's
    /// are removed. Repeat for more.
    #[arg(long = "trusted-proxy")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How long a client has to send a request's head (slowloris), in milliseconds.
    #[arg(long = "header-timeout-ms", value_parser = millis)]
    pub header_timeout: Duration,
    /// How long the worker has to answer with a response head before the client gets a 504,
    /// in milliseconds.
    #[arg(long = "upstream-timeout-ms", value_parser = millis)]
    pub upstream_timeout: Duration,
    /// How long a body may stay silent (either way) before the exchange is cut, in
    /// milliseconds.
    #[arg(long = "body-timeout-ms", value_parser = millis)]
    pub body_timeout: Duration,
    /// The most bytes of a request head; more gets a 431.
    #[arg(long, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// The most header fields in a request; more gets a 431.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_headers: u32,
    /// A log line per request on stderr (the front's journal).
    #[arg(long)]
    pub access_log: bool,
    /// Reuse keep-alive connections to the workers (`pool`) or open one per request.
    #[arg(id = "upstream_mode", long = "upstream-mode", value_enum)]
    pub upstream: UpstreamMode,
}

impl HttpArgs {
    fn push_argv(&self, argv: &mut Vec<String>) {
        for net in &self.trusted_proxies {
            argv.push("--trusted-proxy".to_string());
            argv.push(net.to_string());
        }
        for (flag, d) in [
            ("--header-timeout-ms", self.header_timeout),
            ("--upstream-timeout-ms", self.upstream_timeout),
            ("--body-timeout-ms", self.body_timeout),
        ] {
            argv.push(flag.to_string());
            argv.push(d.as_millis().to_string());
        }
        argv.push("--max-header-bytes".to_string());
        argv.push(self.max_header_bytes.to_string());
        argv.push("--max-headers".to_string());
        argv.push(self.max_headers.to_string());
        if self.access_log {
            argv.push("--access-log".to_string());
        }
        argv.push("--upstream-mode".to_string());
        argv.push(self.upstream.as_str().to_string());
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
    #[arg(long, value_enum)]
    pub proxy: ProxyMode,
    #[command(flatten)]
    pub http: HttpArgs,
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
    /// Answer ACME challenges (TLS-ALPN-01, and HTTP-01 on the redirect listener) from the
    /// answers the `corral acme` process writes into this directory.
    #[arg(long)]
    pub acme_challenges: Option<std::path::PathBuf>,
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
            "--proxy".to_string(),
            self.proxy.as_str().to_string(),
            "--handshake-timeout-ms".to_string(),
            self.handshake_timeout.as_millis().to_string(),
            "--max-handshakes".to_string(),
            self.max_handshakes.to_string(),
        ];
        self.http.push_argv(&mut argv);
        if let Some(port) = self.redirect_to_port {
            argv.push("--redirect-to-port".to_string());
            argv.push(port.to_string());
        }
        if self.proxy_protocol_v2 {
            argv.push("--proxy-protocol-v2".to_string());
        }
        if let Some(dir) = &self.acme_challenges {
            argv.push("--acme-challenges".to_string());
            argv.push(dir.display().to_string());
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
            proxy: ProxyMode::Http,
            http: HttpArgs {
                trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                header_timeout: Duration::from_secs(10),
                upstream_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_secs(30),
                max_header_bytes: 65536,
                max_headers: 100,
                access_log: true,
                upstream: UpstreamMode::Pool,
            },
            handshake_timeout: Duration::from_millis(10_500),
            max_handshakes: 1024,
            redirect_to_port: None,
            proxy_protocol_v2: false,
            acme_challenges: None,
        };
        assert_eq!(round_trip(&a), a);
        a.redirect_to_port = Some(8443);
        a.proxy_protocol_v2 = true;
        a.acme_challenges = Some("/var/lib/corral/acme/api.challenges".into());
        a.proxy = ProxyMode::Tcp;
        a.http.trusted_proxies.clear();
        a.http.access_log = false;
        a.http.upstream = UpstreamMode::Connect;
        for k in [KtlsMode::Auto, KtlsMode::Off, KtlsMode::Require] {
            a.ktls = k;
            assert_eq!(round_trip(&a), a);
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |extra: &[&str]| {
            let extra = if extra.contains(&"--max-header-bytes") {
                extra.to_vec()
            } else {
                [extra, &["--max-header-bytes", "8192"]].concat()
            };
            let mut argv = vec![
                "corral",
                "front",
                "--app",
                "a",
                "--upstream",
                "127.0.0.1:1",
                "--ktls",
                "auto",
                "--proxy",
                "http",
                "--header-timeout-ms",
                "1",
                "--upstream-timeout-ms",
                "1",
                "--body-timeout-ms",
                "1",
                "--max-headers",
                "1",
                "--upstream-mode",
                "connect",
            ];
            argv.extend_from_slice(&extra);
            Cli::try_parse_from(argv).map(|_| ())
        };
        assert!(parse(&["--handshake-timeout-ms", "10", "--max-handshakes", "1"]).is_ok());
        assert!(parse(&["--handshake-timeout-ms", "1s", "--max-handshakes", "1"]).is_err());
        assert!(parse(&["--handshake-timeout-ms", "10", "--max-handshakes", "0"]).is_err());
        let ok = ["--handshake-timeout-ms", "10", "--max-handshakes", "1"];
        assert!(parse(&[&ok[..], &["--trusted-proxy", "10.0.0.0/8"]].concat()).is_ok());
        assert!(parse(&[&ok[..], &["--trusted-proxy", "10.0.0.0/33"]].concat()).is_err());
        assert!(parse(&[&ok[..], &["--max-header-bytes", "100"]].concat()).is_err());
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
