-- Refund (part of) a redeemed order. The voucher is never given back; the refunded share
-- of the subsidy leaves `spent`: to `available` if the merchant was not reimbursed yet,
-- to `clawback_due` if it was (a share that floors to 0 fen is owed by nobody). The share
-- repays the round's overdraw of this redemption first (issuer/money.py overdraw_repaid).
-- KEYS: 1 ledger, 2 round of the voucher, 3 vouchers, 4 redemptions, 5 refunds, 6 events,
--       7 idem current, 8 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 redemption id, 5 refunded fen the
--       caller computed from (compare-and-set), 6 amount fen, 7 subsidy returned fen,
--       8 refund record JSON (refund_id, redemption_id, amount_fen, reason, by),
--       9 overdraw repaid fen (computed from the same refunded fen)
-- Returns {code, payload}: OK / REPLAY with the refund JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, ALREADY_REFUNDED, TOO_MUCH (more than is left to refund), or
-- STALE (another refund came first: recompute and retry).
local prior = idem_lookup(KEYS[7], KEYS[8], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', KEYS[5], prior)} end
local raw = redis.call('HGET', KEYS[4], ARGV[4])
if not raw then return {'NOT_FOUND', ''} end
local r = cjson.decode(raw)
local order, refunded = tonumber(r.order_amount_fen), tonumber(r.refunded_fen)
local amount, returned = tonumber(ARGV[6]), tonumber(ARGV[7])
if refunded >= order then return {'ALREADY_REFUNDED', ''} end
if refunded ~= tonumber(ARGV[5]) then return {'STALE', ''} end
if amount > order - refunded then return {'TOO_MUCH', tostring(order - refunded)} end
-- every check passed: write
local now = now_ms()
local f = cjson.decode(ARGV[8])
f.campaign_id = r.campaign_id
f.voucher_id = r.voucher_id
f.created_at = now
f.subsidy_returned_fen = returned
redis.call('HINCRBY', KEYS[1], 'spent', -returned)
redis.call('HINCRBY', KEYS[2], 'spent', -returned)
redis.call('HINCRBY', KEYS[2], 'overdrawn', -tonumber(ARGV[9]))
if r.paid_to_merchant and returned > 0 then
  f.clawback_due_fen = returned
  f.status = 'clawback_due'
  redis.call('HINCRBY', KEYS[1], 'clawback_due', returned)
else
  f.clawback_due_fen = 0
  f.status = 'returned'
  redis.call('HINCRBY', KEYS[1], 'available', returned)
end
r.refunded_fen = refunded + amount
r.subsidy_returned_fen = tonumber(r.subsidy_returned_fen) + returned
if r.refunded_fen == order then
  r.status = 'refunded'
  local v = cjson.decode(redis.call('HGET', KEYS[3], r.voucher_id))
  v.status = 'refunded'
  redis.call('HSET', KEYS[3], r.voucher_id, cjson.encode(v))
else
  r.status = 'partially_refunded'
end
f.voucher_status = r.status == 'refunded' and 'refunded' or 'redeemed'
local json = cjson.encode(f)
redis.call('HSET', KEYS[4], ARGV[4], cjson.encode(r))
redis.call('HSET', KEYS[5], f.refund_id, json)
idem_store(KEYS[7], ARGV[1], ARGV[2], f.refund_id, tonumber(ARGV[3]))
redis.call('XADD', KEYS[6], '*', 't', 'refund', 'd', json)
return {'OK', json}
