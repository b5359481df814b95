--[[
  Remembers which assignment served a request's prompt prefixes, for one model (CONTRACT 16.2):
  the model's affinity map, bounded (LRU by last write) and expiring. Cost: the fingerprints
  written (at most 8) plus at most as many entries trimmed, never a scan of the map.

    Input:
      KEYS[1] '<prefix>aff:<model hex>'    hash fingerprint -> '<assignment>|<tokens>|<ms>'
      KEYS[2] '<prefix>affl:<model hex>'   zset fingerprint -> ms of its last write
      ARGV[1] now (ms)   ARGV[2] ttl (ms)   ARGV[3] entries kept at most per model
      ARGV[4] assignment id
      ARGV[5..] fingerprint, tokens, fingerprint, tokens, ...

    Output:
      the number of entries trimmed
]]
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local written = 0
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[4] .. '|' .. ARGV[i + 1] .. '|' .. ARGV[1])
  redis.call('ZADD', KEYS[2], now, ARGV[i])
  written = written + 1
end
-- Trim: expired entries and those past the cap, oldest first, at most twice what was written
-- (so the map shrinks back under its cap without any call scanning it).
local budget = written * 2 + 2
local trimmed = 0
local old = redis.call('ZRANGE', KEYS[2], 0, budget - 1, 'WITHSCORES')
local size = redis.call('ZCARD', KEYS[2])
for i = 1, #old, 2 do
  if size <= cap and tonumber(old[i + 1]) > now - ttl then break end
  redis.call('ZREM', KEYS[2], old[i])
  redis.call('HDEL', KEYS[1], old[i])
  size = size - 1
  trimmed = trimmed + 1
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return trimmed
