-- Spend the signature nonces of claims that were refused before reaching claim_batch.
-- Returns per nonce 1 (fresh, now spent) or 0 (seen before: a replay).
-- KEYS
local nonce_buckets_at = 1  -- from here: the nonce buckets, consecutive from first_nonce_bucket
-- ARGV
local nonce_ttl_s = ARGV[1]
local nonce_bucket_s = tonumber(ARGV[2])  -- keys.NONCE_BUCKET_S
local first_nonce_bucket = tonumber(ARGV[3])  -- the number of the first nonce bucket
-- per nonce, its X-Timestamp and the nonce, all in one flat JSON list decoded once (as
-- separate arguments, each cost the worker its own packing); each nonce's bucket found
-- here as keys.nonce_bucket finds it (in the worker, a Python step per nonce)
local nonces = cjson.decode(ARGV[4])
local fresh = {}
for at = 1, #nonces, 2 do
  local timestamp_s, nonce = unpack(nonces, at, at + 1)
  local nonce_bucket = math.floor(timestamp_s / nonce_bucket_s)
  local bucket = KEYS[nonce_buckets_at + nonce_bucket - first_nonce_bucket]
  fresh[#fresh + 1] = redis.call('HSETNX', bucket, nonce, 1)
end
for _, bucket in ipairs(KEYS) do redis.call('EXPIRE', bucket, nonce_ttl_s, 'NX') end
return fresh
