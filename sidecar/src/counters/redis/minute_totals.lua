-- Sums the requests admitted per customer over the minute-totals hashes of
-- one shard.
--
-- KEYS: minute-totals hashes of one shard. ARGV: customers.
-- Returns the admitted total, as a string, for each customer in order.
local totals = {}
for index, customer in ipairs(ARGV) do
  local total = 0
  for _, key in ipairs(KEYS) do
    total = total + tonumber(redis.call('HGET', key, customer) or '0')
  end
  totals[index] = string.format('%d', total)
end
return totals
