--[[
  A reservation's hold on its client's limits (CONTRACT 18), kept under the lease's own token: it
  counts as a request in flight until it is released or, not pinged, expires with its lease (the
  same ttl); and it says whose the reservation is, so that only its holder may ping or release it.

    Input:
      KEYS[1] '<prefix>client:<hex id>:active'     zset token -> expiry ms
      KEYS[2] '<prefix>reservation:<hex token>'    the holder's client id (PX)

      ARGV[1] token (the lease's)
      ARGV[2] ttl ms
      ARGV[3] client id
      ARGV[4] 'hold' (a new reservation), 'renew' (a ping: only a hold of this client that still
              exists; one released meanwhile stays released) or 'release'

    Output:
      1 when done, 0 when renewing or releasing found no hold of this client
]]
local token, ttl, client, op = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if op ~= 'hold' and redis.call('GET', KEYS[2]) ~= client then return 0 end
if op == 'release' then
  redis.call('ZREM', KEYS[1], token)
  redis.call('DEL', KEYS[2])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + ttl, token)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], client, 'PX', ttl)
return 1
