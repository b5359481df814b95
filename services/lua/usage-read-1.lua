--[[
  Everything buffered and not yet in MariaDB, read at one instant (a report adds it to MariaDB's
  rows; the generation tells it whether a seal happened while it read MariaDB).

    Input:
      KEYS[1] '<prefix>usage:hours'   zset hour ms -> hour ms (see usage-seal-1.lua for the layout)
      ARGV[1] first hour (ms), ARGV[2] end (ms, exclusive)

    Output:
      { generation, { hour, { field, value, ... }, ... }, { batch id, { field, value, ... }, ... } }
      live hours in [ARGV[1], ARGV[2]); every sealed batch (the caller keeps those of its hours)
]]
local P = string.sub(KEYS[1], 1, #KEYS[1] - #'usage:hours')
local live = {}
for _, hour in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '(' .. ARGV[2])) do
  live[#live + 1] = hour
  live[#live + 1] = redis.call('HGETALL', P .. 'usage:h:' .. hour)
end
local batches = {}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'usage:sealed')) do
  batches[#batches + 1] = id
  batches[#batches + 1] = redis.call('HGETALL', P .. 'usage:b:' .. id)
end
return { tonumber(redis.call('GET', P .. 'usage:generation') or '0'), live, batches }
