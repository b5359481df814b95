--[[
  A client's request was granted its lease: it moves from waiting to active.

    Input:
      KEYS[1] '<prefix>client:<hex id>:active'   zset token -> expiry ms
      KEYS[2] '<prefix>client:<hex id>:waiting'  zset token -> expiry ms

      ARGV[1] token
      ARGV[2] ttl ms

    Output:
      1 when the token was waiting, 0 when it was not (released or expired meanwhile: not re-added)
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
