--[[
  Admit one request of a client against its limits. When every limit allows it, the request is
  recorded as waiting (for a GPU) and counted in the client's one-minute window.

  Expired tokens (their replica stopped renewing them) are dropped first, so a crashed replica
  never holds a client's slots for longer than one ttl.

    Input:
      KEYS[1] '<prefix>client:<hex id>:active'   zset token -> expiry ms: requests holding a lease
      KEYS[2] '<prefix>client:<hex id>:waiting'  zset token -> expiry ms: requests waiting for one
      KEYS[3] '<prefix>client:<hex id>:window'   zset token -> arrival ms: admitted in the last minute

      ARGV[1] token, unique per request
      ARGV[2] ttl ms: how long a token lives unless renewed
      ARGV[3] maxConcurrent: requests in flight (waiting + active) at once, 0 for no limit
      ARGV[4] maxQueued: requests waiting at once, 0 for no limit
      ARGV[5] rpm: requests admitted per sliding minute, 0 for no limit

    Output:
      {0}                          admitted
      {1, limit, retryAfterMs}     refused; limit is 'rpm', 'maxConcurrent' or 'maxQueued'
]]
local token = ARGV[1]
local ttl = tonumber(ARGV[2])
local maxConcurrent = tonumber(ARGV[3])
local maxQueued = tonumber(ARGV[4])
local rpm = tonumber(ARGV[5])
local WINDOW = 60000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - WINDOW)

if rpm > 0 then
  local count = redis.call('ZCARD', KEYS[3])
  if count >= rpm then
    -- the request that must leave the window before one more fits (several if the limit was lowered)
    local entry = redis.call('ZRANGE', KEYS[3], count - rpm, count - rpm, 'WITHSCORES')
    return {1, 'rpm', math.max(1, tonumber(entry[2]) + WINDOW - now)}
  end
end

local waiting = redis.call('ZCARD', KEYS[2])
if maxConcurrent > 0 and redis.call('ZCARD', KEYS[1]) + waiting >= maxConcurrent then
  return {1, 'maxConcurrent', 1000}
end
if maxQueued > 0 and waiting >= maxQueued then
  return {1, 'maxQueued', 1000}
end

redis.call('ZADD', KEYS[2], now + ttl, token)
redis.call('PEXPIRE', KEYS[2], ttl)
if rpm > 0 then
  redis.call('ZADD', KEYS[3], now, token)
  redis.call('PEXPIRE', KEYS[3], WINDOW)
end
return {0}
