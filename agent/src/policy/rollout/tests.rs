use super::*;
use crate::config::RestartMode;

type TestApp = App<u32, ()>;

const POLICY: Restart = Restart::DEFAULT;

/// The context a decision gets in world `$w` (fields only, so `$w.app` can be borrowed beside it).
macro_rules! ctx {
    ($w:expr) => {
        Ctx {
            app: "api",
            now: $w.now,
            restart: &$w.restart,
            stopping: $w.stopping,
            jitter: 0.0,
            token: 7,
        }
    };
}

struct World {
    app: TestApp,
    now: Instant,
    next_id: WorkerId,
    stopping: bool,
    restart: Restart,
}

impl World {
    /// An app with `n` slots (socket number = slot) whose pre-start steps just succeeded.
    fn started(n: u32) -> (World, Vec<Effect>) {
        let mut w = World {
            app: App::new(0..n),
            now: Instant::now(),
            next_id: 100,
            stopping: false,
            restart: POLICY,
        };
        w.app.begin_prestart(1);
        assert!(w.app.awaits_prestart(1));
        let effects = w.app.prestart_succeeded(&ctx!(w));
        (w, effects)
    }

    /// Carry out the `Start` effects as the supervisor would (every start succeeds); returns
    /// the new workers' ids and the other effects.
    fn run(&mut self, effects: Vec<Effect>) -> (Vec<WorkerId>, Vec<Effect>) {
        let mut ids = Vec::new();
        let mut rest = Vec::new();
        for e in effects {
            match e {
                Effect::Start { slot } => {
                    self.next_id += 1;
                    let id = self.next_id;
                    self.app
                        .started(Worker::starting(id, slot, id as i32 + 1000, self.now, ()));
                    ids.push(id);
                }
                other => rest.push(other),
            }
        }
        (ids, rest)
    }

    fn ready(&mut self, id: WorkerId) -> Vec<Effect> {
        self.app.ready(id, Ok(()), &ctx!(self))
    }

    fn exit(&mut self, id: WorkerId, status: ExitStatus, migrates: bool) -> Vec<Effect> {
        let exit = Exit {
            status,
            reason: status.to_string(),
            oom: false,
        };
        let (gone, out) = self.app.exited(id, exit, migrates, &ctx!(self));
        assert_eq!(gone.map(|w| w.id), Some(id), "the exited worker comes back");
        out
    }

    fn current(&self, slot: usize) -> Option<WorkerId> {
        self.app.slots[slot].current.as_ref().map(|w| w.id)
    }

    /// Start every slot and make each worker ready.
    fn all_ready(n: u32) -> (World, Vec<WorkerId>) {
        let (mut w, effects) = World::started(n);
        let (ids, rest) = w.run(effects);
        assert!(rest.is_empty(), "{rest:?}");
        for &id in &ids {
            w.ready(id);
        }
        (w, ids)
    }
}

fn starts(effects: &[Effect]) -> Vec<u32> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start { slot } => Some(*slot),
            _ => None,
        })
        .collect()
}

fn stops(effects: &[Effect]) -> Vec<WorkerId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Stop { id } => Some(*id),
            _ => None,
        })
        .collect()
}

const KILLED: ExitStatus = ExitStatus::Signaled {
    signal: 9,
    core_dumped: false,
};

#[test]
fn a_first_start_starts_every_slot_at_once() {
    let (w, effects) = World::started(4);
    assert_eq!(starts(&effects), vec![0, 1, 2, 3]);
    assert_eq!(w.app.phase, Phase::Running);
    assert_eq!(w.app.label().0, "running");
}

#[test]
fn only_ready_slots_get_connections() {
    let (mut w, effects) = World::started(2);
    let (ids, _) = w.run(effects);
    assert!(w.app.ready_slots(|_, _| true).is_empty());
    w.ready(ids[1]);
    assert_eq!(w.app.ready_slots(|_, _| true), vec![1]);
}

#[test]
fn a_rolling_restart_replaces_one_slot_at_a_time_and_stops_the_old_worker_once_the_new_is_ready() {
    let (mut w, old) = World::all_ready(3);
    let effects = w.app.restart(None, &ctx!(w));
    assert_eq!(starts(&effects), vec![0], "one slot at a time");
    let (new0, _) = w.run(effects);
    // The old worker keeps serving, so the slot stays ready.
    assert_eq!(w.app.slots[0].retired[0].id, old[0]);
    assert_eq!(w.app.ready_slots(|_, _| true), vec![0, 1, 2]);
    // Nothing more happens until the replacement is ready.
    assert!(w.app.advance(&ctx!(w)).is_empty());
    let effects = w.ready(new0[0]);
    assert_eq!(stops(&effects), vec![old[0]], "the old worker stops");
    assert_eq!(starts(&effects), vec![1], "and the next slot begins");
    assert_eq!(w.app.slots[0].retired[0].state, WorkerState::Stopping);
    // The old worker's exit is expected: no restart, no failure.
    let effects = w.exit(
        old[0],
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        },
        true,
    );
    assert!(
        starts(&effects).is_empty()
            && !effects
                .iter()
                .any(|e| matches!(e, Effect::RenewSocket { .. }))
    );
    assert!(w.app.slots[0].retired.is_empty());
    assert_eq!(w.app.slots[0].restarts, 0);
}

#[test]
fn a_crash_restarts_at_once_then_backs_off_then_gives_up() {
    let (mut w, ids) = World::all_ready(2);
    let effects = w.exit(ids[0], KILLED, true);
    assert!(
        effects.contains(&Effect::RenewSocket { slot: 0 }),
        "with migration the dead worker's queue moves to ready workers"
    );
    assert_eq!(
        starts(&effects),
        vec![0],
        "the first crash restarts at once"
    );
    assert_eq!(w.app.slots[0].restarts, 1);
    assert_eq!(
        w.app.slots[0].last_exit.as_deref(),
        Some("killed by signal 9 (SIGKILL)")
    );
    // The second in a row waits backoff_initial.
    let (new, _) = w.run(effects);
    let effects = w.exit(new[0], KILLED, true);
    assert!(effects.contains(&Effect::RestartLater {
        slot: 0,
        after: POLICY.backoff_initial,
        token: 7
    }));
    assert_eq!(w.app.slots[0].waiting, Some(7));
    assert_eq!(w.app.slots[0].empty_state(), "waiting");
    // A stale timer does nothing; the armed one starts the slot.
    assert!(w.app.restart_due(0, 6, &ctx!(w)).is_empty());
    let effects = w.app.restart_due(0, 7, &ctx!(w));
    assert_eq!(starts(&effects), vec![0]);
    // Keep crashing: after max_restarts within the window the slot gives up, the app is
    // degraded (slot 1 serves), and says why.
    let mut effects = effects;
    for _ in 0..10 {
        let (new, _) = w.run(effects);
        let Some(&id) = new.first() else { break };
        effects = w.exit(id, KILLED, true);
        if let Some(Effect::RestartLater { slot, token, .. }) = effects
            .iter()
            .find(|e| matches!(e, Effect::RestartLater { .. }))
            .cloned()
        {
            effects = w.app.restart_due(slot, token, &ctx!(w));
        }
    }
    let slot = &w.app.slots[0];
    assert!(slot.current.is_none());
    let why = slot.gave_up.clone().expect("gave up");
    assert!(why.contains("gave up after 5 restarts"), "{why}");
    assert_eq!(w.app.label(), ("degraded", Some(why)));
    assert_eq!(w.app.ready_slots(|_, _| true), vec![1]);
}

#[test]
fn without_migration_a_crashed_slot_keeps_its_socket() {
    let (mut w, ids) = World::all_ready(1);
    let effects = w.exit(ids[0], KILLED, false);
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::RenewSocket { .. })));
    assert_eq!(starts(&effects), vec![0]);
}

#[test]
fn a_worker_that_never_gets_ready_is_stopped_and_counts_as_a_failure() {
    let (mut w, effects) = World::started(1);
    let (ids, _) = w.run(effects);
    let effects = w
        .app
        .ready(ids[0], Err("no answer within 1s".into()), &ctx!(w));
    assert_eq!(stops(&effects), vec![ids[0]]);
    let worker = w.app.slots[0]
        .current
        .as_ref()
        .expect("still there until it exits");
    assert!(!worker.expected_exit, "not a requested stop");
    let effects = w.exit(
        ids[0],
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        },
        true,
    );
    assert_eq!(starts(&effects), vec![0], "restarted like a crash");
    assert_eq!(
        w.app.slots[0].last_exit.as_deref(),
        Some("not ready: no answer within 1s (killed by signal 15 (SIGTERM))")
    );
}

#[test]
fn a_slot_that_gives_up_during_a_rolling_update_stops_the_update() {
    let (mut w, old) = World::all_ready(3);
    w.restart.max_restarts = 0;
    let effects = w.app.restart(None, &ctx!(w));
    let (new0, _) = w.run(effects);
    // The new worker of slot 0 crashes before it is ready: with max_restarts = 0 it gives up.
    let effects = w.exit(new0[0], KILLED, true);
    assert!(starts(&effects).is_empty());
    assert!(
        w.app.slots.iter().all(|s| !s.pending_replace),
        "the update stopped"
    );
    let (label, why) = w.app.label();
    assert_eq!(label, "degraded");
    assert!(why.is_some_and(|r| r.contains("gave up")));
    // The old worker of slot 0 still serves, as do the other slots'.
    assert_eq!(w.app.slots[0].retired[0].id, old[0]);
    assert_eq!(w.app.ready_slots(|_, _| true), vec![0, 1, 2]);
}

#[test]
fn the_start_failing_is_a_failure_of_the_slot() {
    let (mut w, effects) = World::started(1);
    assert_eq!(starts(&effects), vec![0]);
    let effects = w
        .app
        .start_failed(0, "chdir /srv: No such file".into(), &ctx!(w));
    assert_eq!(starts(&effects), vec![0], "first failure: again at once");
    let effects = w
        .app
        .start_failed(0, "chdir /srv: No such file".into(), &ctx!(w));
    assert!(matches!(effects.last(), Some(Effect::RestartLater { .. })));
}

#[test]
fn crossing_memory_high_replaces_the_worker_once() {
    let (mut w, ids) = World::all_ready(2);
    let effects = w.app.memory_high(ids[1], 1, "900MiB", &ctx!(w));
    assert_eq!(starts(&effects), vec![1]);
    assert!(w.app.slots[1].retired[0].recycling);
    // Further crossings of the same worker do nothing more.
    let (_, _) = w.run(effects);
    assert!(w.app.memory_high(ids[1], 2, "900MiB", &ctx!(w)).is_empty());
    // A count that did not grow is not a crossing.
    let (mut w, ids) = World::all_ready(1);
    if let Some(x) = w.app.slots[0].current.as_mut() {
        x.high_seen = 3;
    }
    assert!(w.app.memory_high(ids[0], 3, "900MiB", &ctx!(w)).is_empty());
}

#[test]
fn stopping_the_agent_stops_everything_and_restarts_nothing() {
    let (mut w, ids) = World::all_ready(2);
    let effects = w.app.stop_all();
    assert_eq!(stops(&effects), ids);
    assert_eq!(w.app.phase, Phase::Stopping);
    w.stopping = true;
    let effects = w.exit(ids[0], KILLED, true);
    assert!(starts(&effects).is_empty());
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::RenewSocket { .. })));
    assert_eq!(w.app.live_processes(), 1);
}

#[test]
fn stopping_the_agent_makes_a_not_ready_workers_exit_expected_without_signalling_it_again() {
    let (mut w, effects) = World::started(1);
    let (ids, _) = w.run(effects);
    w.app.ready(ids[0], Err("timeout".into()), &ctx!(w));
    let effects = w.app.stop_all();
    assert!(stops(&effects).is_empty(), "SIGTERM went out already");
    assert!(w.app.slots[0]
        .current
        .as_ref()
        .is_some_and(|x| x.expected_exit));
}

#[test]
fn scaling_down_stops_the_removed_slots_workers_and_up_starts_new_ones() {
    let (mut w, ids) = World::all_ready(4);
    let effects = w.app.scale(vec![0, 1], &ctx!(w));
    assert_eq!(stops(&effects), vec![ids[3], ids[2]]);
    assert_eq!(w.app.slots.len(), 2);
    assert_eq!(w.app.removed.len(), 2);
    let effects = w.exit(ids[3], ExitStatus::Exited(0), true);
    assert!(starts(&effects).is_empty());
    assert!(!effects.contains(&Effect::Remove), "a running app stays");
    let effects = w.app.scale(vec![0, 1, 12], &ctx!(w));
    assert_eq!(starts(&effects), vec![2]);
    assert_eq!(w.app.slots[2].socket, 12);
    assert_eq!(w.current(0), Some(ids[0]), "kept slots keep their workers");
}

#[test]
fn a_removed_app_goes_when_its_last_worker_has_exited() {
    let (mut w, ids) = World::all_ready(2);
    let effects = w.app.remove();
    assert_eq!(stops(&effects).len(), 2);
    assert!(!effects.contains(&Effect::Remove));
    assert!(!w
        .exit(ids[0], ExitStatus::Exited(0), true)
        .contains(&Effect::Remove));
    assert!(w
        .exit(ids[1], ExitStatus::Exited(0), true)
        .contains(&Effect::Remove));
    // An app without workers goes at once.
    let mut empty: TestApp = App::new(Vec::new());
    assert_eq!(empty.remove(), vec![Effect::Remove]);
}

#[test]
fn a_new_version_takes_the_new_sockets_and_replaces_every_slot() {
    let (mut w, old) = World::all_ready(3);
    w.app.slots[1].gave_up = Some("earlier".into());
    w.app.begin_prestart(9);
    assert_eq!(w.app.label().0, "reloading");
    let effects = w.app.new_version(vec![10, 11], &ctx!(w));
    assert_eq!(stops(&effects), vec![old[2]], "slot 2 is gone");
    assert_eq!(starts(&effects), vec![0]);
    assert_eq!(w.app.slots[0].socket, 10);
    assert_eq!(w.app.slots[1].socket, 11);
    assert!(
        w.app.slots[1].gave_up.is_none(),
        "a new version starts with a clean slate"
    );
    assert!(w.app.slots[1].pending_replace);
}

#[test]
fn a_new_version_whose_pre_start_fails_leaves_the_old_one_serving() {
    let (mut w, _) = World::all_ready(2);
    w.app.begin_prestart(9);
    assert!(!w.app.awaits_prestart(8));
    let effects = w
        .app
        .prestart_failed("pre-start migrate exited with status 1".into(), true);
    assert!(matches!(
        &effects[0],
        Effect::Log {
            level: Level::Error,
            ..
        }
    ));
    assert_eq!(w.app.phase, Phase::Running);
    assert_eq!(w.app.label().0, "degraded");
    // A first start whose pre-start fails is a failed app.
    let mut fresh: TestApp = App::new(vec![0]);
    fresh.begin_prestart(1);
    assert_eq!(fresh.label().0, "starting");
    fresh.prestart_failed("pre-start migrate timed out".into(), false);
    assert_eq!(
        fresh.label(),
        ("failed", Some("pre-start migrate timed out".to_string()))
    );
    // ... and a failed app does not restart crashed workers.
    assert!(fresh.start_failed(0, "x".into(), &ctx!(w)).is_empty());
}

#[test]
fn never_restart_policy_leaves_the_slot_empty() {
    let (mut w, ids) = World::all_ready(1);
    w.restart.policy = RestartMode::Never;
    let effects = w.exit(ids[0], ExitStatus::Exited(0), true);
    assert!(starts(&effects).is_empty());
    assert_eq!(w.app.slots[0].empty_state(), "exited");
}

#[test]
fn an_oom_kill_is_counted_on_its_slot() {
    let (mut w, ids) = World::all_ready(2);
    let exit = Exit {
        status: KILLED,
        reason: "oom-killed at memory.max = 64MiB".into(),
        oom: true,
    };
    let (_, effects) = w.app.exited(ids[1], exit, true, &ctx!(w));
    assert_eq!(w.app.slots[1].oom_kills, 1);
    assert_eq!(
        w.app.slots[1].last_exit.as_deref(),
        Some("oom-killed at memory.max = 64MiB")
    );
    assert_eq!(starts(&effects), vec![1]);
}

#[test]
fn an_app_is_steady_only_with_every_worker_ready_and_nothing_replacing() {
    let (mut w, effects) = World::started(2);
    let (ids, _) = w.run(effects);
    assert!(w
        .app
        .steady("api")
        .unwrap_err()
        .contains("worker api/0 is starting"));
    for id in &ids {
        w.ready(*id);
    }
    assert!(w.app.steady("api").is_ok());
    let effects = w.app.restart(Some(1), &ctx!(w));
    w.run(effects);
    assert!(w.app.steady("api").unwrap_err().contains("being replaced"));
    w.app.begin_prestart(3);
    assert!(w.app.steady("api").unwrap_err().contains("pre-start"));
}

#[test]
fn a_slot_takes_connections_only_from_a_ready_worker_on_its_own_socket() {
    let (mut w, old) = World::all_ready(2);
    // A new version on new sockets 10 and 11 (a new address, or shared -> per-worker): the old
    // workers keep serving sockets 0 and 1 while slot 0's replacement starts.
    w.app.begin_prestart(5);
    let effects = w.app.new_version(vec![10, 11], &ctx!(w));
    let (new, _) = w.run(effects);
    let serves = |wk: &Worker<()>, socket: &u32| {
        let on = if old.contains(&wk.id) {
            wk.slot
        } else {
            wk.slot + 10
        };
        on == *socket
    };
    assert!(
        w.app.ready_slots(serves).is_empty(),
        "old workers serve old sockets"
    );
    w.ready(new[0]);
    assert_eq!(w.app.ready_slots(serves), vec![0]);
    // Where the socket is kept (an ordinary rolling restart), the old worker keeps its slot
    // ready meanwhile.
    let (mut w, _) = World::all_ready(2);
    let effects = w.app.restart(None, &ctx!(w));
    w.run(effects);
    assert_eq!(w.app.ready_slots(|_, _| true), vec![0, 1]);
}
