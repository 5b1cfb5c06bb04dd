#!/bin/bash
# corral's VM pod tier, run by corral-pod.service in a booted Debian bookworm with podman from
# Debian's packages and no network: the image of `cargo xtask image` (podman load) run from
# the project's manifest with `podman kube play`, each step asserted. The variants of the
# manifest are made here from the project's own file (sed), each edit checked.
set -u
K=/root/kube
M=$K/corral-fastapi.yaml
IMAGE=localhost/corral-fastapi:latest
# Every curl gives up: a listening socket nobody serves would hang it forever.
curl() { command curl --connect-timeout 5 --max-time 20 "$@"; }
exec > >(tee -a $K/log) 2>&1
ok() { echo "CORRAL-KUBE ok: $*"; }
fail() {
    echo "CORRAL-KUBE FAIL: $*"
    podman pod ps 2>&1
    podman ps -a 2>&1
    for c in $(podman ps -aq --filter ancestor=$IMAGE); do
        echo "--- podman logs $c:"
        podman logs --tail 80 "$c" 2>&1
    done
    echo "CORRAL-VM-RESULT: FAIL $*"
    sync
    systemctl poweroff
    exit 1
}
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# wait_for WHAT SECONDS COMMAND...: poll (5 times a second) until COMMAND succeeds.
wait_for() {
    local what=$1 secs=$2; shift 2
    local until=$((SECONDS + secs))
    while [ $SECONDS -lt $until ]; do
        if "$@" >/dev/null 2>&1; then ok "$what"; return 0; fi
        sleep 0.2
    done
    fail "$what (waited $secs s)"
}
# variant NAME SED-SCRIPT EXPECTED...: $K/NAME.yaml, the project's manifest edited by
# SED-SCRIPT; each EXPECTED line must be in the result (an edit that no longer applies fails).
variant() {
    local out=$K/$1.yaml script=$2; shift 2
    sed -e "$script" "$M" > "$out"
    for line in "$@"; do
        grep -qxF -- "$line" "$out" || fail "variant $1: no line '$line' after '$script'"
    done
    echo "$out"
}
# The running corral container (the pod's other one is its infra container).
ctr() { podman ps -q --filter ancestor=$IMAGE --filter status=running | head -1; }
# The pod's IP on podman's bridge network: its infra container's.
pod_ip() {
    local pod infra
    pod=$(podman inspect --format '{{.Pod}}' "$(ctr)")
    infra=$(podman pod inspect --format '{{.InfraContainerID}}' "$pod")
    podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$infra"
}
serves() { curl -fsS "http://$IP:8000/" | grep -q '"hello":"world"'; }
ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$IP:9466/readyz")" = 200 ]; }
not_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$IP:9466/readyz")" = 503 ]; }
# The pids of the workers that answer 30 requests, sorted, distinct.
served_pids() {
    for _ in $(seq 1 30); do curl -fsS "http://$IP:8000/" | grep -o '"pid":[0-9]*' | cut -d: -f2; done | sort -nu | tr '\n' ' '
}
started() { podman inspect --format '{{.State.StartedAt}} {{.State.Pid}} {{.RestartCount}}' "$C"; }
# Signal pids inside the container (its pid namespace; the image has no kill binary).
kill_in() { podman exec "$C" sh -c "kill -9 $*"; }

echo "CORRAL-VM-INIT uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "CORRAL-KUBE: $(uname -r), $(podman --version), $(crun --version | head -1)"
check "podman load -i corral-fastapi.tar (no registry: the VM has no network)" \
    podman load -q -i $K/corral-fastapi.tar
check "the image is $IMAGE" podman image exists $IMAGE

# What every variant changes for podman 4.3: one replica (one pod of the Deployment on this
# one machine), and no livenessProbe: podman runs an httpGet probe as `curl` inside the
# container (this image has none) with a named port read as port 0, and restarts the container
# when it fails; the kubelet probes from outside. /livez is asserted below directly.
PODMAN='s/^  replicas: 3$/  replicas: 1/; /^          livenessProbe:$/,/^          readinessProbe:$/{/^          readinessProbe:$/!d}'
PLAIN=$(variant plain "$PODMAN" '  replicas: 1' '          readinessProbe:')
grep -q livenessProbe "$PLAIN" && fail "variant plain: the livenessProbe is still there"
t0=$SECONDS
check "podman kube play the project's manifest" podman kube play "$PLAIN"
C=$(ctr)
[ -n "$C" ] || fail "a running corral container after kube play"
IP=$(pod_ip)
echo "CORRAL-KUBE: pod $(podman pod ps --format '{{.Name}}'), container $C, pod IP $IP"
wait_for "the FastAPI app serves through the pod's port 8000" 300 serves
echo "CORRAL-KUBE: first response $((SECONDS - t0)) s after kube play"
wait_for "/readyz on the metrics port is 200" 120 ready
check "/livez on the metrics port is 200" curl -fsS "http://$IP:9466/livez"
check "PID 1 in the container is corral" bash -c "podman exec $C cat /proc/1/cmdline | tr '\0' ' ' | grep -q '^/usr/bin/corral agent'"
pids=$(served_pids)
echo "CORRAL-KUBE: workers serving: $pids"
check "2 workers (count = auto from the pod's 2 CPUs) serve" [ "$(echo $pids | wc -w)" = 2 ]
logs=$(podman logs "$C" 2>&1)
check "without a writable cgroup the agent says so at start" grep -q "is read-only" <<<"$logs"
echo "CORRAL-KUBE: $(grep -o 'connection steering: .*' <<<"$logs" | head -1)"
budget=$(podman exec "$C" corral check --config /etc/corral/corral.toml 2>&1)
echo "$budget"
check "the budget is the pod's memory limit (the container's memory.max = 2GiB)" \
    grep -q "available is the container's memory.max = 2GiB" <<<"$budget"

# A worker killed inside the pod is restarted by corral: the container is not.
before=$(started)
victim=$(echo $pids | cut -d' ' -f1)
check "kill -9 of worker $victim inside the pod (podman exec)" kill_in "$victim"
wait_for "a replacement serves and $victim does not" 180 bash -c "
    now=\$(for _ in \$(seq 1 30); do command curl -fsS --max-time 10 http://$IP:8000/ | grep -o '\"pid\":[0-9]*' | cut -d: -f2; done | sort -nu)
    [ \$(echo \$now | wc -w) = 2 ] && ! grep -qx $victim <<<\"\$now\""
check "the container was not restarted (start time, PID, restart count: $before)" [ "$(started)" = "$before" ]
check "the pod keeps serving" serves

# Readiness: every worker down -> /readyz 503 (min_ready = 1), then 200 again.
wait_for "/readyz is 200 before the kill" 120 ready
ws=$(served_pids)
check "both workers answer before the kill ($ws)" [ "$(echo $ws | wc -w)" = 2 ]
check "kill -9 of every worker inside the pod ($ws)" kill_in $ws
wait_for "/readyz turns 503 while no worker is ready" 60 not_ready
wait_for "/readyz is 200 again once the replacements are ready" 240 ready
check "the container was still not restarted" [ "$(started)" = "$before" ]

# podman kube down (SIGTERM) under load, a new connection per request: every request whose
# connection was accepted is answered.
podman logs -f "$C" > $K/agent.log 2>&1 &
rm -f $K/stop $K/load.*
for i in 1 2 3; do
    (while [ ! -e $K/stop ]; do
        command curl -s -o /dev/null --connect-timeout 3 --max-time 30 \
            -w '%{http_code} %{time_connect}\n' "http://$IP:8000/" >> $K/load.$i
    done) &
done
wait_for "the load is being served" 120 bash -c "[ \$(cat $K/load.* | grep -c '^200 ') -ge 30 ]"
t1=$SECONDS
check "podman kube down (SIGTERM to corral) under load" podman kube down "$PLAIN"
echo "CORRAL-KUBE: kube down took $((SECONDS - t1)) s"
touch $K/stop
wait $(jobs -p) 2>/dev/null
served=$(cat $K/load.* | grep -c '^200 ')
refused=$(cat $K/load.* | awk '$1 != "200" && $2 + 0 == 0' | wc -l)
lost=$(cat $K/load.* | awk '$1 != "200" && $2 + 0 > 0' | wc -l)
echo "CORRAL-KUBE: under kube down: $served answered, $refused not connected (refused or no pod), $lost accepted but not answered"
cat $K/load.* | awk '$1 != "200" && $2 + 0 > 0' | sort | uniq -c | head
echo "CORRAL-KUBE: the agent's last lines:"
tail -15 $K/agent.log
check "kube down lost no accepted request ($lost of $((served + lost)))" [ "$lost" = 0 ]
check "the load was served until the pod went ($served answered)" [ "$served" -ge 30 ]
check "the pod is gone" bash -c "[ -z \"\$(podman pod ps -q)\" ]"

# A writable cgroup (privileged, as the manifest's comment says): a cgroup leaf per worker
# inside the pod, with the config's memory_max.
PRIV=$(variant privileged "$PODMAN"'; s/^            # privileged: true$/            privileged: true/; s/^            allowPrivilegeEscalation: false$/            allowPrivilegeEscalation: true/' \
    '  replicas: 1' '            privileged: true' '            allowPrivilegeEscalation: true')
check "podman kube play with privileged: true" podman kube play "$PRIV"
C=$(ctr)
IP=$(pod_ip)
wait_for "the privileged pod serves" 300 serves
leaves() { podman exec "$C" sh -c 'cat /sys/fs/cgroup/app-api/worker-*/memory.max' | sort | tr '\n' ' '; }
echo "CORRAL-KUBE: worker leaves: $(podman exec "$C" sh -c 'ls -d /sys/fs/cgroup/app-api/worker-*' | tr '\n' ' ')"
check "each of the 2 workers has its own memory.max of 768MiB inside the pod ($(leaves))" \
    [ "$(leaves)" = "805306368 805306368 " ]
check "the container's own limit is the pod's (memory.max 2Gi)" \
    [ "$(podman exec "$C" cat /sys/fs/cgroup/memory.max)" = 2147483648 ]
check "no read-only warning with a writable cgroup" bash -c "! podman logs $C 2>&1 | grep -q 'is read-only'"
echo "CORRAL-KUBE: privileged: $(podman logs "$C" 2>&1 | grep -o 'connection steering: .*' | head -1)"
check "podman kube down (privileged)" podman kube down "$PRIV"

# An over-budget count: 3 x 768MiB + the agent does not fit the pod's 2Gi: refused at start,
# naming the pod's limit.
OVER=$(variant over "$PODMAN"'; s/^    count = "auto"$/    count = 3/' \
    '  replicas: 1' '    count = 3')
podman kube play "$OVER"
echo "CORRAL-KUBE: kube play of count = 3 exited with $?"
refusal() { podman ps -aq --filter ancestor=$IMAGE | while read -r c; do podman logs "$c" 2>&1; done; }
refused() { refusal | grep -q 'memory budget exceeded'; }
names_the_limit() { refusal | grep 'memory budget exceeded' | grep -q "the container's memory.max = 2GiB"; }
wait_for "count = 3 is refused: memory budget exceeded" 240 refused
refusal | grep 'memory budget exceeded' | head -2
check "the refusal names the pod's limit" names_the_limit
podman kube down "$OVER" >/dev/null 2>&1

echo "CORRAL-VM-RESULT: PASS"
systemctl poweroff
exit 0
