-- Spend the signature nonces of claims that were refused before reaching claim_batch.
-- KEYS: nonce buckets of one campaign. ARGV: 1 bucket ttl s, then per nonce: bucket index,
-- nonce. Returns per nonce 1 (fresh, now spent) or 0 (seen before: a replay).
local fresh = {}
for i = 2, #ARGV, 2 do
  fresh[#fresh + 1] = redis.call('HSETNX', KEYS[tonumber(ARGV[i])], ARGV[i + 1], 1)
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[1], 'NX') end
return fresh
