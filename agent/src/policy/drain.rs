//! How the agent stops on SIGTERM/SIGINT without losing a connection the kernel already
//! accepted. A worker stops accepting when told to stop, and what then sits in its listener's
//! accept queue is reset when the socket closes: a client whose connect() succeeded gets a
//! reset (8 of the requests of a loaded test did, before this). So each app is drained first:
//! its listeners stop completing new handshakes (a socket filter drops bare SYNs: the client
//! retries and is refused once the socket is closed, never accepted and dropped), the workers
//! keep accepting until the queues are empty, and only then are they told to stop. TLS fronts
//! drain before the apps behind them, whose listeners must take the fronts' last upstream
//! connections.

use std::time::Duration;

/// After the filter, handshakes already past their SYN may still complete into the queue
/// (within a round trip): wait this long before an empty queue counts as drained.
pub const SETTLE: Duration = Duration::from_millis(50);
/// A queue that does not empty (workers stuck, or none ready) is given up on after this long:
/// the workers are stopped anyway and the kubelet's grace period is not exceeded for it.
pub const MAX_DRAIN: Duration = Duration::from_secs(5);

/// One app as the drain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainApp {
    pub name: String,
    /// A TLS front (`NAME.tls`): drained before the plain apps.
    pub front: bool,
    /// How long ago its listeners stopped taking new connections; `None`: not yet.
    pub filtered_for: Option<Duration>,
    /// Connections in its listeners' accept queues now.
    pub queued: u32,
    /// Ready workers (that will accept what is queued).
    pub ready: u32,
    /// Its processes still running.
    pub live: usize,
    /// Its workers were told to stop.
    pub stopped: bool,
}

/// One step of the drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainAction {
    /// Stop taking new connections on the app's listeners.
    Refuse(String),
    /// The app's queues are drained (or given up on): stop its workers.
    Stop { app: String, why: &'static str },
}

/// What to do now. Fronts first: the plain apps start draining once every front has stopped
/// and exited.
pub fn next(apps: &[DrainApp]) -> Vec<DrainAction> {
    let fronts_done = apps
        .iter()
        .filter(|a| a.front)
        .all(|a| a.stopped && a.live == 0);
    let mut out = Vec::new();
    for a in apps
        .iter()
        .filter(|a| !a.stopped && (a.front || fronts_done))
    {
        let Some(since) = a.filtered_for else {
            out.push(DrainAction::Refuse(a.name.clone()));
            continue;
        };
        let why = if a.ready == 0 {
            Some("no worker is ready to accept what is queued")
        } else if since >= MAX_DRAIN {
            Some("its accept queues did not empty")
        } else if since >= SETTLE && a.queued == 0 {
            Some("its accept queues are empty")
        } else {
            None
        };
        if let Some(why) = why {
            out.push(DrainAction::Stop {
                app: a.name.clone(),
                why,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, front: bool, filtered_ms: Option<u64>, queued: u32) -> DrainApp {
        DrainApp {
            name: name.into(),
            front,
            filtered_for: filtered_ms.map(Duration::from_millis),
            queued,
            ready: 2,
            live: 2,
            stopped: false,
        }
    }

    fn stop(app: &str, why: &'static str) -> DrainAction {
        DrainAction::Stop {
            app: app.into(),
            why,
        }
    }

    #[test]
    fn refuse_then_wait_for_the_queue_then_stop() {
        assert_eq!(
            next(&[app("web", false, None, 3)]),
            [DrainAction::Refuse("web".into())]
        );
        // Queued connections: keep the workers accepting.
        assert_eq!(next(&[app("web", false, Some(100), 3)]), []);
        // Empty, but a handshake may still land: wait out SETTLE.
        assert_eq!(next(&[app("web", false, Some(10), 0)]), []);
        assert_eq!(
            next(&[app("web", false, Some(60), 0)]),
            [stop("web", "its accept queues are empty")]
        );
    }

    #[test]
    fn a_queue_that_does_not_empty_is_given_up_on() {
        assert_eq!(
            next(&[app("web", false, Some(5000), 7)]),
            [stop("web", "its accept queues did not empty")]
        );
        let mut none_ready = app("web", false, Some(1), 7);
        none_ready.ready = 0;
        assert_eq!(
            next(&[none_ready]),
            [stop("web", "no worker is ready to accept what is queued")]
        );
    }

    #[test]
    fn fronts_drain_before_the_apps_behind_them() {
        let apps = [app("web", false, None, 0), app("web.tls", true, None, 0)];
        assert_eq!(next(&apps), [DrainAction::Refuse("web.tls".into())]);
        // The front stopped but its processes still run (they may still connect upstream).
        let mut front = app("web.tls", true, Some(100), 0);
        front.stopped = true;
        assert_eq!(next(&[app("web", false, None, 0), front.clone()]), []);
        front.live = 0;
        assert_eq!(
            next(&[app("web", false, None, 0), front]),
            [DrainAction::Refuse("web".into())]
        );
    }

    #[test]
    fn stopped_apps_are_left_alone() {
        let mut a = app("web", false, Some(100), 0);
        a.stopped = true;
        assert_eq!(next(&[a]), []);
    }
}
