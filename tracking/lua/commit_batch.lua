-- commit_batch: count a batch of usage events with no hold, all at once and exactly once.
--
-- The client has summed the batch per usage hash; this script checks that none of the
-- event ids was counted before, then adds the ids and the sums. If any id was counted
-- before (a batch sent again after a timeout, or an event replayed from the journal),
-- it changes nothing and returns 0: the client then counts that batch event by event
-- with commit.lua, which skips each id already counted.
--
-- KEYS: first the events SETs (one per UTC day in the batch), then the usage HASHes,
--       then the index SETs, then the rate (tpm) keys, in the order of ARGV[1]'s lists
-- ARGV[1]: JSON [days, usage, index, rates] (one argument: cheaper to send than many)
--   days   [[expiry (unix s), [event id, ...]], ...]                 one per events SET
--   usage  [[requests, errors, prompt tokens, completion tokens, cost (micros),
--            expiry (unix s)], ...]                                  one per usage HASH
--   index  [[expiry (unix s), [scope, ...]], ...]                    one per index SET
--   rates  [[tpm, tokens to add to its charge (may be negative)], ...] one per rate key
--
-- Returns 1 if counted, 0 if any id was counted before (nothing changed).

local batch = cjson.decode(ARGV[1])
local days, usage, index, rates = batch[1], batch[2], batch[3], batch[4]

-- cjson reads numbers as doubles; Redis wants integers written out in full.
local function int(x) return string.format('%d', x) end

for d = 1, #days do
  local seen = redis.call('SMISMEMBER', KEYS[d], unpack(days[d][2]))
  for i = 1, #seen do
    if seen[i] == 1 then return 0 end
  end
end

for d = 1, #days do
  redis.call('SADD', KEYS[d], unpack(days[d][2]))
  redis.call('EXPIREAT', KEYS[d], int(days[d][1]))
end

-- As commit.lua: requests / errors only when there are some; tokens and cost always.
local first = #days
for i = 1, #usage do
  local key, sums = KEYS[first + i], usage[i]
  if sums[1] ~= 0 then redis.call('HINCRBY', key, 'requests', int(sums[1])) end
  if sums[2] ~= 0 then redis.call('HINCRBY', key, 'errors', int(sums[2])) end
  redis.call('HINCRBY', key, 'prompt_tokens', int(sums[3]))
  redis.call('HINCRBY', key, 'completion_tokens', int(sums[4]))
  redis.call('HINCRBY', key, 'cost_micros', int(sums[5]))
  redis.call('EXPIREAT', key, int(sums[6]))
end

first = first + #usage
for i = 1, #index do
  local key = KEYS[first + i]
  redis.call('SADD', key, unpack(index[i][2]))
  redis.call('EXPIREAT', key, int(index[i][1]))
end

-- Tokens-per-minute corrections, summed per key (as commit.lua does for one event).
first = first + #index
for i = 1, #rates do
  local key, tpm, delta = KEYS[first + i], rates[i][1], rates[i][2]
  local tat = redis.call('GET', key)
  if tat and tpm > 0 and delta ~= 0 then
    local tm = redis.call('TIME')
    local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
    local new_tat = tonumber(tat) + delta * 60000 / tpm
    if new_tat > now then
      redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
    else
      redis.call('DEL', key)
    end
  end
end
return 1
