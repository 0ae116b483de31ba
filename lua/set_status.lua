-- Pause or resume a campaign.
-- Returns {code, status, version}: OK, REPLAY, IDEMPOTENCY_MISMATCH, NOT_FOUND, CAMPAIGN_ENDED.
-- KEYS
local idem_current = KEYS[1]  -- the request's idempotency buckets (lib.lua)
local idem_previous = KEYS[2]
local ledger = KEYS[3]
local events = KEYS[4]
-- ARGV
local idem_field = ARGV[1]  -- the request: its idempotency field, body fingerprint, TTL
local fingerprint = ARGV[2]
local idem_ttl_s = tonumber(ARGV[3])
local status = ARGV[4]  -- the new status: paused or active
local event = ARGV[5]  -- JSON: who and why
local led = redis.call('HMGET', ledger, 'status', 'version')
if not led[1] then return {'NOT_FOUND', '', ''} end
local prior = idem_lookup(idem_current, idem_previous, idem_field, fingerprint)
if prior == false then return {'IDEMPOTENCY_MISMATCH', '', ''} end
-- a replay answers as the first call did: the status it set (the fingerprint covers it),
-- not the status now, which a later pause or resume may have changed
if prior then return {'REPLAY', status, prior} end
if led[1] == 'ended' then return {'CAMPAIGN_ENDED', led[1], led[2]} end
local version = tonumber(led[2]) + 1
redis.call('HSET', ledger, 'status', status, 'version', version)
idem_store(idem_current, idem_field, fingerprint, tostring(version), idem_ttl_s)
redis.call('XADD', events, '*', 't', 'status', 'd', event, 'status', status,
  'version', version)
return {'OK', status, tostring(version)}
