-- commit: settle a call. Release its hold (if any) and count its usage once.
--
-- KEYS[1]    events SET of the event's day (ids already counted)
-- KEYS[2]    rate key (tpm) of the API key, for the tokens-per-minute correction
-- KEYS[3..]  first the hold's budgets, three keys each: usage HASH, holds ZSET, held HASH;
--            then the usage HASHes to count into, then the index SETs (one per window)
-- ARGV[1] event id   ARGV[2] hold id ("": none)   ARGV[3] number of hold budgets
-- ARGV[4] number of usage hashes   ARGV[5] number of index sets
-- ARGV[6] prompt tokens   ARGV[7] completion tokens   ARGV[8] cost (micros)
-- ARGV[9] 1 if the call failed   ARGV[10] events set expiry (unix s)
-- ARGV[11] tpm (0: none)   ARGV[12] tokens to add to the tpm charge (may be negative)
-- ARGV[13] JSON list of the scopes to add to the index sets
-- ARGV[14..]  expiry (unix s) of each usage hash, then of each index set
--
-- Returns 1 if counted, 0 if this event id was counted before (replay).

local hold_id = ARGV[2]
local n_hold, n_usage, n_index = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

if hold_id ~= '' then
  for i = 1, n_hold do
    local usage, holds, held = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
    local a = redis.call('HGET', held, hold_id)
    if a then
      redis.call('HDEL', held, hold_id)
      redis.call('ZREM', holds, hold_id)
      redis.call('HINCRBY', usage, 'held_micros', '-' .. a)
    end
  end
end

if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('EXPIREAT', KEYS[1], ARGV[10])

local counter = 'requests'
if ARGV[9] == '1' then counter = 'errors' end
local first_usage = 3 + 3 * n_hold
for i = 0, n_usage - 1 do
  local usage = KEYS[first_usage + i]
  redis.call('HINCRBY', usage, counter, 1)
  redis.call('HINCRBY', usage, 'prompt_tokens', ARGV[6])
  redis.call('HINCRBY', usage, 'completion_tokens', ARGV[7])
  redis.call('HINCRBY', usage, 'cost_micros', ARGV[8])
  redis.call('EXPIREAT', usage, ARGV[14 + i])
end

local first_index = first_usage + n_usage
local scopes = cjson.decode(ARGV[13])
for i = 0, n_index - 1 do
  redis.call('SADD', KEYS[first_index + i], unpack(scopes))
  redis.call('EXPIREAT', KEYS[first_index + i], ARGV[14 + n_usage + i])
end

local tpm, delta = tonumber(ARGV[11]), tonumber(ARGV[12])
if tpm > 0 and delta ~= 0 then
  local tat = redis.call('GET', KEYS[2])
  if tat then
    local tm = redis.call('TIME')
    local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
    local new_tat = tonumber(tat) + delta * 60000 / tpm
    if new_tat > now then
      redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
    else
      redis.call('DEL', KEYS[2])
    end
  end
end
return 1
