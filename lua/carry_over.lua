-- Move a closed round's unused budget (budget + overdrawn - reserved - spent: what the
-- campaign pool paid above reservations is not the round's to give) to a round still open.
-- Run again whenever expiries or refunds free more of it; a no-op when nothing is unused.
-- KEYS: 1 closed round, 2 next round, 3 events
-- ARGV: 1 now ms (the caller's clock), 2 closed round id, 3 next round id
-- Returns the fen moved.
local now = tonumber(ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'closes', 'budget', 'reserved', 'spent', 'overdrawn')
local t = redis.call('HMGET', KEYS[2], 'closes', 'budget')
if not f[1] or not t[1] then return 0 end
if now < tonumber(f[1]) or now >= tonumber(t[1]) then return 0 end
local budget = tonumber(f[2])
if budget < 0 or tonumber(t[2]) < 0 then return 0 end
local unused = budget + tonumber(f[5] or 0) - tonumber(f[3]) - tonumber(f[4] or 0)
if unused <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'budget', budget - unused)
redis.call('HINCRBY', KEYS[2], 'budget', unused)
redis.call('XADD', KEYS[3], '*', 't', 'carry_over', 'd', cjson.encode({
  from_round = ARGV[2], to_round = ARGV[3], fen = unused, at = now}))
return unused
