-- Removes every count of one customer from one shard.
--
-- KEYS[1]  window hash (a:<customer>, r:<customer>)
-- KEYS[2]  bucket hash (a:<bucket>:<customer>, r:<bucket>:<customer>)
-- KEYS[3]  expiry sorted set (<bucket>:<customer>)
-- KEYS[4..] minute totals hashes (field <customer>)
-- ARGV[1]  the customer
--
-- Returns the number of fields and entries removed.
local customer = ARGV[1]
local suffix = ':' .. customer
local removed = redis.call('HDEL', KEYS[1], 'a:' .. customer, 'r:' .. customer)
for _, entry in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if #entry > #suffix and string.sub(entry, -#suffix) == suffix then
        local bucket = string.sub(entry, 1, #entry - #suffix)
        -- A bucket is an integer, so a customer whose id ends in
        -- ':<this customer>' is never mistaken for this one.
        if string.match(bucket, '^%-?%d+$') then
            removed = removed + redis.call('HDEL', KEYS[2], 'a:' .. entry, 'r:' .. entry)
            removed = removed + redis.call('ZREM', KEYS[3], entry)
        end
    end
end
for index = 4, #KEYS do
    removed = removed + redis.call('HDEL', KEYS[index], customer)
end
return removed
