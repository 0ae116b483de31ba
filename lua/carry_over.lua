-- Move a closed round's unused budget (budget + overdrawn - reserved - spent: what the
-- campaign pool paid above reservations is not the round's to give) to a round still open.
-- Run again whenever expiries or refunds free more of it; a no-op when nothing is unused.
-- Returns the fen moved.
-- KEYS
local closed_round = KEYS[1]
local next_round = KEYS[2]
local events = KEYS[3]
-- ARGV
local now_ms = tonumber(ARGV[1])  -- the caller's clock
local closed_round_id = ARGV[2]
local next_round_id = ARGV[3]
local f = redis.call('HMGET', closed_round, 'closes', 'budget', 'reserved', 'spent', 'overdrawn')
local t = redis.call('HMGET', next_round, 'closes', 'budget')
if not f[1] or not t[1] then return 0 end
if now_ms < tonumber(f[1]) or now_ms >= tonumber(t[1]) then return 0 end
local budget = tonumber(f[2])
if budget < 0 or tonumber(t[2]) < 0 then return 0 end
local unused = budget + tonumber(f[5] or 0) - tonumber(f[3]) - tonumber(f[4] or 0)
if unused <= 0 then return 0 end
redis.call('HSET', closed_round, 'budget', budget - unused)
redis.call('HINCRBY', next_round, 'budget', unused)
redis.call('XADD', events, '*', 't', 'carry_over', 'd', cjson.encode({
  from_round = closed_round_id, to_round = next_round_id, fen = unused, at = now_ms}))
return unused
