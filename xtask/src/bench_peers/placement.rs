//! Where requests landed, seen from the client: for each request, how many requests its worker
//! already had in flight (queued or being served) when it was sent, against the least busy
//! worker at that instant. The same measure for every server, whatever decides the placement
//! (a steering program at the SYN, or the first worker to accept from a shared socket), so it
//! shows why one tail is longer than another.

use std::collections::HashMap;

use crate::bench_steering::{LoadResult, Outcome};

#[derive(Clone, Copy, Default)]
pub(super) struct Placement {
    /// Successful requests of known workers.
    pub(super) requests: usize,
    /// ... sent while their worker had a request in flight and another worker had none.
    pub(super) busy_while_idle: usize,
    /// ... sent while their worker had more in flight than the least busy worker.
    pub(super) behind_more: usize,
    /// Sum over requests of the in-flight count of their worker at the send.
    ahead_theirs: usize,
    /// Sum over requests of the least in-flight count of any worker at the send.
    ahead_least: usize,
    /// The first class's (1 ms) slowest requests: those at or above the class's p99 in their
    /// round, where the targets read.
    tail: usize,
    /// ... of which were sent to a worker that had a request in flight (the rest went to an
    /// idle worker and were slow for another reason: waiting for a CPU).
    tail_busy: usize,
    /// Sum over the tail of the requests in flight on all workers at their send.
    tail_all: usize,
}

impl Placement {
    /// Of one segment (times are relative to its own start). Requests of the warm-up still in
    /// flight when the measured window opens are not seen: a small undercount, alike for all.
    pub(super) fn of(r: &LoadResult, workers: &[i32]) -> Placement {
        let slot: HashMap<i32, usize> = workers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut first: Vec<_> = (r.measured.iter())
            .filter(|rec| rec.class == 0 && matches!(rec.outcome, Outcome::Ok(_)))
            .map(|rec| rec.latency)
            .collect();
        first.sort();
        let tail_from = first
            .get(first.len() * 99 / 100)
            .copied()
            .unwrap_or(std::time::Duration::MAX);
        // (time, 0 = end / 1 = start, worker, in the tail): ends sort before starts at the
        // same instant.
        let mut events = Vec::new();
        for rec in &r.measured {
            let Outcome::Ok(pid) = rec.outcome else {
                continue;
            };
            let Some(&w) = slot.get(&pid) else { continue };
            let sent = rec.done.saturating_sub(rec.latency) + rec.lag;
            let tail = rec.class == 0 && rec.latency >= tail_from;
            events.push((sent, 1u8, w, tail));
            events.push((rec.done, 0u8, w, false));
        }
        events.sort();
        let mut count = vec![0usize; workers.len()];
        let mut p = Placement::default();
        for (_, kind, w, tail) in events {
            if kind == 0 {
                count[w] = count[w].saturating_sub(1);
                continue;
            }
            let least = count.iter().copied().min().unwrap_or(0);
            p.requests += 1;
            p.ahead_theirs += count[w];
            p.ahead_least += least;
            p.busy_while_idle += (count[w] > 0 && least == 0) as usize;
            p.behind_more += (count[w] > least) as usize;
            if tail {
                p.tail += 1;
                p.tail_busy += (count[w] > 0) as usize;
                p.tail_all += count.iter().sum::<usize>();
            }
            count[w] += 1;
        }
        p
    }

    pub(super) fn add(&mut self, o: Placement) {
        self.requests += o.requests;
        self.busy_while_idle += o.busy_while_idle;
        self.behind_more += o.behind_more;
        self.ahead_theirs += o.ahead_theirs;
        self.ahead_least += o.ahead_least;
        self.tail += o.tail;
        self.tail_busy += o.tail_busy;
        self.tail_all += o.tail_all;
    }

    fn share(&self, n: usize) -> f64 {
        n as f64 * 100.0 / self.requests.max(1) as f64
    }

    pub(super) fn busy_while_idle_pct(&self) -> f64 {
        self.share(self.busy_while_idle)
    }

    pub(super) fn behind_more_pct(&self) -> f64 {
        self.share(self.behind_more)
    }

    /// Of the first class's slowest 1%: the share sent to a busy worker, and the mean in
    /// flight on all workers at their send.
    pub(super) fn tail(&self) -> (f64, f64) {
        let n = self.tail.max(1) as f64;
        (self.tail_busy as f64 * 100.0 / n, self.tail_all as f64 / n)
    }

    /// Mean in flight on their worker, and on the least busy worker, at the send.
    pub(super) fn means(&self) -> (f64, f64) {
        let n = self.requests.max(1) as f64;
        (self.ahead_theirs as f64 / n, self.ahead_least as f64 / n)
    }
}
