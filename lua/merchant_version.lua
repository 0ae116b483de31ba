-- Raise a campaign's merchants' version (the one its redemptions are decided at) to one
-- read from the merchants' counter since; never lower it.
-- Returns {the campaign's version now}.
-- KEYS
local held = KEYS[1]  -- the campaign's merchants' version
-- ARGV
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', held) or '0')
if version <= current then return {current} end
redis.call('SET', held, version)
return {version}
