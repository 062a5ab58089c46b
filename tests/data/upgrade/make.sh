#!/usr/bin/env bash
# Writes tests/data/upgrade/data/: a gateway's data directory as an older outpost left it when
# it was killed (kill -9), for tests/upgrade.rs. Run it with the older binary and that
# version's `faulty` example module:
#   bash tests/data/upgrade/make.sh OLD_OUTPOST FAULTY_WASM "WHAT THE BINARY IS"
# What the data holds (the upstream is never reachable, so nothing leaves):
#   - 5 rows in the outbox (route "plain", payloads p-1 .. p-5);
#   - 3 events held for module "later", which has no file yet (route "lane", reason
#     "not-deployed", payloads {"n":1} .. {"n":3});
#   - 4 events in the lane queue of module "slow" (route "slowlane", payloads loop, s-1 .. s-3),
#     killed while the first invocation spins;
#   - 2 dead letters "malformed" (route "strict", payloads not-json-1, not-json-2);
#   - a kept session "keeper" subscribed to local/# with one queued message (kept-1);
#   - a retained message on retained/x (r-1).
set -euo pipefail
old=${1:?usage: make.sh OLD_OUTPOST FAULTY_WASM DESCRIPTION}
faulty=${2:?usage: make.sh OLD_OUTPOST FAULTY_WASM DESCRIPTION}
description=${3:?usage: make.sh OLD_OUTPOST FAULTY_WASM DESCRIPTION}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"' EXIT
sed -e 's|@LATER@||' -e "s|@SLOW@|$faulty|" "$here/outpost.toml" >"$work/outpost.toml"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$old" run --config "$work/outpost.toml" --data "$work/data" --listen "127.0.0.1:$port" \
    >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/log"; exit 1; }
    sleep 0.1
done
pub() { mosquitto_pub -p "$port" -q 1 -i maker "$@"; }
# The kept session first, so the local message is queued for it while it is away.
mosquitto_sub -p "$port" -q 1 -c -i keeper -t 'local/#' -W 1 || true
for i in 1 2 3 4 5; do pub -t plain/d1/env -m "p-$i"; done
for i in 1 2 3; do pub -t lane/d2/env -m "{\"n\":$i}"; done
pub -t slow/d4/env -m loop
for i in 1 2 3; do pub -t slow/d4/env -m "s-$i"; done
for i in 1 2; do pub -t strict/d3/env -m "not-json-$i"; done
pub -t local/x -m kept-1
pub -r -t retained/x -m r-1
db="$work/data/outpost.db"
want="5 3 4 2 0"
counts=
for _ in $(seq 100); do
    counts=$(sqlite3 "$db" "SELECT (SELECT COUNT(*) FROM outbox) || ' ' ||
        (SELECT COUNT(*) FROM retries WHERE reason = 'not-deployed') || ' ' ||
        (SELECT COUNT(*) FROM retries WHERE reason = 'queued') || ' ' ||
        (SELECT COUNT(*) FROM dead_letters) || ' ' || (SELECT COUNT(*) FROM journal)" \
        2>/dev/null || true)
    [ "$counts" = "$want" ] && break
    sleep 0.1
done
[ "$counts" = "$want" ] || { echo "rows: $counts, wanted $want"; cat "$work/log"; exit 1; }
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
pid=
rm -rf "$here/data"
cp -r "$work/data" "$here/data"
echo "$description" >"$here/data/WRITTEN-BY"
ls -la "$here/data"
