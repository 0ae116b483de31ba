-- Record that merchants were reimbursed for redemptions (settlement): a later refund of
-- them becomes a clawback. Redemptions already paid or fully refunded are skipped.
-- Returns the ids marked.
-- KEYS
local redemptions = KEYS[1]
local events = KEYS[2]
-- ARGV
local batch_id = ARGV[1]  -- the settlement batch that paid them
local redemption_ids_at = 2  -- from here: the redemption ids
local marked = {}
local now = time_ms()
for i = redemption_ids_at, #ARGV do
  local redemption_id = ARGV[i]
  local raw = redis.call('HGET', redemptions, redemption_id)
  if raw then
    local r = cjson.decode(raw)
    if not r.paid_to_merchant and r.status ~= 'refunded' then
      r.paid_to_merchant = true
      redis.call('HSET', redemptions, redemption_id, cjson.encode(r))
      redis.call('XADD', events, '*', 't', 'merchant_paid', 'd', cjson.encode({
        redemption_id = redemption_id, batch_id = batch_id, paid_ms = now}))
      marked[#marked + 1] = redemption_id
    end
  end
end
return marked
