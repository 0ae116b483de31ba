-- A merchant paid back the subsidy of a refund made after reimbursement: the money leaves
-- `clawback_due` for `available`.
-- KEYS: 1 ledger, 2 refunds, 3 events, 4 idem current, 5 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 refund id, 5 who, 6 reason
-- Returns {code, payload}: OK / REPLAY with the refund JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, NO_CLAWBACK_DUE, ALREADY_REPAID.
local prior = idem_lookup(KEYS[4], KEYS[5], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', KEYS[2], prior)} end
local raw = redis.call('HGET', KEYS[2], ARGV[4])
if not raw then return {'NOT_FOUND', ''} end
local f = cjson.decode(raw)
if f.status == 'repaid' then return {'ALREADY_REPAID', ''} end
if f.status ~= 'clawback_due' then return {'NO_CLAWBACK_DUE', ''} end
local due = tonumber(f.clawback_due_fen)
local now = now_ms()
f.status = 'repaid'
f.repaid_at = now
local json = cjson.encode(f)
redis.call('HSET', KEYS[2], ARGV[4], json)
redis.call('HINCRBY', KEYS[1], 'clawback_due', -due)
redis.call('HINCRBY', KEYS[1], 'available', due)
idem_store(KEYS[4], ARGV[1], ARGV[2], ARGV[4], tonumber(ARGV[3]))
redis.call('XADD', KEYS[3], '*', 't', 'clawback_repaid', 'd', cjson.encode({
  refund_id = ARGV[4], clawback_fen = due, repaid_at = now, by = ARGV[5], reason = ARGV[6]}))
return {'OK', json}
