-- Create or replace a merchant.
-- Returns {code}: CREATED or REPLACED.
-- KEYS
local merchants = KEYS[1]  -- hash merchant id -> record JSON
local events = KEYS[2]  -- the global event stream
-- ARGV
local merchant_id = ARGV[1]
local merchant = ARGV[2]  -- its record JSON
local existed = redis.call('HSET', merchants, merchant_id, merchant) == 0
redis.call('XADD', events, '*', 't', 'merchant', 'd', merchant)
if existed then return {'REPLACED'} end
return {'CREATED'}
