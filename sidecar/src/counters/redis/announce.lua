-- Appends one erasure notice to the notice stream, trims the notices older
-- than the retention and sets the stream's TTL, in one step so the stream
-- never lacks its TTL.
--
-- KEYS[1]  notice stream
-- ARGV[1]  oldest entry id kept, in Unix milliseconds (trimmed approximately)
-- ARGV[2]  retention and TTL, in milliseconds
-- ARGV[3]  and after: the entry's fields and values, in pairs
--
-- Returns the new entry's id.
local id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
