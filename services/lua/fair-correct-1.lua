--[[
  Corrects a client's charge in a line's fair order once its answer has ended (CONTRACT 16.4): the
  request was charged its estimated tokens at admission (attempt-1.lua, includes/queue.lua's
  fair_tag); the server has now counted them. One key, two fields: constant cost.

    Input:
      KEYS[1] '<prefix>vt:<line>'   hash v -> the line's clock, c<client> -> the client's counter
      ARGV[1] 'c<client>'           ARGV[2] tokens counted − tokens charged (may be negative)

    Output:
      1 when corrected, 0 when the line's fair state is gone (idle past its ttl: it started over,
      and the client's counter with it)
]]
local counter = redis.call('HGET', KEYS[1], ARGV[1])
if not counter then return 0 end
-- never below zero (a counter under the clock is raised to it at the next admission anyway)
local corrected = math.max(0, tonumber(counter) + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', corrected))
return 1
