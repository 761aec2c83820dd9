#!/bin/sh
# A script as an operator would write it, with only gracectl and standard tools: wait for
# a mission that needs approval, approve it, wait for it to resolve, and check it did.
set -eu

# The first mission awaiting approval (replayed from the journal if it is already there).
line=$(gracectl tail --json --since 1 'mission.awaiting_approval' 'daemon.heartbeat' \
       | grep -m 1 '"topic":"mission.awaiting_approval"')
id=$(printf '%s\n' "$line" | sed -n 's/.*"payload":{[^}]*"id":\([0-9][0-9]*\).*/\1/p')
[ -n "$id" ] || { echo "no mission id in: $line" >&2; exit 1; }
echo "mission $id awaits approval"

gracectl missions approve "$id" --yes --comment "approved by approve_flow.sh"
gracectl wait "$id" --state resolved --timeout 60
state=$(gracectl missions show "$id" --json | grep -m 1 '"state":' | tr -d ' ",' | cut -d: -f2)
[ "$state" = resolved ] || { echo "mission $id is $state" >&2; exit 1; }
echo "mission $id resolved"
