//! The control socket: one JSON request line per connection (`crate::control` is the wire
//! format), answered by the loop, so a request sees and changes the state between two events.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::AppName;
use crate::control::{AgentInfo, Request, Response};
use crate::policy::rollout::Phase;

use super::events::Event;
use super::state::Supervisor;
use super::status::app_status;

/// Longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

pub(super) async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r).take(MAX_REQUEST);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let mut reexec = false;
            let response = match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::Error {
                    message: format!("invalid request: {e}"),
                },
                Ok(request) => {
                    reexec = request == Request::Reexec;
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Event::Control { request, reply }).is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Ok(mut text) = serde_json::to_string(&response) {
                text.push('\n');
                let _ = w.write_all(text.as_bytes()).await;
            }
            if reexec && matches!(response, Response::Ok { .. }) {
                // The reply is in the socket's buffer; the client reads it after the exec too.
                let _ = tx.send(Event::ReexecNow);
            }
        });
    }
}

impl Supervisor {
    pub(super) fn control(&mut self, request: Request) -> Response {
        let err = |message: String| Response::Error { message };
        let answer = |r: Result<String, String>| match r {
            Ok(message) => Response::Ok { message },
            Err(message) => Response::Error { message },
        };
        if self.stopping() && !matches!(request, Request::Status { .. } | Request::Logs { .. }) {
            return err("the agent is stopping".into());
        }
        match request {
            Request::Status { app } => {
                let apps = self
                    .apps
                    .iter()
                    .filter(|(n, _)| app.as_deref().is_none_or(|a| a == n.as_str()))
                    .map(|(n, a)| app_status(n, a))
                    .collect::<Vec<_>>();
                if let Some(a) = app {
                    if apps.is_empty() {
                        return err(format!("no app named `{a}`"));
                    }
                }
                Response::Status {
                    apps,
                    agent: Some(AgentInfo {
                        pid: std::process::id(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        generation: self.generation,
                        reexec_error: self.reexec_error.clone(),
                    }),
                }
            }
            Request::Logs {
                app,
                worker,
                after,
                lines,
            } => {
                if let Some(a) = &app {
                    if !self.apps.keys().any(|n| n.as_str() == a) {
                        return err(format!("no app named `{a}`"));
                    }
                }
                let who = worker.map(|w| format!("worker={w}"));
                let (lines, next) = super::output::recent(after, lines as usize, |l| {
                    app.as_deref().is_none_or(|a| a == l.app)
                        && who.as_deref().is_none_or(|w| w == l.who)
                });
                Response::Logs { lines, next }
            }
            Request::Reexec => answer(
                self.prepare_reexec()
                    .map_err(|e| format!("re-exec refused, nothing changed: {e}")),
            ),
            Request::Reload { app } => {
                let name = match app.as_deref().map(AppName::new).transpose() {
                    Ok(n) => n,
                    Err(e) => return err(e),
                };
                answer(
                    self.reload(name.as_ref())
                        .map_err(|e| format!("reload refused, running apps untouched: {e}")),
                )
            }
            Request::Restart { app, worker } => match AppName::new(&app) {
                Ok(name) => answer(self.restart_request(&name, worker)),
                Err(e) => err(e),
            },
            Request::Scale { app, count } => match AppName::new(&app) {
                Ok(name) => answer(self.scale_request(&name, count)),
                Err(e) => err(e),
            },
        }
    }

    /// `corral restart APP[/WORKER]`: a rolling restart, or a failed app's second chance (its
    /// pre-start steps run again).
    fn restart_request(&mut self, name: &AppName, worker: Option<u32>) -> Result<String, String> {
        let Some(rt) = self.apps.get(name) else {
            return Err(format!("no app named `{name}`"));
        };
        if let Some(w) = worker {
            if w as usize >= rt.state.slots.len() {
                return Err(format!(
                    "app `{name}` has workers 0..{}",
                    rt.state.slots.len()
                ));
            }
        }
        match rt.state.phase {
            Phase::Failed(_) => {
                self.begin_prestart(name, None);
                return Ok(format!(
                    "{name}: running pre-start steps again, then starting workers"
                ));
            }
            Phase::PreStart { .. } => return Err(format!("{name} is running its pre-start steps")),
            Phase::Stopping => return Err(format!("{name} is stopping")),
            Phase::Running => {}
        }
        self.decide(name, |state, ctx| state.restart(worker, ctx));
        Ok(match worker {
            Some(w) => format!("restarting {name}/{w}"),
            None => format!("rolling restart of {name}"),
        })
    }
}
