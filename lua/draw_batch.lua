-- Decide the next applications of a lottery round's draw, in rank order, atomically:
-- winners while quota, round budget and campaign money allow, then (from the first that
-- does not fit) not drawn. A batch applies only at the draw's cursor, so a draw resumed
-- after a crash, or run twice at once, decides every application once; an application
-- already decided is counted, not decided again.
-- Events: a winner's record ('application'), and the ids of the batch's applications not
-- drawn ('not_drawn', one event: a record each would cost the most of a batch)
-- Returns {code, cursor, winners, full (1: no more winners)}: OK (applied), MOVED (the
-- cursor was elsewhere: nothing done), MISMATCH (begun with another seed or root: nothing)
-- KEYS
local ledger = KEYS[1]
local round = KEYS[2]
local persons = KEYS[3]
local accounts = KEYS[4]
local vouchers = KEYS[5]
local events = KEYS[6]
local expiry = KEYS[7]
local applications = KEYS[8]
local draw = KEYS[9]  -- the draw's state: seed, root, cursor, winners, full
-- ARGV
local seed = ARGV[1]
local root = ARGV[2]
local reserve_fen = tonumber(ARGV[3])
local start = tonumber(ARGV[4])  -- the draw's cursor this batch starts at
local round_id = ARGV[5]
local picks_at = 6  -- from here, per application in rank order: its id, the voucher it wins
local n = (#ARGV - picks_at + 1) / 2
local st = redis.call('HMGET', draw, 'cursor', 'seed', 'root', 'winners', 'full')
local cursor, winners = tonumber(st[1] or '0'), tonumber(st[4] or '0')
local was_full = st[5] == '1' and 1 or 0
if st[2] and (st[2] ~= seed or st[3] ~= root) then
  return {'MISMATCH', cursor, winners, was_full}
end
if cursor ~= start then return {'MOVED', cursor, winners, was_full} end
local available = tonumber(redis.call('HGET', ledger, 'available'))
local rnd = redis.call('HMGET', round, 'valid_until', 'quota', 'budget', 'issued',
  'reserved', 'spent', 'overdrawn')
local valid_until = tonumber(rnd[1])
local quota, rbudget = tonumber(rnd[2]), tonumber(rnd[3])
local issued, rreserved = tonumber(rnd[4]), tonumber(rnd[5])
local rspent = tonumber(rnd[6] or 0) - tonumber(rnd[7] or 0)
local full = st[5] == '1'
local now = time_ms()
local granted = 0
-- Records are compact JSON (cjson, msgspec): an outcome is read, and a not_drawn one
-- written, as text; only a winner's record is decoded.
local APPLIED, NOT_DRAWN, WON = '"status":"applied"', '"status":"not_drawn"', '"status":"won"'

local not_drawn = {}  -- recorded for the flusher in one event per batch
local write_voucher = voucher_writer(nil, persons, accounts, vouchers, expiry, events)

for i = 0, n - 1 do
  local at = picks_at + 2 * i
  local application_id, voucher_id = unpack(ARGV, at, at + 1)
  local raw = redis.call('HGET', applications, application_id)
  local found, til = string.find(raw, APPLIED, 1, true)
  if found then
    local app = not full and cjson.decode(raw)
    if app and redis.call('HGET', persons, app.person_ref) == voucher_id then
      -- its voucher was issued and recorded, its outcome not (rebuilt after a Redis loss)
      winners = winners + 1
    elseif app and (quota < 0 or issued < quota)
        and (rbudget < 0 or rreserved + rspent + reserve_fen <= rbudget)
        and available >= reserve_fen then
      local rec = {voucher_id = voucher_id, campaign_id = app.campaign_id,
        round_id = app.round_id, user_id = app.user_id, person_ref = app.person_ref,
        status = 'issued', issued_at = now, expires_at = valid_until, reserve_fen = reserve_fen,
        discount_rate_bp = app.discount_rate_bp, cap_fen = app.cap_fen,
        device_id = app.device_id, staff_id = app.staff_id}
      write_voucher(voucher_id, app.person_ref, app.user_id, valid_until, cjson.encode(rec))
      issued = issued + 1
      rreserved = rreserved + reserve_fen
      available = available - reserve_fen
      granted = granted + 1
    else
      full = true  -- winners are the lowest ranks: none after the first that does not fit
      app = nil
    end
    if app then
      app.status = 'won'
      app.voucher_id = voucher_id
      local json = cjson.encode(app)
      redis.call('HSET', applications, application_id, json)
      redis.call('XADD', events, '*', 't', 'application', 'd', json)
    else
      local outcome = string.sub(raw, 1, found - 1) .. NOT_DRAWN .. string.sub(raw, til + 1)
      redis.call('HSET', applications, application_id, outcome)
      not_drawn[#not_drawn + 1] = application_id
    end
  elseif string.find(raw, WON, 1, true) then
    -- decided before this draw state began (rebuilt after a Redis loss): counted as it is
    -- passed, so that the totals hold however the draw got here
    winners = winners + 1
  else
    full = true
  end
end
winners = winners + granted
if #not_drawn > 0 then
  redis.call('XADD', events, '*', 't', 'not_drawn', 'd',
    cjson.encode({round_id = round_id, application_ids = not_drawn}))
end
redis.call('HSET', draw, 'cursor', start + n, 'seed', seed, 'root', root,
  'winners', winners, 'full', full and '1' or '0')
if granted > 0 then
  redis.call('HSET', round, 'issued', issued, 'reserved', rreserved)
  redis.call('HINCRBY', ledger, 'available', -granted * reserve_fen)
  redis.call('HINCRBY', ledger, 'reserved', granted * reserve_fen)
end
return {'OK', start + n, winners, full and 1 or 0}
