-- Apply a voucher to a payment, atomically: everything is checked before the first write.
-- Returns {code, payload}: OK / REPLAY with the redemption JSON; NOT_FOUND,
-- IDEMPOTENCY_MISMATCH, VOUCHER_NOT_OWNED, VOUCHER_EXPIRED, VOUCHER_USED,
-- ORDER_ALREADY_REDEEMED, BUDGET_EXHAUSTED or the caller's refusal with "".
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local round = KEYS[4]  -- the voucher's round
local vouchers = KEYS[5]
local redemptions = KEYS[6]
local orders = KEYS[7]
local expiry = KEYS[8]
local events = KEYS[9]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local voucher_id = ARGV[4]
local user_id = ARGV[5]
local order_id = ARGV[6]
local redemption = ARGV[7]  -- its record JSON (without redeemed_at)
local discount_fen = tonumber(ARGV[8])
local refusal = ARGV[9]  -- decided by the caller from state outside this slot ("" if none)
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', redemptions, prior)} end
if refusal ~= '' then return {refusal, ''} end
local raw = redis.call('HGET', vouchers, voucher_id)
if not raw then return {'NOT_FOUND', ''} end
local v = cjson.decode(raw)
if v.user_id ~= user_id then return {'VOUCHER_NOT_OWNED', ''} end
if v.status == 'expired' then return {'VOUCHER_EXPIRED', ''} end
if v.status ~= 'issued' then return {'VOUCHER_USED', ''} end
local now = time_ms()
if now >= tonumber(v.expires_at) then
  -- expired but not swept yet: expire it now (the sweeper would), then refuse
  expire_voucher(ledger, round, vouchers, expiry, events, v, now)
  return {'VOUCHER_EXPIRED', ''}
end
if redis.call('HEXISTS', orders, order_id) == 1 then return {'ORDER_ALREADY_REDEEMED', ''} end
local reserve = tonumber(v.reserve_fen)
-- a discount above the reservation takes the difference from `available`, whatever the
-- round budget (that bounds what claims reserve); the round records it as `overdrawn`
local over = math.max(0, discount_fen - reserve)
if tonumber(redis.call('HGET', ledger, 'available')) < over then
  return {'BUDGET_EXHAUSTED', ''}
end
-- every check passed: write
local rec = cjson.decode(redemption)
rec.redeemed_at = now
rec.overdrawn_fen = over
local json = cjson.encode(rec)
v.status = 'redeemed'
v.redemption_id = rec.redemption_id
redis.call('HSET', vouchers, v.voucher_id, cjson.encode(v))
redis.call('HSET', redemptions, rec.redemption_id, json)
redis.call('HSET', orders, order_id, rec.redemption_id)
redis.call('ZREM', expiry, v.voucher_id)
redis.call('HINCRBY', ledger, 'reserved', -reserve)
redis.call('HINCRBY', ledger, 'spent', discount_fen)
redis.call('HINCRBY', ledger, 'available', reserve - discount_fen)
redis.call('HINCRBY', round, 'reserved', -reserve)
redis.call('HINCRBY', round, 'spent', discount_fen)
redis.call('HINCRBY', round, 'overdrawn', over)
idem_store(idem_current, idem_field, fingerprint, rec.redemption_id, idem_ttl_s)
redis.call('XADD', events, '*', 't', 'redemption', 'd', json)
return {'OK', json}
