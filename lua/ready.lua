-- Readiness probe: proves Redis runs our scripts (and reloads them after a restart).
-- KEYS: 1 campaign registry
return redis.call('SCARD', KEYS[1])
