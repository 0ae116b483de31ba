-- Apply vouchers to payments: a batch of one campaign's redemptions, in order, atomically;
-- each checked in full before its first write.
-- Returns per redemption: code, payload. OK / REPLAY: the redemption JSON;
-- UNAUTHENTICATED (its nonce was used), NOT_FOUND, IDEMPOTENCY_MISMATCH, VOUCHER_NOT_OWNED,
-- VOUCHER_EXPIRED, VOUCHER_USED, ORDER_ALREADY_REDEEMED, BUDGET_EXHAUSTED, the caller's
-- refusal, or INTERNAL (a voucher whose discount terms are not its campaign's): "".
-- Or only {STALE, the campaign's version}, nothing written, if the refusals were decided
-- from merchants of another version than the campaign's (the caller reads them again).
-- KEYS
local idem_current = KEYS[1]  -- the idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local vouchers = KEYS[4]
local redemptions = KEYS[5]
local orders = KEYS[6]
local expiry = KEYS[7]
local events = KEYS[8]
local merchant_version = KEYS[9]  -- the merchants' version the campaign's redemptions take
local rounds_at = 10  -- from here: every round of the campaign, in round_ids' order
-- ARGV
local idem_ttl_s = tonumber(ARGV[1])
local nonce_ttl_s = tonumber(ARGV[2])
local discount_rate_bp = tonumber(ARGV[3])  -- the campaign's terms, with which the caller
local cap_fen = tonumber(ARGV[4])  -- computed each discount: every voucher's own
local first_nonce_bucket = tonumber(ARGV[5])  -- the number of the first nonce bucket
local merchants_read = tonumber(ARGV[6])  -- the version of the merchants the refusals saw
local round_count = tonumber(ARGV[7])
local round_ids_at = 8  -- from here: the ids of the rounds of KEYS, in their order
local payments_at = round_ids_at + round_count  -- from here, per payment, its fields
-- (issuer.protocol.Redemption; see decide)
local nonce_buckets_at = rounds_at + round_count  -- KEYS from here: nonce buckets,
-- consecutive from first_nonce_bucket
local FIELDS = 10
local held = tonumber(redis.call('GET', merchant_version) or '0')
if held ~= merchants_read then return {'STALE', held} end
local round_of = {}
for i = 0, round_count - 1 do round_of[ARGV[round_ids_at + i]] = KEYS[rounds_at + i] end
local nonce_used = {}
local stored = 0

-- the redemption whose fields start at ARGV[at]
local function decide(at)
  local idem_field, fingerprint, nonce_bucket, nonce, voucher_id, user_id, order_id,
    redemption, discount_fen, refusal = unpack(ARGV, at, at + 9)
  discount_fen = tonumber(discount_fen)
  local bucket = KEYS[nonce_buckets_at + tonumber(nonce_bucket) - first_nonce_bucket]
  if redis.call('HSETNX', bucket, nonce, 1) == 0 then return 'UNAUTHENTICATED', '' end
  nonce_used[bucket] = true
  local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
  if prior == false then return 'IDEMPOTENCY_MISMATCH', '' end
  if prior then return 'REPLAY', redis.call('HGET', redemptions, prior) end
  if refusal ~= '' then return refusal, '' end
  local raw = redis.call('HGET', vouchers, voucher_id)
  if not raw then return 'NOT_FOUND', '' end
  local v = cjson.decode(raw)
  local round = round_of[v.round_id]
  if not round or tonumber(v.discount_rate_bp) ~= discount_rate_bp or
      tonumber(v.cap_fen) ~= cap_fen then
    return 'INTERNAL', ''
  end
  if v.user_id ~= user_id then return 'VOUCHER_NOT_OWNED', '' end
  if v.status == 'expired' then return 'VOUCHER_EXPIRED', '' end
  if v.status ~= 'issued' then return 'VOUCHER_USED', '' end
  local now = time_ms()
  if now >= tonumber(v.expires_at) then
    -- expired but not swept yet: expire it now (the sweeper would), then refuse
    expire_voucher(ledger, round, vouchers, expiry, events, v, now)
    return 'VOUCHER_EXPIRED', ''
  end
  if redis.call('HEXISTS', orders, order_id) == 1 then return 'ORDER_ALREADY_REDEEMED', '' end
  local reserve = tonumber(v.reserve_fen)
  -- a discount above the reservation takes the difference from `available`, whatever the
  -- round budget (that bounds what claims reserve); the round records it as `overdrawn`
  local over = math.max(0, discount_fen - reserve)
  if tonumber(redis.call('HGET', ledger, 'available')) < over then
    return 'BUDGET_EXHAUSTED', ''
  end
  -- every check passed: write
  local rec = cjson.decode(redemption)
  rec.round_id = v.round_id
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
  idem_put(idem_current, idem_field, fingerprint, rec.redemption_id)
  stored = stored + 1
  redis.call('XADD', events, '*', 't', 'redemption', 'd', json)
  return 'OK', json
end

local out = {}
for at = payments_at, #ARGV, FIELDS do
  local code, payload = decide(at)
  out[#out + 1] = code
  out[#out + 1] = payload
end
if stored > 0 then redis.call('EXPIRE', idem_current, idem_ttl_s, 'NX') end
for bucket in pairs(nonce_used) do redis.call('EXPIRE', bucket, nonce_ttl_s, 'NX') end
return out
