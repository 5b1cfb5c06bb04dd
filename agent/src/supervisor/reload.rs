//! Changing what runs: a reload (SIGHUP, `corral reload [APP]`), `corral scale`, an app that
//! left the config. All-or-nothing: the new config is read, every new socket bound, every
//! program found and the memory budget checked before anything running is touched.

use crate::config::{self, App, AppName, WorkerCount};
use crate::sys::notify::monotonic_usec;
use crate::sys::socket;
use crate::sys::users::SystemLookup;

use super::apps::{prepare, prestart_plan};
use super::budget;
use super::budget::worker_count;
use super::front::bundle_changed;
use super::state::{Prepared, Rollout, Supervisor};

/// What a reload does to one app.
enum Change {
    Add(App, Prepared),
    /// Only `workers.count` changed: no pre-start, slots added or removed.
    Scale(App, Prepared),
    /// Anything else changed: the new version's pre-start steps, then a rolling replacement.
    Replace(App, Prepared),
    Remove,
}

impl Supervisor {
    /// Re-read the config and apply what changed.
    pub(super) fn reload(&mut self, only: Option<&AppName>) -> Result<String, String> {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let result = self.reload_inner(only);
        self.notify("READY=1");
        result
    }

    fn reload_inner(&mut self, only: Option<&AppName>) -> Result<String, String> {
        let new = config::load(&self.config_path, &SystemLookup).map_err(|e| e.to_string())?;
        if let Some(name) = only {
            if !new.apps.contains_key(name) && !self.apps.contains_key(name) {
                return Err(format!("no app named `{name}` in the config"));
            }
        }
        if new.agent != self.config.agent {
            tracing::warn!("changes to [agent] take effect when the agent restarts");
        }
        self.check_budget(self.plan_after_reload(&new, only))?;
        let mut changes: Vec<(AppName, Change)> = Vec::new();
        for (name, cfg) in &new.apps {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let count = worker_count(cfg);
            match self.apps.get(name) {
                None => {
                    let p = prepare(cfg, count, &[], false, &new.agent.bpf_pin_dir)?;
                    changes.push((name.clone(), Change::Add(cfg.clone(), p)));
                }
                Some(rt) if rt.cfg == *cfg && !bundle_changed(rt, cfg)? => {}
                Some(rt) => {
                    let existing: Vec<_> = if rt.cfg.listen.address == cfg.listen.address {
                        rt.state.slots.iter().map(|s| s.socket.clone()).collect()
                    } else {
                        Vec::new()
                    };
                    let keep = rt.cfg.listen.steering == cfg.listen.steering;
                    let p = prepare(cfg, count, &existing, keep, &self.config.agent.bpf_pin_dir)?;
                    prestart_plan(cfg)?;
                    let mut same_but_count = rt.cfg.clone();
                    same_but_count.workers.count = cfg.workers.count;
                    same_but_count.workers.count_at = cfg.workers.count_at.clone();
                    if same_but_count == *cfg && !bundle_changed(rt, cfg)? {
                        changes.push((name.clone(), Change::Scale(cfg.clone(), p)));
                    } else {
                        changes.push((name.clone(), Change::Replace(cfg.clone(), p)));
                    }
                }
            }
        }
        for name in self.apps.keys() {
            if !new.apps.contains_key(name) && only.is_none_or(|o| o == name) {
                changes.push((name.clone(), Change::Remove));
            }
        }
        // Commit: nothing below fails.
        let mut summary = Vec::new();
        for (name, change) in changes {
            match change {
                Change::Add(cfg, p) => {
                    summary.push(format!("added {name}"));
                    self.add_app(cfg, p);
                }
                Change::Scale(cfg, p) => {
                    summary.push(format!("scaled {name} to {}", p.sockets.len()));
                    self.scale(&name, cfg, p);
                }
                Change::Replace(cfg, p) => {
                    summary.push(format!("replacing {name}"));
                    let watched = cfg.clone();
                    let rollout = Rollout {
                        cfg,
                        launch: p.launch,
                        sockets: p.sockets,
                        steering: p.steering,
                    };
                    self.begin_prestart(&name, Some(Box::new(rollout)));
                    self.watch_certs_of(&name, &watched);
                }
                Change::Remove => {
                    summary.push(format!("removed {name}"));
                    self.remove_app(&name);
                }
            }
        }
        match only {
            Some(name) => match new.apps.get(name) {
                Some(cfg) => {
                    self.config.apps.insert(name.clone(), cfg.clone());
                }
                None => {
                    self.config.apps.remove(name);
                }
            },
            None => self.config = new,
        }
        if summary.is_empty() {
            Ok("no changes".into())
        } else {
            Ok(summary.join(", "))
        }
    }

    /// What would run after reloading `new` (every app, or only `only`: the others keep the
    /// worker count they run with, which `corral scale` may have changed).
    fn plan_after_reload(&self, new: &config::Config, only: Option<&AppName>) -> budget::Plan {
        match only {
            None => budget::plan(new.apps.values()),
            Some(o) => {
                let mut plan = self.running_plan();
                plan.retain(|(n, _, _)| n != o);
                plan.extend(budget::plan(new.apps.get(o)));
                plan
            }
        }
    }

    /// Each app as it runs now: its slots and its workers' cap.
    fn running_plan(&self) -> budget::Plan {
        self.apps
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    a.state.slots.len() as u32,
                    a.cfg.workers.memory_max,
                )
            })
            .collect()
    }

    /// The memory budget of a changed plan: refused with the message the agent's start gives,
    /// or allowed with a warning under `allow_overcommit`.
    fn check_budget(&self, plan: budget::Plan) -> Result<(), String> {
        let b = budget::enforce(
            &plan,
            self.cgroups.root_memory_max(),
            self.config.agent.allow_overcommit,
        )?;
        if let Some(msg) = b.over_message() {
            tracing::warn!("{msg} (allowed by [agent] allow_overcommit = true)");
        }
        Ok(())
    }

    /// `corral scale APP N`: the app runs N workers until the next reload re-reads
    /// workers.count.
    pub(super) fn scale_request(&mut self, name: &AppName, count: u32) -> Result<String, String> {
        let Some(rt) = self.apps.get(name) else {
            return Err(format!("no app named `{name}`"));
        };
        if count == 0 || count > socket::PROBE_PORTS as u32 {
            return Err(format!(
                "worker count must be 1..={}, got {count}",
                socket::PROBE_PORTS
            ));
        }
        let mut cfg = rt.cfg.clone();
        cfg.workers.count = WorkerCount::Fixed(
            std::num::NonZeroU32::new(count).unwrap_or(std::num::NonZeroU32::MIN),
        );
        let mut plan = self.running_plan();
        for line in &mut plan {
            if line.0 == *name {
                line.1 = count;
            }
        }
        self.check_budget(plan)
            .map_err(|e| format!("scale refused, nothing changed: {e}"))?;
        let existing: Vec<_> = rt.state.slots.iter().map(|s| s.socket.clone()).collect();
        let p = prepare(&cfg, count, &existing, true, &self.config.agent.bpf_pin_dir)?;
        self.scale(name, cfg, p);
        Ok(format!(
            "scaled {name} to {count} workers (until the next reload re-reads workers.count)"
        ))
    }

    /// Apply a new worker count: slots beyond it go, new ones join the steering and start.
    fn scale(&mut self, name: &AppName, cfg: App, p: Prepared) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        app.cfg = cfg;
        let old = app.state.slots.len();
        for (i, sock) in p.sockets.iter().enumerate().skip(old) {
            if let Err(e) = app.steering.set_socket(i as u32, sock) {
                tracing::error!(app = %name, worker = i, "registering its socket for steering: {e}");
            }
        }
        self.decide(name, |state, ctx| state.scale(p.sockets, ctx));
    }

    /// The app left the config: its workers stop, and it goes when they have.
    fn remove_app(&mut self, name: &AppName) {
        if let Some(app) = self.apps.get(name) {
            let _ = app.cancel.send(true);
        }
        self.decide(name, |state, _| state.remove());
    }
}
