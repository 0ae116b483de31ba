-- Trim a stream below the oldest entry its consumer group still needs: the oldest pending
-- entry, or else the first one not yet delivered. Atomic, so that no other flusher can
-- deliver or leave pending an entry between reading the floor and trimming.
-- Returns the number of entries trimmed.
-- KEYS
local stream = KEYS[1]
-- ARGV
local group = ARGV[1]  -- the consumer group
local summary = redis.call('XPENDING', stream, group)
local floor = summary[2]
if not floor then
  local last
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then last = info['last-delivered-id'] end
  end
  if not last then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  floor = ms .. '-' .. (tonumber(seq) + 1)
end
return redis.call('XTRIM', stream, 'MINID', floor)
