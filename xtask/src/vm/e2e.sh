#!/bin/bash
# corral's VM system tier, run by corral-e2e.service in a booted Debian (trixie, bookworm): what
# an operator does with the .deb, each step asserted. Phase 1 installs and exercises the
# package (on systemd 254+ a kill -9 of the agent under load keeps every worker; before 254 the
# package's drop-in makes it a full restart), stops it, then reboots; phase 2 checks the start
# at boot, upgrades, removes and purges.
set -u
E=/root/e2e
# Every curl gives up: a listening socket nobody serves would hang it forever.
curl() { command curl --max-time 5 "$@"; }
# Everything also goes to a file in the image, for a look after the fact (vm-test --keep).
exec > >(tee -a $E/log) 2>&1
phase=$(cat $E/phase 2>/dev/null || echo 1)
ok() { echo "CORRAL-E2E ok: $*"; }
fail() {
    echo "CORRAL-E2E FAIL: $*"
    # Bounded: with a crashed agent the keeper holds the control socket and nobody answers.
    timeout 10 corral status 2>&1 | head -40
    systemctl status corral --no-pager 2>&1 | tail -20
    journalctl -u corral --no-pager 2>&1 | tail -60
    echo "CORRAL-VM-RESULT: FAIL $*"
    sync
    systemctl poweroff
    exit 1
}
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
wait_for() {
    local what=$1; shift
    local until=$((SECONDS + 120))
    while [ $SECONDS -lt $until ]; do
        if "$@" >/dev/null 2>&1; then ok "$what"; return 0; fi
        sleep 1
    done
    fail "$what (waited 120 s)"
}
main_pid() { systemctl show -P MainPID corral; }
active_with_new_pid() { local p; p=$(main_pid); [ "$p" != "$1" ] && [ "$p" != 0 ] && systemctl is-active -q corral; }
# The pids of every worker and front process, sorted, from corral status.
worker_pids() { corral status --json | grep -o '"pid": *[0-9]*' | grep -o '[0-9]*' | sort -n | tr '\n' ' '; }
same_pid_active() { [ "$(main_pid)" = "$1" ] && systemctl is-active -q corral; }
# No corral process at all: agent, keeper (comm corral), workers, fronts.
no_corral_process() { ! ps -e -o comm= | grep -qE '^corral(-demo|-front)?$'; }
# Every cgroup.procs under the service's cgroup is empty (or the cgroup is gone).
cgroups_empty() { [ ! -d "$1" ] || [ -z "$(find "$1" -name cgroup.procs -exec cat {} +)" ]; }
# Both workers of the shared-socket app are ready.
sync_ready() { [ "$(corral status sync --json | grep -c '"state": "ready"')" -eq 2 ]; }
distinct_workers() {
    for _ in $(seq 1 40); do curl -fsS http://127.0.0.1:8080/ | grep -o '"pid":[0-9]*'; done | sort -u | wc -l
}

if [ "$phase" = 1 ]; then
    echo "CORRAL-VM-INIT uptime $(cut -d' ' -f1 /proc/uptime)s"
    echo "CORRAL-E2E: phase 1: $(uname -r), $(systemctl --version | head -1)"
    sysd=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
    check "apt install ./corral_0.1.0-1_amd64.deb" apt-get install -y -q $E/corral_0.1.0-1_amd64.deb
    check "systemctl is-enabled corral" systemctl is-enabled -q corral
    wait_for "systemctl is-active corral" systemctl is-active -q corral
    check "corral check passes on the shipped config" corral check
    check "systemd-analyze verify corral.service" systemd-analyze verify /lib/systemd/system/corral.service
    dropin=/etc/systemd/system/corral.service.d/10-systemd-before-254.conf
    if [ "$sysd" -ge 254 ]; then
        check "systemd $sysd: no drop-in, the unit's KillMode=process" bash -c \
            "[ ! -e $dropin ] && [ \"\$(systemctl show -P KillMode corral)\" = process ]"
        check "systemd $sysd: the agent runs in the delegated supervisor subgroup" bash -c \
            "grep -q '/corral.service/supervisor\$' /proc/\$(systemctl show -P MainPID corral)/cgroup"
    else
        check "systemd $sysd: the drop-in sets KillMode=mixed (no DelegateSubgroup= here)" bash -c \
            "[ -L $dropin ] && [ \"\$(systemctl show -P KillMode corral)\" = mixed ]"
    fi
    echo "CORRAL-E2E: systemd-analyze security corral: $(systemd-analyze security corral --no-pager 2>&1 | tail -1)"

    cp $E/demo.toml /etc/corral/apps.d/demo.toml
    check "systemctl reload corral (demo app added)" systemctl reload corral
    wait_for "curl reaches the demo workers" curl -fsS http://127.0.0.1:8080/
    n=$(distinct_workers)
    check "4 workers answer ($n distinct pids in 40 requests)" [ "$n" -eq 4 ]

    cg=/sys/fs/cgroup$(systemctl show -P ControlGroup corral)
    check "worker leaves under corral.service ($cg/app-demo)" bash -c "ls -d $cg/app-demo/worker-* | wc -l | grep -qx 4"
    check "memory.max of a worker leaf is the config's 256MiB" bash -c "cat $cg/app-demo/worker-*/memory.max | sort -u | grep -qx 268435456"
    check "pids.max of a worker leaf is the config's 64" bash -c "cat $cg/app-demo/worker-*/pids.max | sort -u | grep -qx 64"
    cp $E/sync.toml /etc/corral/apps.d/sync.toml
    check "systemctl reload corral (an app on a shared socket added)" systemctl reload corral
    wait_for "both workers of the shared-socket app are ready under the unit (whose probe: /proc read as the worker's user)" \
        sync_ready
    check "the shared-socket app serves" curl -fsS http://127.0.0.1:8081/
    wpid=$(curl -fsS http://127.0.0.1:8080/ | grep -o '"pid":[0-9]*' | cut -d: -f2)
    check "a worker runs as nobody with no capabilities" bash -c \
        "grep -q '^Uid:.*65534' /proc/$wpid/status && grep -q '^CapEff:.*0000000000000000' /proc/$wpid/status"
    agent=$(main_pid)
    echo "CORRAL-E2E: agent $(grep -E '^Cap(Eff|Bnd)' /proc/$agent/status | tr '\n' ' ')"
    check "the agent's bounding set is the unit's, not everything" bash -c "! grep -q '^CapBnd:.*000001ffffffffff' /proc/$agent/status"

    mkdir -p /etc/corral/tls
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=demo.test -addext subjectAltName=DNS:demo.test \
        -addext basicConstraints=critical,CA:FALSE \
        -keyout /etc/corral/tls/demo.key -out /etc/corral/tls/demo.crt 2>/dev/null
    chmod 600 /etc/corral/tls/demo.key
    cat $E/demo-tls.toml >> /etc/corral/apps.d/demo.toml
    check "systemctl reload corral (TLS section added)" systemctl reload corral
    wait_for "curl over https through the TLS front" curl -fsS --cacert /etc/corral/tls/demo.crt \
        --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/
    check "the TLS front runs as an app of its own (corral status demo.tls)" \
        bash -c "corral status demo.tls | grep -q '^demo.tls  running'"
    check "the TLS front processes run as the package's corral user" \
        bash -c "ps -o user= -C corral-front | sort -u | grep -qx corral"
    echo "CORRAL-E2E: $(corral status demo.tls | grep 'tls: handshakes' | head -1)"

    if [ "$sysd" -ge 254 ]; then
        # The crash: kill -9 of the agent under load (a new connection per request).
        wait_for "every worker and front is ready before the crash" bash -c "! corral status | grep -qE ' (starting|stopping) '"
        workers=$(worker_pids)
        old=$(main_pid)
        before=$(systemctl show -P NRestarts corral)
        : > $E/load.out
        touch $E/load.on
        ( while [ -e $E/load.on ]; do
              if command curl -fsS --max-time 5 -o /dev/null http://127.0.0.1:8080/; then echo ok; else echo fail; fi
          done >> $E/load.out ) &
        loader=$!
        wait_for "the load flows" bash -c "[ \$(grep -c ok $E/load.out) -ge 20 ]"
        kill -9 "$old"
        wait_for "systemd restarts corral after kill -9 of the agent" active_with_new_pid "$old"
        n=$(grep -c ok $E/load.out)
        wait_for "the load flows after the restart" bash -c "[ \$(grep -c ok $E/load.out) -ge $((n + 20)) ]"
        rm -f $E/load.on
        wait $loader
        good=$(grep -c ok $E/load.out); bad=$(grep -c fail $E/load.out)
        check "0 failed requests across kill -9 of the agent ($good served, $bad failed)" [ "$bad" -eq 0 ]
        check "NRestarts went up" [ "$(systemctl show -P NRestarts corral)" -gt "$before" ]
        check "the same worker and front pids after the restart ($workers)" [ "$(worker_pids)" = "$workers" ]
        check "the journal says the new agent adopted them" bash -c \
            "journalctl -u corral --no-pager | grep -q \"it holds a previous agent's workers: adopting them\""
        check "the restarted agent runs in the supervisor subgroup again" bash -c \
            "grep -q '/corral.service/supervisor\$' /proc/\$(systemctl show -P MainPID corral)/cgroup"
        echo "CORRAL-E2E: corral logs demo -n 3: $(corral logs demo -n 3 | tr '\n' ' ')"
        check "corral logs shows a worker's lines with its app and worker" bash -c \
            "corral logs demo -n 50 | grep -qE '^demo/[0-3] pid=[0-9]+ stdout'"
        check "the journal shows a worker's lines with its app and worker" bash -c \
            "journalctl -u corral --no-pager -n 200 | grep -E 'app=demo' | grep -qE 'worker=[0-3]'"
        check "lines the workers wrote while no agent ran were kept (corral logs marks them)" bash -c \
            "corral logs demo -n 100000 | grep -q '(kept)'"
    else
        old=$(main_pid)
        before=$(systemctl show -P NRestarts corral)
        kill -9 "$old"
        wait_for "systemd restarts corral after kill -9 of the agent" active_with_new_pid "$old"
        check "NRestarts went up" [ "$(systemctl show -P NRestarts corral)" -gt "$before" ]
        check "systemd $sysd: the old workers were stopped with the agent (KillMode=mixed: the keeper and workers too)" bash -c "! kill -0 $wpid 2>/dev/null"
    fi
    wait_for "workers serve again after the restart" curl -fsS http://127.0.0.1:8080/
    wait_for "the shared-socket app is ready again after the restart" \
        sync_ready

    check "systemctl stop corral" systemctl stop corral
    check "no corral process is left after the stop" no_corral_process
    check "the service's cgroups hold no process after the stop ($cg)" cgroups_empty "$cg"
    check "the keeper's socket is gone after the stop" test ! -e /run/corral/keeper.sock

    echo "# edited by the e2e test" >> /etc/corral/corral.toml
    echo 2 > $E/phase
    sync
    echo "CORRAL-E2E: phase 1 done, rebooting"
    systemctl reboot
    exit 0
fi

if [ "$phase" = 2 ]; then
    echo "CORRAL-VM-INIT uptime $(cut -d' ' -f1 /proc/uptime)s"
    echo "CORRAL-E2E: phase 2 (after the reboot)"
    wait_for "corral is active after the reboot (start at boot)" systemctl is-active -q corral
    wait_for "the demo serves after the reboot with no human step" curl -fsS http://127.0.0.1:8080/
    wait_for "https serves after the reboot" curl -fsS --cacert /etc/corral/tls/demo.crt \
        --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/
    old=$(main_pid)
    wait_for "every worker and front is ready before the upgrade" bash -c "! corral status | grep -qE ' (starting|stopping) '"
    workers=$(worker_pids)
    echo "CORRAL-E2E: before the upgrade: agent $old, workers and fronts $workers"
    check "the running binary is the installed one" bash -c "readlink /proc/$old/exe | grep -qx /usr/bin/corral"
    check "apt install ./corral_0.1.1-1_amd64.deb (upgrade)" apt-get install -y -q $E/corral_0.1.1-1_amd64.deb
    check "0.1.1 is installed" bash -c "dpkg-query -W -f='\${Version}' corral | grep -qx 0.1.1-1"
    check "the edit of /etc/corral/corral.toml survives the upgrade" grep -q "edited by the e2e test" /etc/corral/corral.toml
    check "the upgrade re-executed the agent in place (main pid $old kept)" same_pid_active "$old"
    check "the agent runs the upgraded file, not the deleted one" bash -c "readlink /proc/$old/exe | grep -qx /usr/bin/corral"
    check "every worker and front kept running through the upgrade" [ "$(worker_pids)" = "$workers" ]
    check "the journal says it adopted them" bash -c "journalctl -u corral --no-pager | grep -q 'adopted 4 running workers'"
    check "curl serves after the upgrade" curl -fsS http://127.0.0.1:8080/
    check "https serves after the upgrade" curl -fsS --cacert /etc/corral/tls/demo.crt \
        --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/
    check "apt remove corral" apt-get remove -y -q corral
    check "corral is stopped after remove" bash -c "! systemctl is-active -q corral"
    check "/etc/corral is kept on remove" test -f /etc/corral/corral.toml
    check "apt purge corral" apt-get purge -y -q corral
    check "/etc/corral is gone after purge" test ! -e /etc/corral
    echo "CORRAL-VM-RESULT: PASS"
    systemctl poweroff
    exit 0
fi
