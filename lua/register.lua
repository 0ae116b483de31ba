-- Register a person for a campaign (needed before a staff-mode claim).
-- KEYS: 1 ledger, 2 registrations, 3 events, 4 idem current, 5 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 person_ref, 5 record JSON
-- Returns {code, record JSON}: OK (new), EXISTING (person already registered), REPLAY,
-- IDEMPOTENCY_MISMATCH, NOT_FOUND.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND', ''} end
local prior = idem_lookup(KEYS[4], KEYS[5], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', ''} end
if prior then return {'REPLAY', redis.call('HGET', KEYS[2], prior)} end
local existing = redis.call('HGET', KEYS[2], ARGV[4])
if existing then return {'EXISTING', existing} end
local rec = cjson.decode(ARGV[5])
rec.registered_at = now_ms()
local json = cjson.encode(rec)
redis.call('HSET', KEYS[2], ARGV[4], json)
idem_store(KEYS[4], ARGV[1], ARGV[2], ARGV[4], tonumber(ARGV[3]))
redis.call('XADD', KEYS[3], '*', 't', 'registration', 'd', json)
return {'OK', json}
