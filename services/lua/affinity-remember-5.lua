--[[
  Remembers which assignment served a request's prompt prefixes, for one model (CONTRACT 16.2):
  the model's affinity map, bounded (LRU by last write) and expiring. Cost: the fingerprints
  written (at most 8) plus at most as many entries trimmed, never a scan of the map.

  What each server holds warm, counted as it changes (the console's scheduling view reads the
  counters, never the map): an entry written as a request's whole prompt (its last fingerprint)
  is a conversation's leaf, marked `|L`; it stops being one when the next turn writes it as a
  prefix, moves to another server, or is trimmed. So per model, leaves per assignment = the
  conversations cached there (a conversation forked in two counts twice).

    Input:
      KEYS[1] '<prefix>aff:<model hex>'    hash fingerprint -> '<assignment>|<tokens>|<ms>[|L]'
      KEYS[2] '<prefix>affl:<model hex>'   zset fingerprint -> ms of its last write
      KEYS[3] '<prefix>affn:<model hex>'   hash assignment -> its leaves (conversations cached there)
      KEYS[4] '<prefix>affm'               zset model hex -> ms of its last write (the models to read)
      KEYS[5] '<prefix>affs'               hash '<assignment>|n' -> requests routed with a fingerprint,
                                           '<assignment>|h' -> those the map sent to it (hits)
      ARGV[1] now (ms)   ARGV[2] ttl (ms)   ARGV[3] entries kept at most per model
      ARGV[4] assignment id   ARGV[5] model hex   ARGV[6] '1' when the map had sent the request there
      ARGV[7..] fingerprint, tokens, fingerprint, tokens, ... (the whole prompt's last)

    Output:
      the number of entries trimmed
]]
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local a = ARGV[4]

-- An entry's value is replaced or removed: a leaf leaves its assignment's count.
local function unleaf (value)
  if not value then return end
  local was = string.match(value, '^([^|]*)|[^|]*|[^|]*|L$')
  if was and redis.call('HINCRBY', KEYS[3], was, -1) <= 0 then redis.call('HDEL', KEYS[3], was) end
end

local written = 0
local last = #ARGV - 1
for i = 7, #ARGV, 2 do
  unleaf(redis.call('HGET', KEYS[1], ARGV[i]))
  if i == last then
    redis.call('HSET', KEYS[1], ARGV[i], a .. '|' .. ARGV[i + 1] .. '|' .. ARGV[1] .. '|L')
    redis.call('HINCRBY', KEYS[3], a, 1)
  else
    redis.call('HSET', KEYS[1], ARGV[i], a .. '|' .. ARGV[i + 1] .. '|' .. ARGV[1])
  end
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
  unleaf(redis.call('HGET', KEYS[1], old[i]))
  redis.call('HDEL', KEYS[1], old[i])
  size = size - 1
  trimmed = trimmed + 1
end
redis.call('HINCRBY', KEYS[5], a .. '|n', 1)
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[5], a .. '|h', 1) end
-- the models written within a ttl (older ones leave as this runs: each once)
redis.call('ZADD', KEYS[4], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
-- the map, its order and its counts expire together with its last write
for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], ttl) end
return trimmed
