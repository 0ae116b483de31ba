-- A merchant paid back the subsidy of a refund made after reimbursement: the money leaves
-- `clawback_due` for `available`.
-- Returns {code, payload}: OK / REPLAY with the refund JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, NO_CLAWBACK_DUE, ALREADY_REPAID.
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local refunds = KEYS[4]
local events = KEYS[5]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local refund_id = ARGV[4]
local by = ARGV[5]  -- the key that recorded it
local reason = ARGV[6]
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', refunds, prior)} end
local raw = redis.call('HGET', refunds, refund_id)
if not raw then return {'NOT_FOUND', ''} end
local f = cjson.decode(raw)
if f.status == 'repaid' then return {'ALREADY_REPAID', ''} end
if f.status ~= 'clawback_due' then return {'NO_CLAWBACK_DUE', ''} end
local due = tonumber(f.clawback_due_fen)
local now = time_ms()
f.status = 'repaid'
f.repaid_at = now
local json = cjson.encode(f)
redis.call('HSET', refunds, refund_id, json)
redis.call('HINCRBY', ledger, 'clawback_due', -due)
redis.call('HINCRBY', ledger, 'available', due)
idem_store(idem_current, idem_field, fingerprint, refund_id, idem_ttl_s)
redis.call('XADD', events, '*', 't', 'clawback_repaid', 'd', cjson.encode({
  refund_id = refund_id, clawback_fen = due, repaid_at = now, by = by, reason = reason}))
return {'OK', json}
