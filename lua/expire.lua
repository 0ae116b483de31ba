-- Expire a batch of vouchers due at `now_ms`; safe to run from every worker at once (a
-- voucher no longer issued is only dropped from the expiry index).
-- Returns the number of vouchers expired.
-- KEYS
local ledger = KEYS[1]
local vouchers = KEYS[2]
local expiry = KEYS[3]
local events = KEYS[4]
local rounds_at = 5  -- from here: the vouchers' rounds
-- ARGV
local now_ms = tonumber(ARGV[1])  -- the caller's clock
local due_at = 2  -- from here, per voucher: its id, its round's place in the rounds (0: first)
local expired = 0
for at = due_at, #ARGV, 2 do
  local voucher_id, round_index = unpack(ARGV, at, at + 1)
  local raw = redis.call('HGET', vouchers, voucher_id)
  local v = raw and cjson.decode(raw)
  if not v or v.status ~= 'issued' then
    redis.call('ZREM', expiry, voucher_id)
  elseif tonumber(v.expires_at) <= now_ms then
    local round = KEYS[rounds_at + tonumber(round_index)]
    expire_voucher(ledger, round, vouchers, expiry, events, v, now_ms)
    expired = expired + 1
  end
end
return expired
