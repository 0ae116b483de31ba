-- Move a rebuilt campaign's staged keys in place, all at once, unless the campaign came
-- back while it was rebuilt (a campaign PUT meanwhile); merge the staged idempotency
-- records into their buckets without replacing any record already there, and the staged
-- winners into the winners set.
-- Returns 1 if done, 0 if a live key exists (then nothing is written).
-- KEYS
local winners = KEYS[1]
local staged_winners = KEYS[2]
local live_at = 3  -- from here: the live keys, `moves` of them
-- ARGV
local idem_ttl_s = ARGV[1]  -- as the scripts set it on a new bucket or winners set
local moves = tonumber(ARGV[2])  -- how many live keys
-- the rest of KEYS: the live keys' staged keys, in the same order, then idempotency
-- buckets, then theirs
local staged_at = live_at + moves
local buckets_at = staged_at + moves
local merges = (#KEYS - buckets_at + 1) / 2
local staged_buckets_at = buckets_at + merges
for i = 0, moves - 1 do
  if redis.call('EXISTS', KEYS[live_at + i]) == 1 then return 0 end
end
for i = 0, moves - 1 do
  local staged = KEYS[staged_at + i]
  if redis.call('EXISTS', staged) == 1 then redis.call('RENAME', staged, KEYS[live_at + i]) end
end
for j = 0, merges - 1 do
  local bucket, staged = KEYS[buckets_at + j], KEYS[staged_buckets_at + j]
  local fields = redis.call('HGETALL', staged)
  for k = 1, #fields, 2 do
    redis.call('HSETNX', bucket, fields[k], fields[k + 1])
  end
  if #fields > 0 then redis.call('EXPIRE', bucket, idem_ttl_s, 'NX') end
end
local members = redis.call('SMEMBERS', staged_winners)
for _, member in ipairs(members) do redis.call('SADD', winners, member) end
if #members > 0 then redis.call('EXPIRE', winners, idem_ttl_s, 'NX') end
return 1
