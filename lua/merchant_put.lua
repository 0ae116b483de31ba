-- Create or replace a merchant; its tenant is fixed once it exists.
-- Returns {code, version}: CREATED or REPLACED, and the merchants' version it raised
-- (the caller raises every campaign's to it before answering); or {TENANT_CONFLICT} (the
-- merchant has another tenant).
-- KEYS
local merchants = KEYS[1]  -- hash merchant id -> record JSON
local events = KEYS[2]  -- the global event stream
local version = KEYS[3]  -- the merchants' version
-- ARGV
local merchant_id = ARGV[1]
local merchant = ARGV[2]  -- its record JSON
local tenant = ARGV[3]  -- its tenant
local old = redis.call('HGET', merchants, merchant_id)
if old and (cjson.decode(old).tenant or 'default') ~= tenant then
  return {'TENANT_CONFLICT'}
end
redis.call('HSET', merchants, merchant_id, merchant)
redis.call('XADD', events, '*', 't', 'merchant', 'd', merchant)
-- past the last one and at least the time in ms: a counter a failover set back never
-- gives a version a lost change had
local raised = math.max(tonumber(redis.call('GET', version) or '0') + 1, time_ms())
redis.call('SET', version, raised)
if old then return {'REPLACED', raised} end
return {'CREATED', raised}
