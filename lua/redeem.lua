-- Apply a voucher to a payment, atomically: everything is checked before the first write.
-- KEYS: 1 ledger, 2 round of the voucher, 3 vouchers, 4 redemptions, 5 orders, 6 expiry,
--       7 events, 8 idem current, 9 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 voucher id, 5 user id, 6 order id,
--       7 redemption record JSON (without redeemed_at), 8 discount fen,
--       9 refusal decided by the caller from state outside this slot ("" if none)
-- Returns {code, payload}: OK / REPLAY with the redemption JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, VOUCHER_NOT_OWNED, VOUCHER_EXPIRED, VOUCHER_USED,
-- ORDER_ALREADY_REDEEMED, BUDGET_EXHAUSTED or the caller's refusal with "".
local prior = idem_lookup(KEYS[8], KEYS[9], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', KEYS[4], prior)} end
if ARGV[9] ~= '' then return {ARGV[9], ''} end
local raw = redis.call('HGET', KEYS[3], ARGV[4])
if not raw then return {'NOT_FOUND', ''} end
local v = cjson.decode(raw)
if v.user_id ~= ARGV[5] then return {'VOUCHER_NOT_OWNED', ''} end
if v.status == 'expired' then return {'VOUCHER_EXPIRED', ''} end
if v.status ~= 'issued' then return {'VOUCHER_USED', ''} end
local now = now_ms()
if now >= tonumber(v.expires_at) then
  -- expired but not swept yet: expire it now (the sweeper would), then refuse
  expire_voucher(KEYS[1], KEYS[2], KEYS[3], KEYS[6], KEYS[7], v, now)
  return {'VOUCHER_EXPIRED', ''}
end
if redis.call('HEXISTS', KEYS[5], ARGV[6]) == 1 then return {'ORDER_ALREADY_REDEEMED', ''} end
local discount = tonumber(ARGV[8])
local reserve = tonumber(v.reserve_fen)
-- a discount above the reservation takes the difference from `available`, whatever the
-- round budget (that bounds what claims reserve); the round records it as `overdrawn`
local over = math.max(0, discount - reserve)
if tonumber(redis.call('HGET', KEYS[1], 'available')) < over then
  return {'BUDGET_EXHAUSTED', ''}
end
-- every check passed: write
local rec = cjson.decode(ARGV[7])
rec.redeemed_at = now
rec.overdrawn_fen = over
local json = cjson.encode(rec)
v.status = 'redeemed'
v.redemption_id = rec.redemption_id
redis.call('HSET', KEYS[3], v.voucher_id, cjson.encode(v))
redis.call('HSET', KEYS[4], rec.redemption_id, json)
redis.call('HSET', KEYS[5], ARGV[6], rec.redemption_id)
redis.call('ZREM', KEYS[6], v.voucher_id)
redis.call('HINCRBY', KEYS[1], 'reserved', -reserve)
redis.call('HINCRBY', KEYS[1], 'spent', discount)
redis.call('HINCRBY', KEYS[1], 'available', reserve - discount)
redis.call('HINCRBY', KEYS[2], 'reserved', -reserve)
redis.call('HINCRBY', KEYS[2], 'spent', discount)
redis.call('HINCRBY', KEYS[2], 'overdrawn', over)
idem_store(KEYS[8], ARGV[1], ARGV[2], rec.redemption_id, tonumber(ARGV[3]))
redis.call('XADD', KEYS[7], '*', 't', 'redemption', 'd', json)
return {'OK', json}
