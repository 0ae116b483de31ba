-- Expire a batch of vouchers due at `now`; safe to run from every worker at once (a voucher
-- no longer issued is only dropped from the expiry index).
-- KEYS: 1 ledger, 2 vouchers, 3 expiry, 4 events, 5.. round keys
-- ARGV: 1 now ms, 2 count, then per voucher: voucher id, index of its round key (1-based)
-- Returns the number of vouchers expired.
local now = tonumber(ARGV[1])
local expired = 0
for i = 0, tonumber(ARGV[2]) - 1 do
  local vid = ARGV[3 + 2 * i]
  local raw = redis.call('HGET', KEYS[2], vid)
  local v = raw and cjson.decode(raw)
  if not v or v.status ~= 'issued' then
    redis.call('ZREM', KEYS[3], vid)
  elseif tonumber(v.expires_at) <= now then
    local round = KEYS[4 + tonumber(ARGV[4 + 2 * i])]
    expire_voucher(KEYS[1], round, KEYS[2], KEYS[3], KEYS[4], v, now)
    expired = expired + 1
  end
end
return expired
