-- Appends one erasure notice to the notice stream, trims the notices older
-- than the retention and sets the stream's TTL, in one step so the stream
-- never lacks its TTL.
--
-- KEYS[1]  notice stream
-- ARGV[1]  oldest entry id kept, in Unix milliseconds (trimmed approximately)
-- ARGV[2]  retention and TTL, in milliseconds
-- ARGV[3]  the customer
-- ARGV[4]  the announcing sidecar's id
-- ARGV[5]  its erasure id
-- ARGV[6]  when the customer was erased, in Unix milliseconds
--
-- Returns the new entry's id.
local id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*',
    'customer', ARGV[3], 'sidecar', ARGV[4], 'erasure', ARGV[5], 'erased_at_ms', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
