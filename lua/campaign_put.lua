-- Create or replace a campaign that has not opened yet (the caller adds it to the
-- registry, in the global slot, before).
-- Returns {code, version}: OK, CAMPAIGN_RUNNING, CONFLICT (definition changed meanwhile).
-- KEYS
local definition = KEYS[1]
local ledger = KEYS[2]
local events = KEYS[3]
local new_rounds_at = 4  -- from here: a key per round of the new definition, in its order
-- ARGV
local stored_campaign = ARGV[1]  -- the new definition (StoredCampaign JSON)
local budget_fen = ARGV[2]
local expected_version = ARGV[3]  -- the version it replaces ("" if new)
local rounds_at = 4  -- from here, per new round, its settings (issuer.protocol.RoundSettings)
local new_count = (#ARGV - rounds_at + 1) / 6
local old_rounds_at = new_rounds_at + new_count  -- KEYS from here: the old definition's rounds
local led = redis.call('HMGET', ledger, 'version', 'opens', 'reserved', 'spent')
local now = time_ms()
if led[1] then
  if led[1] ~= expected_version then return {'CONFLICT', led[1]} end
  if tonumber(led[2]) <= now or tonumber(led[3]) > 0 or tonumber(led[4]) > 0 then
    return {'CAMPAIGN_RUNNING', led[1]}
  end
elseif expected_version ~= '' then
  return {'CONFLICT', '0'}
end
for i = old_rounds_at, #KEYS do redis.call('DEL', KEYS[i]) end
local first_open = nil
for i = 0, new_count - 1 do
  local at = rounds_at + 6 * i
  local opens, closes, valid_until, quota, budget, apps_close = unpack(ARGV, at, at + 5)
  redis.call('HSET', KEYS[new_rounds_at + i], 'opens', opens, 'closes', closes,
    'valid_until', valid_until, 'quota', quota, 'budget', budget, 'apps_close', apps_close,
    'issued', 0, 'reserved', 0, 'spent', 0, 'overdrawn', 0)
  local o = tonumber(opens)
  if not first_open or o < first_open then first_open = o end
end
local version = (tonumber(led[1]) or 0) + 1
redis.call('SET', definition, stored_campaign)
redis.call('HSET', ledger, 'status', 'active', 'version', version, 'opens', first_open,
  'budget', budget_fen, 'available', budget_fen, 'reserved', 0, 'spent', 0, 'clawback_due', 0,
  'adjustments', 0)
redis.call('XADD', events, '*', 't', 'campaign', 'd', stored_campaign, 'version', version)
return {'OK', tostring(version)}
