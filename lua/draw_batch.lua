-- Decide the next applications of a lottery round's draw, in rank order, atomically:
-- winners while quota, round budget and campaign money allow, then (from the first that
-- does not fit) not drawn. A batch applies only at the draw's cursor, so a draw resumed
-- after a crash, or run twice at once, decides every application once; an application
-- already decided is counted, not decided again.
-- KEYS: 1 ledger, 2 round, 3 persons, 4 accounts, 5 vouchers, 6 events, 7 expiry,
--       8 applications, 9 draw
-- ARGV: 1 seed, 2 root, 3 reserve_fen, 4 cursor this batch starts at, 5 count, 6 round_id,
--       then per application in rank order: application_id, voucher_id
-- Events: a winner's record ('application'), and the ids of the batch's applications not
-- drawn ('not_drawn', one event: a record each would cost the most of a batch)
-- Returns {code, cursor, winners, full (1: no more winners)}: OK (applied), MOVED (the
-- cursor was elsewhere: nothing done), MISMATCH (begun with another seed or root: nothing)
local seed, root, reserve = ARGV[1], ARGV[2], tonumber(ARGV[3])
local start, n, round_id = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local st = redis.call('HMGET', KEYS[9], 'cursor', 'seed', 'root', 'winners', 'full')
local cursor, winners = tonumber(st[1] or '0'), tonumber(st[4] or '0')
local was_full = st[5] == '1' and 1 or 0
if st[2] and (st[2] ~= seed or st[3] ~= root) then
  return {'MISMATCH', cursor, winners, was_full}
end
if cursor ~= start then return {'MOVED', cursor, winners, was_full} end
local available = tonumber(redis.call('HGET', KEYS[1], 'available'))
local rnd = redis.call('HMGET', KEYS[2], 'valid_until', 'quota', 'budget', 'issued',
  'reserved', 'spent', 'overdrawn')
local valid_until = tonumber(rnd[1])
local quota, rbudget = tonumber(rnd[2]), tonumber(rnd[3])
local issued, rreserved = tonumber(rnd[4]), tonumber(rnd[5])
local rspent = tonumber(rnd[6] or 0) - tonumber(rnd[7] or 0)
local full = st[5] == '1'
local now = now_ms()
local granted = 0
-- Records are compact JSON (cjson, msgspec): an outcome is read, and a not_drawn one
-- written, as text; only a winner's record is decoded.
local APPLIED, NOT_DRAWN, WON = '"status":"applied"', '"status":"not_drawn"', '"status":"won"'

local not_drawn = {}  -- recorded for the flusher in one event per batch

for i = 0, n - 1 do
  local aid, vid = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local raw = redis.call('HGET', KEYS[8], aid)
  local at, til = string.find(raw, APPLIED, 1, true)
  if at then
    local app = not full and cjson.decode(raw)
    if app and redis.call('HGET', KEYS[3], app.person_ref) == vid then
      -- its voucher was issued and recorded, its outcome not (rebuilt after a Redis loss)
      winners = winners + 1
    elseif app and (quota < 0 or issued < quota)
        and (rbudget < 0 or rreserved + rspent + reserve <= rbudget)
        and available >= reserve then
      local rec = {voucher_id = vid, campaign_id = app.campaign_id, round_id = app.round_id,
        user_id = app.user_id, person_ref = app.person_ref, status = 'issued',
        issued_at = now, expires_at = valid_until, reserve_fen = reserve,
        discount_rate_bp = app.discount_rate_bp, cap_fen = app.cap_fen,
        device_id = app.device_id, staff_id = app.staff_id}
      write_voucher(KEYS[3], KEYS[4], KEYS[5], KEYS[7], KEYS[6], rec)
      issued = issued + 1
      rreserved = rreserved + reserve
      available = available - reserve
      granted = granted + 1
    else
      full = true  -- winners are the lowest ranks: none after the first that does not fit
      app = nil
    end
    if app then
      app.status = 'won'
      app.voucher_id = vid
      local json = cjson.encode(app)
      redis.call('HSET', KEYS[8], aid, json)
      redis.call('XADD', KEYS[6], '*', 't', 'application', 'd', json)
    else
      redis.call('HSET', KEYS[8], aid, string.sub(raw, 1, at - 1) .. NOT_DRAWN .. string.sub(raw, til + 1))
      not_drawn[#not_drawn + 1] = aid
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
  redis.call('XADD', KEYS[6], '*', 't', 'not_drawn', 'd',
    cjson.encode({round_id = round_id, application_ids = not_drawn}))
end
redis.call('HSET', KEYS[9], 'cursor', start + n, 'seed', seed, 'root', root,
  'winners', winners, 'full', full and '1' or '0')
if granted > 0 then
  redis.call('HSET', KEYS[2], 'issued', issued, 'reserved', rreserved)
  redis.call('HINCRBY', KEYS[1], 'available', -granted * reserve)
  redis.call('HINCRBY', KEYS[1], 'reserved', granted * reserve)
end
return {'OK', start + n, winners, full and 1 or 0}
