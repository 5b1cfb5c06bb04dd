#!/bin/bash
# corral's VM system tier, run by corral-e2e.service in a booted Debian bookworm: what an
# operator does with the .deb, each step asserted. Phase 1 installs and exercises the package,
# then reboots; phase 2 checks the start at boot, upgrades, removes and purges.
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
    corral status 2>&1 | head -40
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
distinct_workers() {
    for _ in $(seq 1 40); do curl -fsS http://127.0.0.1:8080/ | grep -o '"pid":[0-9]*'; done | sort -u | wc -l
}

if [ "$phase" = 1 ]; then
    echo "CORRAL-VM-INIT uptime $(cut -d' ' -f1 /proc/uptime)s"
    echo "CORRAL-E2E: phase 1: $(uname -r), $(systemctl --version | head -1)"
    check "apt install ./corral_0.1.0-1_amd64.deb" apt-get install -y -q $E/corral_0.1.0-1_amd64.deb
    check "systemctl is-enabled corral" systemctl is-enabled -q corral
    wait_for "systemctl is-active corral" systemctl is-active -q corral
    check "corral check passes on the shipped config" corral check
    check "systemd-analyze verify corral.service" systemd-analyze verify /lib/systemd/system/corral.service
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

    old=$(main_pid)
    before=$(systemctl show -P NRestarts corral)
    kill -9 "$old"
    wait_for "systemd restarts corral after kill -9 of the agent" active_with_new_pid "$old"
    check "NRestarts went up" [ "$(systemctl show -P NRestarts corral)" -gt "$before" ]
    check "the old workers were stopped with the agent (KillMode=mixed: systemd kills the keeper and workers too)" bash -c "! kill -0 $wpid 2>/dev/null"
    wait_for "workers serve again after the restart" curl -fsS http://127.0.0.1:8080/

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
