-- Shared helpers, prepended to every script by issuer/scripts.py. Each script then binds
-- its KEYS and ARGV to named locals at its top, in the order of its structure in
-- issuer/protocol.py (tests/test_protocol.py checks that they agree).
-- Idempotency records are hash fields "<key id>|<request_id>" -> "<fingerprint>\n<result>",
-- kept in two time buckets (current and previous) that expire as a whole.

local function idem_lookup(cur, prev, field, fingerprint)
  local rec = redis.call('HGET', cur, field)
  if not rec then rec = redis.call('HGET', prev, field) end
  if not rec then return nil end
  local nl = string.find(rec, '\n', 1, true)
  if string.sub(rec, 1, nl - 1) ~= fingerprint then return false end
  return string.sub(rec, nl + 1)
end

-- without the bucket's expiry: for a script that stores many and sets it once
local function idem_put(cur, field, fingerprint, result)
  redis.call('HSET', cur, field, fingerprint .. '\n' .. result)
end

local function idem_store(cur, field, fingerprint, result, ttl)
  idem_put(cur, field, fingerprint, result)
  redis.call('EXPIRE', cur, ttl, 'NX')
end

-- Redis's clock, in ms
local function time_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Expire an issued voucher `v` (decoded record) at `now`: its reservation returns to the
-- campaign's `available` and to its round; the person's chance stays used.
local function expire_voucher(ledger, round, vouchers, expiry, events, v, now)
  local reserve = tonumber(v.reserve_fen)
  v.status = 'expired'
  redis.call('HSET', vouchers, v.voucher_id, cjson.encode(v))
  redis.call('ZREM', expiry, v.voucher_id)
  redis.call('HINCRBY', ledger, 'reserved', -reserve)
  redis.call('HINCRBY', ledger, 'available', reserve)
  redis.call('HINCRBY', round, 'reserved', -reserve)
  redis.call('XADD', events, '*', 't', 'expiry', 'd', cjson.encode({
    voucher_id = v.voucher_id, round_id = v.round_id, reserve_fen = reserve, expired_at = now}))
end

-- Issue voucher `rec` (a decoded record, status issued): the person's and the account's
-- hold, the record, its expiry and its claim event for the flusher. Returns its JSON.
local function write_voucher(persons, accounts, vouchers, expiry, events, rec)
  local json = cjson.encode(rec)
  redis.call('HSET', persons, rec.person_ref, rec.voucher_id)
  redis.call('HSET', accounts, rec.user_id, rec.voucher_id)
  redis.call('HSET', vouchers, rec.voucher_id, json)
  redis.call('ZADD', expiry, rec.expires_at, rec.voucher_id)
  redis.call('XADD', events, '*', 't', 'claim', 'd', json)
  return json
end
