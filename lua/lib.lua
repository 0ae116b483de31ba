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

-- Writes gathered and sent by `w.flush()`: one command per key and kind with every field
-- (a batch's commands, and what the AOF and the replicas are sent per command, do not grow
-- with its size). Until then Redis does not have them: a script that reads a key it wrote
-- this way reads its own tables first. The events of one stream and type go in one entry
-- whose `d` is the JSON array of their documents, in order (issuer/events.py reads it).
-- `w.hset(key, field, value)` gathers one write. `w.args(cmd, key)` is the list of
-- arguments gathered for HSET, ZADD or SADD on `key`, `w.documents(stream, kind)` that of
-- the documents of `kind`'s events on `stream`: a script appends its most frequent writes
-- to them itself (a call less per write; a list left empty sends nothing).
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
  local hsets = by_cmd.HSET
  return {
    hset = function(key, field, value)
      local list = hsets[key] or start('HSET', hsets, key)
      local k = #list
      list[k + 1] = field
      list[k + 2] = value
    end,
    args = function(cmd, key)
      local by_key = by_cmd[cmd]
      return by_key[key] or start(cmd, by_key, key)
    end,
    documents = function(stream, kind)
      local by_stream = events[kind]
      if not by_stream then
        by_stream = {}
        events[kind] = by_stream
      end
      return by_stream[stream] or start('XADD', by_stream, stream, kind)
    end,
    flush = function()
      for _, o in ipairs(order) do
        local cmd, key, list, kind = o[1], o[2], o[3], o[4]
        if #list == 0 then  -- bound (w.args, w.documents) but left empty: nothing to send
        elseif cmd == 'XADD' then
          -- the brackets go on the first and last documents, not round a second copy of
          -- the whole array (Lua hashes every string it makes)
          list[1] = '[' .. list[1]
          list[#list] = list[#list] .. ']'
          redis.call('XADD', key, '*', 't', kind, 'd', table.concat(list, ','))
        else
          call_spread(cmd, key, list)
        end
      end
    end,
  }
end

-- Issuing vouchers, with writer `w` (gathered(); nil: each write at once): returns
-- write(id, person_ref, user_id, expires_at, json), which makes voucher `id`'s writes: the
-- person's and the account's hold, its record `json`, its expiry and its claim event for
-- the flusher. A gathered writer's lists are found here once, and each voucher appended to
-- them in place (a call per voucher, not one per write).
local function voucher_writer(w, persons, accounts, vouchers, expiry, events)
  if not w then
    return function(id, person_ref, user_id, expires_at, json)
      redis.call('HSET', persons, person_ref, id)
      redis.call('HSET', accounts, user_id, id)
      redis.call('HSET', vouchers, id, json)
      redis.call('ZADD', expiry, expires_at, id)
      redis.call('XADD', events, '*', 't', 'claim', 'd', json)
    end
  end
  local person_holds, account_holds = w.args('HSET', persons), w.args('HSET', accounts)
  local records, expiries = w.args('HSET', vouchers), w.args('ZADD', expiry)
  local claims = w.documents(events, 'claim')
  return function(id, person_ref, user_id, expires_at, json)
    local k = #person_holds
    person_holds[k + 1], person_holds[k + 2] = person_ref, id
    k = #account_holds
    account_holds[k + 1], account_holds[k + 2] = user_id, id
    k = #records
    records[k + 1], records[k + 2] = id, json
    k = #expiries
    expiries[k + 1], expiries[k + 2] = expires_at, id
    claims[#claims + 1] = json
  end
end
