-- Create or replace a merchant; its tenant is fixed once it exists.
-- KEYS: 1 merchants hash, 2 global events
-- ARGV: 1 merchant id, 2 record JSON, 3 its tenant
-- Returns {code}: CREATED, REPLACED or TENANT_CONFLICT (the merchant has another tenant).
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and (cjson.decode(old).tenant or 'default') ~= ARGV[3] then
  return {'TENANT_CONFLICT'}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 't', 'merchant', 'd', ARGV[2])
if old then return {'REPLACED'} end
return {'CREATED'}
