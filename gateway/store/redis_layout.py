"""How the Redis store lays out its data: key names, the JSON of a key record, and the Lua scripts.

Kept apart from `gateway.store.redis` (the client side) so the layout, which must stay readable by
every gateway version sharing one Redis, is in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from gateway.routing.table import Limit
from gateway.store.base import KeyRecord

CHANNEL = "gw:keys"  # carries the old secret hash of a changed or deleted key
KEYS_BY_NAME = "gw:{keys}:by_name"  # name -> record JSON
KEYS_BY_HASH = "gw:{keys}:by_hash"  # secret hash -> record JSON; same slot, so both change in one script
HEARTBEATS = "gw:{hb}:processes"  # process id, scored by when its heartbeat expires
STATS = "gw:{stats}:processes"  # process id -> {"expires", "stats"}; expires on Redis's clock


def state_key(name: str) -> str:
    return f"gw:{{state}}:{name}"


def lease_keys(name: str) -> list[str]:
    """The lease and its fencing-token counter, in the slot of the state they fence (one script)."""
    return [f"gw:{{state}}:lease:{name}", f"gw:{{state}}:lease-token:{name}"]


@dataclasses.dataclass(frozen=True)
class Script:
    source: str

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


GCRA = Script((Path(__file__).parent / "gcra.lua").read_text())
GCRA_LEASE = Script((Path(__file__).parent / "gcra_lease.lua").read_text())  # gateway.store.leases

# Give back one interval per charged bucket (KEYS may repeat). A TAT below `now` means "full", so taking an
# interval off one that was charged from empty is exact too.
REFUND = Script("""
for i, key in ipairs(KEYS) do
  local tat = redis.call('GET', key)
  if tat then
    redis.call('SET', key, string.format('%.17g', tonumber(tat) - tonumber(ARGV[i])), 'KEEPTTL')
  end
end""")

PUT_KEY = Script("""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then redis.call('HDEL', KEYS[2], cjson.decode(old).secret_hash) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if old then redis.call('PUBLISH', ARGV[4], cjson.decode(old).secret_hash) end
return old""")

DELETE_KEY = Script("""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
local secret_hash = cjson.decode(old).secret_hash
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], secret_hash)
redis.call('PUBLISH', ARGV[2], secret_hash)
return old""")

# Take the lease if free, renew it if ours; one round trip, atomic (SET NX PX alone cannot renew). The
# value is "<token> <holder>"; every new holding draws the next token from a counter that never expires,
# and a renewal keeps it. Returns the token, 0 when another holds the lease.
LEASE = Script("""
local current = redis.call('GET', KEYS[1])
if current then
  local space = string.find(current, ' ', 1, true)
  if space and string.sub(current, space + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(current, 1, space - 1))
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
""")
# Write a state document only while the lease is held with the given token: KEYS = lease, document.
PUT_FENCED = Script("""
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^(%d+) ') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
""")
# Statistics with their expiry on Redis's clock. The value stays the JSON {"expires", "stats"} that every
# release reads; the stats JSON is spliced in as it came, never re-encoded (cjson would round numbers).
PUT_STATS = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expires = string.format('%.17g', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], '{"expires":' .. expires .. ',"stats":' .. ARGV[3] .. '}')
return 1
""")
# The live statistics and Redis's time; removes the expired ones. Returns {now, {value, ...}}.
GET_STATS = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local all = redis.call('HGETALL', KEYS[1])
local live, stale = {}, {}
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '^{"expires":%s*([^,]+),'))
  if expires and expires > now then
    table.insert(live, all[i + 1])
  else
    table.insert(stale, all[i])
  end
end
for i = 1, #stale, 1000 do
  redis.call('HDEL', KEYS[1], unpack(stale, i, math.min(i + 999, #stale)))
end
return {string.format('%.17g', now), live}
""")
HEARTBEAT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], string.format('%d', math.ceil(tonumber(last[2]) * 1000) + 1))
return redis.call('ZCARD', KEYS[1])""")


@functools.lru_cache(maxsize=65536)
def bucket_key(bucket: str) -> str:
    """The Redis key of a bucket. The hash tag puts a key's own buckets ("key:N", "key:N:model:M") in one
    slot and a model's ("model:M...") in another; any other bucket (e.g. by client address) gets its own."""
    kind, _, rest = bucket.partition(":")
    if kind == "key":
        tag = "k:" + rest.split(":model:", 1)[0]
    elif kind == "model":
        tag = "m:" + rest.split(":", 1)[0]
    else:
        tag = "b:" + bucket
    return f"gw:{{{tag}}}:rl:{bucket}"


def dump_record(record: KeyRecord) -> str:
    data: dict[str, Any] = {f.name: getattr(record, f.name) for f in dataclasses.fields(KeyRecord)}
    data["model_limits"] = {
        model: {"rate": limit.rate, "burst": limit.burst} for model, limit in record.model_limits.items()
    }
    return json.dumps(data, separators=(",", ":"))


def load_record(raw: str) -> KeyRecord:
    known = {f.name for f in dataclasses.fields(KeyRecord)}  # ignore fields a newer gateway may add
    data = {name: value for name, value in json.loads(raw).items() if name in known}
    data["models"] = tuple(data.get("models", ()))
    # Absent from records written before keys had per-model limits.
    data["model_limits"] = {
        model: Limit(float(limit["rate"]), int(limit["burst"]))
        for model, limit in data.get("model_limits", {}).items()
    }
    return KeyRecord(**data)
