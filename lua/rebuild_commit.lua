-- Move a rebuilt campaign's staged keys in place, all at once, unless the campaign came
-- back while it was rebuilt (a campaign PUT meanwhile); merge the staged idempotency
-- records into their buckets without replacing any record already there, and the staged
-- winners into the winners set.
-- KEYS: n live keys, their n staged keys in the same order, then m idempotency buckets
--       and their m staged keys, then the winners set and its staged set
-- ARGV: 1 n, 2 m, 3 idempotency ttl s (as the scripts set it on a new bucket or winners)
-- Returns 1 if done, 0 if a live key exists (then nothing is written).
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then redis.call('RENAME', KEYS[n + i], KEYS[i]) end
end
for j = 1, m do
  local bucket, staged = KEYS[2 * n + j], KEYS[2 * n + m + j]
  local fields = redis.call('HGETALL', staged)
  for k = 1, #fields, 2 do
    redis.call('HSETNX', bucket, fields[k], fields[k + 1])
  end
  if #fields > 0 then redis.call('EXPIRE', bucket, ARGV[3], 'NX') end
end
local winners, staged_winners = KEYS[2 * (n + m) + 1], KEYS[2 * (n + m) + 2]
local members = redis.call('SMEMBERS', staged_winners)
for _, member in ipairs(members) do redis.call('SADD', winners, member) end
if #members > 0 then redis.call('EXPIRE', winners, ARGV[3], 'NX') end
return 1
