--[[
  Corrects clients' charges in the lines' fair order once their answers have ended (CONTRACT
  16.4): each request was charged its estimated tokens at admission (attempt-1.lua,
  includes/queue.lua's fair_tag); the servers have now counted them. The store sums the
  corrections of one client in one line and sends those of a short while together: constant
  cost per correction, at most 64 per call.

    Input:
      KEYS[1] '<prefix>vt:'   the lines' fair state is at KEYS[1] .. line (a hash: v -> the line's
                              clock, c<client> -> the client's counter), under the same prefix
                              (and Cluster hash tag) as KEYS[1]
      ARGV    line, 'c<client>', tokens counted − tokens charged (may be negative), ... (repeated)

    Output:
      how many counters were corrected (a line's fair state gone idle past its ttl started over,
      its clients' counters with it: nothing to correct there)
]]
local corrected = 0
for i = 1, #ARGV - 2, 3 do
  local key = KEYS[1] .. ARGV[i]
  local counter = redis.call('HGET', key, ARGV[i + 1])
  if counter then
    -- never below zero (a counter under the clock is raised to it at the next admission anyway)
    redis.call('HSET', key, ARGV[i + 1], string.format('%.0f', math.max(0, tonumber(counter) + tonumber(ARGV[i + 2]))))
    corrected = corrected + 1
  end
end
return corrected
