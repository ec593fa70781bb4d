-- Token leases (gateway/store/leases.py): take up to `want` consecutive slots of each bucket's time line,
-- after giving back the unused tail of an earlier lease if it still is the tail. Same arithmetic as
-- gcra.lua: a grant of k slots is what k requests arriving now would have been granted.
--
-- KEYS: the bucket keys (all in one cluster slot).
-- ARGV: entry count, then per entry: index into KEYS, rate, burst, want, return_end, return_from
--       (return_end "" for none: if the bucket's TAT still is return_end, it goes back to return_from).
-- Returns: {now, then per entry: first slot, slots granted, the TAT after}; numbers as strings.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function fmt(x)
  return string.format('%.17g', x) -- round-trips a double exactly
end

local out = {fmt(now)}
local a = 2
for _ = 1, tonumber(ARGV[1]) do
  local key = KEYS[tonumber(ARGV[a])]
  local rate, burst, want = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local return_end, return_from = ARGV[a + 4], ARGV[a + 5]
  a = a + 6
  local stored = redis.call('GET', key)
  local tat = tonumber(stored or '0')
  local changed = false
  -- Only the tail goes back: slots after it may already be someone else's.
  if stored and return_end ~= '' and stored == return_end then
    tat = math.max(tonumber(return_from), now)
    changed = true
  end
  local interval = 1.0 / rate
  local tolerance = (burst - 1) * interval
  local start = math.max(tat, now)
  local granted = 0
  if want > 0 and start - now <= tolerance then
    granted = math.min(want, math.floor((now + tolerance - start) / interval + 1e-9) + 1)
  end
  if granted > 0 then
    tat = start + granted * interval
    changed = true
  end
  if changed then
    if tat > now then
      redis.call('SET', key, fmt(tat), 'PX', string.format('%d', math.ceil((tat - now) * 1000) + 1))
    else
      redis.call('DEL', key) -- full again: the same as no bucket
    end
  end
  out[#out + 1] = fmt(start)
  out[#out + 1] = tostring(granted)
  out[#out + 1] = fmt(math.max(tat, now))
end
return out
