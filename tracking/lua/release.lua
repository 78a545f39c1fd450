-- release: give a hold back in every (scope, window) it was taken in.
--
-- KEYS  per budget, three keys: usage HASH, holds ZSET, held HASH
-- ARGV[1] hold id
-- Returns the number of budgets the hold was still open in.

local hold_id = ARGV[1]
local released = 0
for i = 1, #KEYS / 3 do
  local usage, holds, held = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = redis.call('HGET', held, hold_id)
  if a then
    redis.call('HDEL', held, hold_id)
    redis.call('ZREM', holds, hold_id)
    redis.call('HINCRBY', usage, 'held_micros', '-' .. a)
    released = released + 1
  end
end
return released
