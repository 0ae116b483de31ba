-- Raise a merchants' version, never lower it: a campaign's (the one its redemptions are
-- decided at) to one read since, or the merchants' own past a campaign's.
-- Returns {the version now}.
-- KEYS
local held = KEYS[1]  -- a campaign's merchants' version, or keys.MERCHANT_VERSION
-- ARGV
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', held) or '0')
if version <= current then return {current} end
redis.call('SET', held, version)
return {version}
