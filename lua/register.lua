-- Register a person for a campaign (needed before a staff-mode claim).
-- Returns {code, record JSON}: OK (new), EXISTING (person already registered), REPLAY,
-- IDEMPOTENCY_MISMATCH, NOT_FOUND.
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local registrations = KEYS[4]
local events = KEYS[5]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local person_ref = ARGV[4]
local registration = ARGV[5]  -- its record JSON (without registered_at)
if redis.call('EXISTS', ledger) == 0 then return {'NOT_FOUND', ''} end
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', registrations, prior)} end
local existing = redis.call('HGET', registrations, person_ref)
if existing then return {'EXISTING', existing} end
local rec = cjson.decode(registration)
rec.registered_at = time_ms()
local json = cjson.encode(rec)
redis.call('HSET', registrations, person_ref, json)
idem_store(idem_current, idem_field, fingerprint, person_ref, idem_ttl_s)
redis.call('XADD', events, '*', 't', 'registration', 'd', json)
return {'OK', json}
