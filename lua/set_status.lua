-- Pause or resume a campaign.
-- KEYS: 1 ledger, 2 events, 3 idem current, 4 idem previous
-- ARGV: 1 idem field, 2 fingerprint, 3 idem ttl s, 4 new status (paused|active),
--       5 event JSON (who and why)
-- Returns {code, status, version}: OK, REPLAY, IDEMPOTENCY_MISMATCH, NOT_FOUND, CAMPAIGN_ENDED.
local led = redis.call('HMGET', KEYS[1], 'status', 'version')
if not led[1] then return {'NOT_FOUND', '', ''} end
local prior = idem_lookup(KEYS[3], KEYS[4], ARGV[1], ARGV[2])
if prior == false then return {'IDEMPOTENCY_MISMATCH', '', ''} end
-- a replay answers as the first call did: the status it set (the fingerprint covers it),
-- not the status now, which a later pause or resume may have changed
if prior then return {'REPLAY', ARGV[4], prior} end
if led[1] == 'ended' then return {'CAMPAIGN_ENDED', led[1], led[2]} end
local version = tonumber(led[2]) + 1
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'version', version)
idem_store(KEYS[3], ARGV[1], ARGV[2], tostring(version), tonumber(ARGV[3]))
redis.call('XADD', KEYS[2], '*', 't', 'status', 'd', ARGV[5], 'status', ARGV[4],
  'version', version)
return {'OK', ARGV[4], tostring(version)}
