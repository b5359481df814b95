--[[
  Heartbeat and fallback poll in one call: keep this replica's lines and waiters alive, serve
  their lists, report grants already made to its members (lost notifications) and the members the
  store no longer knows (dropped as dead while this replica was cut off: to be queued again).

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  number of lines n, then n lines ('<list id>:<queue>:<want>'), then members

  Returns reply() with body { member, token, index triples..., '--', unknown members... }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local n = tonumber(ARGV[8])
local lists, seen = {}, {}
for i = 9, 8 + n do
  local ln = ARGV[i]
  local l, q = string.match(ln, '^([^:]+):([^:]+):')
  -- kept alive (3 ttl) and in the status's index (3 ttl) when a ttl has run down since the last
  -- touch: one read a line, not five writes, on each sweep
  if redis.call('PTTL', P .. 'line:' .. ln) < 2 * TTL then
    touch_line(ln)
    if q then redis.call('ZADD', P .. 'queues', NOW, q) end
  end
  if l and not seen[l] then
    seen[l] = true
    -- (as an attempt does: a list in use lives a day, refreshed twice a day at most)
    if redis.call('PTTL', P .. 'list:' .. l) < 43200000 then
      for _, k in ipairs({ 'list:', 'lpos:', 'free:' }) do redis.call('PEXPIRE', P .. k .. l, 86400000) end
    end
    -- A list with an empty free index cannot be served now (what is in its way puts its entries
    -- back when it frees: see slots.lua), unless its next waiter has starved (its try takes holds).
    if redis.call('EXISTS', P .. 'free:' .. l) == 1 then
      lists[#lists + 1] = l
    else
      local first = redis.call('ZRANGE', P .. 'lines:' .. l, 0, 0, 'WITHSCORES')
      if #first > 0 and NOW - tonumber(first[2]) >= STARVE then lists[#lists + 1] = l end
    end
  end
end
serve_freed()
serve(lists)
-- models nobody has waited for lately leave the status's index
redis.call('ZREMRANGEBYSCORE', P .. 'queues', '-inf', NOW - 3 * TTL)
local body, unknown = {}, {}
for i = 9 + n, #ARGV do
  local m = ARGV[i]
  local wkey = P .. 'w:' .. m
  local w = redis.call('HMGET', wkey, 'token', 'index', 'line', 'queue')
  if w[1] then
    redis.call('DEL', wkey)
    body[#body + 1] = m
    body[#body + 1] = w[1]
    body[#body + 1] = tostring(w[2])
  elseif w[3] then
    redis.call('PEXPIRE', wkey, LINE_TTL)
    redis.call('ZADD', P .. 'qw:' .. w[4], 'XX', NOW + LINE_TTL, m)
    redis.call('PEXPIRE', P .. 'qw:' .. w[4], LINE_TTL)
    redis.call('PEXPIRE', P .. 'qa:' .. w[4], LINE_TTL)
    redis.call('ZADD', P .. 'allw', 'XX', NOW + LINE_TTL, m)
  else
    unknown[#unknown + 1] = m
  end
end
body[#body + 1] = '--'
for _, m in ipairs(unknown) do body[#body + 1] = m end
return reply(body)
