"""How the Redis store lays out the version registry (gateway.artifacts.registry): keys and scripts.

A model's registrations are one hash and each of its versions' histories one list, all under the hash
tag {reg:MODEL}: one slot in a cluster, so a script may touch them together and a model's registry
moves with its slot. Model and version ids are URL-safe names ([A-Za-z0-9_.-]), so they go into key
names as they are.
"""

from __future__ import annotations

from gateway.store.base import HISTORY_LIMIT
from gateway.store.redis_layout import Script

__all__ = ["ADD_EVENT", "HISTORY_LIMIT", "REGISTER", "history_key", "versions_key"]


def versions_key(model: str) -> str:
    return f"gw:{{reg:{model}}}:versions"  # version id -> registration JSON


def history_key(model: str, version: str) -> str:
    return f"gw:{{reg:{model}}}:history:{version}"  # list of event JSON, oldest first


# HSETNX and the answer in one atomic step: two processes registering one id at once see one winner.
REGISTER = Script("""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then return old end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false""")

# Append, keeping the newest ARGV[3] events; with ARGV[2] == '1', an event of the newest one's kind
# replaces it instead, keeping when the newest began.
ADD_EVENT = Script("""
local event = cjson.decode(ARGV[1])
if ARGV[2] == '1' then
  local newest = redis.call('LINDEX', KEYS[1], -1)
  if newest then
    local old = cjson.decode(newest)
    if old.kind == event.kind then
      event.since = old.since or old.at
      redis.call('LSET', KEYS[1], -1, cjson.encode(event))
      return 0
    end
  end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
return 1""")
