--[[
  Renew the tokens of one client's requests still in flight on this replica. Only tokens still
  present are renewed (ZADD XX): a renewal crossing a release must not bring the token back.

    Input:
      KEYS[1] '<prefix>client:<hex id>:active'   zset token -> expiry ms
      KEYS[2] '<prefix>client:<hex id>:waiting'  zset token -> expiry ms

      ARGV[1] ttl ms
      ARGV[2...] tokens

    Output:
      the number of tokens renewed
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  -- CH: count an updated score as a change
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
    + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return renewed
