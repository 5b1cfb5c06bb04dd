//! From raw records to the numbers the report shows: per-variant accumulation, percentiles,
//! shares, and the connection-rate rounds.

use super::*;

/// One variant's segments, merged.
#[derive(Default)]
pub(crate) struct Acc {
    measured: Vec<Record>,
    completed_in_window: usize,
    warmup_failures: usize,
    peak_in_flight: usize,
    cpu: Cpu,
    pub(crate) repeats: usize,
    pub(crate) disturbed: usize,
}

impl Acc {
    pub(crate) fn add(&mut self, r: LoadResult, disturbed: bool) {
        self.measured.extend(r.measured);
        self.completed_in_window += r.completed_in_window;
        self.warmup_failures += r.warmup_failures;
        self.peak_in_flight = self.peak_in_flight.max(r.peak_in_flight);
        self.cpu.busy += r.cpu.busy;
        self.cpu.client += r.cpu.client;
        self.cpu.servers += r.cpu.servers;
        self.cpu.agent += r.cpu.agent;
        self.cpu.steal += r.cpu.steal;
        self.disturbed += disturbed as usize;
    }

    /// The whole as one [`LoadResult`]: CPU shares averaged over the (equal) segments.
    /// The summary of `name` over `segments` measured windows, `measure` long in all, with the
    /// agent's status after them when `servers` is corral (`corral` is its CLI).
    pub(crate) fn summary(
        self,
        name: &'static str,
        servers: &Servers,
        mix: &Mix,
        segments: usize,
        measure: Duration,
        corral: &Path,
    ) -> Result<Summary> {
        let after = match &servers.control {
            Some(c) => Some(status(corral, c)?),
            None => None,
        };
        let (repeats, disturbed) = (self.repeats, self.disturbed);
        let mut sum = summarize(
            name,
            servers,
            mix,
            self.into_result(segments),
            measure,
            after,
        );
        sum.repeats = repeats;
        sum.disturbed = disturbed;
        Ok(sum)
    }

    pub(crate) fn into_result(self, segments: usize) -> LoadResult {
        let n = segments.max(1) as f64;
        LoadResult {
            measured: self.measured,
            completed_in_window: self.completed_in_window,
            warmup_failures: self.warmup_failures,
            peak_in_flight: self.peak_in_flight,
            cpu: Cpu {
                busy: self.cpu.busy / n,
                client: self.cpu.client / n,
                servers: self.cpu.servers / n,
                agent: self.cpu.agent / n,
                steal: self.cpu.steal / n,
            },
        }
    }
}

pub(crate) struct Summary {
    pub(crate) name: &'static str,
    pub(crate) steering: String,
    pub(crate) throughput: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) max: Duration,
    /// p50, p99 and p99.9 per request class of the [`Mix`].
    pub(crate) class_p50: Vec<Duration>,
    pub(crate) class_p99: Vec<Duration>,
    pub(crate) class_p999: Vec<Duration>,
    pub(crate) failures: BTreeMap<Failure, usize>,
    pub(crate) failure_examples: Vec<String>,
    pub(crate) shares: Vec<f64>,
    /// Responses from no known worker pid.
    pub(crate) strays: usize,
    pub(crate) lag_p99: Duration,
    pub(crate) lag_max: Duration,
    pub(crate) peak_in_flight: usize,
    pub(crate) warmup_failures: usize,
    pub(crate) cpu: Cpu,
    pub(crate) program: Option<serde_json::Value>,
    pub(crate) restarts: u64,
    /// Segments measured again because other processes used the CPUs.
    pub(crate) repeats: usize,
    /// Segments kept although disturbed (after [`ATTEMPTS`]).
    pub(crate) disturbed: usize,
}

/// The CPU per request that the handlers of `mix` burn (`/?burn_ms=N`), in ms.
pub(crate) fn handler_cpu_ms(mix: &Mix) -> f64 {
    mix.iter()
        .map(|(share, path, _)| {
            share
                * path
                    .strip_prefix("/?burn_ms=")
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
        })
        .sum()
}

pub(crate) fn pct(mut v: Vec<Duration>, q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub(crate) fn summarize(
    name: &'static str,
    servers: &Servers,
    mix: &Mix,
    r: LoadResult,
    measure: Duration,
    after: Option<serde_json::Value>,
) -> Summary {
    let mut ok_lat = Vec::new();
    let mut by_class = vec![Vec::new(); mix.len()];
    let mut failures = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    let mut by_pid: HashMap<i32, usize> = HashMap::new();
    let mut lags = Vec::with_capacity(r.measured.len());
    for rec in &r.measured {
        lags.push(rec.lag);
        match &rec.outcome {
            Outcome::Ok(pid) => {
                ok_lat.push(rec.latency);
                by_class[rec.class].push(rec.latency);
                *by_pid.entry(*pid).or_default() += 1;
            }
            Outcome::Failed(f, why) => {
                *failures.entry(*f).or_insert(0) += 1;
                if examples.len() < 5 && !examples.contains(why) {
                    examples.push(why.clone());
                }
            }
        }
    }
    let ok = ok_lat.len();
    let shares = servers
        .pids
        .iter()
        .map(|p| by_pid.get(p).copied().unwrap_or(0) as f64 * 100.0 / ok.max(1) as f64)
        .collect();
    let strays = by_pid
        .iter()
        .filter(|(p, _)| !servers.pids.contains(p))
        .map(|(_, n)| n)
        .sum();
    let (program, restarts) = match &after {
        Some(app) => (
            Some(app["steering_stats"].clone()),
            app["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["restarts"].as_u64())
                .sum(),
        ),
        None => (None, 0),
    };
    Summary {
        name,
        steering: servers.steering.clone(),
        throughput: r.completed_in_window as f64 / measure.as_secs_f64(),
        p50: pct(ok_lat.clone(), 0.5),
        p99: pct(ok_lat.clone(), 0.99),
        p999: pct(ok_lat.clone(), 0.999),
        max: pct(ok_lat, 1.0),
        class_p50: by_class.iter().map(|v| pct(v.clone(), 0.5)).collect(),
        class_p99: by_class.iter().map(|v| pct(v.clone(), 0.99)).collect(),
        class_p999: by_class.into_iter().map(|v| pct(v, 0.999)).collect(),
        failures,
        failure_examples: examples,
        shares,
        strays,
        lag_p99: pct(lags.clone(), 0.99),
        lag_max: pct(lags, 1.0),
        peak_in_flight: r.peak_in_flight,
        warmup_failures: r.warmup_failures,
        cpu: r.cpu,
        program,
        restarts,
        repeats: 0,
        disturbed: 0,
    }
}

impl Summary {
    /// The first cells of a report row (both `bench steering` and `bench peers`): name, req/s,
    /// p50, p99, p99.9 and max in ms.
    pub(crate) fn latency_cells(&self) -> String {
        format!(
            "{} | {:.1} | {} | {} | {} | {}",
            self.name,
            self.throughput,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }

    /// Each worker's share of the requests in %, as `a / b / ...`.
    pub(crate) fn shares_cell(&self) -> String {
        let shares: Vec<String> = self.shares.iter().map(|x| format!("{x:.1}")).collect();
        shares.join(" / ")
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

pub(crate) fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

pub(super) struct Round {
    pub(super) tag: char,
    pub(super) rate: f64,
    pub(super) failed: u64,
    pub(super) cpu: Cpu,
}

pub(super) struct RateSummary {
    /// Mean over ABBA blocks of (d1 + d2) / (b1 + b2).
    pub(super) ratio: f64,
    /// Half-width of the ratio's 95% confidence interval (Student's t over the blocks).
    pub(super) ci: Option<f64>,
    pub(super) blocks: Vec<f64>,
}

impl RateSummary {
    pub(super) fn new(rounds: &[Round]) -> RateSummary {
        let blocks: Vec<f64> = rounds
            .chunks(4)
            .filter(|c| c.len() == 4)
            .map(|c| (c[1].rate + c[2].rate) / (c[0].rate + c[3].rate).max(1.0))
            .collect();
        let n = blocks.len() as f64;
        let ratio = blocks.iter().sum::<f64>() / n.max(1.0);
        let ci = (blocks.len() > 1).then(|| {
            let var = blocks.iter().map(|r| (r - ratio).powi(2)).sum::<f64>() / (n - 1.0);
            // Two-sided 95% quantiles of Student's t for 1..=10 degrees of freedom.
            const T95: [f64; 10] = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23];
            let t = T95.get(blocks.len() - 2).copied().unwrap_or(2.1);
            t * (var / n).sqrt()
        });
        RateSummary { ratio, ci, blocks }
    }

    pub(super) fn print(
        &self,
        rounds: &[Round],
        round: Duration,
        counters: &serde_json::Value,
        discarded: usize,
    ) {
        println!(
            "\nconnection rate: closed loop, {RATE_CLIENTS} client threads opening `/healthz` \
             connections back to back (closed with a reset after the response, so no TIME_WAIT \
             piles up), rounds of {:.0} s in ABBA blocks:",
            round.as_secs_f64()
        );
        println!(
            "| variant | conn/s (mean of rounds) | rounds | CPU busy | servers (agent) | client |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        for (tag, name) in [('b', "(b) corral hash"), ('d', "(d) corral least-loaded")] {
            let mine: Vec<&Round> = rounds.iter().filter(|r| r.tag == tag).collect();
            let n = mine.len().max(1) as f64;
            let avg = |f: &dyn Fn(&Round) -> f64| mine.iter().map(|r| f(r)).sum::<f64>() / n;
            println!(
                "| {name} | {:.0} | {} | {:.0}% | {:.0}% ({:.1}%) | {:.0}% |",
                avg(&|r| r.rate),
                mine.iter()
                    .map(|r| format!("{:.0}", r.rate))
                    .collect::<Vec<_>>()
                    .join(" "),
                avg(&|r| r.cpu.busy) * 100.0,
                avg(&|r| r.cpu.servers) * 100.0,
                avg(&|r| r.cpu.agent) * 100.0,
                avg(&|r| r.cpu.client) * 100.0,
            );
        }
        println!(
            "    per-block (d)/(b): {}; failed connections: {}; blocks discarded because other \
             processes used over {:.0}% of the CPUs: {discarded}",
            self.blocks
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            rounds.iter().map(|r| r.failed).sum::<u64>(),
            DISTURBED * 100.0
        );
        println!("    least-loaded program counters after: {counters}");
    }
}
