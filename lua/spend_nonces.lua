-- Spend the signature nonces of claims that were refused before reaching claim_batch.
-- Returns per nonce 1 (fresh, now spent) or 0 (seen before: a replay).
-- KEYS
local nonce_buckets_at = 1  -- from here: the nonce buckets, consecutive from first_nonce_bucket
-- ARGV
local nonce_ttl_s = ARGV[1]
local first_nonce_bucket = tonumber(ARGV[2])  -- the number of the first nonce bucket
local nonces_at = 3  -- from here, per nonce: its bucket's number, the nonce
local fresh = {}
for at = nonces_at, #ARGV, 2 do
  local nonce_bucket, nonce = unpack(ARGV, at, at + 1)
  local bucket = KEYS[nonce_buckets_at + tonumber(nonce_bucket) - first_nonce_bucket]
  fresh[#fresh + 1] = redis.call('HSETNX', bucket, nonce, 1)
end
for _, bucket in ipairs(KEYS) do redis.call('EXPIRE', bucket, nonce_ttl_s, 'NX') end
return fresh
