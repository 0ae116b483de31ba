-- Create or replace a merchant.
-- KEYS: 1 merchants hash, 2 global events
-- ARGV: 1 merchant id, 2 record JSON
-- Returns {code}: CREATED or REPLACED.
local existed = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0
redis.call('XADD', KEYS[2], '*', 't', 'merchant', 'd', ARGV[2])
if existed then return {'REPLACED'} end
return {'CREATED'}
