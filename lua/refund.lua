-- Refund (part of) a redeemed order. The voucher is never given back; the refunded share
-- of the subsidy leaves `spent`: to `available` if the merchant was not reimbursed yet,
-- to `clawback_due` if it was (a share that floors to 0 fen is owed by nobody). The share
-- repays the round's overdraw of this redemption first (issuer/money.py overdraw_repaid).
-- Returns {code, payload}: OK / REPLAY with the refund JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, ALREADY_REFUNDED, TOO_MUCH (more than is left to refund), or
-- STALE (another refund came first: recompute and retry).
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local round = KEYS[4]  -- the voucher's round
local vouchers = KEYS[5]
local redemptions = KEYS[6]
local refunds = KEYS[7]
local events = KEYS[8]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local redemption_id = ARGV[4]
local refunded_fen = tonumber(ARGV[5])  -- what the caller computed from (compare-and-set)
local amount_fen = tonumber(ARGV[6])
local subsidy_returned_fen = tonumber(ARGV[7])
local overdraw_repaid_fen = tonumber(ARGV[8])  -- computed from the same refunded_fen
local refund = ARGV[9]  -- its record JSON (refund_id, redemption_id, amount_fen, reason, by)
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', refunds, prior)} end
local raw = redis.call('HGET', redemptions, redemption_id)
if not raw then return {'NOT_FOUND', ''} end
local r = cjson.decode(raw)
local order, refunded = tonumber(r.order_amount_fen), tonumber(r.refunded_fen)
if refunded >= order then return {'ALREADY_REFUNDED', ''} end
if refunded ~= refunded_fen then return {'STALE', ''} end
if amount_fen > order - refunded then return {'TOO_MUCH', tostring(order - refunded)} end
-- every check passed: write
local now = time_ms()
local f = cjson.decode(refund)
f.campaign_id = r.campaign_id
f.voucher_id = r.voucher_id
f.created_at = now
f.subsidy_returned_fen = subsidy_returned_fen
redis.call('HINCRBY', ledger, 'spent', -subsidy_returned_fen)
redis.call('HINCRBY', round, 'spent', -subsidy_returned_fen)
redis.call('HINCRBY', round, 'overdrawn', -overdraw_repaid_fen)
if r.paid_to_merchant and subsidy_returned_fen > 0 then
  f.clawback_due_fen = subsidy_returned_fen
  f.status = 'clawback_due'
  redis.call('HINCRBY', ledger, 'clawback_due', subsidy_returned_fen)
else
  f.clawback_due_fen = 0
  f.status = 'returned'
  redis.call('HINCRBY', ledger, 'available', subsidy_returned_fen)
end
r.refunded_fen = refunded + amount_fen
r.subsidy_returned_fen = tonumber(r.subsidy_returned_fen) + subsidy_returned_fen
if r.refunded_fen == order then
  r.status = 'refunded'
  local v = cjson.decode(redis.call('HGET', vouchers, r.voucher_id))
  v.status = 'refunded'
  redis.call('HSET', vouchers, r.voucher_id, cjson.encode(v))
else
  r.status = 'partially_refunded'
end
f.voucher_status = r.status == 'refunded' and 'refunded' or 'redeemed'
local json = cjson.encode(f)
redis.call('HSET', redemptions, redemption_id, cjson.encode(r))
redis.call('HSET', refunds, f.refund_id, json)
idem_store(idem_current, idem_field, fingerprint, f.refund_id, idem_ttl_s)
redis.call('XADD', events, '*', 't', 'refund', 'd', json)
return {'OK', json}
