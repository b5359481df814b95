--[[
  A client's request has ended: its token leaves both sets (whichever holds it). Its entry in the
  one-minute window stays: it was a request of that minute.

    Input:
      KEYS[1] '<prefix>client:<hex id>:active'   zset token -> expiry ms
      KEYS[2] '<prefix>client:<hex id>:waiting'  zset token -> expiry ms

      ARGV[1] token

    Output:
      the number of entries removed (0 or 1)
]]
return redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
