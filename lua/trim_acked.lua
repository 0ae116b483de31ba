-- Trim a stream below the oldest entry its consumer group still needs: the oldest pending
-- entry, or else the first one not yet delivered. Atomic, so that no other flusher can
-- deliver or leave pending an entry between reading the floor and trimming.
-- KEYS: 1 stream. ARGV: 1 group. Returns the number of entries trimmed.
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
local floor = summary[2]
if not floor then
  local last
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
  end
  if not last then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  floor = ms .. '-' .. (tonumber(seq) + 1)
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
