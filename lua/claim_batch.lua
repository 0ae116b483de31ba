-- Decide a batch of claims for one campaign round, in order, atomically. In a lottery
-- round a claim that passes every check is an application instead, waiting for the draw.
-- Returns: {status, version, issued, quota, then per claim: code, payload}
--   code OK: payload = issued_at ms (the voucher is the candidate, as the caller sent it);
--   REPLAY: payload = voucher JSON (with request = [idem field, fingerprint]);
--   APPLIED / REPLAY_APPLIED: payload = application JSON;
--   ALREADY_CLAIMED: payload = voucher id ("" if an application waits for its draw);
--   RATE_LIMITED: payload = seconds to wait; any other refusal code: payload = "".
-- KEYS
local ledger = KEYS[1]
local round = KEYS[2]
local persons = KEYS[3]
local accounts = KEYS[4]
local vouchers = KEYS[5]
local registrations = KEYS[6]
local events = KEYS[7]
local idem_current = KEYS[8]  -- the idempotency buckets (lib.lua)
local idem_previous = KEYS[9]
local winners = KEYS[10]  -- idempotency fields of the requests that won a voucher
local expiry = KEYS[11]
local applications = KEYS[12]
local applicants = KEYS[13]
local applicant_accounts = KEYS[14]
local entries = KEYS[15]  -- the round's applications by application_ref
local rate_windows_at = 16  -- from here: the rate-limit windows of account, device, client IP
local nonce_buckets_at = 19  -- from here: nonce buckets, consecutive from first_nonce_bucket
-- ARGV
local round_id = ARGV[1]
local reserve_fen = tonumber(ARGV[2])
local mode = ARGV[3]  -- self, or staff (registered persons only)
local idem_ttl_s = ARGV[4]  -- (the TTLs only go to EXPIRE: not converted)
local nonce_ttl_s = ARGV[5]
local rate_limits_at = 6  -- from here, per rate-limit window: limit (-1: none), seconds
-- until the window ends (Retry-After), window TTL s
local allocation = ARGV[15]  -- first_come or lottery
local check_applicants = ARGV[16]  -- "1" if the campaign has a lottery round
local first_nonce_bucket = tonumber(ARGV[17])  -- the number of the first nonce bucket
local record_head = ARGV[18]  -- every record's start: "{" and the campaign's fields, no "}"
-- the claims' fields (issuer.protocol.Claim; see decide), all in one flat JSON list decoded
-- once, field by field: every claim's idem_field, then every claim's fingerprint... (as
-- separate arguments, each cost the worker its own packing)
local claims = cjson.decode(ARGV[19])
local CLAIM_FIELDS = 10
local n = #claims / CLAIM_FIELDS
-- where the run of each field starts: claim i's is claims[<field>_at + i]
local idem_field_at, fingerprint_at, nonce_bucket_at, nonce_at, person_ref_at, user_id_at,
  candidate_at, extra_at, device_id_at, client_ip_at =
  0, n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n, 7 * n, 8 * n, 9 * n
local staff_mode = mode == 'staff'
local lottery = allocation == 'lottery'
local limits = {}
local limited = false  -- whether any window has a limit (if not, no claim looks at them)
for d = 0, 2 do
  local at = rate_limits_at + 3 * d
  local limit, retry_after_s, window_ttl_s = unpack(ARGV, at, at + 2)
  limit = tonumber(limit)
  limits[d + 1] = {key = KEYS[rate_windows_at + d], limit = limit, reset = retry_after_s,
                   ttl = window_ttl_s, used = false}
  limited = limited or limit >= 0
end

local led = redis.call('HMGET', ledger, 'status', 'version', 'available')
local rnd = redis.call('HMGET', round, 'opens', 'closes', 'valid_until', 'quota', 'budget',
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
local now = time_ms()
local now_json = string.format('%d', now)
local round_json = cjson.encode(round_id)
-- the end of each record this batch makes (the same for all its claims): a voucher's
-- times and reservation, an application's time
local voucher_tail = ',"issued_at":' .. now_json .. ',"expires_at":' .. valid_until ..
  ',"reserve_fen":' .. string.format('%d', reserve_fen) .. '}'
local application_tail = ',"applied_at":' .. now_json .. '}'
-- the answer of every claim that passes its own checks while the campaign or the round is
-- not open: the same for the whole batch, found once
local shut = (status == 'paused' and 'CAMPAIGN_PAUSED') or
  (status ~= 'active' and 'CAMPAIGN_ENDED') or (now < opens and 'NOT_OPEN') or
  (now >= closes and 'ROUND_CLOSED')
local granted = 0
local stored = 0  -- applications taken (their idempotency records too)

-- What the batch reads, read once for all its claims (one HMGET per hash), into tables
-- that the claims then read and update in order: `held[hash][field]` is the value, false
-- if none. Its writes to these hashes are gathered in `w` and sent at the end.
local w = gathered()
local wanted = {}  -- hash -> fields to read
local first_bucket = KEYS[nonce_buckets_at]
-- the writes every claim that gets past its nonce makes, appended here without a call per
-- write (w.args): its nonce, by bucket; its idempotency record, if it is answered; its
-- request among the winners, if it wins a voucher
local nonce_writes = {[first_bucket] = w.args('HSET', first_bucket)}
local record_writes = w.args('HSET', idem_current)
local winner_writes = w.args('SADD', winners)
-- each claim's nonce bucket key, if the batch's nonces are in more than one bucket (most
-- batches' are all in the first: a run of `claims`, read as it is)
local one_bucket = #KEYS == nonce_buckets_at
local buckets = {}
if not one_bucket then
  for i = 1, n do
    local bucket = KEYS[nonce_buckets_at + claims[nonce_bucket_at + i] - first_nonce_bucket]
    local list = wanted[bucket]
    if not list then
      list = {}
      wanted[bucket] = list
      nonce_writes[bucket] = w.args('HSET', bucket)
    end
    buckets[i] = bucket
    list[#list + 1] = claims[nonce_at + i]
  end
end
if limited then
  for i = 1, n do
    local who = {claims[user_id_at + i], claims[device_id_at + i], claims[client_ip_at + i]}
    for d = 1, 3 do
      local key = limits[d].key
      if limits[d].limit >= 0 and who[d] ~= '' then
        local list = wanted[key] or {}
        wanted[key] = list
        list[#list + 1] = who[d]
      end
    end
  end
end
local held = {}
-- read fields[first..last] of `hash` into held[hash]
local function read(hash, fields, first, last)
  local values = call_spread('HMGET', hash, fields, first, last)
  local t = {}
  for j = first, last do t[fields[j]] = values[j - first + 1] end
  held[hash] = t
end
for hash, fields in pairs(wanted) do read(hash, fields, 1, #fields) end
if one_bucket then read(first_bucket, claims, nonce_at + 1, nonce_at + n) end
-- every claim reads the idempotency buckets, the persons and the accounts: runs of `claims`
read(idem_current, claims, idem_field_at + 1, idem_field_at + n)
-- the previous bucket is never written: its records by claim, as HMGET answers them
local previous_records =
  call_spread('HMGET', idem_previous, claims, idem_field_at + 1, idem_field_at + n)
read(persons, claims, person_ref_at + 1, person_ref_at + n)
read(accounts, claims, user_id_at + 1, user_id_at + n)
-- those that every claim reads
local current_records = held[idem_current]
local person_holds, account_holds = held[persons], held[accounts]
local function put(hash, field, value)
  held[hash][field] = value
  w.hset(hash, field, value)
end
-- the record of voucher `id`: issued in this batch (a replay within it, seldom), found in
-- the gathered HSET's field/value pairs, else as Redis has it
local function voucher_json(id)
  local issued_now = w.args('HSET', vouchers)
  for k = 1, #issued_now, 2 do
    if issued_now[k] == id then return issued_now[k + 1] end
  end
  return redis.call('HGET', vouchers, id)
end
local write_voucher = voucher_writer(w, persons, accounts, vouchers, expiry, events)

-- whether the latest application of a person or account (a field of `hash`) waits for
-- its draw
local function waiting(hash, field)
  local aid = redis.call('HGET', hash, field)
  return aid and cjson.decode(redis.call('HGET', applications, aid)).status == 'applied'
end

-- the JSON record a claim makes, a voucher or an application, in one concatenation: the
-- batch's `record_head` (the campaign's fields, never none), the claim's own `extra`
-- members, the round, the person and account, `state`, the request that made it (so that
-- issuer rebuild can restore its idempotency record), its id (`id_name`: `id`) and `tail`.
-- The person reference, the body's fingerprint (hex) and the record's id (issuer.ids) are
-- the worker's own, never in need of an escape; the account and the request id come from
-- the client and go through cjson.
local function made(extra, state, person_ref, user_id, idem_field, fingerprint, id_name, id,
    tail)
  return record_head .. extra .. ',"round_id":' .. round_json .. ',"user_id":' ..
    cjson.encode(user_id) .. ',"person_ref":"' .. person_ref .. '","status":"' .. state ..
    '","request":[' .. cjson.encode(idem_field) .. ',"' .. fingerprint .. '"],"' .. id_name ..
    '":"' .. id .. '"' .. tail
end

-- claim `i`
local function decide(i)
  local idem_field, fingerprint, nonce, person_ref, user_id, candidate, extra =
    claims[idem_field_at + i], claims[fingerprint_at + i], claims[nonce_at + i],
    claims[person_ref_at + i], claims[user_id_at + i], claims[candidate_at + i],
    claims[extra_at + i]
  local bucket = buckets[i] or first_bucket
  local seen = held[bucket]
  if seen[nonce] then return 'UNAUTHENTICATED', '' end
  seen[nonce] = '1'
  local writes = nonce_writes[bucket]
  local k = #writes
  writes[k + 1], writes[k + 2] = nonce, '1'
  local found = current_records[idem_field] or previous_records[i]
  local prior  -- most claims are new: no record to read
  if found then prior = idem_result(found, fingerprint) end
  if prior == false then return 'IDEMPOTENCY_MISMATCH', '' end
  if prior and string.sub(prior, 1, 2) == 'a:' then
    -- the application as first answered, before its draw
    local first = cjson.decode(redis.call('HGET', applications, string.sub(prior, 3)))
    first.status = 'applied'
    first.voucher_id = nil
    return 'REPLAY_APPLIED', cjson.encode(first)
  end
  if prior then
    -- the voucher as first answered: issued, before any redemption, expiry or refund
    local first = cjson.decode(voucher_json(prior))
    first.status = 'issued'
    first.redemption_id = nil
    return 'REPLAY', cjson.encode(first)
  end
  -- rate limits count attempts that reach the gate (a replay above is not one)
  if limited then
    local who = {user_id, claims[device_id_at + i], claims[client_ip_at + i]}
    for d = 1, 3 do
      local lim = limits[d]
      if lim.limit >= 0 and who[d] ~= '' and
          tonumber(held[lim.key][who[d]] or '0') >= lim.limit then
        return 'RATE_LIMITED', lim.reset
      end
    end
    for d = 1, 3 do
      local lim = limits[d]
      if lim.limit >= 0 and who[d] ~= '' then
        put(lim.key, who[d], tonumber(held[lim.key][who[d]] or '0') + 1)
        lim.used = true
      end
    end
  end
  if shut then return shut, '' end
  if staff_mode then
    local reg = redis.call('HGET', registrations, person_ref)
    if not reg or cjson.decode(reg).user_id ~= user_id then return 'NOT_REGISTERED', '' end
  end
  local hold = person_holds[person_ref] or account_holds[user_id]
  if hold then return 'ALREADY_CLAIMED', hold end
  if check_applicants == '1' and
      (waiting(applicants, person_ref) or waiting(applicant_accounts, user_id)) then
    return 'ALREADY_CLAIMED', ''
  end
  if lottery then
    local json = made(extra, 'applied', person_ref, user_id, idem_field, fingerprint,
      'application_id', candidate, application_tail)
    redis.call('HSET', applications, candidate, json)
    redis.call('HSET', applicants, person_ref, candidate)
    redis.call('HSET', applicant_accounts, user_id, candidate)
    redis.call('HSET', entries, cjson.decode('{' .. string.sub(extra, 2) .. '}').application_ref, candidate)
    put(idem_current, idem_field, idem_record(fingerprint, 'a:' .. candidate))
    stored = stored + 1
    redis.call('XADD', events, '*', 't', 'application', 'd', json)
    return 'APPLIED', json
  end
  if quota >= 0 and issued >= quota then return 'ROUND_QUOTA_EXHAUSTED', '' end
  if rbudget >= 0 and rreserved + rspent + reserve_fen > rbudget then
    return 'ROUND_BUDGET_EXHAUSTED', ''
  end
  if available < reserve_fen then return 'BUDGET_EXHAUSTED', '' end
  -- every check passed: write
  local json = made(extra, 'issued', person_ref, user_id, idem_field, fingerprint,
    'voucher_id', candidate, voucher_tail)
  write_voucher(candidate, person_ref, user_id, valid_until, json)
  person_holds[person_ref] = candidate
  account_holds[user_id] = candidate
  local record = idem_record(fingerprint, candidate)
  current_records[idem_field] = record
  k = #record_writes
  record_writes[k + 1], record_writes[k + 2] = idem_field, record
  winner_writes[#winner_writes + 1] = idem_field
  issued = issued + 1
  rreserved = rreserved + reserve_fen
  available = available - reserve_fen
  granted = granted + 1
  return 'OK', now_json  -- the caller knows the rest of the voucher
end

out = {status, led[2], 0, 0}
for i = 1, n do
  out[3 + 2 * i], out[4 + 2 * i] = decide(i)
end
w.flush()
if granted > 0 then
  redis.call('HSET', round, 'issued', issued, 'reserved', rreserved)
  redis.call('HINCRBY', ledger, 'available', -granted * reserve_fen)
  redis.call('HINCRBY', ledger, 'reserved', granted * reserve_fen)
  redis.call('EXPIRE', winners, idem_ttl_s, 'NX')
end
if granted + stored > 0 then redis.call('EXPIRE', idem_current, idem_ttl_s, 'NX') end
for bucket, writes in pairs(nonce_writes) do
  if #writes > 0 then redis.call('EXPIRE', bucket, nonce_ttl_s, 'NX') end
end
for _, lim in ipairs(limits) do
  if lim.used then redis.call('EXPIRE', lim.key, lim.ttl, 'NX') end
end
out[3] = issued
out[4] = quota
return out
