-- Batched GCRA: many requests' rate-limit decisions in one call, each all-or-nothing over its buckets.
-- The arithmetic is gateway.ratelimit.gcra, operation for operation (IEEE doubles on both sides), so the
-- gateway can recompute every verdict from what this returns and get the same answer.
--
-- KEYS: the distinct bucket keys of the batch (all in one cluster slot).
-- ARGV: request count, then per request: limit count n, then n x (index into KEYS, rate, burst).
-- Returns: {now, then per request: 1 if admitted else 0, then the n TATs it was judged against}.
-- Numbers go back as strings: Redis would truncate Lua numbers to integers.

local t = redis.call('TIME') -- the server's clock, so gateways on different machines agree
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tats, dirty = {}, {}

local function fmt(x)
  return string.format('%.17g', x) -- round-trips a double exactly
end

local out = {fmt(now)}
local a = 2
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  a = a + 1
  local flag = #out + 1
  out[flag] = 1
  local idx, new, admitted = {}, {}, true
  for j = 1, n do
    local i, rate, burst = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local tat = tats[i]
    if tat == nil then -- read each bucket once; later requests in the batch see earlier charges
      tat = tonumber(redis.call('GET', KEYS[i]) or '0')
      tats[i] = tat
    end
    local interval = 1.0 / rate
    local tolerance = (burst - 1) * interval
    local start = math.max(tat, now)
    idx[j], new[j] = i, start + interval
    if not (start - now <= tolerance) then
      admitted = false
    end
    out[#out + 1] = fmt(tat)
  end
  if admitted then
    for j = 1, n do
      tats[idx[j]] = new[j]
      dirty[idx[j]] = true
    end
  else
    out[flag] = 0 -- denied: nothing charged anywhere
  end
end

-- A bucket expires when it would be full again (TAT <= now means the same as no bucket), so idle
-- buckets disappear by themselves.
for i in pairs(dirty) do
  local ttl = math.ceil((tats[i] - now) * 1000) + 1
  redis.call('SET', KEYS[i], fmt(tats[i]), 'PX', string.format('%d', ttl))
end
return out
