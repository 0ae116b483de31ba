-- Shared helpers, prepended to every script by issuer/scripts.py. Each script then binds
-- its KEYS and ARGV to named locals at its top, in the order of its structure in
-- issuer/protocol.py (tests/test_protocol.py checks that they agree).
-- Idempotency records are hash fields "<key id>|<request_id>" -> "<fingerprint>\n<result>",
-- kept in two time buckets (current and previous) that expire as a whole.

-- what record `rec` (or false/nil: none) answers a request with `fingerprint`: nil if there
-- is none, false if it was made by another body, else its result
local function idem_result(rec, fingerprint)
  if not rec then return nil end
  local nl = string.find(rec, '\n', 1, true)
  if string.sub(rec, 1, nl - 1) ~= fingerprint then return false end
  return string.sub(rec, nl + 1)
end

local function idem_lookup(cur, prev, field, fingerprint)
  local rec = redis.call('HGET', cur, field)
  if not rec then rec = redis.call('HGET', prev, field) end
  return idem_result(rec, fingerprint)
end

-- the record of a request with `fingerprint` that was answered `result`
local function idem_record(fingerprint, result)
  return fingerprint .. '\n' .. result
end

-- without the bucket's expiry: for a script that stores many and sets it once
local function idem_put(cur, field, fingerprint, result)
  redis.call('HSET', cur, field, idem_record(fingerprint, result))
end

local function idem_store(cur, field, fingerprint, result, ttl)
  idem_put(cur, field, fingerprint, result)
  redis.call('EXPIRE', cur, ttl, 'NX')
end

-- Redis's clock, in ms
local function time_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Expire an issued voucher `v` (decoded record) at `now`: its reservation returns to the
-- campaign's `available` and to its round; the person's chance stays used.
local function expire_voucher(ledger, round, vouchers, expiry, events, v, now)
  local reserve = tonumber(v.reserve_fen)
  v.status = 'expired'
  redis.call('HSET', vouchers, v.voucher_id, cjson.encode(v))
  redis.call('ZREM', expiry, v.voucher_id)
  redis.call('HINCRBY', ledger, 'reserved', -reserve)
  redis.call('HINCRBY', ledger, 'available', reserve)
  redis.call('HINCRBY', round, 'reserved', -reserve)
  redis.call('XADD', events, '*', 't', 'expiry', 'd', cjson.encode({
    voucher_id = v.voucher_id, round_id = v.round_id, reserve_fen = reserve, expired_at = now}))
end

-- Lua's C stack bounds unpack(): a command with more arguments goes in several calls
local CHUNK = 1000

-- redis.call(cmd, key, ...args) (or args[first..last]), spread over calls of at most
-- CHUNK (even, so that field/value pairs stay together); returns the replies' elements in
-- order (for HMGET), the reply itself when one call takes them all
local function call_spread(cmd, key, args, first, last)
  first, last = first or 1, last or #args
  if last - first < CHUNK then return redis.call(cmd, key, unpack(args, first, last)) end
  local out = {}
  for i = first, last, CHUNK do
    local reply = redis.call(cmd, key, unpack(args, i, math.min(i + CHUNK - 1, last)))
    if type(reply) == 'table' then
      for j = 1, #reply do out[#out + 1] = reply[j] end
    end
  end
  return out
end

-- Writes made at once, one command each (`w.hset(key, field, value)`, `w.zadd(key, score,
-- member)`, `w.sadd(key, member)`, `w.event(stream, type, json)`: an entry per event).
local immediately = {
  hset = function(key, field, value) redis.call('HSET', key, field, value) end,
  zadd = function(key, score, member) redis.call('ZADD', key, score, member) end,
  sadd = function(key, member) redis.call('SADD', key, member) end,
  event = function(stream, kind, json) redis.call('XADD', stream, '*', 't', kind, 'd', json) end,
}

-- Writes gathered and sent by `w.flush()`: one command per key and kind with every field
-- (a batch's commands, and what the AOF and the replicas are sent per command, do not grow
-- with its size). Until then Redis does not have them: a script that reads a key it wrote
-- this way reads its own tables first. The events of one stream and type go in one entry
-- whose `d` is the JSON array of their documents, in order (issuer/events.py reads it).
-- `w.args(cmd, key)` is the list of arguments gathered for HSET, ZADD or SADD on `key`: a
-- script appends its most frequent writes to it itself (a call less per write; a list
-- left empty sends nothing).
local function gathered()
  local order = {}
  local by_cmd = {HSET = {}, ZADD = {}, SADD = {}}  -- cmd -> key -> its arguments
  local events = {}  -- event type -> stream -> its documents
  -- each write finds its list here and appends to it itself (a call less per write)
  local function start(cmd, by_key, key, kind)
    local list = {}
    by_key[key] = list
    order[#order + 1] = {cmd, key, list, kind}
    return list
  end
  -- a write of one pair (HSET's field and value, ZADD's score and member) to `cmd`'s key
  local function pair_writer(cmd)
    local by_key = by_cmd[cmd]
    return function(key, a, b)
      local list = by_key[key] or start(cmd, by_key, key)
      local k = #list
      list[k + 1] = a
      list[k + 2] = b
    end
  end
  local sadds = by_cmd.SADD
  return {
    hset = pair_writer('HSET'),
    zadd = pair_writer('ZADD'),
    sadd = function(key, member)
      local list = sadds[key] or start('SADD', sadds, key)
      list[#list + 1] = member
    end,
    args = function(cmd, key)
      local by_key = by_cmd[cmd]
      return by_key[key] or start(cmd, by_key, key)
    end,
    event = function(stream, kind, json)
      local by_stream = events[kind]
      if not by_stream then
        by_stream = {}
        events[kind] = by_stream
      end
      local list = by_stream[stream] or start('XADD', by_stream, stream, kind)
      list[#list + 1] = json
    end,
    flush = function()
      for _, o in ipairs(order) do
        local cmd, key, list, kind = o[1], o[2], o[3], o[4]
        if cmd == 'XADD' then
          -- the brackets go on the first and last documents, not round a second copy of
          -- the whole array (Lua hashes every string it makes)
          list[1] = '[' .. list[1]
          list[#list] = list[#list] .. ']'
          redis.call('XADD', key, '*', 't', kind, 'd', table.concat(list, ','))
        elseif #list > 0 then
          call_spread(cmd, key, list)
        end
      end
    end,
  }
end

-- Issue voucher `v` (voucher_id, person_ref, user_id, expires_at) whose record is `json`,
-- with writer `w`: the person's and the account's hold, the record, its expiry and its
-- claim event for the flusher.
local function write_voucher(w, persons, accounts, vouchers, expiry, events, v, json)
  local id = v.voucher_id
  w.hset(persons, v.person_ref, id)
  w.hset(accounts, v.user_id, id)
  w.hset(vouchers, id, json)
  w.zadd(expiry, v.expires_at, id)
  w.event(events, 'claim', json)
end
