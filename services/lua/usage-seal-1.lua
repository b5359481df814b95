--[[
  Seals every buffered hour of usage into batches of one roll-up, atomically: each hour's hash is
  renamed to a batch key (a record arriving after this starts a fresh hash for its hour), and the
  batch is listed as sealed until the roll-up has applied it to MariaDB and drops it.

    Input:
      KEYS[1] '<prefix>usage:hours'   zset hour ms -> hour ms: hours with a buffer (usage:h:<hour>)
      ARGV[1] the roll-up's id (unique per roll-up)

    Keys derived from the prefix (KEYS[1] without 'usage:hours'; one hash tag on a Cluster):
      usage:h:<hour>    hash: buffered counts of one hour (field: JSON [client, model, assignment, counter])
      usage:b:<batch>   hash: the same, sealed; batch = '<roll-up id>:<hour>'
      usage:sealed      set of batch ids not yet dropped
      usage:generation  counter, incremented when anything was sealed

    Output:
      the ids of the batches sealed now
]]
local P = string.sub(KEYS[1], 1, #KEYS[1] - #'usage:hours')
local sealed = {}
for _, hour in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local live = P .. 'usage:h:' .. hour
  if redis.call('EXISTS', live) == 1 then
    local id = ARGV[1] .. ':' .. hour
    redis.call('RENAME', live, P .. 'usage:b:' .. id)
    redis.call('PERSIST', P .. 'usage:b:' .. id)
    redis.call('SADD', P .. 'usage:sealed', id)
    sealed[#sealed + 1] = id
  end
end
redis.call('DEL', KEYS[1])
if #sealed > 0 then redis.call('INCR', P .. 'usage:generation') end
return sealed
