-- Create or replace a campaign that has not opened yet.
-- KEYS: 1 definition, 2 ledger, 3 events, then the keys of the old rounds (count ARGV[5]),
--       then the keys of the new rounds (count ARGV[6]); all in the campaign's slot (the
--       caller adds the campaign to the registry, in the global slot, before)
-- ARGV: 1 campaign id, 2 definition JSON, 3 budget fen, 4 expected version ("" if new),
--       5 old round count, 6 new round count, then per new round:
--       opens ms, closes ms, valid_until ms, quota (-1 none), budget fen (-1 none),
--       applications close ms (-1: a first-come round)
-- Returns {code, version}: OK, CAMPAIGN_RUNNING, CONFLICT (definition changed meanwhile).
local led = redis.call('HMGET', KEYS[2], 'version', 'opens', 'reserved', 'spent')
local now = now_ms()
if led[1] then
  if led[1] ~= ARGV[4] then return {'CONFLICT', led[1]} end
  if tonumber(led[2]) <= now or tonumber(led[3]) > 0 or tonumber(led[4]) > 0 then
    return {'CAMPAIGN_RUNNING', led[1]}
  end
elseif ARGV[4] ~= '' then
  return {'CONFLICT', '0'}
end
local old, new = tonumber(ARGV[5]), tonumber(ARGV[6])
for i = 1, old do redis.call('DEL', KEYS[3 + i]) end
local first_open = nil
for i = 1, new do
  local a = 7 + (i - 1) * 6
  redis.call('HSET', KEYS[3 + old + i], 'opens', ARGV[a], 'closes', ARGV[a + 1],
    'valid_until', ARGV[a + 2], 'quota', ARGV[a + 3], 'budget', ARGV[a + 4],
    'apps_close', ARGV[a + 5],
    'issued', 0, 'reserved', 0, 'spent', 0, 'overdrawn', 0)
  local o = tonumber(ARGV[a])
  if not first_open or o < first_open then first_open = o end
end
local version = (tonumber(led[1]) or 0) + 1
local budget = ARGV[3]
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'status', 'active', 'version', version, 'opens', first_open,
  'budget', budget, 'available', budget, 'reserved', 0, 'spent', 0, 'clawback_due', 0,
  'adjustments', 0)
redis.call('XADD', KEYS[3], '*', 't', 'campaign', 'd', ARGV[2], 'version', version)
return {'OK', tostring(version)}
