-- admit: a key's rate limits (GCRA) and a budget hold across every applicable
-- (scope, window), all in one atomic step: all held or none.
--
-- KEYS[1], KEYS[2]  rate keys (rpm, tpm) of the API key
-- KEYS[3..]         per budget, three keys: usage HASH, holds ZSET, held HASH
-- ARGV[1] rpm (0: none)   ARGV[2] tpm (0: none)   ARGV[3] tokens charged to tpm
-- ARGV[4] hold id ("": no hold)   ARGV[5] amount (micros)   ARGV[6] hold ttl (ms)
-- ARGV[7..]         per budget, two values: limit (micros), key expiry (unix s)
--
-- Returns {0} admitted (and held), {1, limit, retry_after_ms} rate limited (nothing
-- changed), or {2, budget index (1-based), spent, held, limit} refused (rate charged,
-- nothing held).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local PERIOD = 60000

local function gcra(key, limit, cost)
  if limit <= 0 or cost <= 0 then return nil, 0 end
  if cost > limit then cost = limit end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * PERIOD / limit
  local excess = new_tat - now - PERIOD
  if excess > 0 then return nil, excess end
  return new_tat, 0
end

local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm_tat, rpm_wait = gcra(KEYS[1], rpm, 1)
if rpm_wait > 0 then return {1, 'rpm', math.ceil(rpm_wait)} end
local tpm_tat, tpm_wait = gcra(KEYS[2], tpm, tonumber(ARGV[3]))
if tpm_wait > 0 then return {1, 'tpm', math.ceil(tpm_wait)} end
if rpm_tat then
  redis.call('SET', KEYS[1], string.format('%.3f', rpm_tat), 'PX', math.ceil(rpm_tat - now) + 1)
end
if tpm_tat then
  redis.call('SET', KEYS[2], string.format('%.3f', tpm_tat), 'PX', math.ceil(tpm_tat - now) + 1)
end

local hold_id = ARGV[4]
if hold_id == '' then return {0} end
local amount = tonumber(ARGV[5])
local n = (#KEYS - 2) / 3

-- Purge expired holds (a daemon that died holding money) before checking.
for i = 1, n do
  local usage, holds, held = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  if #expired > 0 then
    for _, id in ipairs(expired) do
      local a = redis.call('HGET', held, id)
      if a then
        redis.call('HDEL', held, id)
        redis.call('HINCRBY', usage, 'held_micros', '-' .. a)
      end
    end
    redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
  end
end

for i = 1, n do
  local f = redis.call('HMGET', KEYS[3 * i], 'cost_micros', 'held_micros')
  local spent, held = tonumber(f[1] or '0'), tonumber(f[2] or '0')
  local limit = tonumber(ARGV[5 + 2 * i])
  if spent + held + amount > limit then
    return {2, i, string.format('%d', spent), string.format('%d', held), ARGV[5 + 2 * i]}
  end
end

local expires = string.format('%d', now + tonumber(ARGV[6]))
for i = 1, n do
  local usage, holds, held = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local expire_at = ARGV[6 + 2 * i]
  redis.call('ZADD', holds, expires, hold_id)
  redis.call('HSET', held, hold_id, ARGV[5])
  redis.call('HINCRBY', usage, 'held_micros', ARGV[5])
  redis.call('EXPIREAT', usage, expire_at)
  redis.call('EXPIREAT', holds, expire_at)
  redis.call('EXPIREAT', held, expire_at)
end
return {0}
