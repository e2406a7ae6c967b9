-- Applies one sidecar's contributions to one shard and returns the window
-- totals of the requested customers of that shard, atomically.
--
-- KEYS[1] window sums, KEYS[2] counts per bucket, KEYS[3] expiry index,
-- KEYS[4] highest id of the calling sidecar applied to this shard,
-- KEYS[5..] minute totals.
--
-- ARGV[1] now (Unix seconds), ARGV[2] window length.
-- ARGV[3], ARGV[4] and ARGV[5] are the TTLs of the window state, the applied
-- id and the minute totals. Lengths and TTLs are in seconds.
-- ARGV[6] is the number of contributions. Six values per contribution
-- follow: id, customer, bucket start, admitted, requests, and the index of
-- its minute-totals key in KEYS. The requested customers come last.
--
-- Returns admitted and requests in the window, as strings, for each
-- requested customer in order.
local window_sums, buckets, expiry, applied = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cutoff = tonumber(ARGV[1]) - tonumber(ARGV[2])
local state_ttl, applied_ttl, totals_ttl = ARGV[3], ARGV[4], ARGV[5]
local count = tonumber(ARGV[6])
local first_customer = 7 + 6 * count

-- Ids are non-negative decimal integers of at most 19 digits without
-- leading zeros. Doubles hold only 15 digits exactly, and string order
-- follows the server's locale, so ids of equal length are compared as a
-- head and a 9-digit tail, both exact.
local function id_above(id, highest)
  if not highest then return true end
  if #id ~= #highest then return #id > #highest end
  local split = #id - 9
  local head = tonumber(string.sub(id, 1, split)) or 0
  local highest_head = tonumber(string.sub(highest, 1, split)) or 0
  if head ~= highest_head then return head > highest_head end
  return tonumber(string.sub(id, split + 1)) > tonumber(string.sub(highest, split + 1))
end

local function add_to_window(field, delta)
  if redis.call('HINCRBY', window_sums, field, delta) <= 0 then
    redis.call('HDEL', window_sums, field)
  end
end

-- Remove the buckets at or before the cutoff from the window sums.
local leaving = redis.call('ZRANGEBYSCORE', expiry, '-inf', cutoff)
for _, entry in ipairs(leaving) do
  local customer = string.sub(entry, string.find(entry, ':', 1, true) + 1)
  local counts = redis.call('HMGET', buckets, 'a:' .. entry, 'r:' .. entry)
  -- Bucket counts are positive integers, so '-' .. count is their negation.
  if counts[1] then add_to_window('a:' .. customer, '-' .. counts[1]) end
  if counts[2] then add_to_window('r:' .. customer, '-' .. counts[2]) end
  redis.call('HDEL', buckets, 'a:' .. entry, 'r:' .. entry)
end
if #leaving > 0 then
  redis.call('ZREMRANGEBYSCORE', expiry, '-inf', cutoff)
end

-- Apply the contributions above this sidecar's highest applied id.
local last_applied = redis.call('GET', applied) or nil
local highest = last_applied
for index = 7, first_customer - 1, 6 do
  local id = ARGV[index]
  if id_above(id, highest) then
    highest = id
    local customer = ARGV[index + 1]
    local bucket = ARGV[index + 2]
    local admitted, requests = ARGV[index + 3], ARGV[index + 4]
    local minute_totals = KEYS[tonumber(ARGV[index + 5])]
    if admitted ~= '0' then
      redis.call('HINCRBY', minute_totals, customer, admitted)
      redis.call('EXPIRE', minute_totals, totals_ttl)
    end
    if tonumber(bucket) > cutoff and (admitted ~= '0' or requests ~= '0') then
      local entry = bucket .. ':' .. customer
      if admitted ~= '0' then
        redis.call('HINCRBY', buckets, 'a:' .. entry, admitted)
        redis.call('HINCRBY', window_sums, 'a:' .. customer, admitted)
      end
      if requests ~= '0' then
        redis.call('HINCRBY', buckets, 'r:' .. entry, requests)
        redis.call('HINCRBY', window_sums, 'r:' .. customer, requests)
      end
      redis.call('ZADD', expiry, bucket, entry)
    end
  end
end
if highest ~= last_applied then
  redis.call('SET', applied, highest)
end

-- Every call renews the TTLs, so idle state expires as a whole.
redis.call('EXPIRE', window_sums, state_ttl)
redis.call('EXPIRE', buckets, state_ttl)
redis.call('EXPIRE', expiry, state_ttl)
redis.call('EXPIRE', applied, applied_ttl)

local totals = {}
for index = first_customer, #ARGV do
  local customer = ARGV[index]
  local sums = redis.call('HMGET', window_sums, 'a:' .. customer, 'r:' .. customer)
  totals[#totals + 1] = sums[1] or '0'
  totals[#totals + 1] = sums[2] or '0'
end
return totals
