-- Move a rebuilt campaign's staged keys in place, all at once, unless the campaign came
-- back while it was rebuilt (a campaign PUT meanwhile).
-- KEYS: n live keys, then their n staged keys in the same order
-- Returns 1 if moved, 0 if a live key exists (then nothing is moved).
local n = #KEYS / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then redis.call('RENAME', KEYS[n + i], KEYS[i]) end
end
return 1
