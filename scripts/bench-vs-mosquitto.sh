#!/usr/bin/env bash
# outpost side by side with a Mosquitto bridge (issue 13's benchmark), on this machine.
#
# One Mosquitto plays the upstream ("the cloud") for the whole run. Each round then runs every
# phase against each edge broker in turn, each started fresh (new data directory) and stopped
# after its phase, so that the systems take turns and a slow moment of the machine does not
# land on one of them only:
#
#   outpost        target/release/outpost run --listen .. --data <fresh> --upstream ..: the
#                  default passthrough route telemetry/# (PUBACK after the journal's fsync)
#   mosquitto      Debian's Mosquitto 2 as the edge broker: persistence on (a fresh
#                  persistence_location; Mosquitto writes its database at exit and every
#                  autosave_interval, 30 min, and acknowledges before: not crash-safe), a
#                  bridge to the upstream with `topic telemetry/# out 1`, everything else its
#                  defaults (max_inflight_messages 20, max_queued_messages 1000: QoS 1 over
#                  the queue cap is dropped)
#   mosquitto-q0   the same with max_queued_messages 0 (no queue cap, so nothing is dropped)
#   outpost-w100   outpost with the uplink's window lowered from its default of 1,000
#                  unacknowledged publishes to 100 ([[upstream]] inflight; load only: what a
#                  cloud broker that takes no more than 100 at once, such as AWS IoT Core,
#                  allows; on a busy machine the window bounds the rate)
#   outpost-bigq   outpost with local subscriber queues raised (broker.max_queued_messages
#                  1,000,000 and max_queued_bytes 1 GiB; fan-out only: the counterpart of
#                  mosquitto-q0 for local subscribers)
#
# Phases (the load generator is `outpost bench load|fanout|retained|idle`, a process of its
# own, see src/cli/bench/external.rs):
#
#   load       10 devices x 30,000 QoS 1 publishes (100-byte JSON) as fast as their windows
#              allow, counted by a QoS 1 subscriber on the upstream: acknowledged msg/s,
#              delivered msg/s (first publish to last arrival), completeness
#   fanout     1 device, 30,000 QoS 1 publishes, 10 QoS 1 subscribers on the edge broker
#   retained   5,000 retained messages, then one new subscriber to all of them
#   idle       the broker idle (upstream connected), then 1,000 connected idle devices: VmRSS
#
# Usage: scripts/bench-vs-mosquitto.sh [--rounds N] [--phases load,fanout,retained,idle]
#                                      [--messages N] [--devices N] [--out DIR] [--no-build]
#                                      [--edge-binary PATH]
#        scripts/bench-vs-mosquitto.sh --report DIR [same options]   (tables of a finished run)
# Results: one JSON report per phase, system and round, the brokers' logs and configurations,
# and summary.md (the tables printed at the end) in the output directory (default
# target/bench-vs-mosquitto/<date>). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
phases="load,fanout,retained,idle"
messages=300000
devices=10
fanout_messages=30000
fanout_subscribers=10
retained_count=5000
idle_devices=1000
idle_hold=10
out=""
build=1
report_only=""
edge_binary=""

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --phases) phases="$2"; shift 2 ;;
        --messages) messages="$2"; shift 2 ;;
        --devices) devices="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --edge-binary) edge_binary="$2"; shift 2 ;;
        --report) report_only="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$rounds" in ''|*[!0-9]*|0) echo "error: --rounds must be a positive number" >&2; exit 2 ;; esac

# Which systems each phase compares.
systems_for() {
    case "$1" in
        load) echo "outpost outpost-w100 mosquitto mosquitto-q0" ;;
        fanout) echo "outpost mosquitto outpost-bigq mosquitto-q0" ;;
        retained) echo "outpost mosquitto mosquitto-q0" ;;
        idle) echo "outpost mosquitto" ;;
        *) echo "error: unknown phase $1 (load, fanout, retained, idle)" >&2; exit 2 ;;
    esac
}
for phase in ${phases//,/ }; do systems_for "$phase" >/dev/null; done

# ---------------------------------------------------------------------------------------------
# Tables: per round, then the median of each system over the rounds (the JSON reports keep
# nothing: the reports keep every digit).

# median: the median of the numbers on standard input (the mean of the middle two when even).
median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# num FILTER FILE: a number from a report, rounded, or "-".
num() {
    jq -r "($1) as \$v | if \$v == null then \"-\" else (\$v | round | tostring) end" "$2"
}

# cores FILE: cores busy during a measurement: the edge, the upstream, the generator, and the
# rest of the machine (other processes and kernel work not charged to these).
cores() {
    jq -r '[(.watch[] | select(.label == "edge" or .label == "upstream" or .label == "generator") | .cores_busy), .machine.others_cores_busy]
        | map(if . == null then "-" else (. * 100 | round / 100 | tostring) end) | join(", ")' "$1"
}

summary() {
    local phase system round f
    for phase in ${phases//,/ }; do
        case "$phase" in
            load)
                echo "### load: $devices devices x $((messages / devices)) QoS 1 publishes to the edge, counted at the upstream"
                echo
                echo "| round | system | acknowledged msg/s | delivered msg/s | complete (unique / sent, duplicates) | edge CPU µs/msg | edge disk B/msg | publish->PUBACK p50 / p99 ms | cores busy: edge, upstream, generator, others |"
                echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
                for round in $(seq 1 "$rounds"); do
                    for system in $(systems_for load); do
                        f="$out/load-$system-r$round.json"
                        [ -f "$f" ] || continue
                        echo "| $round | $system | $(num .acked_per_sec "$f") | $(num .delivered_per_sec "$f") | $(jq -r '"\(if .complete then "yes" else "**NO**" end) (\(.arrivals.unique) / \(.messages), \(.arrivals.duplicates))"' "$f") | $(num '.watch[] | select(.label=="edge") | .cpu_us_per_msg' "$f") | $(num '.watch[] | select(.label=="edge") | .write_bytes_per_msg' "$f") | $(jq -r '"\(.ack_latency_us.p50/1000 | .*10 | round / 10) / \(.ack_latency_us.p99/1000 | .*10 | round / 10)"' "$f") | $(cores "$f") |"
                    done
                done
                echo
                echo "| median of $rounds | acknowledged msg/s | delivered msg/s | all complete |"
                echo "| --- | --- | --- | --- |"
                for system in $(systems_for load); do
                    ls "$out"/load-"$system"-r*.json >/dev/null 2>&1 || continue
                    echo "| $system | $(jq -r '.acked_per_sec // empty' "$out"/load-"$system"-r*.json | median | xargs printf '%.0f') | $(jq -r '.delivered_per_sec // empty' "$out"/load-"$system"-r*.json | median | xargs printf '%.0f') | $(jq -s -r 'if all(.complete) then "yes" else "**NO**: \(map(select(.complete | not)) | length) of \(length) runs" end' "$out"/load-"$system"-r*.json) |"
                done
                echo
                echo "delivered, outpost / Mosquitto bridge, per round:"
                local mine
                for round in $(seq 1 "$rounds"); do
                    for mine in outpost outpost-w100; do
                        local o="$out/load-$mine-r$round.json" line="  round $round, $mine:"
                        [ -f "$o" ] || continue
                        for system in mosquitto mosquitto-q0; do
                            f="$out/load-$system-r$round.json"
                            [ -f "$f" ] || continue
                            line="$line $(jq -n -r --slurpfile a "$o" --slurpfile b "$f" '($a[0].delivered_per_sec / $b[0].delivered_per_sec * 100 | round | tostring) + "% of '"$system"'"')"
                        done
                        echo "$line"
                    done
                done
                echo
                ;;
            fanout)
                echo "### fanout: 1 device x $fanout_messages QoS 1 publishes, $fanout_subscribers QoS 1 subscribers on the edge"
                echo
                echo "| round | system | publisher acknowledged msg/s | delivered msg/s (all subscribers) | delivered / expected | publish->subscriber p50 ms | edge CPU µs/delivery |"
                echo "| --- | --- | --- | --- | --- | --- | --- |"
                for round in $(seq 1 "$rounds"); do
                    for system in $(systems_for fanout); do
                        f="$out/fanout-$system-r$round.json"
                        [ -f "$f" ] || continue
                        echo "| $round | $system | $(num .acked_per_sec "$f") | $(num .delivered_per_sec "$f") | $(jq -r '"\(.delivered) / \(.expected_deliveries)\(if .complete then "" else " **incomplete**" end)"' "$f") | $(jq -r '.delivery_latency_us.p50/1000 | .*10 | round / 10' "$f") | $(num '.watch[] | select(.label=="edge") | .cpu_us_per_msg' "$f") |"
                    done
                done
                echo
                echo "| median of $rounds | publisher acknowledged msg/s | delivered msg/s | all complete |"
                echo "| --- | --- | --- | --- |"
                for system in $(systems_for fanout); do
                    ls "$out"/fanout-"$system"-r*.json >/dev/null 2>&1 || continue
                    echo "| $system | $(jq -r '.acked_per_sec // empty' "$out"/fanout-"$system"-r*.json | median | xargs printf '%.0f') | $(jq -r '.delivered_per_sec // empty' "$out"/fanout-"$system"-r*.json | median | xargs printf '%.0f') | $(jq -s -r 'if all(.complete) then "yes" else "**NO**: \(map(select(.complete | not)) | length) of \(length) runs" end' "$out"/fanout-"$system"-r*.json) |"
                done
                echo
                ;;
            retained)
                echo "### retained: $retained_count retained messages, then one new subscriber to all of them"
                echo
                echo "| round | system | retained publishes msg/s | SUBACK ms | last retained message ms | received / stored |"
                echo "| --- | --- | --- | --- | --- | --- |"
                for round in $(seq 1 "$rounds"); do
                    for system in $(systems_for retained); do
                        f="$out/retained-$system-r$round.json"
                        [ -f "$f" ] || continue
                        echo "| $round | $system | $(num .acked_per_sec "$f") | $(jq -r '.suback_ms // "-" | if type == "number" then (.*10 | round / 10) else . end' "$f") | $(jq -r '.last_ms // "-" | if type == "number" then (.*10 | round / 10) else . end' "$f") | $(jq -r '"\(.arrivals.unique) / \(.count)\(if .complete then "" else " **incomplete**" end)"' "$f") |"
                    done
                done
                echo
                echo "| median of $rounds | last retained message ms | all complete |"
                echo "| --- | --- | --- |"
                for system in $(systems_for retained); do
                    ls "$out"/retained-"$system"-r*.json >/dev/null 2>&1 || continue
                    echo "| $system | $(jq -r '.last_ms // empty' "$out"/retained-"$system"-r*.json | median | xargs printf '%.1f') | $(jq -s -r 'if all(.complete) then "yes" else "**NO**: \(map(select(.complete | not)) | length) of \(length) runs" end' "$out"/retained-"$system"-r*.json) |"
                done
                echo
                ;;
            idle)
                echo "### idle: the edge broker idle (upstream connected), then $idle_devices connected idle devices for $idle_hold s"
                echo
                echo "| round | system | idle VmRSS KiB | VmRSS with $idle_devices devices KiB | B per device | VmHWM KiB | all stayed connected |"
                echo "| --- | --- | --- | --- | --- | --- | --- |"
                for round in $(seq 1 "$rounds"); do
                    for system in $(systems_for idle); do
                        f="$out/idle-$system-r$round.json"
                        [ -f "$f" ] || continue
                        echo "| $round | $system | $(jq -r '.before[] | select(.label=="edge") | .rss_kib' "$f") | $(jq -r '.after_hold[] | select(.label=="edge") | .rss_kib' "$f") | $(jq -r '.rss_bytes_per_device[] | select(.[0]=="edge") | .[1] // "-" | if type == "number" then round else . end' "$f") | $(jq -r '.after_hold[] | select(.label=="edge") | .hwm_kib' "$f") | $(jq -r 'if .stayed_connected then "yes" else "**NO**" end' "$f") |"
                    done
                done
                echo
                echo "| median of $rounds | idle VmRSS KiB | VmRSS with $idle_devices devices KiB |"
                echo "| --- | --- | --- |"
                for system in $(systems_for idle); do
                    ls "$out"/idle-"$system"-r*.json >/dev/null 2>&1 || continue
                    echo "| $system | $(jq -r '.before[] | select(.label=="edge") | .rss_kib' "$out"/idle-"$system"-r*.json | median) | $(jq -r '.after_hold[] | select(.label=="edge") | .rss_kib' "$out"/idle-"$system"-r*.json | median) |"
                done
                echo
                ;;
        esac
    done
    echo "Configurations: $out/upstream.conf, $out/mosquitto*.conf, $out/outpost-bigq.toml and $out/outpost-w100.toml (when run); reports: $out/*.json"
}

if [ -n "$report_only" ]; then
    out="$report_only"
    summary
    exit 0
fi

# What the script needs: Mosquitto (the upstream, and the edge broker compared with) and jq
# (reading the reports).
mosquitto_bin=""
for candidate in /usr/sbin/mosquitto "$(command -v mosquitto || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && { mosquitto_bin="$candidate"; break; }
done
missing=""
[ -n "$mosquitto_bin" ] || missing="$missing mosquitto"
command -v jq >/dev/null 2>&1 || missing="$missing jq"
if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing:$missing"
        apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
        mosquitto_bin=/usr/sbin/mosquitto
    else
        echo "error: needs$missing (apt-get install$missing)" >&2
        exit 1
    fi
fi

if [ "$build" -eq 1 ]; then
    echo "== cargo build --release --locked"
    CARGO_INCREMENTAL=0 cargo build --release --locked
fi
outpost=target/release/outpost
[ -x "$outpost" ] || { echo "error: $outpost is missing (run without --no-build)" >&2; exit 1; }
# The gateway under test: this tree's by default, or another build (another commit's, to
# compare); the load generator is always this tree's.
edge_outpost="${edge_binary:-$outpost}"
[ -x "$edge_outpost" ] || { echo "error: --edge-binary $edge_outpost is not executable" >&2; exit 1; }

out="${out:-target/bench-vs-mosquitto/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d /tmp/bench-vs-mosquitto.XXXXXX)"

# Every process this script started, so that an interrupted run leaves nothing behind.
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A TCP port on 127.0.0.1 that nothing listens on now, below the kernel's ephemeral range
# (clients' source ports), so that an outgoing connection cannot hold it.
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
    local port
    while :; do
        port=$((10000 + RANDOM % (ephemeral_low - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# wait_port PORT PID LOG: until something listens on PORT; fails (status 1) if PID exits
# first, and stops the script if nothing listens after 10 s.
wait_port() {
    local _
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    echo "error: nothing listens on 127.0.0.1:$1 after 10 s; log:" >&2
    cat "$3" >&2
    exit 1
}

# Clients the upstream has seen connect so far (the edge's uplink or bridge is one).
upstream_connects() {
    grep -cE "New (client|bridge) connected" "$work/upstream.log" || true
}

# wait_upstream_connect COUNT: until the upstream saw more than COUNT connections.
wait_upstream_connect() {
    local _
    for _ in $(seq 1 200); do
        [ "$(upstream_connects)" -gt "$1" ] && return 0
        sleep 0.05
    done
    echo "error: the edge broker did not connect to the upstream within 10 s" >&2
    exit 1
}

# stop PID: SIGTERM and wait (a broker saves its state; outpost commits what it received).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local kept=()
    for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
    pids=("${kept[@]}")
}

# The upstream: Mosquitto, in memory, no queue cap and a larger window than its defaults, so
# that it never drops what the edge forwards and the counting subscriber keeps up. The same for
# every system.
upstream_port=$(free_port)
cat > "$out/upstream.conf" <<EOF
listener $upstream_port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 100
log_dest stderr
EOF
[ "$(id -u)" -eq 0 ] && echo "user root" >> "$out/upstream.conf"
"$mosquitto_bin" -c "$out/upstream.conf" > "$work/upstream.log" 2>&1 &
upstream_pid=$!
pids+=("$upstream_pid")
wait_port "$upstream_port" "$upstream_pid" "$work/upstream.log" || {
    echo "error: the upstream Mosquitto exited; its log:" >&2
    cat "$work/upstream.log" >&2
    exit 1
}

# start_edge SYSTEM: starts a fresh edge broker of that kind; sets edge_pid, edge_port and
# edge_log. A start that loses its port to another process is tried again on another port.
start_edge() {
    local attempt
    for attempt in 1 2 3; do
        start_edge_once "$1" && return 0
        wait "$edge_pid" 2>/dev/null || true
        echo "   the edge broker exited at start (attempt $attempt); its log:" >&2
        sed 's/^/   | /' "$edge_log" >&2
    done
    echo "error: the edge broker ($1) did not start" >&2
    exit 1
}

start_edge_once() {
    local system="$1" dir
    dir="$work/$system-$(date +%s%N)"
    mkdir -p "$dir"
    edge_port=$(free_port)
    local before
    before=$(upstream_connects)
    case "$system" in
        outpost|outpost-bigq|outpost-w100)
            local config=(--upstream "mqtt://127.0.0.1:$upstream_port")
            if [ "$system" = outpost-bigq ]; then
                printf '[broker]\nmax_queued_messages = 1000000\nmax_queued_bytes = 1073741824\n' > "$dir/outpost.toml"
                cp "$dir/outpost.toml" "$out/outpost-bigq.toml"
                config+=(--config "$dir/outpost.toml")
            fi
            if [ "$system" = outpost-w100 ]; then
                printf '[[upstream]]\nname = "cloud"\nurl = "mqtt://127.0.0.1:%s"\ninflight = 100\n' \
                    "$upstream_port" > "$dir/outpost.toml"
                sed "s|$upstream_port|<upstream port>|" "$dir/outpost.toml" > "$out/outpost-w100.toml"
                config=(--config "$dir/outpost.toml")
            fi
            "$edge_outpost" run "${config[@]}" --listen "127.0.0.1:$edge_port" --data "$dir/data" \
                --gateway-id bench \
                > "$dir/edge.log" 2>&1 &
            ;;
        mosquitto|mosquitto-q0)
            {
                echo "listener $edge_port 127.0.0.1"
                echo "allow_anonymous true"
                echo "persistence true"
                echo "persistence_location $dir/"
                [ "$system" = mosquitto-q0 ] && echo "max_queued_messages 0"
                echo "log_dest stderr"
                [ "$(id -u)" -eq 0 ] && echo "user root"
                echo "connection upstream"
                echo "address 127.0.0.1:$upstream_port"
                echo "topic telemetry/# out 1"
            } > "$dir/mosquitto.conf"
            sed "s|$dir|<fresh dir>|; s|$edge_port|<edge port>|; s|$upstream_port|<upstream port>|" \
                "$dir/mosquitto.conf" > "$out/$system.conf"
            "$mosquitto_bin" -c "$dir/mosquitto.conf" > "$dir/edge.log" 2>&1 &
            ;;
    esac
    edge_pid=$!
    edge_log="$dir/edge.log"
    pids+=("$edge_pid")
    wait_port "$edge_port" "$edge_pid" "$edge_log" || return 1
    wait_upstream_connect "$before"
}

# run_phase PHASE SYSTEM ROUND: one measurement, its report in $out/PHASE-SYSTEM-rROUND.json.
run_phase() {
    local phase="$1" system="$2" round="$3"
    local json="$out/$phase-$system-r$round.json"
    echo "== round $round: $phase, $system (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    start_edge "$system"
    local watch=(--watch "edge=$edge_pid" --watch "upstream=$upstream_pid")
    case "$phase" in
        load)
            "$outpost" bench load --target "127.0.0.1:$edge_port" \
                --count-at "127.0.0.1:$upstream_port" --devices "$devices" \
                --messages "$messages" "${watch[@]}" --json "$json"
            ;;
        fanout)
            "$outpost" bench fanout --target "127.0.0.1:$edge_port" \
                --subscribers "$fanout_subscribers" --messages "$fanout_messages" \
                "${watch[@]}" --json "$json"
            ;;
        retained)
            "$outpost" bench retained --target "127.0.0.1:$edge_port" \
                --count "$retained_count" "${watch[@]}" --json "$json"
            ;;
        idle)
            # Settled first: the uplink or bridge connected, nothing else happening.
            sleep 3
            "$outpost" bench idle --target "127.0.0.1:$edge_port" --devices "$idle_devices" \
                --hold-secs "$idle_hold" "${watch[@]}" --json "$json"
            ;;
    esac
    stop "$edge_pid"
    cp "$edge_log" "$out/$phase-$system-r$round.log"
}

{
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
    else
        commit="unknown (not a git checkout)"
    fi
    echo "commit: $commit"
    echo "outpost under test: $edge_outpost ($("$edge_outpost" --version))"
    echo "mosquitto: $("$mosquitto_bin" -h 2>/dev/null | head -1)"
    echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rounds: $rounds; phases: $phases; load: $devices devices x $((messages / devices)) msgs"
} | tee "$out/run.txt"

for round in $(seq 1 "$rounds"); do
    for phase in ${phases//,/ }; do
        for system in $(systems_for "$phase"); do
            run_phase "$phase" "$system" "$round"
        done
    done
done
echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ), load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/run.txt"

echo
summary | tee "$out/summary.md"
