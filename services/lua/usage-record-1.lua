--[[
  Adds the usage a replica recorded in one turn of its event loop (every request that ended in it),
  in one call: the hours' counts, the hours' listing and the key budgets' counters, atomically (a
  seal never runs between a count and its hour's listing).

    Input:
      KEYS[1] '<prefix>usage:hours'   zset hour ms -> hour ms: hours with a buffer (usage:h:<hour>)
      ARGV[1] retention, ms: without MariaDB buffered hours expire this long after they start (0: kept)
      ARGV[2] now, ms (hours older than the retention leave the listing)
      ARGV[3] H, the number of hours that follow; for each:
                hour ms, N, then N times: field, amount, 'f' (HINCRBYFLOAT) or 'i' (HINCRBY)
      then, to the end, budget counters, three values each:
                '<d|m>:<window>:<key name>', tokens, time to live ms

    Keys derived from the prefix (KEYS[1] without 'usage:hours'; one hash tag on a Cluster):
      usage:h:<hour>            hash: buffered counts of one hour (field: JSON [client, model, assignment, counter])
      usage:budget:<suffix>     a key's tokens in a UTC day or month

    Output:
      the number of fields incremented
]]
local P = string.sub(KEYS[1], 1, #KEYS[1] - #'usage:hours')
local retention = tonumber(ARGV[1])
local i = 4
local fields = 0
for _ = 1, tonumber(ARGV[3]) do
  local hour = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local key = P .. 'usage:h:' .. hour
  i = i + 2
  for _ = 1, n do
    if ARGV[i + 2] == 'f' then
      redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 1])
    else
      redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    end
    i = i + 3
    fields = fields + 1
  end
  redis.call('ZADD', KEYS[1], hour, hour)
  if retention > 0 then redis.call('PEXPIREAT', key, tonumber(hour) + retention) end
end
if retention > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[2]) - retention)) end
while i + 2 <= #ARGV do
  local key = P .. 'usage:budget:' .. ARGV[i]
  redis.call('INCRBY', key, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[i + 2])
  i = i + 3
end
return fields
