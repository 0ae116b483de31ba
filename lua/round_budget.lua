-- Compare-and-set a round's budget (and optionally its quota).
-- Returns {code, budget, quota, issued, reserved} (NOT_FOUND: {code} alone); the new
-- budget may not be below what the round's budget holds (reserved + spent - overdrawn):
-- OK, REPLAY, IDEMPOTENCY_MISMATCH, NOT_FOUND, BUDGET_CONFLICT.
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local round = KEYS[4]
local events = KEYS[5]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local expected_budget_fen = tonumber(ARGV[4])  -- -1: the round has none
local budget_fen = ARGV[5]  -- the new budget
local quota = ARGV[6]  -- the new quota, "" to leave it
local event = ARGV[7]  -- JSON: who and the request
local rnd = redis.call('HMGET', round, 'budget', 'quota', 'issued', 'reserved', 'spent',
  'overdrawn')
if not rnd[1] or redis.call('EXISTS', ledger) == 0 then return {'NOT_FOUND'} end
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', rnd[1], rnd[2], rnd[3], rnd[4]} end
if prior then
  -- the first answer, kept as "budget quota issued reserved" (a record from before that
  -- format holds only a version: answer with the round as it is now)
  local first = {}
  for x in string.gmatch(prior, '%S+') do first[#first + 1] = x end
  if #first == 4 then return {'REPLAY', first[1], first[2], first[3], first[4]} end
  return {'REPLAY', rnd[1], rnd[2], rnd[3], rnd[4]}
end
local budget, issued = tonumber(budget_fen), tonumber(rnd[3])
local held = tonumber(rnd[4]) + tonumber(rnd[5] or 0) - tonumber(rnd[6] or 0)
if quota == '' then quota = rnd[2] end
if tonumber(rnd[1]) ~= expected_budget_fen or budget < held
    or (tonumber(quota) >= 0 and tonumber(quota) < issued) then
  return {'BUDGET_CONFLICT', rnd[1], rnd[2], rnd[3], rnd[4]}
end
redis.call('HSET', round, 'budget', budget, 'quota', quota)
local version = redis.call('HINCRBY', ledger, 'version', 1)
idem_store(idem_current, idem_field, fingerprint,
  table.concat({budget_fen, quota, rnd[3], rnd[4]}, ' '), idem_ttl_s)
redis.call('XADD', events, '*', 't', 'round_budget', 'd', event, 'budget', budget,
  'quota', quota, 'version', version)
return {'OK', tostring(budget), quota, rnd[3], rnd[4]}
