-- Record that merchants were reimbursed for redemptions (settlement): a later refund of
-- them becomes a clawback. Redemptions already paid or fully refunded are skipped.
-- KEYS: 1 redemptions, 2 events
-- ARGV: 1 batch id, then redemption ids
-- Returns the ids marked.
local marked = {}
local now = now_ms()
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local r = cjson.decode(raw)
    if not r.paid_to_merchant and r.status ~= 'refunded' then
      r.paid_to_merchant = true
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(r))
      redis.call('XADD', KEYS[2], '*', 't', 'merchant_paid', 'd', cjson.encode({
        redemption_id = ARGV[i], batch_id = ARGV[1], paid_ms = now}))
      marked[#marked + 1] = ARGV[i]
    end
  end
end
return marked
