-- Decide a batch of claims for one campaign round, in order, atomically. In a lottery
-- round a claim that passes every check is an application instead, waiting for the draw.
-- KEYS: 1 ledger, 2 round, 3 persons, 4 accounts, 5 vouchers, 6 registrations,
--       7 events, 8 idem current, 9 idem previous, 10 winners, 11 expiry,
--       12 applications, 13 applicants, 14 applicant accounts, 15 the round's entries,
--       16-18 rate-limit windows (per account, device, client IP), 19.. nonce buckets
-- ARGV: 1 round_id, 2 reserve_fen, 3 mode (self|staff), 4 idem ttl s, 5 nonce ttl s,
--       6 claim count, 7-15 per rate-limit dimension: limit (-1: none), seconds until the
--       window ends (Retry-After), window ttl s; 16 allocation (first_come|lottery),
--       17 "1" if the campaign has a lottery round (applicants to check); then 10 fields
--       per claim:
--       idem field, fingerprint, nonce bucket index, nonce field,
--       person_ref, user_id, voucher_id (or application_id) candidate, extra JSON object
--       body ("{}" or fields), device id ("" if none), client IP ("" if none)
-- Returns: {status, version, issued, quota, then per claim: code, payload}
--   code OK: payload = issued_at ms (the voucher is the candidate, as the caller sent it);
--   REPLAY: payload = voucher JSON (with request = [idem field, fingerprint]);
--   APPLIED / REPLAY_APPLIED: payload = application JSON;
--   ALREADY_CLAIMED: payload = voucher id ("" if an application waits for its draw);
--   RATE_LIMITED: payload = seconds to wait; any other refusal code: payload = "".
local FIELDS = 10
local FIRST = 18  -- ARGV index of the first claim's first field
local round_id = ARGV[1]
local reserve = tonumber(ARGV[2])
local staff_mode = ARGV[3] == 'staff'
local idem_ttl = tonumber(ARGV[4])
local nonce_ttl = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local lottery = ARGV[16] == 'lottery'
local applicants = ARGV[17] == '1'
local limits = {}
for d = 0, 2 do
  limits[d + 1] = {key = KEYS[16 + d], limit = tonumber(ARGV[7 + 3 * d]),
                   reset = ARGV[8 + 3 * d], ttl = tonumber(ARGV[9 + 3 * d]), used = false}
end

local led = redis.call('HMGET', KEYS[1], 'status', 'version', 'available')
local rnd = redis.call('HMGET', KEYS[2], 'opens', 'closes', 'valid_until', 'quota', 'budget',
  'issued', 'reserved', 'spent', 'overdrawn', 'apps_close')
local out
if not led[1] or not rnd[1] then
  out = {'missing', led[2] or '0', 0, 0}
  for _ = 1, n do
    out[#out + 1] = 'NOT_FOUND'
    out[#out + 1] = ''
  end
  return out
end
local status = led[1]
local available = tonumber(led[3])
local opens, closes, valid_until = tonumber(rnd[1]), tonumber(rnd[2]), rnd[3]
if lottery then closes = tonumber(rnd[10]) end  -- applications end before the round
local quota, rbudget = tonumber(rnd[4]), tonumber(rnd[5])
local issued, rreserved = tonumber(rnd[6]), tonumber(rnd[7])
-- money of the round's redeemed vouchers that its budget paid (not the campaign pool)
local rspent = tonumber(rnd[8] or 0) - tonumber(rnd[9] or 0)
local now = now_ms()
local granted = 0
local stored = 0  -- applications taken (their idempotency records too)
local nonce_used = {}

-- whether the latest application of a person or account (a field of `hash`) waits for
-- its draw
local function waiting(hash, field)
  local aid = redis.call('HGET', hash, field)
  return aid and cjson.decode(redis.call('HGET', KEYS[12], aid)).status == 'applied'
end

-- what a claim at `base` makes, a voucher or an application: the caller's fields, the
-- round, the person and account, `status`, and the request that made it (so that issuer
-- rebuild can restore its idempotency record)
local function made(base, status)
  local rec = cjson.decode(ARGV[base + 7])
  rec.round_id = round_id
  rec.user_id = ARGV[base + 5]
  rec.person_ref = ARGV[base + 4]
  rec.status = status
  rec.request = {ARGV[base], ARGV[base + 1]}
  return rec
end

local function decide(base)
  local idem_field, fingerprint = ARGV[base], ARGV[base + 1]
  local nonce_idx = tonumber(ARGV[base + 2])
  local person, user = ARGV[base + 4], ARGV[base + 5]
  local nkey = KEYS[18 + nonce_idx]
  if redis.call('HSETNX', nkey, ARGV[base + 3], 1) == 0 then return 'UNAUTHENTICATED', '' end
  nonce_used[nkey] = true
  local prior = idem_lookup(KEYS[8], KEYS[9], idem_field, fingerprint)
  if prior == false then return 'IDEMPOTENCY_MISMATCH', '' end
  if prior and string.sub(prior, 1, 2) == 'a:' then
    -- the application as first answered, before its draw
    local first = cjson.decode(redis.call('HGET', KEYS[12], string.sub(prior, 3)))
    first.status = 'applied'
    first.voucher_id = nil
    return 'REPLAY_APPLIED', cjson.encode(first)
  end
  if prior then
    -- the voucher as first answered: issued, before any redemption, expiry or refund
    local first = cjson.decode(redis.call('HGET', KEYS[5], prior))
    first.status = 'issued'
    first.redemption_id = nil
    return 'REPLAY', cjson.encode(first)
  end
  -- rate limits count attempts that reach the gate (a replay above is not one)
  local who = {user, ARGV[base + 8], ARGV[base + 9]}
  for d = 1, 3 do
    local lim = limits[d]
    if lim.limit >= 0 and who[d] ~= '' and
        tonumber(redis.call('HGET', lim.key, who[d]) or '0') >= lim.limit then
      return 'RATE_LIMITED', lim.reset
    end
  end
  for d = 1, 3 do
    local lim = limits[d]
    if lim.limit >= 0 and who[d] ~= '' then
      redis.call('HINCRBY', lim.key, who[d], 1)
      lim.used = true
    end
  end
  if status == 'paused' then return 'CAMPAIGN_PAUSED', '' end
  if status ~= 'active' then return 'CAMPAIGN_ENDED', '' end
  if now < opens then return 'NOT_OPEN', '' end
  if now >= closes then return 'ROUND_CLOSED', '' end
  if staff_mode then
    local reg = redis.call('HGET', KEYS[6], person)
    if not reg or cjson.decode(reg).user_id ~= user then return 'NOT_REGISTERED', '' end
  end
  local held = redis.call('HGET', KEYS[3], person) or redis.call('HGET', KEYS[4], user)
  if held then return 'ALREADY_CLAIMED', held end
  if applicants and (waiting(KEYS[13], person) or waiting(KEYS[14], user)) then
    return 'ALREADY_CLAIMED', ''
  end
  if lottery then
    local aid = ARGV[base + 6]
    local app = made(base, 'applied')
    app.application_id = aid
    app.applied_at = now
    local json = cjson.encode(app)
    redis.call('HSET', KEYS[12], aid, json)
    redis.call('HSET', KEYS[13], person, aid)
    redis.call('HSET', KEYS[14], user, aid)
    redis.call('HSET', KEYS[15], app.application_ref, aid)
    idem_put(KEYS[8], idem_field, fingerprint, 'a:' .. aid)
    stored = stored + 1
    redis.call('XADD', KEYS[7], '*', 't', 'application', 'd', json)
    return 'APPLIED', json
  end
  if quota >= 0 and issued >= quota then return 'ROUND_QUOTA_EXHAUSTED', '' end
  if rbudget >= 0 and rreserved + rspent + reserve > rbudget then return 'ROUND_BUDGET_EXHAUSTED', '' end
  if available < reserve then return 'BUDGET_EXHAUSTED', '' end
  -- every check passed: write
  local vid = ARGV[base + 6]
  local rec = made(base, 'issued')
  rec.voucher_id = vid
  rec.issued_at = now
  rec.expires_at = tonumber(valid_until)
  rec.reserve_fen = reserve
  write_voucher(KEYS[3], KEYS[4], KEYS[5], KEYS[11], KEYS[7], rec)
  idem_put(KEYS[8], idem_field, fingerprint, vid)
  redis.call('SADD', KEYS[10], idem_field)
  issued = issued + 1
  rreserved = rreserved + reserve
  available = available - reserve
  granted = granted + 1
  return 'OK', string.format('%d', now)  -- the caller knows the rest of the voucher
end

out = {status, led[2], 0, 0}
for i = 0, n - 1 do
  local code, payload = decide(FIRST + i * FIELDS)
  out[#out + 1] = code
  out[#out + 1] = payload
end
if granted > 0 then
  redis.call('HSET', KEYS[2], 'issued', issued, 'reserved', rreserved)
  redis.call('HINCRBY', KEYS[1], 'available', -granted * reserve)
  redis.call('HINCRBY', KEYS[1], 'reserved', granted * reserve)
  redis.call('EXPIRE', KEYS[10], idem_ttl, 'NX')
end
if granted + stored > 0 then redis.call('EXPIRE', KEYS[8], idem_ttl, 'NX') end
for nkey in pairs(nonce_used) do redis.call('EXPIRE', nkey, nonce_ttl, 'NX') end
for _, lim in ipairs(limits) do
  if lim.used then redis.call('EXPIRE', lim.key, lim.ttl, 'NX') end
end
out[3] = issued
out[4] = quota
return out
