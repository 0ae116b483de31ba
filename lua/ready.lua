-- Readiness probe: proves Redis runs our scripts (and reloads them after a restart).
-- Returns the number of campaigns.
-- KEYS
local campaigns = KEYS[1]  -- the campaign registry
return redis.call('SCARD', campaigns)
