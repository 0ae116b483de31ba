-- Compare-and-set a round's budget (and optionally its quota).
-- KEYS: 1 ledger, 2 round, 3 events, 4 idem current, 5 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 expected budget (-1 = none),
--       5 new budget, 6 new quota ("" = unchanged), 7 event JSON
-- Returns {code, budget, quota, issued, reserved} (NOT_FOUND: {code} alone); the new
-- budget may not be below what the round's budget holds (reserved + spent - overdrawn):
-- OK, REPLAY, IDEMPOTENCY_MISMATCH, NOT_FOUND, BUDGET_CONFLICT.
local rnd = redis.call('HMGET', KEYS[2], 'budget', 'quota', 'issued', 'reserved', 'spent',
  'overdrawn')
if not rnd[1] or redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
local prior = idem_lookup(KEYS[4], KEYS[5], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', rnd[1], rnd[2], rnd[3], rnd[4]} end
if prior then
  -- the first answer, kept as "budget quota issued reserved" (a record from before that
  -- format holds only a version: answer with the round as it is now)
  local first = {}
  for x in string.gmatch(prior, '%S+') do first[#first + 1] = x end
  if #first == 4 then return {'REPLAY', first[1], first[2], first[3], first[4]} end
  return {'REPLAY', rnd[1], rnd[2], rnd[3], rnd[4]}
end
local budget, issued = tonumber(ARGV[5]), tonumber(rnd[3])
local held = tonumber(rnd[4]) + tonumber(rnd[5] or 0) - tonumber(rnd[6] or 0)
local quota = rnd[2]
if ARGV[6] ~= '' then quota = ARGV[6] end
if tonumber(rnd[1]) ~= tonumber(ARGV[4]) or budget < held
    or (tonumber(quota) >= 0 and tonumber(quota) < issued) then
  return {'BUDGET_CONFLICT', rnd[1], rnd[2], rnd[3], rnd[4]}
end
redis.call('HSET', KEYS[2], 'budget', budget, 'quota', quota)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
idem_store(KEYS[4], ARGV[1], ARGV[2], table.concat({ARGV[5], quota, rnd[3], rnd[4]}, ' '),
  tonumber(ARGV[3]))
redis.call('XADD', KEYS[3], '*', 't', 'round_budget', 'd', ARGV[7], 'budget', budget,
  'quota', quota, 'version', version)
return {'OK', tostring(budget), quota, rnd[3], rnd[4]}
